"""Light classifiers trained on frozen embeddings, behind one interface, with pickle-free save/load.

    head = make_head("logreg", class_weight="balanced").fit(X, y, eval_set=[(X_val, y_val)])
    head.save(run_dir / "head")
    probabilities = load_head(run_dir / "head").predict_proba(X_test)[:, 1]
"""

import importlib
from pathlib import Path
from typing import Any

from medembed.errors import MedembedError
from medembed.scorers.heads.base import HEAD_FILE, Head, HeadLoadError, read_head_document

__all__ = ["Head", "HeadLoadError", "head_class", "load_head", "make_head"]

# name -> (module, class), imported on first use: a logreg run's options are checked without importing torch.
# Only these constants are ever imported; a name read from a run or a command line is a key of this table.
_HEADS: dict[str, tuple[str, str]] = {
    "logreg": ("medembed.scorers.heads.logreg", "LogisticRegressionHead"),
    "mlp": ("medembed.scorers.heads.mlp", "MLPHead"),
    "xgboost": ("medembed.scorers.heads.xgb", "XGBoostHead"),
    "sklearn": ("medembed.scorers.heads.sklearn_adapter", "SklearnHead"),
    "attention": ("medembed.scorers.heads.tokens", "AttentionTokenHead"),
    "concat": ("medembed.scorers.heads.tokens", "ConcatTokenHead"),
    "adapter": ("medembed.scorers.heads.adapter", "AdapterHead"),
}
SKLEARN_PREFIX = "sklearn:"  # as medembed.scorers.heads.sklearn_adapter.PREFIX (checked by tests/heads/test_heads_common.py)
# The names users choose from (medembed.scorers.options.HEAD_NAMES, TOKEN_HEADS) are checked against this registry by
# tests/heads/test_heads_common.py; the registry itself never imports the options.
_KNOWN = ", ".join(name for name in _HEADS if name != "sklearn")


def head_class(name: str) -> type[Head]:
    """The head class registered under `name` (a key of the registry; KeyError otherwise)."""
    module, attribute = _HEADS[name]
    return getattr(importlib.import_module(module), attribute)


def make_head(name: str, **params: Any) -> Head:
    """An unfitted head by name ("logreg" | "mlp" | "xgboost" | "sklearn:MODULE.CLASS") with its hyperparameters.

    For a scikit-learn classifier, parameters the adapter does not take itself are the estimator's own."""
    if name.startswith(SKLEARN_PREFIX):
        sklearn_head = head_class("sklearn")
        own = set(sklearn_head.param_names()) - {"estimator", "estimator_params"}
        mine = {k: v for k, v in params.items() if k in own}
        theirs = {k: v for k, v in params.items() if k not in own}
        return sklearn_head(estimator=name.removeprefix(SKLEARN_PREFIX), estimator_params=theirs or None, **mine)
    if name not in _HEADS or name == "sklearn":
        raise MedembedError(f"unknown head {name!r}; choose one of {_KNOWN} or sklearn:MODULE.CLASS")
    chosen = head_class(name)
    unknown = sorted(set(params) - set(chosen.param_names()))
    if unknown:
        raise MedembedError(
            f"unknown parameter(s) {', '.join(unknown)} for head {name!r}; "
            f"it accepts {', '.join(chosen.param_names())}"
        )
    return chosen(**params)


def load_head(directory: Path) -> Head:
    """The fitted head saved in `directory` (its head.json names which kind); HeadLoadError if unreadable."""
    document = read_head_document(Path(directory))
    if document["head"] not in _HEADS:
        raise HeadLoadError(f"{Path(directory) / HEAD_FILE}: unknown head {document['head']!r}; medembed knows {_KNOWN}")
    return head_class(document["head"]).from_document(Path(directory), document)

"""Light classifiers trained on frozen embeddings, behind one interface, with pickle-free save/load.

    head = make_head("logreg", class_weight="balanced").fit(X, y, eval_set=[(X_val, y_val)])
    head.save(run_dir / "head")
    probabilities = load_head(run_dir / "head").predict_proba(X_test)[:, 1]
"""

from pathlib import Path
from typing import Any

from medembed.errors import MedembedError
from medembed.scorers.heads.adapter import AdapterHead
from medembed.scorers.heads.base import HEAD_FILE, Head, HeadLoadError, read_head_document
from medembed.scorers.heads.logreg import LogisticRegressionHead
from medembed.scorers.heads.mlp import MLPHead
from medembed.scorers.heads.sklearn_adapter import PREFIX as SKLEARN_PREFIX
from medembed.scorers.heads.sklearn_adapter import SklearnHead
from medembed.scorers.heads.tokens import AttentionTokenHead, ConcatTokenHead
from medembed.scorers.heads.xgb import XGBoostHead

__all__ = ["Head", "HeadLoadError", "load_head", "make_head"]

_HEADS: dict[str, type[Head]] = {
    head.name: head
    for head in (LogisticRegressionHead, MLPHead, XGBoostHead, SklearnHead, AttentionTokenHead, ConcatTokenHead, AdapterHead)
}
# The names users choose from (medembed.scorers.options.HEAD_NAMES, TOKEN_HEADS) are checked against this registry by
# tests/heads/test_heads_common.py; the registry itself never imports the options.
_KNOWN = ", ".join(name for name in _HEADS if name != SklearnHead.name)


def make_head(name: str, **params: Any) -> Head:
    """An unfitted head by name ("logreg" | "mlp" | "xgboost" | "sklearn:MODULE.CLASS") with its hyperparameters.

    For a scikit-learn classifier, parameters the adapter does not take itself are the estimator's own."""
    if name.startswith(SKLEARN_PREFIX):
        own = set(SklearnHead.param_names()) - {"estimator", "estimator_params"}
        mine = {k: v for k, v in params.items() if k in own}
        theirs = {k: v for k, v in params.items() if k not in own}
        return SklearnHead(estimator=name.removeprefix(SKLEARN_PREFIX), estimator_params=theirs or None, **mine)
    if name not in _HEADS or name == SklearnHead.name:
        raise MedembedError(f"unknown head {name!r}; choose one of {_KNOWN} or sklearn:MODULE.CLASS")
    head_class = _HEADS[name]
    unknown = sorted(set(params) - set(head_class.param_names()))
    if unknown:
        raise MedembedError(
            f"unknown parameter(s) {', '.join(unknown)} for head {name!r}; "
            f"it accepts {', '.join(head_class.param_names())}"
        )
    return head_class(**params)


def load_head(directory: Path) -> Head:
    """The fitted head saved in `directory` (its head.json names which kind); HeadLoadError if unreadable."""
    document = read_head_document(Path(directory))
    head_class = _HEADS.get(document["head"])
    if head_class is None:
        raise HeadLoadError(f"{Path(directory) / HEAD_FILE}: unknown head {document['head']!r}; medembed knows {_KNOWN}")
    return head_class.from_document(Path(directory), document)

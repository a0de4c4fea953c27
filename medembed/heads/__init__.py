"""Light classifiers trained on frozen embeddings, behind one interface, with pickle-free save/load.

    head = make_head("logreg", class_weight="balanced").fit(X, y, X_val, y_val)
    head.save(run_dir / "head")
    probabilities = load_head(run_dir / "head").predict_proba(X_test)[:, 1]
"""

from pathlib import Path
from typing import Any

from medembed.errors import MedembedError
from medembed.heads.adapter import AdapterHead
from medembed.heads.base import HEAD_FILE, Head, HeadLoadError, read_head_document
from medembed.heads.logreg import LogisticRegressionHead
from medembed.heads.mlp import MLPHead
from medembed.heads.sklearn_adapter import PREFIX as SKLEARN_PREFIX
from medembed.heads.sklearn_adapter import SklearnHead
from medembed.heads.tokens import AttentionTokenHead, ConcatTokenHead
from medembed.heads.xgb import XGBoostHead

__all__ = ["HEAD_NAMES", "TOKEN_HEADS", "Head", "HeadLoadError", "load_head", "make_head"]

_HEADS: dict[str, type[Head]] = {
    head.name: head
    for head in (LogisticRegressionHead, MLPHead, XGBoostHead, SklearnHead, AttentionTokenHead, ConcatTokenHead, AdapterHead)
}
HEAD_NAMES: tuple[str, ...] = ("logreg", "mlp", "xgboost")  # the built-in heads on [N, D]; plus sklearn:MODULE.CLASS
TOKEN_HEADS: tuple[str, ...] = ("attention", "concat", "adapter")  # the heads on a token level [N, T, C] (fit --level)


def make_head(name: str, **params: Any) -> Head:
    """An unfitted head by name ("logreg" | "mlp" | "xgboost" | "sklearn:MODULE.CLASS") with its hyperparameters.

    For a scikit-learn classifier, parameters the adapter does not take itself are the estimator's own."""
    if name.startswith(SKLEARN_PREFIX):
        own = set(SklearnHead.param_names()) - {"estimator", "estimator_params"}
        mine = {k: v for k, v in params.items() if k in own}
        theirs = {k: v for k, v in params.items() if k not in own}
        return SklearnHead(estimator=name.removeprefix(SKLEARN_PREFIX), estimator_params=theirs or None, **mine)
    if name not in _HEADS or name == SklearnHead.name:
        raise MedembedError(f"unknown head {name!r}; choose one of {', '.join(HEAD_NAMES + TOKEN_HEADS)} or sklearn:MODULE.CLASS")
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
        known = ", ".join(HEAD_NAMES + TOKEN_HEADS)
        raise HeadLoadError(f"{Path(directory) / HEAD_FILE}: unknown head {document['head']!r}; medembed knows {known}")
    return head_class.from_document(Path(directory), document)

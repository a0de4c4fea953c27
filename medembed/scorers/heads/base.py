"""The interface every head shares, and the head.json file that describes a saved head.

A head is a light binary classifier on frozen embeddings and a scorer (`medembed.scorers.contract`), following
scikit-learn's estimator contract: hyperparameters are keyword constructor arguments stored unmodified (so
`get_params`, `set_params` and `sklearn.base.clone` work), learned state ends in ``_``, ``fit`` returns self.
``fit`` takes the validation split as ``eval_set`` because every choice a head makes (C, epochs, trees) is made
there, and ``selection_`` records that choice; without one, a stratified eighth of the training rows is held out.

A saved head is a directory: ``head.json`` (name, format version, params, selection, small state) plus the
head's own weight file when it has one. Nothing is ever pickled, so loading a foreign file runs no code.
"""

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split

from medembed.errors import MedembedError
from medembed.scorers.heads._checks import check_bool, check_choice, check_embeddings, check_int, check_labels
from medembed.scorers.heads._features import l2_normalize_rows
from medembed.scorers.heads._json import HeadLoadError, read_json, require, write_json

__all__ = ["FORMAT_VERSION", "HEAD_FILE", "Head", "HeadLoadError", "read_head_document", "selection_record", "stopped_while_improving"]

FORMAT_VERSION = 1
HEAD_FILE = "head.json"
MAX_FEATURES = 1 << 24  # embedding widths are thousands; a token level's T * C tens of thousands
_DOCUMENT_KEYS = {"head", "format_version", "n_features", "params", "selection", "state"}


def selection_record(
    searched: str, values: list[float], val_auroc: list[float], best: int, **extra: list[float]
) -> dict[str, Any]:
    """What a validation search tried and chose: `values[best]` of `searched`, with the val AUROC curve."""
    return {
        "searched": searched,
        "values": values,
        "val_auroc": val_auroc,
        "chosen": values[best],
        "best_val_auroc": val_auroc[best],
        **extra,
    }


def stopped_while_improving(head: Any) -> bool:
    """Whether a head trained in epochs ran all its `max_epochs` and chose the last one: its val AUROC was still
    rising when training was cut, so more epochs may fit better."""
    selection = getattr(head, "selection_", None) or {}
    epochs = selection.get("values") or []
    return selection.get("searched") == "epochs" and len(epochs) == getattr(head, "max_epochs", None) and selection.get("chosen") == epochs[-1]


EvalSet = Sequence[tuple[np.ndarray, np.ndarray]] | tuple[np.ndarray, np.ndarray]
HELD_OUT_FRACTION = 0.125  # of the training rows, when fit is given no eval_set


class Head(ClassifierMixin, BaseEstimator, abc.ABC):
    """A binary classifier on `[N, D]` embeddings; column 1 of `predict_proba` is P(abnormal)."""

    name: ClassVar[str]
    kind: ClassVar[str] = "head"
    consumes: ClassVar[str] = "embeddings"
    columns_used: ClassVar[tuple[str, ...]] = ()
    n_features_in_: int
    selection_: dict[str, Any]

    def __init__(self, *, class_weight: str | None = None, l2_normalize: bool = False, seed: int = 0) -> None:
        """Options every head shares. `class_weight="balanced"` reweighs the loss so both classes count equally;
        `l2_normalize` scales every embedding row to unit norm first; `seed` makes fits reproducible."""
        check_choice("class_weight", class_weight, (None, "balanced"))
        self.class_weight = class_weight
        check_bool("l2_normalize", l2_normalize)
        self.l2_normalize = l2_normalize
        check_int("seed", seed, minimum=0)
        self.seed = seed

    # -- the public interface -----------------------------------------------------------------------------

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """Names of the constructor arguments, i.e. the head's hyperparameters."""
        return tuple(cls._get_param_names())

    def fit(self, X: np.ndarray, y: np.ndarray, *, eval_set: EvalSet | None = None) -> "Head":
        """Train on `X` `[N, D]` float16/float32 with `y` `[N]` in {0, 1}; choose hyperparameters on
        `eval_set=[(X_val, y_val)]` (the first pair), or on a held-out stratified eighth of `X` without one."""
        type(self)(**self.get_params())  # re-validates what set_params may have changed
        if eval_set is None:
            X, X_val, y, y_val = self._held_out(X, y)
        else:
            X_val, y_val = _first_pair(eval_set)
        X = self._features(X, "X")
        X_val = self._features(X_val, "X_val")
        if X_val.shape[1] != X.shape[1]:
            raise MedembedError(f"X_val has {X_val.shape[1]} features but X has {X.shape[1]}")
        y = check_labels(y, X.shape[0], "y")
        y_val = check_labels(y_val, X_val.shape[0], "y_val")
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        self.selection_ = self._fit(X, y, X_val, y_val)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """`[N]` 0/1 decisions at probability 0.5 (medembed's protocol chooses its thresholds on val instead)."""
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(np.int64)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Return `[N, 2]` float64 class probabilities for `X` `[N, D]`; column 1 is P(abnormal)."""
        self._require_fitted()
        X = self._features(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise MedembedError(
                f"X has {X.shape[1]} features but the {self.name} head was fitted on {self.n_features_in_}"
            )
        positive = self._positive_proba(X)
        return np.column_stack([1.0 - positive, positive])

    def save(self, directory: Path) -> None:
        """Write the fitted head to `directory` (created if needed); head.json is written last, as the commit."""
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / HEAD_FILE).unlink(missing_ok=True)  # an older head.json must never describe the new weights
        state = self._save_state(directory)
        document = {
            "head": self.name,
            "format_version": FORMAT_VERSION,
            "n_features": self.n_features_in_,
            "params": self.get_params(),
            "selection": self.selection_,
            "state": state,
        }
        write_json(directory / HEAD_FILE, document)

    @classmethod
    def load(cls, directory: Path) -> "Head":
        """Read a head saved by `save`; anything missing, tampered or foreign raises HeadLoadError."""
        directory = Path(directory)
        return cls.from_document(directory, read_head_document(directory))

    @classmethod
    def from_document(cls, directory: Path, document: dict[str, Any]) -> "Head":
        """Build the head described by an already validated head.json `document` saved in `directory`."""
        path = directory / HEAD_FILE
        if document["head"] != cls.name:
            raise HeadLoadError(f"{path}: holds a {document['head']!r} head, not {cls.name!r}")
        params = document["params"]
        if set(params) != set(cls.param_names()):
            raise HeadLoadError(
                f"{path}: params {sorted(params)} do not match the {cls.name} head's {sorted(cls.param_names())}"
            )
        try:
            # JSON has no tuples: sequence hyperparameters (hidden, c_grid) come back as the tuples they were.
            head = cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in params.items()})
        except (MedembedError, TypeError, ValueError) as error:  # TypeError: e.g. a list where a number belongs
            raise HeadLoadError(f"{path}: {error}") from None
        head.n_features_in_ = document["n_features"]
        head.classes_ = np.array([0, 1])
        head.selection_ = document["selection"]
        head._load_state(directory, document["state"])
        return head

    # -- what each head implements ------------------------------------------------------------------------

    @abc.abstractmethod
    def _fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
        """Fit on validated `[N, D] float32` features and int64 labels; return the `selection_record`."""

    @abc.abstractmethod
    def _positive_proba(self, X: np.ndarray) -> np.ndarray:
        """Return P(abnormal) `[N]` float64 for validated `[N, D] float32` features."""

    @abc.abstractmethod
    def _save_state(self, directory: Path) -> dict[str, Any]:
        """Write the head's weight files into `directory`; return the JSON-able state kept in head.json."""

    @abc.abstractmethod
    def _load_state(self, directory: Path, state: dict[str, Any]) -> None:
        """Restore learned state from head.json's `state` and the weight files; raise HeadLoadError on mismatch."""

    # -- shared helpers -----------------------------------------------------------------------------------

    def _held_out(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """Train/val parts of `X`, `y` for a fit without eval_set: stratified, seeded."""
        labels = check_labels(y, np.shape(X)[0], "y")
        try:
            return tuple(train_test_split(X, labels, test_size=HELD_OUT_FRACTION, stratify=labels, random_state=self.seed))
        except ValueError as error:
            raise MedembedError(f"cannot hold out a validation eighth of the training rows ({error}); pass eval_set") from None

    def _features(self, X: np.ndarray, what: str) -> np.ndarray:
        """Validated `[N, D] float32` features, L2-normalised per row when the head asks for it."""
        features = check_embeddings(X, what)
        return l2_normalize_rows(features) if self.l2_normalize else features

    def _positive_class_weight(self, y: np.ndarray) -> float:
        """Weight of an abnormal example relative to a normal one: n_normal / n_abnormal when balanced, else 1."""
        if self.class_weight != "balanced":
            return 1.0
        n_positive = int(y.sum())
        return (y.size - n_positive) / n_positive

    def _require_fitted(self) -> None:
        if not hasattr(self, "selection_"):
            raise MedembedError(f"this {self.name} head is not fitted yet; call fit() or load_head() first")


def _first_pair(eval_set: EvalSet) -> tuple[np.ndarray, np.ndarray]:
    """(X_val, y_val) from `eval_set` given as one pair or a list of pairs (the first is used)."""
    if isinstance(eval_set, tuple) and len(eval_set) == 2 and not isinstance(eval_set[0], tuple):
        return eval_set
    pairs = list(eval_set)
    if not pairs or not (isinstance(pairs[0], (tuple, list)) and len(pairs[0]) == 2):
        raise MedembedError("eval_set must be [(X_val, y_val)]")
    return pairs[0][0], pairs[0][1]


def read_head_document(directory: Path) -> dict[str, Any]:
    """Parse and type-check `directory`/head.json; the head-specific `state` is checked by the head itself."""
    path = Path(directory) / HEAD_FILE
    if not Path(directory).is_dir():
        raise HeadLoadError(f"{directory}: not a directory holding a saved head")
    document = read_json(path)
    if not isinstance(document, dict):
        raise HeadLoadError(f"{path}: expected a JSON object, got {type(document).__name__}")
    unknown = set(document) - _DOCUMENT_KEYS
    if unknown:
        raise HeadLoadError(f"{path}: unexpected keys {sorted(unknown)}")
    require(document, "head", str, path)
    version = require(document, "format_version", int, path)
    if version != FORMAT_VERSION:
        raise HeadLoadError(f"{path}: format_version {version} is not supported (this medembed reads {FORMAT_VERSION})")
    if not 1 <= require(document, "n_features", int, path) <= MAX_FEATURES:
        raise HeadLoadError(f"{path}: n_features must be an integer in [1, {MAX_FEATURES}]")
    require(document, "params", dict, path)
    require(document, "selection", dict, path)
    require(document, "state", dict, path)
    return document

"""Any scikit-learn classifier as a head: `--head sklearn:sklearn.svm.SVC -p C=0.5`.

The estimator is named by its import path and built from JSON-able keyword parameters, so a run records it
exactly. Saving needs no pickle: the fitted attributes (those ending in ``_``) are numbers, strings, lists or
numeric arrays for most estimators (linear models, LDA/QDA, naive Bayes, SVMs' support vectors); arrays go to
safetensors, the rest to head.json. An estimator whose state holds other objects (trees, nested estimators)
cannot be saved that way and is refused at save time with a clear error. A name is looked up in scikit-learn's own
registry of classifiers (`all_estimators`), never imported: a tampered head.json naming another module (one with
top-level effects, say) is refused before anything of it runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import roc_auc_score

from medembed.errors import MedembedError
from medembed.scorers.heads._checks import check_bool
from medembed.scorers.heads._features import Standardizer
from medembed.scorers.heads._json import HeadLoadError, checked_standardizer, require
from medembed.scorers.heads._weights import load_finite, tensor_header
from medembed.scorers.heads.base import HEAD_FILE, Head, selection_record

PREFIX = "sklearn:"
ARRAYS_FILE = "estimator.safetensors"
_SCALARS = (bool, int, float, str, type(None))


@functools.cache
def _classifiers() -> dict[str, type]:
    """scikit-learn's public classifiers by class name (its own registry; imports only sklearn's modules)."""
    from sklearn.utils import all_estimators

    return dict(all_estimators(type_filter="classifier"))


def estimator_class(path: str) -> type:
    """The classifier class named `path` ("sklearn.svm.SVC"), found in scikit-learn's registry of classifiers;
    MedembedError for anything else. Nothing is imported by the name given: the module part must be a
    `sklearn.` package that the registered class lives in."""
    module_name, _, class_name = str(path).rpartition(".")
    if not module_name or not class_name:
        raise MedembedError(f"sklearn head: {path!r} is not an import path like sklearn.svm.SVC")
    candidate = _classifiers().get(class_name) if module_name.split(".")[0] == "sklearn" else None
    if candidate is None or not (candidate.__module__ + ".").startswith(module_name + "."):
        raise MedembedError(
            f"sklearn head: {path!r} is not a scikit-learn classifier (a name like sklearn.svm.SVC; "
            "scikit-learn's classifiers are listed by sklearn.utils.all_estimators(type_filter='classifier'))"
        )
    if not (isinstance(candidate, type) and issubclass(candidate, BaseEstimator) and issubclass(candidate, ClassifierMixin)):
        raise MedembedError(f"sklearn head: {path!r} is not a scikit-learn classifier")
    return candidate


class SklearnHead(Head):
    """A scikit-learn classifier on (optionally standardised) embeddings; no search on val, which is only reported."""

    name = "sklearn"

    def __init__(
        self,
        *,
        estimator: str = "sklearn.linear_model.LogisticRegression",
        estimator_params: dict[str, Any] | None = None,
        standardize: bool = True,
        class_weight: str | None = None,
        l2_normalize: bool = False,
        seed: int = 0,
    ) -> None:
        """`estimator`: import path of the classifier; `estimator_params`: its keyword arguments (JSON-able);
        `standardize`: per-feature standardisation on train first (what most sklearn models expect)."""
        super().__init__(class_weight=class_weight, l2_normalize=l2_normalize, seed=seed)
        model = estimator_class(estimator)
        check_bool("standardize", standardize)
        if estimator_params is not None and not isinstance(estimator_params, dict):
            raise MedembedError(f"head parameter 'estimator_params' must be an object, got {estimator_params!r}")
        try:
            model(**self._model_params(model, estimator_params or {}))
        except TypeError as error:
            raise MedembedError(f"sklearn head {estimator}: {error}") from None
        self.estimator = estimator
        self.estimator_params = estimator_params
        self.standardize = standardize

    def _model_params(self, model: type, params: dict[str, Any]) -> dict[str, Any]:
        accepted = model._get_param_names()
        shared = {"random_state": self.seed, "class_weight": self.class_weight}
        return {k: v for k, v in shared.items() if k in accepted and (k != "class_weight" or v is not None)} | params

    def _build(self) -> Any:
        model = estimator_class(self.estimator)
        return model(**self._model_params(model, self.estimator_params or {}))

    def _fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
        self.standardizer_ = Standardizer.fit(X) if self.standardize else None
        try:
            self.model_ = self._build().fit(self._scaled(X), y)
        except (ValueError, TypeError) as error:
            raise MedembedError(f"sklearn head {self.estimator}: fit failed ({error})") from None
        val_auroc = float(roc_auc_score(y_val, self._positive_proba(X_val)))
        return selection_record("nothing (fitted as given)", [0], [val_auroc], 0, estimator=self.estimator)

    def _scaled(self, X: np.ndarray) -> np.ndarray:
        return self.standardizer_.transform(X) if self.standardizer_ is not None else X

    def _positive_proba(self, X: np.ndarray) -> np.ndarray:
        X = self._scaled(X)
        column = list(self.model_.classes_).index(1)
        if hasattr(self.model_, "predict_proba"):
            return self.model_.predict_proba(X)[:, column].astype(np.float64)
        # Margin-only classifiers (LinearSVC, RidgeClassifier): the logistic of the margin; calibration on val fixes the scale.
        margin = np.asarray(self.model_.decision_function(X), dtype=np.float64)
        return expit(margin if column == 1 else -margin)

    def _save_state(self, directory: Path) -> dict[str, Any]:
        arrays, values = {}, {}
        for key, value in vars(self.model_).items():
            if not key.endswith("_") or key.startswith("_"):
                continue
            if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                arrays[key] = np.ascontiguousarray(value)
            elif isinstance(value, _SCALARS + (np.integer, np.floating)):
                values[key] = value.item() if isinstance(value, (np.integer, np.floating)) else value
            elif isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
                values[key] = list(value)
            else:
                raise MedembedError(
                    f"sklearn head {self.estimator}: its fitted attribute {key!r} ({type(value).__name__}) "
                    "cannot be saved without pickle; choose a model whose state is arrays and numbers"
                )
        if self.standardizer_ is not None:
            arrays[_STANDARDIZER[0]], arrays[_STANDARDIZER[1]] = self.standardizer_.mean, self.standardizer_.std
        save_file(arrays, str(directory / ARRAYS_FILE))
        return {"attributes": values, "arrays": sorted(arrays)}

    def _load_state(self, directory: Path, state: dict[str, Any]) -> None:
        head_json, path = directory / HEAD_FILE, directory / ARRAYS_FILE
        n_features = self.n_features_in_
        attributes = require(state, "attributes", dict, head_json)
        check_attribute_values(attributes, n_features, head_json)
        check_array_shapes(tensor_header(path), n_features, self.standardize, path)
        arrays = load_finite(path, framework="numpy")  # the header fits: what it allocates is what the file holds
        mean, std = arrays.pop(_STANDARDIZER[0], None), arrays.pop(_STANDARDIZER[1], None)
        self.standardizer_ = checked_standardizer(mean, std, n_features, path, _STANDARDIZER) if self.standardize else None
        model = self._build()
        for key, value in {**attributes, **arrays}.items():
            set_fitted(model, key, value, path)
        if list(np.asarray(getattr(model, "classes_", [])).tolist()) != [0, 1]:
            raise HeadLoadError(f"{path}: the saved estimator's classes are not [0, 1]")
        self.model_ = model
        self._check_scores_a_row(path)

    def _check_scores_a_row(self, path: Path) -> None:
        """Score one row of zeros: saved state the estimator cannot use (inconsistent shapes or types of its
        attributes) is refused at load time, naming the file, instead of failing later in scikit-learn."""
        try:
            with np.errstate(all="ignore"):
                p = self._positive_proba(np.zeros((1, self.n_features_in_), dtype=np.float32))
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
            raise HeadLoadError(f"{path}: the saved {self.estimator} cannot score with this state ({str(error).splitlines()[0][:200]})") from None
        if p.shape != (1,) or not np.isfinite(p).all():
            raise HeadLoadError(f"{path}: the saved {self.estimator} gives no finite probability with this state")


_STANDARDIZER = ("_standardizer_mean", "_standardizer_std")
_ARRAY_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64")
MAX_ROWS = 1 << 20  # an array dimension other than n_features (support vectors, iterations) is at most this
# Attributes whose shape a binary classifier on n_features inputs fixes (others, e.g. support vectors, vary).
_FIXED_SHAPES: dict[str, Callable[[int], tuple[tuple[int, ...], ...]]] = {
    "coef_": lambda n: ((1, n), (n,)),
    "intercept_": lambda n: ((1,), ()),
    "classes_": lambda n: ((2,),),
    "n_features_in_": lambda n: ((),),
}


def check_attribute_values(attributes: dict[str, Any], n_features: int, path: Path) -> None:
    """head.json's fitted attributes: numbers, strings, null or flat lists of them, as `_save_state` writes;
    `n_features_in_` must be head.json's n_features."""
    for key, value in attributes.items():
        flat = value if isinstance(value, list) else [value]
        if not all(isinstance(v, _SCALARS) for v in flat):
            raise HeadLoadError(f"{path}: state.attributes.{key} must be a number, string, null or a flat list of them")
    if "n_features_in_" in attributes:
        value = attributes["n_features_in_"]
        if isinstance(value, bool) or not isinstance(value, int) or value != n_features:
            raise HeadLoadError(f"{path}: state.attributes.n_features_in_ is {value!r:.40}, head.json's n_features is {n_features}")
    if "classes_" in attributes and attributes["classes_"] != [0, 1]:
        raise HeadLoadError(f"{path}: state.attributes.classes_ must be [0, 1]")


def check_array_shapes(header: dict[str, tuple[str, tuple[int, ...]]], n_features: int, standardize: bool, path: Path) -> None:
    """The arrays file's header against head.json, before any array is read: fitted-attribute names only, the
    standardisation vectors exactly when the head standardises, and shapes a binary classifier on `n_features`
    inputs can have (coef_ [1, n_features], a few classes, no dimension beyond n_features or MAX_ROWS)."""
    for key in _STANDARDIZER:
        if (key in header) != standardize:
            raise HeadLoadError(f"{path}: standardisation statistics {'missing' if standardize else 'present'} although the head "
                                f"{'standardises' if standardize else 'does not standardise'}")
    for key, (dtype, shape) in header.items():
        if key in _STANDARDIZER:
            allowed: tuple[tuple[int, ...], ...] = ((n_features,),)
        elif not key.endswith("_") or key.startswith("_"):
            raise HeadLoadError(f"{path}: {key!r} is not a fitted attribute")
        else:
            allowed = _FIXED_SHAPES[key](n_features) if key in _FIXED_SHAPES else ()
        if dtype not in _ARRAY_DTYPES:
            raise HeadLoadError(f"{path}: array {key!r} has dtype {dtype}, not a number type")
        if allowed and shape not in allowed:
            raise HeadLoadError(f"{path}: array {key!r} has shape {shape}; head.json's n_features {n_features} allows {list(allowed)}")
        if len(shape) > 3 or any(size > max(n_features, MAX_ROWS) for size in shape):
            raise HeadLoadError(f"{path}: array {key!r} has shape {shape}, too large for a head on {n_features} features")


def set_fitted(model: Any, key: str, value: Any, path: Path) -> None:
    """Set one saved fitted attribute (a name ending in "_", not private) on the rebuilt estimator."""
    if not key.endswith("_") or key.startswith("_"):
        raise HeadLoadError(f"{path}: {key!r} is not a fitted attribute")
    try:
        setattr(model, key, value)
    except (AttributeError, TypeError, ValueError) as error:
        raise HeadLoadError(f"{path}: the estimator's attribute {key!r} cannot be set ({error})") from None

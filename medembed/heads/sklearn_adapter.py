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
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
from safetensors.numpy import load_file, save_file
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import roc_auc_score

from medembed.errors import MedembedError
from medembed.heads._checks import check_bool
from medembed.heads._features import Standardizer
from medembed.heads._json import HeadLoadError, float_vector, require
from medembed.heads.base import HEAD_FILE, Head, selection_record

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
            arrays["_standardizer_mean"], arrays["_standardizer_std"] = self.standardizer_.mean, self.standardizer_.std
        save_file(arrays, str(directory / ARRAYS_FILE))
        return {"attributes": values, "arrays": sorted(arrays)}

    def _load_state(self, directory: Path, state: dict[str, Any]) -> None:
        path = directory / ARRAYS_FILE
        attributes = require(state, "attributes", dict, directory / HEAD_FILE)
        try:
            arrays = load_file(str(path))
        except (safetensors.SafetensorError, OSError, ValueError) as error:
            raise HeadLoadError(f"{path}: not a readable safetensors file ({error})") from None
        mean, std = arrays.pop("_standardizer_mean", None), arrays.pop("_standardizer_std", None)
        if self.standardize:
            if mean is None or std is None:
                raise HeadLoadError(f"{path}: no standardisation statistics although the head standardises")
            stats = {"mean": mean.tolist(), "std": std.tolist()}
            self.standardizer_ = Standardizer(*(float_vector(stats, k, self.n_features_in_, np.float32, path) for k in ("mean", "std")))
        else:
            self.standardizer_ = None
        model = self._build()
        for key, value in {**attributes, **arrays}.items():
            if not key.endswith("_") or key.startswith("_"):
                raise HeadLoadError(f"{path}: {key!r} is not a fitted attribute")
            setattr(model, key, value)
        if list(getattr(model, "classes_", [])) != [0, 1]:
            raise HeadLoadError(f"{path}: the saved estimator's classes are not [0, 1]")
        self.model_ = model

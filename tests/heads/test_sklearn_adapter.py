"""Any scikit-learn classifier as a head, and the scikit-learn contract of every head (clone, get/set_params)."""

import sys

import numpy as np
import pytest
from sklearn.base import clone

from medembed.errors import MedembedError
from medembed.scorers.options import HEAD_NAMES
from medembed.scorers.heads import load_head, make_head



@pytest.mark.parametrize("name", HEAD_NAMES)
def test_every_head_clones_and_stores_parameters_unmodified(name, fast_head):
    head = fast_head(name)
    copy = clone(head)
    assert type(copy) is type(head) and copy.get_params() == head.get_params()
    assert head.set_params(seed=3).get_params()["seed"] == 3


def test_set_params_is_validated_at_fit(separable):
    head = make_head("logreg").set_params(tol=-1.0)
    with pytest.raises(MedembedError, match="tol"):
        head.fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])


def test_fit_without_eval_set_holds_out_a_stratified_eighth(separable):
    head = make_head("logreg").fit(separable.X, separable.y)
    assert head.selection_["best_val_auroc"] > 0.9


@pytest.mark.parametrize("estimator", ["sklearn.discriminant_analysis.LinearDiscriminantAnalysis", "sklearn.svm.LinearSVC"])
def test_a_sklearn_classifier_is_a_head_that_saves_without_pickle(estimator, separable, tmp_path):
    head = make_head(f"sklearn:{estimator}").fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
    head.save(tmp_path / "head")
    loaded = load_head(tmp_path / "head")
    np.testing.assert_array_equal(loaded.predict_proba(separable.X_val), head.predict_proba(separable.X_val))
    assert head.selection_["best_val_auroc"] > 0.9
    assert clone(head).get_params() == head.get_params()


def test_estimator_parameters_pass_through_and_unknown_ones_are_refused():
    head = make_head("sklearn:sklearn.linear_model.LogisticRegression", C=0.5, standardize=False)
    assert head.estimator_params == {"C": 0.5} and head.standardize is False
    with pytest.raises(MedembedError, match="depth"):
        make_head("sklearn:sklearn.linear_model.LogisticRegression", depth=3)


def test_a_model_whose_state_is_objects_is_refused_at_save(separable, tmp_path):
    head = make_head("sklearn:sklearn.ensemble.RandomForestClassifier", n_estimators=3).fit(separable.X, separable.y)
    with pytest.raises(MedembedError, match="cannot be saved without pickle"):
        head.save(tmp_path / "head")


@pytest.mark.parametrize(
    "path",
    ["os.system", "sklearn.linear_model.Ridge", "nosuch.Model", "venv.__main__.X", "this.X", "sklearn.svm.LogisticRegression", "sklearn_fake.svm.SVC"],
)
def test_only_scikit_learn_classifiers_are_built(path):
    with pytest.raises(MedembedError, match="not a scikit-learn classifier"):
        make_head(f"sklearn:{path}")


def test_a_name_outside_sklearn_is_never_imported():
    """The estimator name is looked up in scikit-learn's registry; the module it names is never imported."""
    before = set(sys.modules)
    with pytest.raises(MedembedError):
        make_head("sklearn:this.X")
    assert "this" not in set(sys.modules) - before

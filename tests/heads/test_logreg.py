"""Logistic regression head: the C search really chooses, standardisation, JSON-only artifacts, tampering."""

import json

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.scorers.heads import HeadLoadError, load_head, make_head
from medembed.scorers.heads.logreg import DEFAULT_C_GRID


def _noisy_labels(n: int, seed: int, flip: float) -> tuple[np.ndarray, np.ndarray]:
    """100 features each weakly shifted by the class; a `flip` fraction of labels inverted."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.standard_normal((n, 100)) + 0.3 * y[:, None]
    flipped = rng.random(n) < flip
    y[flipped] = 1 - y[flipped]
    y[:2] = [0, 1]
    return X.astype(np.float32), y


def _correlated_nuisance(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two features sharing a large common noise; only their difference carries the class.

    Rows come in normal/abnormal pairs with the same common noise, so it is exactly uncorrelated with the label
    and the mean-difference direction that strong regularisation tends to is the poor one, feature 0 alone.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.standard_normal((n, 2)) + np.repeat(rng.standard_normal((n // 2, 1)), 2, axis=0) * 5.0
    X[:, 0] += 1.5 * y
    return X.astype(np.float32), y


def test_few_noisy_labels_make_the_search_pick_strong_regularisation():
    X, y = _noisy_labels(60, seed=1, flip=0.2)
    X_val, y_val = _noisy_labels(400, seed=2, flip=0.0)
    selection = make_head("logreg").fit(X, y, eval_set=[(X_val, y_val)]).selection_
    assert selection["chosen"] <= 1e-3
    assert selection["best_val_auroc"] > selection["val_auroc"][-1] + 0.1


def test_correlated_nuisance_makes_the_search_pick_weak_regularisation():
    X, y = _correlated_nuisance(1000, seed=1)
    X_val, y_val = _correlated_nuisance(1000, seed=2)
    selection = make_head("logreg").fit(X, y, eval_set=[(X_val, y_val)]).selection_
    assert selection["chosen"] >= 0.1
    assert selection["best_val_auroc"] > selection["val_auroc"][0] + 0.1


def test_ties_go_to_the_smallest_c(separable):
    # One feature: every C gives the same ranking, hence the same val AUROC.
    head = make_head("logreg", c_grid=[10.0, 0.01, 1.0]).fit(
        separable.X[:, :1], separable.y, eval_set=[(separable.X_val[:, :1], separable.y_val)]
    )
    assert head.selection_["values"] == [0.01, 1.0, 10.0]
    assert len(set(head.selection_["val_auroc"])) == 1
    assert head.selection_["chosen"] == 0.01


def test_selection_records_grid_val_auroc_and_iterations(fitted):
    selection = fitted["logreg"].selection_
    assert selection["searched"] == "C"
    assert selection["values"] == sorted(DEFAULT_C_GRID)
    assert len(selection["val_auroc"]) == len(selection["n_iter"]) == 13
    assert all(1 <= n <= fitted["logreg"].max_iter for n in selection["n_iter"][:3])


def test_standardisation_makes_feature_scale_and_offset_irrelevant(separable):
    scale = np.random.default_rng(0).uniform(0.01, 100.0, size=separable.X.shape[1]).astype(np.float32)
    offset = np.float32(7.0)

    def affine(X):
        return X.astype(np.float32) * scale + offset

    params = {"c_grid": [0.01, 1.0], "tol": 1e-6}
    plain = make_head("logreg", **params).fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
    moved = make_head("logreg", **params).fit(
        affine(separable.X), separable.y, eval_set=[(affine(separable.X_val), separable.y_val)]
    )
    assert moved.selection_["chosen"] == plain.selection_["chosen"]
    np.testing.assert_allclose(
        moved.predict_proba(affine(separable.X_test)), plain.predict_proba(separable.X_test), atol=1e-3
    )


@pytest.mark.parametrize(
    "params, message",
    [
        ({"c_grid": []}, "must not be empty"),
        ({"c_grid": [1.0, -1.0]}, r"'c_grid' must lie in \(0.0"),
        ({"c_grid": [1.0, 1.0]}, "repeated"),
        ({"c_grid": 1.0}, "list of numbers"),
        ({"tol": 0}, "'tol'"),
        ({"max_iter": 2.5}, "'max_iter' must be an integer"),
    ],
)
def test_invalid_hyperparameters_are_refused(params, message):
    with pytest.raises(MedembedError, match=message):
        make_head("logreg", **params)


def test_saved_as_a_single_json_file(fitted, tmp_path):
    fitted["logreg"].save(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["head.json"]
    document = json.loads((tmp_path / "head.json").read_text())
    assert document["head"] == "logreg" and document["format_version"] == 1
    assert set(document["state"]) == {"mean", "std", "coef", "intercept"}
    assert len(document["state"]["coef"]) == document["n_features"] == 48
    assert document["params"]["c_grid"] == sorted(DEFAULT_C_GRID)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda state: state["coef"].pop(), "'coef' must be a list of 48 numbers"),
        (lambda state: state["coef"].__setitem__(0, "1.0"), "'coef' must be a list of 48 numbers"),
        (lambda state: state["mean"].__setitem__(0, True), "'mean' must be a list of 48 numbers"),
        (lambda state: state["mean"].__setitem__(0, 1e39), "'mean' has values out of float32 range"),
        (lambda state: state["std"].__setitem__(3, 0.0), "'std' must be positive"),
        (lambda state: state.update(intercept=[0.0]), "'intercept' has the wrong type"),
        (lambda state: state.pop("coef"), "missing key 'coef'"),
    ],
)
def test_tampered_weights_are_refused(tamper, message, fitted, tmp_path):
    fitted["logreg"].save(tmp_path)
    document = json.loads((tmp_path / "head.json").read_text())
    tamper(document["state"])
    (tmp_path / "head.json").write_text(json.dumps(document))
    with pytest.raises(HeadLoadError, match=message):
        load_head(tmp_path)

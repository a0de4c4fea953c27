"""The contract every head shares: fit/predict/save/load, input refusal, the registry, head.json tampering."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medembed.errors import MedembedError
from medembed.scorers.options import HEAD_NAMES
from medembed.scorers.heads import HeadLoadError, load_head, make_head


def test_registry_lists_the_three_heads():
    assert HEAD_NAMES == ("logreg", "mlp", "xgboost")


def test_every_head_the_options_name_is_registered():
    from medembed.scorers.options import TOKEN_HEADS
    from medembed.scorers.heads import _HEADS

    assert set(HEAD_NAMES + TOKEN_HEADS) | {"sklearn"} == set(_HEADS)


def test_each_registered_class_carries_its_registry_name_and_the_sklearn_prefix_agrees():
    from medembed.scorers.heads import SKLEARN_PREFIX, _HEADS, head_class
    from medembed.scorers.heads.sklearn_adapter import PREFIX

    assert {name: head_class(name).name for name in _HEADS} == {name: name for name in _HEADS}
    assert SKLEARN_PREFIX == PREFIX


def test_options_of_a_pooled_head_are_checked_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from medembed.scorers.options import FitOptions; FitOptions(head='logreg'); "
            "FitOptions(head='xgboost', head_params={'n_estimators': 10}); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_make_head_rejects_unknown_name_listing_the_known_ones():
    with pytest.raises(MedembedError, match="logreg, mlp, xgboost"):
        make_head("svm")


def test_make_head_rejects_unknown_params_listing_the_accepted_ones():
    with pytest.raises(MedembedError, match=r"unknown parameter\(s\) C, epochs.*accepts c_grid"):
        make_head("logreg", C=1.0, epochs=3)


@pytest.mark.parametrize(
    "name, params",
    [("logreg", {"seed": -1}), ("mlp", {"class_weight": "auto"}), ("xgboost", {"l2_normalize": "yes"})],
)
def test_invalid_shared_options_are_refused(name, params):
    with pytest.raises(MedembedError, match=next(iter(params))):
        make_head(name, **params)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_fit_returns_self_and_separates_the_classes(name, separable, fast_head):
    head = fast_head(name)
    assert head.fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)]) is head
    assert head.selection_["best_val_auroc"] > 0.9
    test_auroc = roc_auc_score(separable.y_test, head.predict_proba(separable.X_test)[:, 1])
    assert test_auroc > 0.9


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_predict_proba_is_float64_n_by_2_rows_summing_to_one(name, fitted, separable):
    probabilities = fitted[name].predict_proba(separable.X_test)
    assert probabilities.shape == (len(separable.X_test), 2)
    assert probabilities.dtype == np.float64
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_selection_records_the_curve_and_its_best_point(name, fitted):
    selection = fitted[name].selection_
    best = int(np.argmax(selection["val_auroc"]))
    assert len(selection["values"]) == len(selection["val_auroc"]) >= 1
    assert selection["chosen"] == selection["values"][best]
    assert selection["best_val_auroc"] == max(selection["val_auroc"])


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_save_load_round_trip_gives_identical_probabilities(name, fitted, separable, tmp_path):
    fitted[name].save(tmp_path / "head")
    loaded = load_head(tmp_path / "head")
    assert type(loaded) is type(fitted[name])
    assert loaded.get_params() == fitted[name].get_params()
    assert loaded.selection_ == fitted[name].selection_
    np.testing.assert_array_equal(loaded.predict_proba(separable.X_test), fitted[name].predict_proba(separable.X_test))
    assert not [path for path in (tmp_path / "head").iterdir() if path.suffix in (".pkl", ".pickle", ".joblib")]


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_nan_or_inf_embeddings_are_refused_naming_rows(name, separable, fast_head):
    X = separable.X.copy()
    X[[3, 7], 5] = np.nan
    X[11, 0] = np.inf
    with pytest.raises(MedembedError, match=r"X has 3 row\(s\) with NaN or infinite.*first row indices: 3, 7, 11"):
        fast_head(name).fit(X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
    X_val = separable.X_val.copy()
    X_val[4, 2] = np.nan
    with pytest.raises(MedembedError, match=r"X_val has 1 row\(s\).*: 4$"):
        fast_head(name).fit(separable.X, separable.y, eval_set=[(X_val, separable.y_val)])


def test_values_overflowing_float32_count_as_infinite(fitted, separable):
    X = separable.X_test.astype(np.float64)
    X[2, 0] = 1e300
    with pytest.raises(MedembedError, match=r"1 row\(s\).*: 2$"):
        fitted["logreg"].predict_proba(X)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_single_class_labels_are_refused(name, separable, fast_head):
    with pytest.raises(MedembedError, match=r"y holds only normal \(0\)"):
        fast_head(name).fit(separable.X, np.zeros_like(separable.y), eval_set=[(separable.X_val, separable.y_val)])
    with pytest.raises(MedembedError, match=r"y_val holds only abnormal \(1\)"):
        fast_head(name).fit(separable.X, separable.y, eval_set=[(separable.X_val, np.ones_like(separable.y_val))])


@pytest.mark.parametrize(
    "y, message",
    [
        (np.full(400, 2), r"outside \{0, 1\}"),
        (np.zeros(399), "one label per embedding row"),
        (np.array(["a"] * 400), "dtype"),
    ],
)
def test_bad_labels_are_refused(y, message, separable, fast_head):
    with pytest.raises(MedembedError, match=message):
        fast_head("logreg").fit(separable.X, y, eval_set=[(separable.X_val, separable.y_val)])


def test_mismatched_feature_counts_are_refused(fitted, separable, fast_head):
    with pytest.raises(MedembedError, match="X_val has 47 features but X has 48"):
        fast_head("logreg").fit(separable.X, separable.y, eval_set=[(separable.X_val[:, :47], separable.y_val)])
    with pytest.raises(MedembedError, match="fitted on 48"):
        fitted["logreg"].predict_proba(separable.X_test[:, :47])
    with pytest.raises(MedembedError, match=r"\[N, D\]"):
        fitted["logreg"].predict_proba(separable.X_test[0])


def test_unfitted_head_refuses_to_predict_or_save(tmp_path, separable):
    head = make_head("logreg")
    with pytest.raises(MedembedError, match="not fitted"):
        head.predict_proba(separable.X_test)
    with pytest.raises(MedembedError, match="not fitted"):
        head.save(tmp_path)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_l2_normalize_makes_predictions_ignore_row_scale(name, separable, fast_head):
    row_scale = np.random.default_rng(1).uniform(0.2, 5.0, size=(len(separable.X_test), 1))
    rescaled = (separable.X_test.astype(np.float32) * row_scale).astype(np.float32)
    normalised = fast_head(name, l2_normalize=True).fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
    np.testing.assert_allclose(
        normalised.predict_proba(rescaled), normalised.predict_proba(separable.X_test), atol=1e-5
    )
    raw = fast_head(name).fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
    assert not np.allclose(raw.predict_proba(rescaled), raw.predict_proba(separable.X_test), atol=1e-3)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_balanced_class_weight_raises_the_minority_probability(name, imbalanced, fast_head):
    rare = imbalanced
    plain = fast_head(name).fit(rare.X, rare.y, eval_set=[(rare.X_val, rare.y_val)])
    balanced = fast_head(name, class_weight="balanced").fit(rare.X, rare.y, eval_set=[(rare.X_val, rare.y_val)])
    assert balanced.predict_proba(rare.X_test)[:, 1].mean() > plain.predict_proba(rare.X_test)[:, 1].mean() + 0.1


# -- tampered or foreign head.json: a clear HeadLoadError, and no code runs -------------------------------


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create `marker` if anything ever unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _saved(head, directory: Path) -> dict:
    head.save(directory)
    return json.loads((directory / "head.json").read_text())


def _rewrite(directory: Path, document: dict) -> None:
    (directory / "head.json").write_text(json.dumps(document))


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_pickle_renamed_to_head_json_is_refused_without_running_it(name, fitted, tmp_path):
    fitted[name].save(tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}-marker"
    (tmp_path / "head.json").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    with pytest.raises(HeadLoadError, match="head.json: not a valid medembed JSON file"):
        load_head(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_truncated_head_json_is_refused(name, fitted, tmp_path):
    fitted[name].save(tmp_path)
    text = (tmp_path / "head.json").read_bytes()
    (tmp_path / "head.json").write_bytes(text[: len(text) // 2])
    with pytest.raises(HeadLoadError, match="not a valid medembed JSON file"):
        load_head(tmp_path)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
        (lambda d: d.update(format_version="1"), "'format_version' has the wrong type"),
        (lambda d: d.update(head="svm"), "unknown head 'svm'"),
        (lambda d: d.update(extra=1), r"unexpected keys \['extra'\]"),
        (lambda d: d.pop("params"), "missing key 'params'"),
        (lambda d: d.update(n_features=True), "'n_features' has the wrong type"),
        (lambda d: d["params"].update(surprise=1), "params .* do not match"),
        (lambda d: d["params"].update(seed="0"), "'seed' must be an integer"),
        (lambda d: d.update(selection=[]), "'selection' has the wrong type"),
    ],
)
@pytest.mark.parametrize("name", HEAD_NAMES)
def test_tampered_head_json_is_refused(name, tamper, message, fitted, tmp_path):
    document = _saved(fitted[name], tmp_path)
    tamper(document)
    _rewrite(tmp_path, document)
    with pytest.raises(HeadLoadError, match=message):
        load_head(tmp_path)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_n_features_disagreeing_with_the_weights_is_refused(name, fitted, tmp_path):
    document = _saved(fitted[name], tmp_path)
    document["n_features"] += 1
    _rewrite(tmp_path, document)
    with pytest.raises(HeadLoadError, match="49"):
        load_head(tmp_path)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_non_finite_numbers_in_head_json_are_refused(name, fitted, tmp_path):
    _saved(fitted[name], tmp_path)
    text = (tmp_path / "head.json").read_text()
    for bad in ("NaN", "Infinity", "1e999"):
        (tmp_path / "head.json").write_text(text.replace('"best_val_auroc": ', f'"best_val_auroc": {bad}, "x": ', 1))
        with pytest.raises(HeadLoadError, match="non-finite number"):
            load_head(tmp_path)


def test_a_head_loaded_through_the_wrong_class_is_refused(fitted, tmp_path):
    fitted["mlp"].save(tmp_path)
    with pytest.raises(HeadLoadError, match="holds a 'mlp' head, not 'logreg'"):
        type(fitted["logreg"]).load(tmp_path)


def test_missing_directory_or_head_json_is_refused(tmp_path):
    with pytest.raises(HeadLoadError, match="not a directory"):
        load_head(tmp_path / "absent")
    with pytest.raises(HeadLoadError, match="head.json: file not found"):
        load_head(tmp_path)

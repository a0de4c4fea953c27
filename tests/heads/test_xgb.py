"""XGBoost head: early stopping keeps only the chosen trees, seeding, XGBoost-format tampering."""

import json
import pickle

import numpy as np
import pytest
import xgboost as xgb
from sklearn.metrics import roc_auc_score

from medembed.errors import MedembedError
from medembed.scorers.heads import HeadLoadError, load_head
from medembed.scorers.heads.xgb import MODEL_FILE


def test_early_stopping_keeps_only_the_best_trees(separable, fast_head):
    head = fast_head("xgboost", n_estimators=300, learning_rate=0.3, early_stopping_rounds=5)
    selection = head.fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)]).selection_
    assert selection["searched"] == "trees"
    assert len(selection["values"]) == selection["chosen"] + 5 < 300
    assert head.booster_.num_boosted_rounds() == selection["chosen"]
    # XGBoost's own val AUC of the kept trees is what scikit-learn measures on the saved model's predictions.
    val_auroc = roc_auc_score(separable.y_val, head.predict_proba(separable.X_val)[:, 1])
    assert val_auroc == pytest.approx(selection["best_val_auroc"], abs=1e-6)


def test_same_seed_gives_identical_probabilities_and_another_seed_does_not(separable, fast_head):
    def probabilities(seed):
        head = fast_head("xgboost", seed=seed).fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
        return head.predict_proba(separable.X_test)

    first = probabilities(seed=3)
    np.testing.assert_array_equal(probabilities(seed=3), first)
    assert not np.array_equal(probabilities(seed=4), first)


def test_saved_in_xgboost_format_with_the_tree_count(fitted, tmp_path):
    fitted["xgboost"].save(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["head.json", MODEL_FILE]
    document = json.loads((tmp_path / "head.json").read_text())
    assert document["state"] == {"n_trees": fitted["xgboost"].selection_["chosen"]}
    booster = xgb.Booster()
    booster.load_model(str(tmp_path / MODEL_FILE))
    assert booster.num_features() == 48


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_estimators": 0}, "'n_estimators'"),
        ({"subsample": 0.0}, "'subsample' must lie in"),
        ({"colsample_bytree": 1.5}, "'colsample_bytree' must lie in"),
        ({"max_bin": 1}, "'max_bin'"),
        ({"n_jobs": -1}, "'n_jobs'"),
    ],
)
def test_invalid_hyperparameters_are_refused(params, message, fast_head):
    with pytest.raises(MedembedError, match=message):
        fast_head("xgboost", **params)


# -- tampered or foreign models: HeadLoadError, nothing unpickled ----------------------------------------


@pytest.fixture
def saved_xgb(fitted, tmp_path):
    fitted["xgboost"].save(tmp_path)
    return tmp_path


def test_truncated_model_is_refused(saved_xgb):
    model = saved_xgb / MODEL_FILE
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(HeadLoadError, match="model.ubj: not a readable XGBoost model"):
        load_head(saved_xgb)


def test_pickle_renamed_to_the_model_file_is_refused(saved_xgb, fitted):
    (saved_xgb / MODEL_FILE).write_bytes(pickle.dumps(fitted["xgboost"].booster_))
    with pytest.raises(HeadLoadError, match="not a readable XGBoost model"):
        load_head(saved_xgb)


def test_missing_model_file_is_refused(saved_xgb):
    (saved_xgb / MODEL_FILE).unlink()
    with pytest.raises(HeadLoadError, match="model.ubj: file not found"):
        load_head(saved_xgb)


def test_a_foreign_regression_model_is_refused(saved_xgb, separable):
    data = xgb.DMatrix(separable.X, label=separable.y)
    regression = xgb.train({"objective": "reg:squarederror", "nthread": 1}, data, num_boost_round=3)
    regression.save_model(str(saved_xgb / MODEL_FILE))
    with pytest.raises(HeadLoadError, match="objective is 'reg:squarederror'"):
        load_head(saved_xgb)


def test_a_tree_count_disagreeing_with_head_json_is_refused(saved_xgb):
    document = json.loads((saved_xgb / "head.json").read_text())
    document["state"]["n_trees"] += 1
    (saved_xgb / "head.json").write_text(json.dumps(document))
    with pytest.raises(HeadLoadError, match="trees, head.json says"):
        load_head(saved_xgb)

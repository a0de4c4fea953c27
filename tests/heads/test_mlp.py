"""MLP head: determinism, early stopping on val AUROC, no lasting global torch state, safetensors tampering."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from medembed.errors import MedembedError
from medembed.scorers.heads import HeadLoadError, load_head
from medembed.scorers.heads.mlp import WEIGHTS_FILE


def test_same_seed_gives_identical_probabilities_and_another_seed_does_not(separable, fast_head):
    def probabilities(seed):
        head = fast_head("mlp", seed=seed).fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
        return head.predict_proba(separable.X_test)

    first = probabilities(seed=3)
    np.testing.assert_array_equal(probabilities(seed=3), first)
    assert not np.array_equal(probabilities(seed=4), first)


def test_fit_leaves_the_global_torch_rng_and_thread_count_alone(separable, fast_head):
    torch.manual_seed(1234)
    rng_state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    fast_head("mlp", n_jobs=1).fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert torch.get_num_threads() == threads


def test_the_best_val_epoch_is_restored_not_the_last(fast_head):
    # Few rows, noisy labels and a high learning rate: the MLP overfits after its first epochs.
    rng = np.random.default_rng(0)
    X, X_val = rng.standard_normal((80, 48)), rng.standard_normal((300, 48))
    y, y_val = (X[:, 0] + rng.standard_normal(80) > 0).astype(int), (X_val[:, 0] > 0).astype(int)
    head = fast_head("mlp", hidden=(128,), lr=0.05, batch_size=16, max_epochs=15, patience=15)
    selection = head.fit(X, y, eval_set=[(X_val, y_val)]).selection_
    assert len(selection["values"]) == 15
    assert selection["chosen"] < 15
    restored_auroc = roc_auc_score(y_val, head.predict_proba(X_val)[:, 1])
    assert restored_auroc == pytest.approx(selection["best_val_auroc"], abs=1e-12)
    assert restored_auroc > selection["val_auroc"][-1]


def test_training_stops_patience_epochs_after_the_best(separable, fast_head):
    head = fast_head("mlp", max_epochs=200, patience=2).fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
    selection = head.selection_
    assert len(selection["values"]) == selection["chosen"] + 2 < 200
    assert len(selection["train_loss"]) == len(selection["values"])


def test_several_hidden_layers_round_trip(separable, fast_head, tmp_path):
    head = fast_head("mlp", hidden=(16, 8)).fit(separable.X, separable.y, eval_set=[(separable.X_val, separable.y_val)])
    head.save(tmp_path)
    assert sorted(load_file(tmp_path / WEIGHTS_FILE)) == [
        "network.0.bias", "network.0.weight", "network.3.bias", "network.3.weight", "network.6.bias",
        "network.6.weight", "standardizer.mean", "standardizer.std",
    ]  # fmt: skip
    loaded = load_head(tmp_path)
    np.testing.assert_array_equal(loaded.predict_proba(separable.X_test), head.predict_proba(separable.X_test))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"hidden": 512}, "'hidden' must be a list"),
        ({"hidden": [64, 0]}, "'hidden' must be an integer >= 1"),
        ({"dropout": 1.0}, "'dropout' must lie in"),
        ({"lr": 0.0}, "'lr' must lie in"),
        ({"patience": 0}, "'patience'"),
        ({"n_jobs": 0}, "'n_jobs'"),
    ],
)
def test_invalid_hyperparameters_are_refused(params, message, fast_head):
    with pytest.raises(MedembedError, match=message):
        fast_head("mlp", **params)


# -- tampered weights: HeadLoadError, nothing unpickled --------------------------------------------------


@pytest.fixture
def saved_mlp(fitted, tmp_path):
    fitted["mlp"].save(tmp_path)
    return tmp_path


def test_truncated_safetensors_is_refused(saved_mlp):
    weights = saved_mlp / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(HeadLoadError, match="mlp.safetensors: not a readable safetensors file"):
        load_head(saved_mlp)


def test_pickle_renamed_to_safetensors_is_refused(saved_mlp):
    (saved_mlp / WEIGHTS_FILE).write_bytes(pickle.dumps({"network.0.weight": np.zeros((32, 48))}))
    with pytest.raises(HeadLoadError, match="not a readable safetensors file"):
        load_head(saved_mlp)


def test_missing_weights_file_is_refused(saved_mlp):
    (saved_mlp / WEIGHTS_FILE).unlink()
    with pytest.raises(HeadLoadError, match="mlp.safetensors"):
        load_head(saved_mlp)


def _rewrite_tensors(directory, change) -> None:
    tensors = dict(load_file(directory / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, directory / WEIGHTS_FILE)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({"network.0.weight": torch.zeros(16, 48)}), r"'network.0.weight' .*\(16, 48\).*\(32, 48\)"),
        (lambda t: t.update({"network.3.bias": torch.zeros(1, dtype=torch.float64)}), "'network.3.bias' is F64"),
        (lambda t: t["network.3.weight"].__setitem__((0, 0), float("nan")), "'network.3.weight' holds NaN"),
        (lambda t: t["standardizer.std"].__setitem__(0, 0.0), "'standardizer.std' must be positive"),
        (lambda t: t.pop("standardizer.mean"), "do not match the config"),
        (lambda t: t.update({"network.9.weight": torch.zeros(1)}), "do not match the config"),
    ],
)
def test_tensors_disagreeing_with_the_config_are_refused(change, message, saved_mlp):
    _rewrite_tensors(saved_mlp, change)
    with pytest.raises(HeadLoadError, match=message):
        load_head(saved_mlp)

"""Early stopping on crafted validation curves, mini-batching, and the safetensors + JSON weight files."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from medembed.scorers.baselines._training import EarlyStopping, load_weights, read_config, save_model, shuffled_batches
from medembed.errors import MedembedError


def _run_curve(scores: list[float], patience: int, mode: str) -> tuple[EarlyStopping, nn.Linear, int]:
    """Feed `scores` epoch by epoch to a stopper; the model's weight holds the epoch number (1-based)."""
    model = nn.Linear(1, 1)
    stopper = EarlyStopping(patience, mode)
    for epoch, score in enumerate(scores, start=1):
        model.weight.data.fill_(epoch)
        if stopper.update(score, model):
            break
    return stopper, model, epoch


def test_early_stopping_restores_the_best_epoch_of_a_rising_then_falling_auroc() -> None:
    stopper, model, stopped_at = _run_curve([0.50, 0.70, 0.60, 0.65, 0.69, 0.90], patience=3, mode="max")
    assert stopped_at == 5  # three epochs in a row without beating epoch 2
    assert stopper.best_epoch == 1 and stopper.best_score == 0.70
    stopper.restore(model)
    assert model.weight.item() == 2.0


def test_early_stopping_on_a_loss_keeps_the_lowest_and_ignores_nan() -> None:
    stopper, model, stopped_at = _run_curve([0.9, 0.4, math.nan, 0.5, 0.3, 0.35, 0.36, 0.31, 0.1], patience=3, mode="min")
    assert stopped_at == 8  # epoch 5 improved on epoch 2 in time; 6, 7 and 8 did not beat it
    stopper.restore(model)
    assert model.weight.item() == 5.0


def test_early_stopping_refuses_to_restore_when_every_epoch_diverged() -> None:
    stopper, model, stopped_at = _run_curve([math.nan, math.nan, math.nan], patience=2, mode="max")
    assert stopped_at == 2
    with pytest.raises(MedembedError, match="diverged"):
        stopper.restore(model)


def test_shuffled_batches_cover_every_index_once_and_never_leave_a_single_image_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = shuffled_batches(10, 4, generator)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert [len(b) for b in shuffled_batches(9, 4, generator)] == [4, 4]  # the lone 9th image waits for the next epoch


def test_saved_weights_and_config_load_back(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    digest = save_model(tmp_path / "m", model, {"kind": "autoencoder", "size": 8})
    assert len(digest) == 64
    fresh = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    load_weights(tmp_path / "m", fresh)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[key])
    assert read_config(tmp_path / "m", "autoencoder")["size"] == 8
    with pytest.raises(MedembedError, match="not a 'cnn-efficientnet-lite0' one"):
        read_config(tmp_path / "m", "cnn-efficientnet-lite0")
    with pytest.raises(MedembedError, match="do not fit"):
        load_weights(tmp_path / "m", nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)))

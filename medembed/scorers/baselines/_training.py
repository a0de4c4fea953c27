"""What the trained baselines share: seeding, mini-batches, early stopping, batched inference, weights on disk.

Weights are saved without pickle: a directory with `model.safetensors` (the state dict) and `model.json` (what
is needed to rebuild the network: its kind, sizes, preprocessing, training options and history).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from medembed.scorers.baselines._data import unit_pixels
from medembed.encoders.base import file_sha256
from medembed._files import read_json
from medembed.errors import MedembedError
from medembed.scorers.heads._weights import check_header, load_finite, tensor_header

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


class StageTimer:
    """Wall-clock seconds of consecutive named stages of a run."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, stage: str) -> float:
        """End `stage` now (it began when the previous one ended); returns its seconds."""
        now = time.perf_counter()
        self.seconds[stage], self._last = now - self._last, now
        return self.seconds[stage]

    def summary(self) -> dict[str, float]:
        """Seconds per stage, plus "total" since the timer was made."""
        return {**self.seconds, "total": time.perf_counter() - self._start}


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's global generators (weight init, dropout) seeded; the caller's state comes back after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch using `threads` CPU threads (None: leave torch's default); restored after.

    One thread can be several times faster than two on a machine other processes keep busy: each parallel
    kernel waits for its slowest thread, and a descheduled thread stalls them all.
    """
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU (where bf16 is slower on most cores)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Indices 0..n-1 in a random order, cut into batches [<= batch_size] int64.

    A last batch of a single image is dropped: BatchNorm cannot normalise one sample in training mode.
    """
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) == 1 else batches


class EarlyStopping:
    """Tracks one validation score per epoch, keeps a copy of the best epoch's weights, says when to stop.

    `mode` "max" (AUROC) or "min" (a loss). Training stops once `patience` epochs in a row did not improve
    on the best; `restore` then puts the best epoch's weights back. A non-finite score never counts as best.
    """

    def __init__(self, patience: int, mode: str = "max") -> None:
        if patience < 1:
            raise MedembedError(f"patience must be at least 1 epoch, got {patience}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.patience, self.mode = patience, mode
        self.scores: list[float] = []
        self.best_epoch = -1  # 0-based index into scores; -1 until a finite score arrives
        self._best_state: dict[str, torch.Tensor] | None = None

    @property
    def best_score(self) -> float:
        """The best score so far (NaN before any finite one)."""
        return self.scores[self.best_epoch] if self.best_epoch >= 0 else math.nan

    def update(self, score: float, model: nn.Module) -> bool:
        """Record this epoch's score (copying `model`'s weights if it is the best); True when training should stop."""
        self.scores.append(float(score))
        best = self.best_score
        better = score > best if self.mode == "max" else score < best
        if math.isfinite(score) and (self.best_epoch < 0 or better):
            self.best_epoch = len(self.scores) - 1
            self._best_state = copy.deepcopy(model.state_dict())
        return len(self.scores) - 1 - self.best_epoch >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights into `model`."""
        if self._best_state is None:
            raise MedembedError(f"training diverged: no epoch reached a finite validation score ({self.scores})")
        model.load_state_dict(self._best_state)


def train_epochs(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    n_train: int,
    val_score: Callable[[], float],
    stopper: EarlyStopping,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    log: Callable[[str], None],
    score_name: str,
) -> list[float]:
    """Train for up to `epochs` passes over shuffled batches of `n_train` items, early-stopped by `stopper`.

    `batch_loss(indices)` returns the mean loss of one batch of train items (network in train mode);
    `val_score()` scores the network on val after each epoch (network in eval mode). The best epoch's weights
    are restored at the end. Returns the mean training loss of each epoch run.
    """
    train_loss: list[float] = []
    for epoch in range(1, epochs + 1):
        began = time.perf_counter()
        network.train()
        total = 0.0
        for batch in shuffled_batches(n_train, batch_size, generator):
            loss = batch_loss(batch)
            if not torch.isfinite(loss):
                raise MedembedError(f"training diverged (loss {loss.item()}) in epoch {epoch}; lower the learning rate (--lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        train_loss.append(total / n_train)
        network.eval()
        score = val_score()
        stop = stopper.update(score, network)
        best = " (best)" if stopper.best_epoch == epoch - 1 else ""
        log(f"epoch {epoch}: train loss {train_loss[-1]:.4f}, val {score_name} {score:.4f}{best}, {time.perf_counter() - began:.0f} s")
        if stop:
            break
    stopper.restore(network)
    return train_loss


def predict_batches(
    forward: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """`forward` over cached uint8 pixels [N, C, S, S] in batches -> its outputs concatenated, float32 on the CPU.

    Runs under inference mode and `autocast`; the caller puts the network in eval mode.
    """
    outputs = []
    with torch.inference_mode(), autocast(device):
        for start in range(0, len(pixels), batch_size):
            outputs.append(forward(unit_pixels(pixels[start : start + batch_size], device)).float().cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0)


def save_model(directory: Path, network: nn.Module, config: dict[str, Any]) -> str:
    """Write `network`'s weights (safetensors) and `config` (JSON) into `directory`; returns the weights' sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in network.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return file_sha256(directory / WEIGHTS_FILE)


def read_config(directory: Path, kind: str) -> dict[str, Any]:
    """The model.json of a saved baseline of `kind` ("cnn-efficientnet-lite0", "autoencoder")."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise MedembedError(f"{directory}: not a saved medembed baseline (no {CONFIG_FILE})")
    config = read_json(path, CONFIG_FILE)
    if not isinstance(config, dict) or config.get("kind") != kind:
        found = config.get("kind") if isinstance(config, dict) else None
        raise MedembedError(f"{path}: a saved {found!r} model, not a {kind!r} one")
    return config


def load_weights(directory: Path, network: nn.Module) -> None:
    """Load `directory`'s model.safetensors into `network`; every tensor must match by name and shape."""
    path = Path(directory) / WEIGHTS_FILE
    check_header(path, tensor_header(path), {key: tuple(t.shape) for key, t in network.state_dict().items()}, dtype=None, what=CONFIG_FILE)
    tensors = load_finite(path)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise MedembedError(f"{path}: weights do not fit the network that {CONFIG_FILE} describes ({error})") from None

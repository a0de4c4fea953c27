"""The adapter: the encoder's own last stage, fine-tuned from its cached input (a token level in the store).

For EfficientNet-Lite the store's `block14` tokens (7 x 7 x 192 at 224 px: the input of the last MBConv
block) go through a trainable copy of block 15, the head conv and its batch norm, the global average and a
new linear classifier: the part of the network a fine-tuned CNN changes most, trained without running the
encoder again. Batch-norm statistics stay as pretrained (small batches would make them noisy); the copied
layers train at `lr`, the new classifier at `head_lr`; early stopping on val AUROC; seeded. Saved as
safetensors (the tail and the classifier) and head.json; loading rebuilds the tail's architecture from the
encoder's definition (no pretrained weights are read again).

Cost: block 15 + head conv are ~0.1 GFLOP per 224 px image forward, so an epoch over FracAtlas's train
split is seconds to tens of seconds on a CPU. A ViT's last block at 448 px (1,024 tokens x 1,152 channels
for MedSigLIP) is ~30 GFLOP per image and needs a GPU; encoders without `tail` (the ViTs today) refuse.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from medembed.errors import MedembedError
from medembed.scorers.heads._checks import check_float, set_training_params
from medembed.scorers.heads.base import Head
from medembed.scorers.heads.mlp import _logits, _torch_threads
from medembed.scorers.heads._weights import read_checked
from medembed.scorers.heads.tokens import TokenHeadMixin, train_early_stopped

WEIGHTS_FILE = "adapter.safetensors"


class AdapterNetwork(nn.Module):
    """Level tokens `[B, 1 + H*W, C]` -> the grid as a map `[B, C, H, W]` -> encoder tail -> dropout -> one logit."""

    def __init__(self, tail: nn.Module, dim: int, dropout: float) -> None:
        super().__init__()
        self.tail = tail
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        cells = tokens[:, 1:]
        side = math.isqrt(cells.shape[1])
        feature_map = cells.transpose(1, 2).reshape(cells.shape[0], cells.shape[2], side, side)
        return self.classifier(self.dropout(self.tail(feature_map)))

    def train(self, mode: bool = True) -> AdapterNetwork:
        super().train(mode)
        for module in self.modules():  # pretrained batch-norm statistics are kept (see the module docstring)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class AdapterHead(TokenHeadMixin, Head):
    """The encoder's stage after `level`, fine-tuned on that level's cached tokens (a square, unpooled grid)."""

    name = "adapter"

    def __init__(
        self,
        *,
        encoder: str = "",
        encoder_options: dict[str, Any] | None = None,
        level: str = "",
        lr: float = 1e-4,
        head_lr: float = 1e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.2,
        batch_size: int = 32,
        max_epochs: int = 8,
        patience: int = 2,
        n_jobs: int | None = None,
        class_weight: str | None = None,
        l2_normalize: bool = False,
        seed: int = 0,
    ) -> None:
        """`encoder`, `encoder_options` and `level` name the network and where its cached input comes from
        (`medembed fit --level block14 --head adapter` fills them from the store)."""
        super().__init__(class_weight=class_weight, l2_normalize=l2_normalize, seed=seed)
        if l2_normalize:
            raise MedembedError("the adapter feeds the encoder's own activations to its layers; l2_normalize must be false")
        for name, value in (("encoder", encoder), ("level", level)):
            if not isinstance(value, str):
                raise MedembedError(f"head parameter {name!r} must be a string, got {value!r:.60}")
        if encoder_options is not None and not isinstance(encoder_options, dict):
            raise MedembedError(f"head parameter 'encoder_options' must be an object, got {encoder_options!r:.60}")
        self.encoder = encoder
        self.encoder_options = encoder_options
        self.level = level
        check_float("head_lr", head_lr, 0.0, 10.0, low_inclusive=False)
        self.head_lr = head_lr
        check_float("dropout", dropout, 0.0, 0.95)
        self.dropout = dropout
        set_training_params(self, lr=lr, weight_decay=weight_decay, batch_size=batch_size, max_epochs=max_epochs, patience=patience, n_jobs=n_jobs)

    def _network(self, pretrained: bool) -> AdapterNetwork:
        """The encoder's tail after `level` (its pretrained weights, or only its architecture) and a classifier."""
        from medembed.encoders import get_encoder

        if not self.encoder or not self.level:
            raise MedembedError("the adapter head needs encoder= and level= (medembed fit --level LEVEL fills them from the store)")
        built = get_encoder(self.encoder, **dict(self.encoder_options or {}))
        if not hasattr(built, "tail"):
            raise MedembedError(f"encoder {self.encoder!r} has no adapter tail (EfficientNet-Lite has; a ViT's last block needs a GPU)")
        if pretrained:
            built.load(torch.device("cpu"))
        tail = built.tail(self.level.split("@")[0], pretrained=pretrained)
        return AdapterNetwork(tail, built.dim, self.dropout)

    def _fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
        _check_square(X, "X")
        inputs, val_inputs = torch.from_numpy(X), torch.from_numpy(X_val)
        targets = torch.from_numpy(y.astype(np.float32))
        with torch.random.fork_rng(devices=[]), _torch_threads(self.n_jobs):
            torch.manual_seed(self.seed)
            network = self._network(pretrained=True)
            groups = [
                {"params": network.tail.parameters(), "lr": self.lr},
                {"params": network.classifier.parameters(), "lr": self.head_lr},
            ]
            optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
            self.network_, selection = train_early_stopped(self, network, optimizer, inputs, targets, val_inputs, y_val)
        self.token_shape_ = list(X.shape[1:])
        return selection

    def _positive_proba(self, X: np.ndarray) -> np.ndarray:
        if list(X.shape[1:]) != self.token_shape_:
            raise MedembedError(f"X has tokens of shape {tuple(X.shape[1:])} but the adapter was fitted on {tuple(self.token_shape_)}")
        with _torch_threads(self.n_jobs):
            return expit(_logits(self.network_, torch.from_numpy(X)))

    def _save_state(self, directory: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        # Only float tensors are saved: batch norm's num_batches_tracked counters are rebuilt as they are.
        tensors = {key: tensor.contiguous() for key, tensor in self.network_.state_dict().items() if tensor.is_floating_point()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        return {"token_shape": self.token_shape_}

    def _load_state(self, directory: Path, state: dict[str, Any]) -> None:
        from medembed.scorers.heads._json import HeadLoadError, require

        shape = require(state, "token_shape", list, directory / "head.json")
        if len(shape) != 2 or not all(isinstance(v, int) and v > 0 for v in shape):
            raise HeadLoadError(f"{directory / 'head.json'}: token_shape must be two positive integers")
        self.token_shape_ = shape
        try:
            network = self._network(pretrained=False)
        except (MedembedError, TypeError, ValueError, KeyError) as error:  # encoder options are the encoder's own
            raise HeadLoadError(f"{directory}: cannot rebuild the adapter's network ({error})") from None
        expected = {key: tuple(tensor.shape) for key, tensor in network.state_dict().items() if tensor.is_floating_point()}
        tensors = read_checked(directory / WEIGHTS_FILE, expected)
        network.load_state_dict(tensors, strict=False)
        self.network_ = network.eval()


def _check_square(X: np.ndarray, what: str) -> None:
    cells = X.shape[1] - 1
    if cells < 1 or math.isqrt(cells) ** 2 != cells:
        raise MedembedError(f"{what}: the adapter needs a level's square grid of tokens (1 + H*W), got {X.shape[1]} tokens")

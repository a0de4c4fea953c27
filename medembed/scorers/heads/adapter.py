"""The adapter: the encoder's own layers after a cached level, fine-tuned from that level's tokens in the store.

`--level blockN` (or `stem`) of an EfficientNet-Lite store: the level's full grid of tokens (its input map) goes
through trainable copies of blocks N+1..15, the head conv and its batch norm, the global average and a new
linear classifier: the part of the network a fine-tuned CNN changes, trained without running the frozen part
again. `block14` (7 x 7 x 192 at 224 px) adapts the last MBConv block; `block10` (14 x 14 x 112) the last five;
`stem` (112 x 112 x 32) all sixteen. Copied layers start from the pretrained weights and train at `lr`, the new
classifier at `head_lr`; early stopping on val AUROC; seeded. Batch-norm statistics stay as pretrained
(`bn="frozen"`: small batches of one finding would make them noisy) or are re-estimated on the training
batches (`bn="train"`). Saved as safetensors (the tail, its batch-norm statistics and the classifier) and
head.json; loading rebuilds the tail's architecture from the encoder's definition, checks every tensor's shape
against it before reading, and reads no pretrained weights.

Cost (`adapter_cost`, counted with torch's FLOP counter on the meta device, recorded in `selection_["cost"]`):
forward GFLOP per EfficientNet-Lite0 224 px image 0.04 (from block15), 0.10 (block14), 0.19 (block12),
0.28 (block10), 0.52 (block5), 0.73 (block0), 0.75 (stem); an epoch is about 3x that per train image (forward and
backward). The level must be stored at its full grid, so deeper starts cost store bytes too: float16
`(1 + H*W) * C * 2` per image, 19,200 B for block14, 44,128 B for block10 [197, 112], 802,880 B for the stem
[12545, 32] at 224 px. Tokens stay in the store's dtype in memory (float16: half of float32) and each batch
is cast to float32 on its way in. Encoders without a tail (the ViTs today) are refused in one line: a ViT's
last block at 448 px is ~30 GFLOP per image, a GPU job not implemented here.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from medembed.errors import MedembedError
from medembed.scorers.heads._checks import check_choice, check_float, set_training_params
from medembed.scorers.heads.base import Head
from medembed.scorers.heads.mlp import ViewsMixin, _logits, _torch_threads
from medembed.scorers.heads._weights import read_checked
from medembed.scorers.heads.tokens import TokenHeadMixin, check_tokens, train_early_stopped

WEIGHTS_FILE = "adapter.safetensors"
BN_MODES = ("frozen", "train")
_EVAL_CHUNK = 64  # images per forward pass at prediction time: a stem-level tail's activations are ~5 MB per image
_CHECK_CHUNK = 256  # rows per finiteness check of float16 tokens (no float32 copy of the whole level)


class AdapterNetwork(nn.Module):
    """Level tokens `[B, 1 + H*W, C]` (any float dtype) -> the grid as a float32 map `[B, C, H, W]` -> encoder tail
    -> dropout -> one logit. Batch-norm layers keep their pretrained statistics unless `train_bn`."""

    def __init__(self, tail: nn.Module, dim: int, dropout: float, train_bn: bool = False) -> None:
        super().__init__()
        self.tail = tail
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, 1)
        self.train_bn = train_bn

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.training and len(tokens) > _EVAL_CHUNK:  # bounds activation memory for deep tails
            return torch.cat([self(tokens[start:start + _EVAL_CHUNK]) for start in range(0, len(tokens), _EVAL_CHUNK)])
        cells = tokens[:, 1:].float()
        side = math.isqrt(cells.shape[1])
        feature_map = cells.transpose(1, 2).reshape(cells.shape[0], cells.shape[2], side, side)
        return self.classifier(self.dropout(self.tail(feature_map)))

    def train(self, mode: bool = True) -> AdapterNetwork:
        super().train(mode)
        if not self.train_bn:  # pretrained batch-norm statistics are kept (see the module docstring)
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def adapter_start(encoder: str, encoder_options: dict[str, Any] | None, level: str) -> tuple[Any, str]:
    """The (unloaded) encoder and the level name the adapter starts after, or one MedembedError line naming the
    level and what is accepted: a level of an encoder with a tail (EfficientNet-Lite), the stem or a block
    output, at its full grid (`block10@14x14` at 224 px is `block10`; `block10@7x7` is pooled and refused)."""
    from medembed.encoders import get_encoder
    from medembed.encoders.levels import parse_level

    if not encoder or not level:
        raise MedembedError("the adapter head needs encoder= and level= (medembed fit --level LEVEL fills them from the store)")
    try:
        built = get_encoder(encoder, **dict(encoder_options or {}))
    except (MedembedError, TypeError, ValueError, KeyError) as error:
        raise MedembedError(f"the adapter cannot build encoder {encoder!r} ({str(error).splitlines()[0][:200]})") from None
    if not hasattr(built, "tail"):
        raise MedembedError(
            f"--head adapter --level {level}: encoder {encoder!r} has no adapter; it fine-tunes EfficientNet-Lite's layers after a "
            "cached stem or block level (a ViT's layers at 448 px need a GPU and are not implemented)"
        )
    accepted = built.adapter_levels()
    shown = f"{accepted[0]}, {accepted[1]}..{accepted[-1]}"
    spec = parse_level(level) if "+" not in level else None
    if spec is None or spec.name not in accepted:
        raise MedembedError(
            f"--head adapter cannot start from level {level!r}: it fine-tunes {encoder}'s layers after one stored level at its full "
            f"grid, one of {shown}" + (" ('final' is the head conv's output: nothing is left to adapt; use --head attention)" if spec and spec.name == "final" else "")
        )
    _, height, width = built.level_map_shapes()[spec.name]
    if spec.grid is not None and spec.grid != (height, width):
        raise MedembedError(
            f"--head adapter cannot start from level {level!r}: it is pooled to {spec.grid[0]}x{spec.grid[1]}, the adapter needs "
            f"{spec.name}'s full {height}x{width} grid; extract --levels {spec.name} ({shown} are accepted)"
        )
    return built, spec.name


def adapter_cost(encoder: Any, level: str, n_train: int | None = None) -> dict[str, Any]:
    """What fine-tuning from `level` costs: forward GFLOP per image of the adapted layers, their parameters, the
    level's tokens `[T, C]` and float16 store bytes per image; with `n_train`, training GFLOP per epoch (forward +
    backward taken as 3x forward, the usual estimate)."""
    tokens, channels = _token_shape(encoder, level)
    counted = encoder.tail_cost(level)
    first, last = 0 if level == "stem" else int(level.removeprefix("block")) + 1, len(encoder.level_names()) - 3
    blocks = {0: "", 1: f"block{last} and "}.get(last - first + 1, f"block{first}..block{last} and ")
    adapted = f"{blocks}the head conv"
    cost = {
        "starts_after": level,
        "adapts": adapted,
        "input_tokens": [tokens, channels],
        "store_bytes_per_image_float16": tokens * channels * 2,
        "forward_gflop_per_image": round(counted["forward_flops"] / 1e9, 4),
        "trainable_parameters": counted["parameters"] + encoder.dim + 1,
    }
    if n_train is not None:
        cost["train_gflop_per_epoch"] = round(3 * counted["forward_flops"] * n_train / 1e9, 2)
    return cost


def adapter_cost_note(encoder: str = "efficientnet-lite0") -> str:
    """One line for `medembed heads`: forward GFLOP per image by starting level at the encoder's default size."""
    from medembed.encoders import get_encoder

    built = get_encoder(encoder)
    shown = [level for level in built.adapter_levels() if level in ("stem", "block0", "block5", "block10", "block12", "block14", "block15")]
    costs = ", ".join(f"{level} {built.tail_cost(level)['forward_flops'] / 1e9:.2f}" for level in reversed(shown))
    return (f"--level stem or blockN: fine-tunes what follows it; forward GFLOP per {encoder} {built.size} px image by level: {costs}; "
            "an epoch is ~3x that per train image; -p bn=train re-estimates batch-norm statistics")


def _token_shape(encoder: Any, level: str) -> list[int]:
    channels, height, width = encoder.level_map_shapes()[level]
    return [1 + height * width, channels]


class AdapterHead(ViewsMixin, TokenHeadMixin, Head):
    """The encoder's layers after `level`, fine-tuned on that level's cached tokens (its full, square grid)."""

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
        bn: str = "frozen",
        batch_size: int = 32,
        max_epochs: int = 20,  # a cap, not a schedule: at 8 FracAtlas's block14 adapter was still improving (best at 9-10)
        patience: int = 2,
        n_jobs: int | None = None,
        class_weight: str | None = None,
        l2_normalize: bool = False,
        seed: int = 0,
    ) -> None:
        """`encoder`, `encoder_options` and `level` name the network and where its cached input comes from
        (`medembed fit --level block12 --head adapter` fills them from the store). `bn`: "frozen" keeps the
        pretrained batch-norm statistics, "train" re-estimates them on the training batches."""
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
        check_choice("bn", bn, BN_MODES)
        self.bn = bn
        set_training_params(self, lr=lr, weight_decay=weight_decay, batch_size=batch_size, max_epochs=max_epochs, patience=patience, n_jobs=n_jobs)

    def start(self) -> tuple[Any, str]:
        """The encoder and the level this adapter starts after (`adapter_start`): refuses what it cannot start from."""
        return adapter_start(self.encoder, self.encoder_options, self.level)

    def _network(self, pretrained: bool) -> AdapterNetwork:
        """The encoder's tail after `level` (its pretrained weights, or only its architecture) and a classifier."""
        built, level = self.start()
        if pretrained:
            built.load(torch.device("cpu"))
        return AdapterNetwork(built.tail(level, pretrained=pretrained), built.dim, self.dropout, train_bn=self.bn == "train")

    def expected_token_shape(self) -> list[int]:
        """`[T, C]` of the level's full grid at the encoder's input size (what fit and a saved head must have)."""
        built, level = self.start()
        return _token_shape(built, level)

    def _features(self, X: Any, what: str) -> np.ndarray:
        """`[N, T, C]` tokens, float16 kept as float16 (each batch is cast on its way into the network)."""
        array = np.asarray(X)
        if array.dtype != np.float16:
            return TokenHeadMixin._features(self, array, what)
        if array.ndim != 3 or 0 in array.shape:
            return check_tokens(array, what)  # its error names the shape
        bad = np.concatenate([np.flatnonzero(~np.isfinite(array[start:start + _CHECK_CHUNK]).all(axis=(1, 2))) + start
                              for start in range(0, len(array), _CHECK_CHUNK)])
        if bad.size:
            raise MedembedError(f"{what} has {bad.size} row(s) with NaN or infinite tokens; first row indices: {', '.join(map(str, bad[:10]))}")
        return np.ascontiguousarray(array)

    def _fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
        built, level = self.start()
        expected = _token_shape(built, level)
        for name, array in (("X", X), ("X_val", X_val)):
            if list(array.shape[1:]) != expected:
                raise MedembedError(
                    f"{name} has tokens {tuple(array.shape[1:])}; the adapter needs level {self.level!r}'s full square grid of "
                    f"{self.encoder} at its input size, {tuple(expected)} (1 + H*W tokens, C channels)"
                )
        if self.bn == "train" and len(X) % self.batch_size == 1 and built.level_map_shapes()["final"][1] == 1:
            raise MedembedError(f"-p bn=train: the last training batch would hold one image on a 1x1 map (no batch statistics); change batch_size ({self.batch_size})")
        inputs, val_inputs = torch.from_numpy(X), torch.from_numpy(X_val)
        targets = torch.from_numpy(y.astype(np.float32))
        views = self._training_views()  # a store's augmentation bank: one view or the original per image per epoch
        pool = None if views is None else torch.cat([inputs, torch.from_numpy(self._features(views.X, "views"))])
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]), _torch_threads(self.n_jobs):
            torch.manual_seed(self.seed)
            network = self._network(pretrained=True)
            groups = [
                {"params": network.tail.parameters(), "lr": self.lr},
                {"params": network.classifier.parameters(), "lr": self.head_lr},
            ]
            optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
            self.network_, selection = train_early_stopped(self, network, optimizer, inputs, targets, val_inputs, y_val, views=views, pool=pool)
        seconds = time.perf_counter() - started
        self.token_shape_ = list(X.shape[1:])
        cost = adapter_cost(built, level, n_train=len(X))
        cost["seconds_per_epoch"] = round(seconds / len(selection["val_auroc"]), 2)  # measured: train pass + val pass, this machine
        return {**selection, "cost": cost}

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
        if len(shape) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
            raise HeadLoadError(f"{directory / 'head.json'}: token_shape must be two positive integers")
        try:
            expected_shape = self.expected_token_shape()
            network = self._network(pretrained=False)
        except (MedembedError, TypeError, ValueError, KeyError) as error:  # encoder options are the encoder's own
            raise HeadLoadError(f"{directory}: cannot rebuild the adapter's network ({error})") from None
        if shape != expected_shape or self.n_features_in_ != shape[0]:
            raise HeadLoadError(f"{directory / 'head.json'}: token_shape {shape} (n_features {self.n_features_in_}) is not level {self.level!r}'s {expected_shape}")
        self.token_shape_ = shape
        expected = {key: tuple(tensor.shape) for key, tensor in network.state_dict().items() if tensor.is_floating_point()}
        tensors = read_checked(directory / WEIGHTS_FILE, expected)
        network.load_state_dict(tensors, strict=False)
        self.network_ = network.eval()

"""Heads over token levels `[N, T, C]` (`medembed.encoders.levels`: token 0 the global average, then the grid cells).

- `attention`: a gated-attention pooling MLP (Ilse et al. 2018, "Attention-based deep multiple instance
  learning"): each token goes through Linear -> ReLU -> Dropout; the grid tokens are pooled with softmax
  weights from tanh(V h) * sigmoid(U h); the attended vector and the global token's are concatenated into one
  logit. Channels are standardised on train (statistics over every train token), training is AdamW with
  early stopping on val AUROC, seeded and reproducible on CPU as the MLP head (same training loop). With
  `views` (a store's augmentation bank) each epoch draws one view or the original per train image, as the MLP.
- `concat`: every token concatenated into one `[T * C]` vector, then the logistic-regression head (C chosen
  on val): the "regional grid + linear head" of a small grid such as final@2x2.

Several levels with the same token count (block14 and block10@7x7: 50 each) are concatenated along the
channels by `medembed.protocol.splits` before they reach a head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from torch import nn

from medembed.errors import MedembedError
from medembed.scorers.heads._checks import check_float, check_int, set_training_params
from medembed.scorers.heads._features import Standardizer, l2_normalize_rows
from medembed.scorers.heads._json import HeadLoadError, checked_standardizer, require
from medembed.scorers.heads._weights import expected_shapes, read_checked
from medembed.scorers.heads.base import HEAD_FILE, Head, selection_record
from medembed.scorers.heads.logreg import DEFAULT_C_GRID, LogisticRegressionHead
from medembed.store.views import TrainViews
from medembed.scorers.heads.mlp import MAX_WIDTH, ViewsMixin, _logits, _torch_threads, _train_epoch, epoch_inputs

WEIGHTS_FILE = "attention.safetensors"


def check_tokens(X: Any, what: str) -> np.ndarray:
    """`X` as a C-contiguous `[N, T, C] float32` array; refuses other ranks, empty arrays and NaN/inf rows."""
    array = np.asarray(X)
    if array.ndim != 3 or 0 in array.shape:
        raise MedembedError(f"{what} must be a non-empty [N, T, C] token array (a store level, fit --level), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise MedembedError(f"{what} must hold real numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):
        array = np.ascontiguousarray(array, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(array).all(axis=(1, 2)))
    if bad.size:
        raise MedembedError(f"{what} has {bad.size} row(s) with NaN or infinite tokens; first row indices: {', '.join(map(str, bad[:10]))}")
    return array


class TokenStandardizer(Standardizer):
    """Per-channel standardisation of `[N, T, C]` tokens, statistics over all train tokens."""

    @classmethod
    def fit(cls, X: np.ndarray) -> TokenStandardizer:
        flat = Standardizer.fit(X.reshape(-1, X.shape[-1]))
        return cls(mean=flat.mean, std=flat.std)


class GatedAttentionPool(nn.Module):
    """`[B, T, C]` tokens -> `[B, 1]` logit: gated attention over tokens 1.. beside the global token 0."""

    def __init__(self, channels: int, hidden: int, attention: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.gate_tanh = nn.Linear(hidden, attention)
        self.gate_sigmoid = nn.Linear(hidden, attention)
        self.score = nn.Linear(attention, 1)
        self.out = nn.Linear(2 * hidden, 1)

    def attention(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedded tokens `[B, T, H]`, softmax weights `[B, T - 1, 1]` over the grid tokens)."""
        embedded = self.embed(tokens)
        cells = embedded[:, 1:] if embedded.shape[1] > 1 else embedded
        weights = self.score(torch.tanh(self.gate_tanh(cells)) * torch.sigmoid(self.gate_sigmoid(cells))).softmax(dim=1)
        return embedded, weights

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        embedded, weights = self.attention(tokens)
        cells = embedded[:, 1:] if embedded.shape[1] > 1 else embedded
        attended = (weights * cells).sum(dim=1)
        return self.out(torch.cat([attended, embedded[:, 0]], dim=1))


class TokenHeadMixin:
    """Validation of `[N, T, C]` inputs for heads over token levels (base `Head` checks `[N, D]`)."""

    def _features(self, X: np.ndarray, what: str) -> np.ndarray:
        tokens = check_tokens(X, what)
        if self.l2_normalize:
            tokens = l2_normalize_rows(tokens.reshape(-1, tokens.shape[-1])).reshape(tokens.shape)
        return tokens


class AttentionTokenHead(ViewsMixin, TokenHeadMixin, Head):
    """Gated-attention pooling MLP over a token level; the epoch with the best val AUROC is kept."""

    name = "attention"

    def __init__(
        self,
        *,
        hidden: int = 128,
        attention: int = 64,
        dropout: float = 0.25,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        batch_size: int = 64,
        max_epochs: int = 40,
        patience: int = 8,
        n_jobs: int | None = None,
        class_weight: str | None = None,
        l2_normalize: bool = False,
        seed: int = 0,
    ) -> None:
        """`hidden`: width each token is embedded to; `attention`: width of the gates. Training stops after
        `patience` epochs without a better val AUROC, or at `max_epochs`. `n_jobs`: torch threads (None: torch's)."""
        super().__init__(class_weight=class_weight, l2_normalize=l2_normalize, seed=seed)
        check_int("hidden", hidden, minimum=1, maximum=MAX_WIDTH)
        self.hidden = hidden
        check_int("attention", attention, minimum=1, maximum=MAX_WIDTH)
        self.attention = attention
        check_float("dropout", dropout, 0.0, 0.95)
        self.dropout = dropout
        set_training_params(self, lr=lr, weight_decay=weight_decay, batch_size=batch_size, max_epochs=max_epochs, patience=patience, n_jobs=n_jobs)

    def _fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
        if X_val.shape[2] != X.shape[2]:
            raise MedembedError(f"X_val has {X_val.shape[2]} channels per token but X has {X.shape[2]}")
        self.n_channels_ = X.shape[2]
        self.standardizer_ = TokenStandardizer.fit(X)
        inputs = torch.from_numpy(self._standardized(X))
        val_inputs = torch.from_numpy(self._standardized(X_val))
        targets = torch.from_numpy(y.astype(np.float32))
        views = self._training_views()
        pool = None if views is None else torch.cat([inputs, torch.from_numpy(self._standardized(self._features(views.X, "views")))])
        with torch.random.fork_rng(devices=[]), _torch_threads(self.n_jobs):
            torch.manual_seed(self.seed)
            network = self._build_network()
            optimizer = torch.optim.AdamW(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            self.network_, selection = train_early_stopped(self, network, optimizer, inputs, targets, val_inputs, y_val, views=views, pool=pool)
        return selection

    def _positive_proba(self, X: np.ndarray) -> np.ndarray:
        self._check_channels(X)
        with _torch_threads(self.n_jobs):
            return expit(_logits(self.network_, torch.from_numpy(self._standardized(X))))

    def attention_weights(self, X: np.ndarray) -> np.ndarray:
        """`[N, T - 1]` softmax weights the head gives each grid token (where it looks), for `[N, T, C]` tokens."""
        self._require_fitted()
        X = self._features(X, "X")
        self._check_channels(X)
        with torch.inference_mode(), _torch_threads(self.n_jobs):
            _, weights = self.network_.attention(torch.from_numpy(self._standardized(X)))
        return weights.squeeze(-1).numpy().astype(np.float64)

    def _check_channels(self, X: np.ndarray) -> None:
        if X.shape[2] != self.n_channels_:
            raise MedembedError(f"X has {X.shape[2]} channels per token but the attention head was fitted on {self.n_channels_}")

    def _standardized(self, X: np.ndarray) -> np.ndarray:
        return self.standardizer_.transform(X.reshape(-1, X.shape[2])).reshape(X.shape)

    def _build_network(self) -> GatedAttentionPool:
        return GatedAttentionPool(self.n_channels_, int(self.hidden), int(self.attention), self.dropout)

    def _save_state(self, directory: Path) -> dict[str, Any]:
        tensors = {f"network.{key}": tensor.contiguous() for key, tensor in self.network_.state_dict().items()}
        tensors["standardizer.mean"] = torch.from_numpy(self.standardizer_.mean)
        tensors["standardizer.std"] = torch.from_numpy(self.standardizer_.std)
        save_file(tensors, str(directory / WEIGHTS_FILE))
        return {"n_channels": self.n_channels_}

    def _load_state(self, directory: Path, state: dict[str, Any]) -> None:
        channels = require(state, "n_channels", int, directory / HEAD_FILE)
        if channels < 1:
            raise HeadLoadError(f"{directory / HEAD_FILE}: n_channels must be positive")
        self.n_channels_ = channels
        path = directory / WEIGHTS_FILE
        expected = {f"network.{key}": shape for key, shape in expected_shapes(self._build_network).items()}
        tensors = read_checked(path, expected | {"standardizer.mean": (channels,), "standardizer.std": (channels,)})
        flat = checked_standardizer(tensors["standardizer.mean"], tensors["standardizer.std"], channels, path, ("standardizer.mean", "standardizer.std"))
        network = self._build_network()
        network.load_state_dict({key.removeprefix("network."): tensors[key] for key in expected})
        self.network_ = network.eval()
        self.standardizer_ = TokenStandardizer(mean=flat.mean, std=flat.std)


def train_early_stopped(
    head: Head, network: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
    val_inputs: torch.Tensor, y_val: np.ndarray, views: TrainViews | None = None, pool: torch.Tensor | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `network` in shuffled mini-batches (`head`'s batch_size, seed, class weight) for at most `head.max_epochs`,
    stopping after `head.patience` epochs without a better val AUROC; returns it at its best epoch (eval mode) and
    the selection record. With `views` each epoch trains on one draw per row from `pool` (the originals, then the
    views, prepared as `inputs`: `medembed.scorers.heads.mlp.epoch_inputs`)."""
    positive_weight = head._positive_class_weight(targets.numpy().astype(np.int64))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(positive_weight))
    shuffle = torch.Generator().manual_seed(head.seed)
    draws = np.random.default_rng(head.seed)
    val_auroc: list[float] = []
    train_loss: list[float] = []
    best = 0
    for epoch in range(head.max_epochs):
        train_loss.append(_train_epoch(network, optimizer, loss_fn, epoch_inputs(inputs, pool, views, draws), targets, head.batch_size, shuffle))
        val_auroc.append(float(roc_auc_score(y_val, _logits(network, val_inputs))))
        if epoch == 0 or val_auroc[epoch] > val_auroc[best]:
            best = epoch
            best_state = {key: tensor.clone() for key, tensor in network.state_dict().items()}
        elif epoch - best >= head.patience:
            break
    network.load_state_dict(best_state)
    extra = {"views": views.record()} if views is not None else {}
    return network.eval(), selection_record("epochs", list(range(1, len(val_auroc) + 1)), val_auroc, best, train_loss=train_loss, **extra)


class ConcatTokenHead(LogisticRegressionHead):
    """Logistic regression on every token of a level concatenated (`[N, T, C]` -> `[N, T * C]`), C chosen on val."""

    name = "concat"

    def __init__(
        self,
        *,
        c_grid: tuple[float, ...] = DEFAULT_C_GRID,
        tol: float = 1e-3,
        max_iter: int = 300,
        class_weight: str | None = None,
        l2_normalize: bool = False,
        seed: int = 0,
    ) -> None:
        """As the logreg head; `l2_normalize` scales each token (not the concatenation) to unit norm."""
        super().__init__(c_grid=c_grid, tol=tol, max_iter=max_iter, class_weight=class_weight, l2_normalize=l2_normalize, seed=seed)

    def _features(self, X: np.ndarray, what: str) -> np.ndarray:
        tokens = TokenHeadMixin._features(self, X, what)
        return tokens.reshape(tokens.shape[0], -1)

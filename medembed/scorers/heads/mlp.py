"""A small multilayer perceptron (torch, CPU) on standardised embeddings, early-stopped on val AUROC.

Training is seeded and reproducible on CPU: weights and dropout draw from the global torch generator inside
`torch.random.fork_rng` (so the caller's random state is left as it was), shuffling from a private generator.
Saved as safetensors (weights and standardisation) plus the params in head.json.

With `views` (`medembed.store.views.TrainViews`: the embedded augmented views of train rows, from a store's
augmentation bank) each epoch trains on one choice per train image, drawn uniformly among its original and its views
from a private generator seeded by the head's seed; the standardisation is fitted on the originals, and val (early
stopping) is always the originals.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from torch import nn

from medembed.store.views import TrainViews
from medembed.errors import MedembedError
from medembed.scorers.heads._checks import check_float, check_int, check_sequence, set_training_params
from medembed.scorers.heads._features import Standardizer
from medembed.scorers.heads._json import checked_standardizer
from medembed.scorers.heads._weights import expected_shapes, read_checked
from medembed.scorers.heads.base import Head, selection_record

WEIGHTS_FILE = "mlp.safetensors"
_PREDICT_CHUNK = 8192  # rows per forward pass at prediction time; bounds activation memory


MAX_WIDTH = 65536  # a hidden layer wider than this is a typo (1e9 would allocate terabytes)
MAX_LAYERS = 64  # deeper is a typo too (and a tampered head.json naming a million layers would take minutes to build)


class ViewsMixin:
    """`fit(X, y, eval_set=..., views=TrainViews)` for heads that train in epochs and draw one view (or the original)
    per train image per epoch; `_fit` reads the views with `_training_views()` (None without)."""

    consumes_views = True

    def fit(self, X: Any, y: np.ndarray, *, eval_set: Any = None, views: TrainViews | None = None) -> Any:
        """`Head.fit`; `views`: augmented views of the rows of `X` to draw from each epoch (needs `eval_set`)."""
        if views is not None:
            if not isinstance(views, TrainViews):
                raise MedembedError(f"views must be TrainViews, got {type(views).__name__}")
            if eval_set is None:
                raise MedembedError("fit with views needs eval_set (holding out rows would separate them from their views)")
            views.check(np.shape(X)[0], tuple(np.shape(X)[1:]))
        self._views = views
        try:
            return super().fit(X, y, eval_set=eval_set)
        finally:
            del self._views

    def _training_views(self) -> TrainViews | None:
        return getattr(self, "_views", None)


def epoch_inputs(inputs: torch.Tensor, pool: torch.Tensor | None, views: TrainViews | None, draws: np.random.Generator) -> torch.Tensor:
    """One epoch's train inputs: `inputs` itself without views, else for each row its original or one of its views
    (`pool` = the originals then the views, as `inputs` are prepared), drawn from `draws`."""
    if views is None or pool is None:
        return inputs
    return pool[torch.from_numpy(views.draw(len(inputs), draws))]


class MLPHead(ViewsMixin, Head):
    """Linear -> ReLU -> Dropout blocks, then one logit; AdamW; the epoch with the best val AUROC is kept."""

    name = "mlp"

    def __init__(
        self,
        *,
        hidden: Sequence[int] = (512,),
        dropout: float = 0.2,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        batch_size: int = 512,
        max_epochs: int = 30,
        patience: int = 5,
        n_jobs: int | None = None,
        class_weight: str | None = None,
        l2_normalize: bool = False,
        seed: int = 0,
    ) -> None:
        """`hidden`: widths of the hidden layers. Training stops after `patience` epochs without a better val
        AUROC, or at `max_epochs`. `n_jobs`: torch threads while fitting and predicting (restored afterwards; None
        keeps torch's setting). `class_weight="balanced"` sets BCE's pos_weight to n_normal / n_abnormal."""
        super().__init__(class_weight=class_weight, l2_normalize=l2_normalize, seed=seed)
        widths = check_sequence("hidden", hidden)
        if len(widths) > MAX_LAYERS:
            raise MedembedError(f"head parameter 'hidden' names {len(widths)} layers; at most {MAX_LAYERS}")
        for width in widths:
            check_int("hidden", width, minimum=1, maximum=MAX_WIDTH)
        self.hidden = hidden
        check_float("dropout", dropout, 0.0, 0.95)
        self.dropout = dropout
        set_training_params(self, lr=lr, weight_decay=weight_decay, batch_size=batch_size, max_epochs=max_epochs, patience=patience, n_jobs=n_jobs)

    def _fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
        self.standardizer_ = Standardizer.fit(X)
        inputs = torch.from_numpy(self.standardizer_.transform(X))
        views = self._training_views()
        pool = None if views is None else torch.cat([inputs, torch.from_numpy(self.standardizer_.transform(self._features(views.X, "views")))])
        draws = np.random.default_rng(self.seed)
        targets = torch.from_numpy(y.astype(np.float32))
        val_inputs = torch.from_numpy(self.standardizer_.transform(X_val))
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(self._positive_class_weight(y)))
        val_auroc: list[float] = []
        train_loss: list[float] = []
        with torch.random.fork_rng(devices=[]), _torch_threads(self.n_jobs):
            torch.manual_seed(self.seed)
            network = self._build_network()
            optimizer = torch.optim.AdamW(network.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            shuffle = torch.Generator().manual_seed(self.seed)
            best = 0
            for epoch in range(self.max_epochs):
                loss = _train_epoch(network, optimizer, loss_fn, epoch_inputs(inputs, pool, views, draws), targets, self.batch_size, shuffle)
                train_loss.append(loss)
                val_auroc.append(float(roc_auc_score(y_val, _logits(network, val_inputs))))
                if epoch == 0 or val_auroc[epoch] > val_auroc[best]:
                    best = epoch
                    best_state = {key: tensor.clone() for key, tensor in network.state_dict().items()}
                elif epoch - best >= self.patience:
                    break
        network.load_state_dict(best_state)
        self.network_ = network.eval()
        epochs = list(range(1, len(val_auroc) + 1))
        extra = {"views": views.record()} if views is not None else {}
        return selection_record("epochs", epochs, val_auroc, best, train_loss=train_loss, **extra)

    def _positive_proba(self, X: np.ndarray) -> np.ndarray:
        with _torch_threads(self.n_jobs):
            logits = _logits(self.network_, torch.from_numpy(self.standardizer_.transform(X)))
        return expit(logits)

    def _save_state(self, directory: Path) -> dict[str, Any]:
        tensors = {f"network.{key}": tensor.contiguous() for key, tensor in self.network_.state_dict().items()}
        tensors["standardizer.mean"] = torch.from_numpy(self.standardizer_.mean)
        tensors["standardizer.std"] = torch.from_numpy(self.standardizer_.std)
        save_file(tensors, str(directory / WEIGHTS_FILE))
        return {}

    def _load_state(self, directory: Path, state: dict[str, Any]) -> None:
        path = directory / WEIGHTS_FILE
        n = self.n_features_in_
        expected = {f"network.{key}": shape for key, shape in expected_shapes(self._build_network).items()}
        tensors = read_checked(path, expected | {"standardizer.mean": (n,), "standardizer.std": (n,)})
        self.standardizer_ = checked_standardizer(tensors["standardizer.mean"], tensors["standardizer.std"], n, path, ("standardizer.mean", "standardizer.std"))
        network = self._build_network()
        network.load_state_dict({key.removeprefix("network."): tensors[key] for key in expected})
        self.network_ = network.eval()

    def _build_network(self) -> nn.Sequential:
        """The untrained network for `n_features_in_` inputs (initialised from the global torch generator)."""
        layers: list[nn.Module] = []
        width = self.n_features_in_
        for hidden_width in self.hidden:
            layers += [nn.Linear(width, int(hidden_width)), nn.ReLU(), nn.Dropout(self.dropout)]
            width = int(hidden_width)
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)


@contextmanager
def _torch_threads(n_threads: int | None) -> Iterator[None]:
    """Run the block with `n_threads` torch intra-op threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    if n_threads is not None:
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_epoch(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    shuffle: torch.Generator,
) -> float:
    """One pass over `inputs` `[N, D]` in shuffled mini-batches; returns the mean training loss."""
    network.train()
    order = torch.randperm(inputs.shape[0], generator=shuffle)
    total = 0.0
    for start in range(0, inputs.shape[0], batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad()
        loss = loss_fn(network(inputs[batch]).squeeze(1), targets[batch])
        loss.backward()
        optimizer.step()
        total += loss.item() * batch.numel()
    return total / inputs.shape[0]


def _logits(network: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """Logits `[N]` float64 of `inputs` `[N, D] float32` in eval mode (dropout off)."""
    network.eval()
    with torch.inference_mode():
        starts = range(0, len(inputs), _PREDICT_CHUNK)
        chunks = [network(inputs[start : start + _PREDICT_CHUNK]).squeeze(1) for start in starts]
    return torch.cat(chunks).numpy().astype(np.float64)

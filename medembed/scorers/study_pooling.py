"""Learned study pooling: gated attention over the image embeddings of a study (run kind "study-pooling").

    medembed fit mura.h5 --study-pooling attention --out runs/mura-attention

Mean or max of image probabilities (`--aggregation`) treat every view of a study alike; a radiologist does not.
This scorer learns which images of a study to look at (Ilse et al. 2018, gated attention multiple-instance
pooling): each image embedding x_i becomes h_i = ReLU(W x_i); its weight a_i = softmax_i(w . (tanh(V h_i) *
sigmoid(U h_i))); the study's logit is c . sum_i a_i h_i + b. It is trained on train studies (study label: any
abnormal image makes the study abnormal) and early-stopped on val studies' AUROC; test is never seen.

The protocol works per image, so `predict_proba(X, study_id=...)` gives every image its study's pooled
probability: study-level metrics (the mean of identical values) are the attention pooling's, and image-level
metrics are those of each image's study score. MURA has 1-11 images per study; FracAtlas has one image per
study, so there the pooling has a single image to weigh and its figure is an image-level one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import roc_auc_score
from torch import nn

from medembed._files import atomic_write_json, read_json
from medembed.errors import MedembedError
from medembed.scorers.heads._checks import check_embeddings, check_float, check_int, check_labels
from medembed.scorers.heads._features import Standardizer
from medembed.scorers.heads._json import checked_standardizer
from medembed.scorers.heads.base import MAX_FEATURES
from medembed.scorers.heads._weights import expected_shapes, read_checked

KIND = "study-pooling"
POOLINGS = ("attention",)
PARAMS_FILE = "study_pooling.json"
WEIGHTS_FILE = "study_pooling.safetensors"
FORMAT_VERSION = 1


class GatedAttentionPool(nn.Module):
    """`[S, K, D]` padded studies with mask `[S, K]` -> study logits `[S]` and attention weights `[S, K]`."""

    def __init__(self, dim: int, hidden: int, attention: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.tanh_branch = nn.Linear(hidden, attention)
        self.gate_branch = nn.Linear(hidden, attention)
        self.score = nn.Linear(attention, 1)
        self.classify = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        a = self.score(torch.tanh(self.tanh_branch(h)) * torch.sigmoid(self.gate_branch(h))).squeeze(-1)
        weights = torch.softmax(a.masked_fill(~mask, float("-inf")), dim=1)
        pooled = (weights.unsqueeze(-1) * h).sum(dim=1)
        return self.classify(pooled).squeeze(-1), weights


class AttentionStudyPooling(ClassifierMixin, BaseEstimator):
    """The study-pooling scorer (see the module docstring); consumes `[N, D]` embeddings and their `study_id`."""

    kind: ClassVar[str] = KIND
    consumes: ClassVar[str] = "embeddings"
    columns_used: ClassVar[tuple[str, ...]] = ("study_id",)

    def __init__(
        self, *, hidden: int = 128, attention: int = 64, dropout: float = 0.2, lr: float = 3e-3, weight_decay: float = 1e-2,
        batch_studies: int = 32, max_epochs: int = 60, patience: int = 8, seed: int = 0,
    ) -> None:
        """`hidden`: width of each image's projection; `attention`: width of the gated attention; training stops
        after `patience` epochs without a better val study AUROC, or at `max_epochs`."""
        check_int("hidden", hidden, minimum=1, maximum=65536)
        check_int("attention", attention, minimum=1, maximum=65536)
        check_float("dropout", dropout, 0.0, 0.95)
        check_float("lr", lr, 0.0, 10.0, low_inclusive=False)
        check_float("weight_decay", weight_decay, 0.0, 10.0)
        check_int("batch_studies", batch_studies, minimum=1)
        check_int("max_epochs", max_epochs, minimum=1)
        check_int("patience", patience, minimum=1)
        check_int("seed", seed, minimum=0)
        self.hidden, self.attention, self.dropout, self.lr, self.weight_decay = hidden, attention, dropout, lr, weight_decay
        self.batch_studies, self.max_epochs, self.patience, self.seed = batch_studies, max_epochs, patience, seed

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        return tuple(cls._get_param_names())

    # -- the scorer contract ---------------------------------------------------------------------------------

    def fit(self, X: Any, y: np.ndarray, *, eval_set: Any = None, study_id: np.ndarray | None = None, eval_study_id: np.ndarray | None = None) -> AttentionStudyPooling:
        """Train on the studies of `X` `[N, D]` (grouped by `study_id` [N]); early-stop on the val studies of
        `eval_set=[(X_val, y_val)]` grouped by `eval_study_id`."""
        X = check_embeddings(X, "X")
        y = check_labels(y, X.shape[0], "y")
        if eval_set is None or study_id is None or eval_study_id is None:
            raise MedembedError("study pooling is fitted with eval_set=[(X_val, y_val)], study_id and eval_study_id (it learns over studies)")
        X_val, y_val = eval_set[0]
        X_val = check_embeddings(X_val, "X_val")
        y_val = check_labels(y_val, X_val.shape[0], "y_val")
        self.standardizer_ = Standardizer.fit(X)
        train, val = _Studies.of(self.standardizer_.transform(X), y, study_id), _Studies.of(self.standardizer_.transform(X_val), y_val, eval_study_id)
        for name, studies in (("train", train), ("val", val)):
            if len(np.unique(studies.y)) < 2:
                raise MedembedError(f"the {name} studies hold a single class; study pooling needs abnormal and normal studies")
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.model_ = GatedAttentionPool(X.shape[1], self.hidden, self.attention, self.dropout)
            self.selection_ = self._train(train, val)
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X: Any, study_id: np.ndarray | None = None) -> np.ndarray:
        """`[N, 2]`: column 1 is each image's study's pooled P(abnormal) (images grouped by `study_id` [N])."""
        if not hasattr(self, "model_"):
            raise MedembedError("this study pooling is not fitted yet; call fit() or load it from a run directory")
        X = check_embeddings(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise MedembedError(f"X has {X.shape[1]} features but the study pooling was fitted on {self.n_features_in_}")
        if study_id is None or len(study_id) != len(X):
            raise MedembedError("study pooling scores images with their study_id (one per row)")
        studies = _Studies.of(self.standardizer_.transform(X), np.zeros(len(X), dtype=np.int8), study_id)
        positive = self.study_probabilities(studies)[studies.index_of_row]
        return np.column_stack([1.0 - positive, positive])

    def study_probabilities(self, studies: _Studies) -> np.ndarray:
        """`[S]` pooled P(abnormal) per study."""
        self.model_.eval()
        with torch.no_grad():
            logits = np.concatenate([self.model_(x, m)[0].numpy() for x, m in studies.batches(4096)]) if len(studies.y) else np.zeros(0)
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

    def save(self, directory: Path) -> None:
        """study_pooling.json (params, selection, width) and the weights and standardisation as safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {**{f"model.{k}": v.contiguous() for k, v in self.model_.state_dict().items()},
                   "mean": torch.from_numpy(self.standardizer_.mean), "std": torch.from_numpy(self.standardizer_.std)}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        atomic_write_json(directory / PARAMS_FILE, {
            "format_version": FORMAT_VERSION, "pooling": "attention", "params": self.get_params(),
            "n_features": self.n_features_in_, "selection": self.selection_,
        })

    @classmethod
    def load(cls, directory: Path) -> AttentionStudyPooling:
        """Read a pooling saved by `save`; a missing, tampered or foreign file is one MedembedError."""
        path = Path(directory) / PARAMS_FILE
        document = read_json(path, "study pooling file")
        if not isinstance(document, dict) or document.get("format_version") != FORMAT_VERSION or document.get("pooling") != "attention":
            raise MedembedError(f"{path}: not a study pooling of format {FORMAT_VERSION}")
        params, n_features = document.get("params"), document.get("n_features")
        if not isinstance(params, dict) or set(params) != set(cls.param_names()) or isinstance(n_features, bool) or not isinstance(n_features, int) or not 1 <= n_features <= MAX_FEATURES:
            raise MedembedError(f"{path}: params must be {sorted(cls.param_names())} and n_features a positive integer")
        try:
            scorer = cls(**params)
        except (MedembedError, TypeError) as error:
            raise MedembedError(f"{path}: {error}") from None
        weights = Path(directory) / WEIGHTS_FILE
        build = lambda: GatedAttentionPool(n_features, scorer.hidden, scorer.attention, scorer.dropout)  # noqa: E731
        expected = {f"model.{key}": shape for key, shape in expected_shapes(build).items()}
        tensors = read_checked(weights, expected | {"mean": (n_features,), "std": (n_features,)})
        scorer.standardizer_ = checked_standardizer(tensors["mean"], tensors["std"], n_features, weights)
        scorer.model_ = build()
        scorer.model_.load_state_dict({key.removeprefix("model."): tensors[key] for key in expected})
        selection = document.get("selection", {})
        if not isinstance(selection, dict):
            raise MedembedError(f"{path}: selection must be an object")
        scorer.n_features_in_, scorer.selection_, scorer.classes_ = n_features, selection, np.array([0, 1])
        return scorer

    # -- training --------------------------------------------------------------------------------------------

    def _train(self, train: _Studies, val: _Studies) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        shuffle = torch.Generator().manual_seed(self.seed)
        loss_fn = nn.BCEWithLogitsLoss()
        best, best_epoch, best_state, curve = -1.0, 0, None, []
        for epoch in range(1, self.max_epochs + 1):
            self.model_.train()
            order = torch.randperm(len(train.y), generator=shuffle).numpy()
            for start in range(0, len(order), self.batch_studies):
                x, mask = train.padded(order[start:start + self.batch_studies])
                target = torch.from_numpy(train.y[order[start:start + self.batch_studies]].astype(np.float32))
                optimizer.zero_grad()
                loss_fn(self.model_(x, mask)[0], target).backward()
                optimizer.step()
            auroc = float(roc_auc_score(val.y, self.study_probabilities(val)))
            curve.append(auroc)
            if auroc > best:
                best, best_epoch = auroc, epoch
                best_state = {k: v.detach().clone() for k, v in self.model_.state_dict().items()}
            elif epoch - best_epoch >= self.patience:
                break
        self.model_.load_state_dict(best_state)
        return {"searched": "epochs", "val_study_auroc": curve, "chosen": best_epoch, "best_val_auroc": best,
                "studies": {"train": len(train.y), "val": len(val.y)}, "max_images_per_study": int(train.sizes.max())}


class _Studies:
    """Rows grouped into studies: `[S, K_max, D]` padded batches, study labels, and each row's study index."""

    def __init__(self, X: np.ndarray, rows_of: list[np.ndarray], y: np.ndarray, index_of_row: np.ndarray) -> None:
        self.X, self.rows_of, self.y, self.index_of_row = X, rows_of, y, index_of_row
        self.sizes = np.array([len(r) for r in rows_of], dtype=np.int64)

    @classmethod
    def of(cls, X: np.ndarray, y: np.ndarray, study_id: np.ndarray) -> _Studies:
        """Group `X` [N, D] by `study_id` [N]; a study is abnormal when any of its images is."""
        ids, index = np.unique(np.asarray(study_id).astype(str), return_inverse=True)
        order = np.argsort(index, kind="stable")
        bounds = np.searchsorted(index[order], np.arange(len(ids) + 1))
        rows_of = [order[bounds[s]:bounds[s + 1]] for s in range(len(ids))]
        labels = np.array([int(y[r].max()) for r in rows_of], dtype=np.int8) if len(ids) else np.zeros(0, dtype=np.int8)
        return cls(X, rows_of, labels, index)

    def padded(self, studies: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of `studies` as `[S, K_max, D]` float32 (zero padding) and their mask `[S, K_max]`."""
        width = int(self.sizes[studies].max())
        x = np.zeros((len(studies), width, self.X.shape[1]), dtype=np.float32)
        mask = np.zeros((len(studies), width), dtype=bool)
        for i, s in enumerate(studies):
            rows = self.rows_of[s]
            x[i, :len(rows)] = self.X[rows]
            mask[i, :len(rows)] = True
        return torch.from_numpy(x), torch.from_numpy(mask)

    def batches(self, size: int):
        """Every study in order, `size` at a time."""
        for start in range(0, len(self.rows_of), size):
            yield self.padded(np.arange(start, min(start + size, len(self.rows_of))))


def make_study_pooling(pooling: str, params: dict[str, Any], seed: int) -> AttentionStudyPooling:
    """An unfitted study pooling by name with its `-p` parameters."""
    if pooling not in POOLINGS:
        raise MedembedError(f"option study_pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
    unknown = sorted(set(params) - set(AttentionStudyPooling.param_names()) - {"seed"})
    if unknown:
        raise MedembedError(f"unknown parameter(s) {', '.join(unknown)} for study pooling; it accepts {', '.join(AttentionStudyPooling.param_names())}")
    return AttentionStudyPooling(**{**params, "seed": seed})

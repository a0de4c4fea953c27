"""The conventional-CNN baseline: EfficientNet-Lite0 (ImageNet weights) fine-tuned end to end on the train images.

It is compared with embedding heads under `medembed fit`'s protocol: the manifest's own train/val/test rows,
early stopping (on val AUROC), probability calibration and thresholds chosen on val, metrics and report on
test, all through `medembed.fit`'s functions. The run directory matches a fit run's:

    run.json           options, fingerprint (encoder "cnn-efficientnet-lite0", fine-tuned weights' sha256,
                       preprocess hash), thresholds, calibration, split sizes, training history, timings,
                       and the images left out because they could not be decoded (in `notes`)
    model/             model.safetensors + model.json (no pickle)
    metrics.json, report.md, figures/, predictions.csv

Images are decoded once into an 8-bit cache (`_data`); training augments batches with plain torch ops
(`augment`). Seeded: on a CPU, a rerun with the same seed and thread count gives identical weights. CUDA
runs use bf16 autocast.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import save as save_tensors
from scipy.special import expit
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score
from torch import nn

from medembed.scorers.baselines._data import cache_images, grey_spec, unit_pixels
from medembed.scorers.baselines._training import (
    EarlyStopping,
    autocast,
    cpu_threads,
    load_weights,
    predict_batches,
    read_config,
    save_model,
    seeded,
    train_epochs,
)
from medembed.scorers.baselines.augment import Augmentation
from medembed.encoders.efficientnet_lite import EfficientNetLite0Encoder
from medembed.errors import MedembedError
from medembed.encoders.runtime import resolve_device
from medembed.data.images import PreprocessSpec
from medembed.data.manifest import Manifest
from medembed.options.baselines import CNN_KIND, CNNOptions, check_cnn_options

KIND = CNN_KIND


class EfficientNetClassifier(nn.Module):
    """Grey images [B, 1, S, S] in [0, 1] -> abnormality logits [B]: EfficientNet-Lite0 with a one-logit head.

    The backbone's normalisation (`spec.mean`, `spec.std`, grey repeated to three channels) happens inside,
    so the cached 8-bit grey pixels go in directly.
    """

    def __init__(self, backbone: nn.Module, spec: PreprocessSpec) -> None:
        super().__init__()
        backbone._fc = nn.Linear(backbone._fc.in_features, 1)
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] float in [0, 1] -> [B] logits."""
        pixels = (grey.expand(-1, 3, -1, -1) - self.mean) / self.std
        # channels_last runs the depthwise convolutions markedly faster on CPUs (oneDNN) and on GPUs.
        return self.backbone(pixels.contiguous(memory_format=torch.channels_last)).squeeze(1)


def pretrained_classifier(size: int) -> tuple[EfficientNetClassifier, EfficientNetLite0Encoder]:
    """EfficientNet-Lite0 with the packaged ImageNet weights, built for `size` px, with a new (seeded) logit head.

    Loaded through medembed's encoder, so the weights and preprocessing are exactly the embedding baseline's.
    """
    encoder = EfficientNetLite0Encoder(size)
    encoder.load(torch.device("cpu"))
    backbone = encoder.network.requires_grad_(True)  # the encoder holds it frozen; fine-tuning unfreezes it
    return EfficientNetClassifier(backbone, encoder.preprocess), encoder


def load_cnn(directory: Path) -> tuple[EfficientNetClassifier, PreprocessSpec]:
    """A fine-tuned classifier saved in a run's model/ directory (eval mode, CPU), and its preprocessing spec."""
    config = read_config(directory, KIND)
    try:
        spec = PreprocessSpec.from_dict(config["preprocess"])
    except (KeyError, TypeError, ValueError) as error:
        raise MedembedError(f"{Path(directory) / 'model.json'}: preprocess is not a preprocessing spec ({error})") from None
    network, _ = pretrained_classifier(spec.size)
    load_weights(directory, network)
    return network.eval(), spec


class CNNScorer(BaseEstimator):
    """The fine-tuned CNN behind the scoring contract: it consumes images, decoded by `load_images` into the
    8-bit grey cache at its input size, and `fit` fine-tunes on train with early stopping on `eval_set`."""

    kind: ClassVar[str] = "cnn"
    consumes: ClassVar[str] = "images"
    columns_used: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: CNNOptions | None = None) -> None:
        self.options = options

    @property
    def _options(self) -> CNNOptions:
        return self.options if self.options is not None else CNNOptions()

    @property
    def preprocess(self) -> PreprocessSpec:
        """The backbone's preprocessing at the CNN's input size (its hash is the run's preprocess hash)."""
        return EfficientNetLite0Encoder(self._options.size).preprocess

    @property
    def image_spec(self) -> PreprocessSpec:
        """What `load_images` decodes with: the backbone's geometry, one grey channel in [0, 1]."""
        return grey_spec(self.preprocess)

    def load_images(self, manifest: Manifest, root: Path, preprocess: Any = None) -> tuple[torch.Tensor, np.ndarray, dict[str, str]]:
        """Decode `manifest`'s images into cached pixels [M, 1, S, S] uint8; also which rows decoded ([N] bool)
        and why the others did not. `preprocess` replaces `image_spec` (e.g. a corrupted variant of it)."""
        spec = preprocess if preprocess is not None else self.image_spec
        cache = cache_images(manifest, root, spec, self._options.num_workers)
        decoded = np.zeros(len(manifest), dtype=bool)
        decoded[cache.rows] = True
        return cache.pixels, decoded, cache.failed

    def fit(self, X: torch.Tensor, y: np.ndarray, *, eval_set: Any = None, log: Callable[[str], None] | None = None) -> CNNScorer:
        """Fine-tune on cached train pixels X [N, 1, S, S] uint8 and labels y [N]; early stopping on eval_set's AUROC."""
        check_cnn_options(self._options)
        if eval_set is None:
            raise MedembedError("the CNN needs eval_set=[(X_val, y_val)] for early stopping")
        (X_val, y_val), = eval_set[:1]
        options = self._options
        device = resolve_device(options.device)
        with seeded(options.seed, device), cpu_threads(options.threads):
            network, encoder = pretrained_classifier(options.size)
            network.to(device, memory_format=torch.channels_last)
            self.history_ = _train(network, X, np.asarray(y), X_val, np.asarray(y_val), options, device, log or (lambda line: None))
        self.network_ = network.eval()
        self.model_id_, self.revision_ = encoder.model_id, encoder.revision
        return self

    def predict_proba(self, X: torch.Tensor) -> np.ndarray:
        """[N, 2] float64 probabilities of cached pixels X [N, 1, S, S] uint8; column 1 is P(abnormal)."""
        device = next(self.network_.parameters()).device
        with cpu_threads(self._options.threads):
            p = _probabilities(self.network_, X, 2 * self._options.batch_size, device)
        return np.column_stack([1.0 - p, p])

    def config(self) -> dict[str, Any]:
        return {"kind": KIND, "preprocess": self.preprocess.to_dict(), "options": asdict(self._options), "history": self.history_}

    def save(self, directory: Path) -> None:
        save_model(Path(directory), self.network_, self.config())

    def weights_sha256(self) -> str:
        """sha256 of the safetensors file `save` writes."""
        tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in self.network_.state_dict().items()}
        return hashlib.sha256(save_tensors(tensors)).hexdigest()

    @classmethod
    def load(cls, directory: Path) -> CNNScorer:
        config = read_config(directory, KIND)
        try:
            options = CNNOptions(**config["options"])
        except (TypeError, KeyError) as error:
            raise MedembedError(f"{directory}: model.json options do not describe a CNN ({error})") from None
        scorer = cls(replace(options, device="cpu"))
        scorer.network_, _ = load_cnn(directory)
        scorer.history_ = config.get("history", {})
        return scorer


def _probabilities(network: EfficientNetClassifier, pixels: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Uncalibrated abnormality probabilities [N] float64 of cached pixels [N, 1, S, S] uint8."""
    return expit(predict_batches(network, pixels, batch_size, device).numpy().astype(np.float64))


def _train(
    network: EfficientNetClassifier,
    train_pixels: torch.Tensor,
    train_labels: np.ndarray,
    val_pixels: torch.Tensor,
    val_labels: np.ndarray,
    options: CNNOptions,
    device: torch.device,
    log: Callable[[str], None],
) -> dict:
    """Fine-tune `network` in place with early stopping on val AUROC; the best epoch's weights are restored."""
    train_y = torch.from_numpy(train_labels.astype(np.float32))
    pos_weight = (len(train_y) - train_y.sum()) / train_y.sum() if options.pos_weight == "balanced" else float(options.pos_weight)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(pos_weight, dtype=torch.float32, device=device))
    augment = Augmentation() if options.augment else None
    generator = torch.Generator().manual_seed(options.seed)  # shuffling and augmentation

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        images = unit_pixels(train_pixels[batch], device)
        if augment is not None:
            images = augment(images, generator)
        with autocast(device):
            logits = network(images)
        return loss_fn(logits.float(), train_y[batch].to(device))

    def val_auroc() -> float:
        logits = predict_batches(network, val_pixels, 2 * options.batch_size, device).numpy()
        return float(roc_auc_score(val_labels, logits)) if np.isfinite(logits).all() else float("nan")

    stopper = EarlyStopping(options.patience, mode="max")
    optimizer = torch.optim.AdamW(network.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    train_loss = train_epochs(
        network, optimizer, batch_loss, len(train_y), val_auroc, stopper,
        epochs=options.epochs, batch_size=options.batch_size, generator=generator, log=log, score_name="AUROC",
    )
    return {
        "epochs": len(stopper.scores),
        "train_loss": train_loss,
        "val_auroc": stopper.scores,
        "best_epoch": stopper.best_epoch + 1,
        "pos_weight": float(pos_weight),
    }

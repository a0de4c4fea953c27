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

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from torch import nn

from medembed.baselines._data import ImageCache, cache_images, failed_note, grey_spec, read_checked_manifest, unit_pixels
from medembed.baselines._training import (
    TrainingResources,
    EarlyStopping,
    StageTimer,
    autocast,
    cpu_threads,
    load_weights,
    predict_batches,
    read_config,
    save_model,
    seeded,
    train_epochs,
)
from medembed.baselines.augment import Augmentation
from medembed.encoders.efficientnet_lite import EfficientNetLite0Encoder
from medembed.errors import MedembedError
from medembed.extract import resolve_device
from medembed.fit import FitOptions, Split, calibrate_on_val, evaluate_split, run_record, write_outputs
from medembed.images import PreprocessSpec
from medembed.manifest import SPLITS, Manifest
from medembed.store import make_fingerprint

KIND = "cnn-efficientnet-lite0"
MODEL_DIR = "model"


@dataclass
class CNNOptions(TrainingResources):
    """How the CNN is trained; stored in run.json (as the options' head_params) so a run is reproducible."""

    size: int = 128  # input side in pixels; EfficientNet-Lite0 was trained at 224, CPUs need smaller
    epochs: int = 5  # at most (~2 min each for FracAtlas on a 2-core CPU at 128 px); early stopping may end sooner
    patience: int = 2  # epochs without a better val AUROC before stopping
    batch_size: int = 32
    lr: float = 3e-4  # AdamW
    weight_decay: float = 1e-2  # AdamW's decoupled decay
    pos_weight: float | str = 1.0  # BCE weight of abnormal images; "balanced" = n_normal / n_abnormal of train
    augment: bool = True


@dataclass
class CNNRun:
    """What one baseline run did: its metrics, training history, left-out images and timings."""

    out: Path
    metrics: dict
    history: dict  # epochs, train_loss, val_auroc per epoch, best_epoch (1-based)
    failed: dict[str, str]  # image id -> why it could not be decoded
    seconds: dict[str, float] = field(default_factory=dict)  # decode, train, evaluate, total


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
    spec = PreprocessSpec.from_dict(config["preprocess"])
    network, _ = pretrained_classifier(spec.size)
    load_weights(directory, network)
    return network.eval(), spec


def run_cnn_baseline(
    manifest_path: Path,
    root: Path,
    out: Path,
    options: CNNOptions | None = None,
    fit_options: FitOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> CNNRun:
    """Fine-tune the CNN on the manifest's train rows, calibrate on val, evaluate on test; write the run `out`.

    `fit_options` gives the shared protocol (threshold rule, calibration, study aggregation, bootstrap);
    its head fields are set to describe the CNN. Rows without a label or split are not used; images that
    cannot be decoded are left out and named in run.json. `log` receives one line per stage and epoch.
    """
    options = options or CNNOptions()
    fit_options = replace(fit_options or FitOptions(), head=KIND, head_params=asdict(options), seeds=1)
    log = log or (lambda line: None)
    _check_options(options)
    out = Path(out)
    timer = StageTimer()
    manifest = read_checked_manifest(manifest_path, SPLITS)
    usable = (manifest.label >= 0) & np.isin(manifest.split, SPLITS)
    notes = [f"{int((~usable).sum())} rows without a label or split left out"] if not usable.all() else []
    manifest = manifest.subset(usable)

    encoder_spec = EfficientNetLite0Encoder(options.size).preprocess
    cache = cache_images(manifest, root, grey_spec(encoder_spec), options.num_workers)
    log(f"decoded {len(cache)} images in {timer.done('decode'):.1f} s ({len(cache.failed)} could not be decoded)")
    if cache.failed:
        notes.append(failed_note(cache.failed))
    splits, pixels = _split_cache(manifest, cache)

    device = resolve_device(options.device)
    with seeded(options.seed, device), cpu_threads(options.threads):
        network, encoder = pretrained_classifier(options.size)
        network.to(device, memory_format=torch.channels_last)
        history = _train(network, splits, pixels, options, device, log)
        timer.done("train")
        network.eval()
        raw = {name: _probabilities(network, pixels[name], 2 * options.batch_size, device) for name in ("val", "test")}

    config = {"kind": KIND, "preprocess": encoder_spec.to_dict(), "options": asdict(options), "history": history}
    weights_sha256 = save_model(out / MODEL_DIR, network, config)
    calibration = calibrate_on_val(raw["val"], splits["val"], fit_options)
    p_test = calibration.calibrator.transform(raw["test"])
    metrics = evaluate_split(p_test, splits["test"], calibration, fit_options, seed=fit_options.seed)
    fingerprint = make_fingerprint(
        encoder=KIND, model_id=encoder.model_id, revision=encoder.revision, weights_sha256=weights_sha256,
        embedding_kind="abnormality_logit", preprocess_hash=encoder_spec.hash(), dtype="float32",
    )
    run_json = run_record(fit_options, calibration, splits, fingerprint, notes) | {
        "manifest": str(Path(manifest_path).resolve()),
        "image_root": str(Path(root).resolve()),
        "preprocess": encoder_spec.to_json(),
        "model": MODEL_DIR,
        "training": history,
        "failed_images": cache.failed,
    }
    write_outputs(p_test, splits["test"], calibration, metrics, out, fit_options, run_json)
    timer.done("evaluate")
    run_json["timing_seconds"] = timer.summary()
    (out / "run.json").write_text(json.dumps(run_json, indent=2, default=str) + "\n")
    return CNNRun(out, metrics, history, cache.failed, run_json["timing_seconds"])


def _probabilities(network: EfficientNetClassifier, pixels: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Uncalibrated abnormality probabilities [N] float64 of cached pixels [N, 1, S, S] uint8."""
    return expit(predict_batches(network, pixels, batch_size, device).numpy().astype(np.float64))


def _check_options(options: CNNOptions) -> None:
    for name in ("size", "epochs", "patience", "batch_size"):
        if getattr(options, name) < 1:
            raise MedembedError(f"CNN option {name} must be a positive integer, got {getattr(options, name)}")
    if options.size < 32:
        raise MedembedError(f"CNN input size {options.size} px is too small for EfficientNet's 32x downsampling; use 32 or more")
    if options.lr <= 0:
        raise MedembedError(f"CNN learning rate must be positive, got {options.lr}")
    if options.pos_weight != "balanced" and not (isinstance(options.pos_weight, (int, float)) and options.pos_weight > 0):
        raise MedembedError(f"pos_weight must be a positive number or 'balanced', got {options.pos_weight!r}")


def _split_cache(manifest: Manifest, cache: ImageCache) -> tuple[dict[str, Split], dict[str, torch.Tensor]]:
    """The decoded rows of each split, as fit's Split (no embeddings) and as cached pixels."""
    splits, pixels = {}, {}
    for name in SPLITS:
        take = np.flatnonzero(manifest.split[cache.rows] == name)
        rows = manifest.subset(cache.rows[take])
        columns = {"study_id": rows.study_id, "patient_id": rows.patient_id, "body_part": rows.body_part}
        splits[name] = Split.from_columns(None, rows.label, rows.image_id, columns)
        pixels[name] = cache.pixels[torch.from_numpy(take)]
    for name in ("train", "val"):
        if len(np.unique(splits[name].y)) < 2:
            raise MedembedError(f"the {name} split has {len(splits[name])} decodable images of a single class; both classes are needed")
    if len(splits["test"]) == 0:
        raise MedembedError("no test image could be decoded")
    return splits, pixels


def _train(
    network: EfficientNetClassifier,
    splits: dict[str, Split],
    pixels: dict[str, torch.Tensor],
    options: CNNOptions,
    device: torch.device,
    log: Callable[[str], None],
) -> dict:
    """Fine-tune `network` in place with early stopping on val AUROC; the best epoch's weights are restored."""
    train_y = torch.from_numpy(splits["train"].y.astype(np.float32))
    pos_weight = (len(train_y) - train_y.sum()) / train_y.sum() if options.pos_weight == "balanced" else float(options.pos_weight)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(pos_weight, dtype=torch.float32, device=device))
    augment = Augmentation() if options.augment else None
    generator = torch.Generator().manual_seed(options.seed)  # shuffling and augmentation

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        images = unit_pixels(pixels["train"][batch], device)
        if augment is not None:
            images = augment(images, generator)
        with autocast(device):
            logits = network(images)
        return loss_fn(logits.float(), train_y[batch].to(device))

    def val_auroc() -> float:
        logits = predict_batches(network, pixels["val"], 2 * options.batch_size, device).numpy()
        return float(roc_auc_score(splits["val"].y, logits)) if np.isfinite(logits).all() else float("nan")

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

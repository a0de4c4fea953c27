"""The autoencoder baseline: a small convolutional autoencoder trained on the train images, its bottleneck as embeddings.

Grey `size` x `size` pixels in [0, 1] go through four stride-2 convolutions (`width`, 2x, 4x channels, then
`bottleneck`; each with batch norm and ReLU) to a `[bottleneck, size/16, size/16]` map, and four transposed
convolutions back; the loss is the pixel MSE. Training uses the manifest's train rows only, early-stopped on the val reconstruction loss.
The bottleneck map's global average (`[bottleneck]` per image) of every manifest image is written to a
regular embedding store, so `medembed fit` fits the same heads on it as on foundation-model embeddings:

    medembed baseline autoencoder data_manifests/fracatlas.csv --root FRACATLAS --out fracatlas-ae.h5
    medembed fit fracatlas-ae.h5 --head logreg --out runs/ae-logreg

The network and its encoder live in `medembed.encoders.autoencoder`: once trained, the weights (model.safetensors +
model.json) are saved next to the store, in `<store stem>.autoencoder/`, and `extract` writes the store with that
encoder, so the fingerprint names encoder "autoencoder" and the weights' sha256, and `predict` can rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medembed._version import __version__
from medembed.scorers.baselines._data import cache_images, failed_note, read_checked_manifest, unit_pixels
from medembed.scorers.baselines._training import (
    EarlyStopping,
    StageTimer,
    autocast,
    cpu_threads,
    predict_batches,
    save_model,
    seeded,
    train_epochs,
)
from medembed.encoders.autoencoder import KIND, LEVELS, AutoencoderEncoder, ConvAutoencoder, autoencoder_spec
from medembed.errors import MedembedError
from medembed.options.extract import ExtractOptions
from medembed.extract.runner import extract
from medembed.encoders.runtime import resolve_device
from medembed.data.images import PreprocessSpec
from medembed.options.extract import DTYPES
from medembed.options.baselines import AutoencoderOptions


@dataclass
class AutoencoderRun:
    """What one run did: the store written, the saved weights, training history, left-out images and timings."""

    store: Path
    weights: Path
    embedded: int
    history: dict  # epochs, train_loss, val_mse per epoch, best_epoch (1-based)
    failed: dict[str, str]  # image id -> why it could not be decoded
    seconds: dict[str, float] = field(default_factory=dict)  # decode, train, embed (inference + store), total


def weights_dir(store: Path) -> Path:
    """Where the autoencoder behind `store` keeps its weights: `<store stem>.autoencoder/` beside it."""
    return Path(store).with_name(Path(store).stem + ".autoencoder")


def load_autoencoder(directory: Path) -> tuple[ConvAutoencoder, PreprocessSpec]:
    """A trained autoencoder saved by `run_autoencoder_baseline` (eval mode, CPU), and its preprocessing spec."""
    encoder = AutoencoderEncoder(str(directory))
    encoder.load(torch.device("cpu"))
    return encoder._model, encoder.preprocess


def run_autoencoder_baseline(
    manifest_path: Path,
    root: Path,
    out: Path,
    options: AutoencoderOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> AutoencoderRun:
    """Train the autoencoder on the manifest's train rows (early stopping on val), then embed every manifest
    image into the new store `out`; images that cannot be decoded go to its failed table.

    `log` receives one line per stage and epoch.
    """
    options = options or AutoencoderOptions()
    log = log or (lambda line: None)
    _check_options(options)
    out = Path(out)
    if out.exists():
        raise MedembedError(f"{out} already exists; an autoencoder store is written whole, so give a new path")
    timer = StageTimer()
    manifest = read_checked_manifest(manifest_path, ("train", "val"))
    spec = autoencoder_spec(options.size)
    cache = cache_images(manifest, root, spec, options.num_workers)
    log(f"decoded {len(cache)} images in {timer.done('decode'):.1f} s ({len(cache.failed)} could not be decoded)")
    if cache.failed:
        log(failed_note(cache.failed))
    split = manifest.split[cache.rows]
    train, val = (cache.pixels[torch.from_numpy(np.flatnonzero(split == name))] for name in ("train", "val"))
    if len(train) < 2 or len(val) == 0:
        raise MedembedError(f"{manifest_path}: {len(train)} train and {len(val)} val images could be decoded; need 2 and 1 at least")

    device = resolve_device(options.device)
    with seeded(options.seed, device), cpu_threads(options.threads):
        network = ConvAutoencoder(options.width, options.bottleneck).to(device)
        history = _train(network, train, val, options, device, log)
        timer.done("train")

    weights = weights_dir(out)
    config = {"kind": KIND, "preprocess": spec.to_dict(), "options": asdict(options), "history": history, "revision": __version__}
    save_model(weights, network.eval(), config)
    # The store is an extraction with the trained encoder: resumable, failed images tabled, like any other.
    extract_options = ExtractOptions(
        batch_size=2 * options.batch_size, num_workers=options.num_workers or 0, device=options.device, store_dtype=options.store_dtype
    )
    with cpu_threads(options.threads):
        summary = extract(manifest, root, AutoencoderEncoder(str(weights)), out, extract_options, encoder_options={"weights": str(weights.resolve())})
    timer.done("embed")
    return AutoencoderRun(out, weights, summary.done, history, cache.failed, timer.summary())


def _check_options(options: AutoencoderOptions) -> None:
    for name in ("size", "width", "bottleneck", "epochs", "patience", "batch_size"):
        if getattr(options, name) < 1:
            raise MedembedError(f"autoencoder option {name} must be a positive integer, got {getattr(options, name)}")
    if options.size % 2**LEVELS:
        raise MedembedError(f"autoencoder input size must be a multiple of {2**LEVELS} (it halves {LEVELS} times), got {options.size}")
    if options.lr <= 0:
        raise MedembedError(f"autoencoder learning rate must be positive, got {options.lr}")
    if options.store_dtype not in DTYPES:
        raise MedembedError(f"store dtype must be one of {', '.join(DTYPES)}, got {options.store_dtype!r}")


def _train(
    network: ConvAutoencoder,
    train: torch.Tensor,
    val: torch.Tensor,
    options: AutoencoderOptions,
    device: torch.device,
    log: Callable[[str], None],
) -> dict:
    """Train on cached uint8 `train` pixels with early stopping on the `val` pixel MSE; best epoch restored."""

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        images = unit_pixels(train[batch], device)
        with autocast(device):
            reconstruction = network(images)
        return nn.functional.mse_loss(reconstruction.float(), images)

    def val_mse() -> float:
        per_image = predict_batches(lambda x: (network(x).float() - x).square().mean(dim=(1, 2, 3)), val, 2 * options.batch_size, device)
        return float(per_image.mean())

    stopper = EarlyStopping(options.patience, mode="min")
    optimizer = torch.optim.AdamW(network.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    train_loss = train_epochs(
        network, optimizer, batch_loss, len(train), val_mse, stopper,
        epochs=options.epochs, batch_size=options.batch_size, generator=torch.Generator().manual_seed(options.seed),
        log=log, score_name="MSE",
    )
    return {"epochs": len(stopper.scores), "train_loss": train_loss, "val_mse": stopper.scores, "best_epoch": stopper.best_epoch + 1}

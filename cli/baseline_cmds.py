"""`medembed baseline …`: the conventional baselines the embedding heads are compared with, under fit's protocol."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.baselines.autoencoder import AutoencoderOptions, run_autoencoder_baseline
from medembed.baselines.cnn import CNNOptions, run_cnn_baseline
from medembed.fit import FitOptions

app = typer.Typer(
    help="Baselines on the same manifest, splits, calibration and metrics as `medembed fit`: a fine-tuned CNN, "
    "and an autoencoder whose embeddings `medembed fit` takes like any store.",
    no_args_is_help=True,
)

MANIFEST = typer.Argument(..., help="Manifest CSV with train/val/test splits.")
ROOT = typer.Option(..., "--root", help="Folder the manifest's paths are relative to.")
DEVICE = typer.Option("auto", help="auto (CUDA when present, bf16), cpu, cuda or cuda:N.")
WORKERS = typer.Option(None, "--workers", help="Image-decoding worker processes (default: one per CPU core).")
THREADS = typer.Option(None, "--threads", help="CPU threads for training (default: torch's); 1 is often fastest on a busy machine.")
SEED = typer.Option(0, help="Seed of weight initialisation, shuffling and augmentation.")


@app.command()
def cnn(
    manifest: Path = MANIFEST,
    root: Path = ROOT,
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (like `medembed fit`'s)."),
    size: int = typer.Option(CNNOptions.size, help="Input side in pixels."),
    epochs: int = typer.Option(CNNOptions.epochs, help="Most epochs; early stopping on val AUROC may end sooner."),
    patience: int = typer.Option(CNNOptions.patience, help="Epochs without a better val AUROC before stopping."),
    batch_size: int = typer.Option(CNNOptions.batch_size, help="Images per training step."),
    lr: float = typer.Option(CNNOptions.lr, help="AdamW learning rate."),
    pos_weight: str = typer.Option("1", help="BCE weight of abnormal images: a number, or 'balanced' (n_normal / n_abnormal)."),
    augment: bool = typer.Option(True, help="Random flip, rotation, zoom, shift, brightness and contrast while training."),
    threshold: str = typer.Option(FitOptions.threshold, help="Threshold rule chosen on val: f1, youden, kappa, sensitivity:0.9, specificity:0.9, fixed:0.5."),
    calibration: str = typer.Option(FitOptions.calibration, help="Probability calibration fitted on val: none, platt, isotonic."),
    aggregation: str = typer.Option(FitOptions.aggregation, help="Study probability from its images': mean or max."),
    device: str = DEVICE,
    workers: int | None = WORKERS,
    threads: int | None = THREADS,
    seed: int = SEED,
) -> None:
    """Fine-tune EfficientNet-Lite0 (ImageNet weights) end to end; calibrate on val, evaluate on test.

    Example: medembed baseline cnn data_manifests/fracatlas.csv --root ../shared/data/fracatlas --out runs/cnn
    """
    options = CNNOptions(
        size=size, epochs=epochs, patience=patience, batch_size=batch_size, lr=lr,
        pos_weight=pos_weight if pos_weight == "balanced" else _positive_number(pos_weight),
        augment=augment, device=device, num_workers=workers, threads=threads, seed=seed,
    )
    fit_options = FitOptions(threshold=threshold, calibration=calibration, aggregation=aggregation, seed=seed)
    run = run_cnn_baseline(manifest, root, out, options, fit_options, log=typer.echo)
    overall = run.metrics["image"]["overall"]
    low, high = overall["auroc"]["ci"]
    typer.echo(
        f"test (image level): AUROC {overall['auroc']['value']:.3f} ({low:.3f}-{high:.3f}), kappa {overall['kappa']['value']:.3f}; "
        f"best epoch {run.history['best_epoch']} of {run.history['epochs']}"
    )
    typer.echo(_timing(run.seconds) + f"; wrote {out}")


@app.command()
def autoencoder(
    manifest: Path = MANIFEST,
    root: Path = ROOT,
    out: Path = typer.Option(..., "--out", "-o", help="Embedding store to write (must not exist); weights go beside it."),
    size: int = typer.Option(AutoencoderOptions.size, help="Input side in pixels (a multiple of 16)."),
    width: int = typer.Option(AutoencoderOptions.width, help="Channels after the first convolution (doubled per stage)."),
    bottleneck: int = typer.Option(AutoencoderOptions.bottleneck, help="Bottleneck channels = embedding dimension."),
    epochs: int = typer.Option(AutoencoderOptions.epochs, help="Most epochs; early stopping on val loss may end sooner."),
    patience: int = typer.Option(AutoencoderOptions.patience, help="Epochs without a lower val loss before stopping."),
    batch_size: int = typer.Option(AutoencoderOptions.batch_size, help="Images per training step."),
    lr: float = typer.Option(AutoencoderOptions.lr, help="AdamW learning rate."),
    device: str = DEVICE,
    workers: int | None = WORKERS,
    threads: int | None = THREADS,
    seed: int = SEED,
) -> None:
    """Train a convolutional autoencoder on the train images; write every image's bottleneck features to a store.

    Then fit heads on it like on any store.

    Example: medembed baseline autoencoder data_manifests/fracatlas.csv --root ../shared/data/fracatlas --out fracatlas-ae.h5
    && medembed fit fracatlas-ae.h5 --head logreg --out runs/ae-logreg
    """
    options = AutoencoderOptions(
        size=size, width=width, bottleneck=bottleneck, epochs=epochs, patience=patience, batch_size=batch_size,
        lr=lr, device=device, num_workers=workers, threads=threads, seed=seed,
    )
    run = run_autoencoder_baseline(manifest, root, out, options, log=typer.echo)
    typer.echo(f"embedded {run.embedded} images into {run.store} ({len(run.failed)} failed); weights in {run.weights}")
    typer.echo(_timing(run.seconds))


def _positive_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"expected a number or 'balanced', got {text!r}", param_hint="--pos-weight") from None


def _timing(seconds: dict[str, float]) -> str:
    parts = ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items() if stage != "total")
    return f"time: {seconds['total']:.1f} s ({parts})"

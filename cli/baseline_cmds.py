"""`medembed baseline …`: the conventional baselines the embedding heads are compared with, under fit's protocol."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.options.baselines import AutoencoderOptions, CNNOptions
from medembed.options.protocol import ProtocolOptions

from ._generate import command

app = typer.Typer(
    help="Baselines on the same manifest, splits, calibration and metrics as `medembed fit`: a fine-tuned CNN, "
    "and an autoencoder whose embeddings `medembed fit` takes like any store.",
    no_args_is_help=True,
)
MANIFEST = typer.Argument(..., metavar="MANIFEST", help="Manifest CSV with train/val/test splits.")
ROOT = typer.Option(..., "--root", help="Folder the manifest's paths are relative to.")


def cnn(
    manifest: Path = MANIFEST,
    root: Path = ROOT,
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (like `medembed fit`'s)."),
    options: CNNOptions = None,
    protocol: ProtocolOptions = None,
) -> None:
    """Fine-tune EfficientNet-Lite0 (ImageNet weights) end to end; calibrate on val, evaluate on test.

    Example: medembed baseline cnn data_manifests/fracatlas.csv --root ../shared/data/fracatlas --out runs/cnn
    """
    from medembed.baseline import run_cnn_baseline

    protocol.seed = options.seed  # one --seed: the CNN's initialisation and the protocol's
    run = run_cnn_baseline(manifest, root, out, options, protocol, log=typer.echo)
    from medembed.protocol.report import format_cell

    overall = run.metrics["image"]["overall"]
    typer.echo(
        f"test (image level): AUROC {format_cell(overall['auroc'], 'auroc')}"
        + f", kappa {overall['kappa']['value']:.3f}; best epoch {run.history['best_epoch']} of {run.history['epochs']}"
    )
    typer.echo(_timing(run.seconds) + f"; wrote {out}")


def autoencoder(
    manifest: Path = MANIFEST,
    root: Path = ROOT,
    out: Path = typer.Option(..., "--out", "-o", help="Embedding store to write (must not exist); weights go beside it."),
    options: AutoencoderOptions = None,
) -> None:
    """Train a convolutional autoencoder on the train images; write every image's bottleneck features to a store.

    Then fit heads on it like on any store.

    Example: medembed baseline autoencoder data_manifests/fracatlas.csv --root ../shared/data/fracatlas --out fracatlas-ae.h5
    && medembed fit fracatlas-ae.h5 --head logreg --out runs/ae-logreg
    """
    from medembed.scorers.baselines.autoencoder import run_autoencoder_baseline

    run = run_autoencoder_baseline(manifest, root, out, options, log=typer.echo)
    typer.echo(f"embedded {run.embedded} images into {run.store} ({len(run.failed)} failed); weights in {run.weights}")
    typer.echo(_timing(run.seconds))


def _timing(seconds: dict[str, float]) -> str:
    parts = ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items() if stage != "total")
    return f"time: {seconds['total']:.1f} s ({parts})"


def register(main: typer.Typer) -> None:
    command(app, skip={ProtocolOptions: ("seed",)})(cnn)
    command(app)(autoencoder)
    main.add_typer(app, name="baseline")

"""`medembed predict`: score new images with a fitted run of any kind."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.options.extract import PREDICT_EXTRACT_SKIPS, ExtractOptions
from medembed.options.transfer import PREDICT_SKIPS, TransferOptions

from ._generate import command


def predict(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory of any kind (fit, baseline cnn, zeroshot)."),
    inputs: list[Path] = typer.Argument(..., metavar="INPUTS", help="Image files, folders of images, or one manifest CSV."),
    out: Path = typer.Option(None, "--out", "-o", help="CSV of image probabilities and decisions (default: standard output)."),
    extract: ExtractOptions = None,
    transfer: TransferOptions = None,
) -> None:
    """Score new images with a fitted run: its own encoder or model, calibration and thresholds.

    Examples:

      medembed predict runs/frac-mlp new_xrays/ --out predictions.csv

      medembed predict runs/frac-mlp scan1.png scan2.dcm > predictions.csv
    """
    from medembed.predict import predict as run_predict

    summary = run_predict(run, inputs, out, extract, transfer)
    typer.echo(f"{summary.scored} of {summary.images} images scored, {summary.abnormal} called abnormal, {summary.failed} could not be read", err=out is None)
    flagged = "" if summary.ood_flagged is None else f", {summary.ood_flagged} flagged out of distribution"
    typer.echo(f"{summary.referred} referred (conformal set not one class){flagged}", err=out is None)
    for note in summary.notes:
        typer.echo(f"note: {note}", err=True)
    if out is not None:
        typer.echo(f"wrote {summary.images_csv}" + (f" and {summary.studies_csv}" if summary.studies_csv else ""))


def register(app: typer.Typer) -> None:
    """Add `predict` to the top-level app."""
    command(app, skip={ExtractOptions: PREDICT_EXTRACT_SKIPS, TransferOptions: PREDICT_SKIPS})(predict)

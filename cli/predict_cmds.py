"""`medembed predict`: score new images with a fitted run of any kind."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.options.extract import PREDICT_EXTRACT_SKIPS, ExtractOptions
from medembed.options.transfer import PREDICT_SKIPS, TransferOptions

from ._generate import command


def predict(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory of any kind (fit, baseline cnn, zeroshot)."),
    inputs: list[Path] = typer.Argument(..., metavar="INPUTS", help="Image files, folders of images, or one manifest CSV (its label and every other column are carried to the output)."),
    out: Path = typer.Option(None, "--out", "-o", help="Table of image probabilities and decisions: CSV, or Parquet for a .parquet name (needs pyarrow: pip install 'medembed\\[parquet]'); studies go to <out>_studies beside it. Default: CSV on standard output."),
    root: Path = typer.Option(None, "--root", help="Folder a manifest CSV's relative paths are under. Default: the manifest's own folder."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Where the embeddings of the scored images are cached, one store per run and set of inputs (same files, sizes and times: a rerun resumes or reuses it; delete the folder to free space). Default: $MEDEMBED_CACHE, else medembed/predict under $XDG_CACHE_HOME, else under ~/.cache."),
    explain: Path = typer.Option(None, "--explain", help="Folder for one attention-map PNG per image (token-head runs: where the head looked, over the image); other heads say in one line that they have none."),
    extract: ExtractOptions = None,
    transfer: TransferOptions = None,
) -> None:
    """Score new images with a fitted run: its own encoder or model, calibration and thresholds.

    Paths in the output are the inputs as given (links are not resolved). Nothing but the tables is written beside --out: embeddings are cached under --cache-dir, and a rerun resumes there.

    Examples:

      medembed predict runs/frac-mlp new_xrays/ --out predictions.csv

      medembed predict runs/frac-mlp mine.csv --root my_xrays/ --out predictions.parquet

      medembed predict runs/frac-mlp scan1.png scan2.dcm > predictions.csv
    """
    from medembed.predict import predict as run_predict

    summary = run_predict(run, inputs, out, extract, transfer, root=root, cache_dir=cache_dir, explain=explain)
    labelled = f"; {summary.labelled} labelled in the manifest ({summary.labelled_abnormal} abnormal), in the label column" if summary.labelled else ""
    typer.echo(f"{summary.scored} of {summary.images} images scored, {summary.abnormal} called abnormal, {summary.failed} could not be read{labelled}", err=out is None)
    flagged = "" if summary.ood_flagged is None else f", {summary.ood_flagged} flagged out of distribution"
    typer.echo(f"{summary.referred} referred (conformal set not one class){flagged}", err=out is None)
    for note in summary.notes:
        typer.echo(f"note: {note}", err=True)
    if summary.cache is not None:
        typer.echo(f"embeddings cached in {summary.cache.parent}", err=True)
    if out is not None:
        typer.echo(f"wrote {summary.images_csv}" + (f" and {summary.studies_csv}" if summary.studies_csv else ""))


def register(app: typer.Typer) -> None:
    """Add `predict` to the top-level app."""
    command(app, skip={ExtractOptions: PREDICT_EXTRACT_SKIPS, TransferOptions: PREDICT_SKIPS})(predict)

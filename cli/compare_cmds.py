"""`medembed compare`: several runs of any kind side by side, each paired against a baseline."""

from __future__ import annotations

from pathlib import Path

import typer


def compare(
    runs: list[Path] = typer.Argument(..., metavar="RUNS", help="Run directories of any kind (each with metrics.json)."),
    level: str = typer.Option("study", help="image | study (the side-by-side table; paired differences are shown at both)."),
    baseline: Path = typer.Option(None, "--baseline", help="The run the others are paired against (default: the first)."),
    paired: bool = typer.Option(True, "--paired/--no-paired", help="With two runs or more: paired bootstrap differences of AUROC and kappa, and DeLong's test, on the same test images."),
    intersect: bool = typer.Option(False, "--intersect", help="Runs scored on different test images: pair them on the images both scored (with a warning) instead of refusing."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Paired bootstrap resamples."),
    fmt: str = typer.Option("md", "--format", help="md | csv | json | parquet (parquet needs --out FILE.parquet)."),
    out: Path = typer.Option(None, "--out", "-o", help="Also write the comparison to this file, in --format."),
) -> None:
    """Print several runs side by side (AUROC, kappa, sensitivity, specificity, F1 with their intervals, kind, scorer,
    encoder) and, for two runs or more, whether each differs from the baseline on the same test images.

    Examples:

      medembed compare runs/frac-logreg runs/frac-mlp runs/cnn runs/zeroshot

      medembed compare runs/frac-logreg runs/frac-mlp --baseline runs/frac-mlp --format csv --out compare.csv
    """
    from medembed.runs.compare import FORMATS, compare_runs, write_comparison

    if level not in ("image", "study"):
        raise typer.BadParameter(f"expected image or study; got {level!r}", param_hint="--level")
    if fmt not in FORMATS:
        raise typer.BadParameter(f"expected one of {', '.join(FORMATS)}; got {fmt!r}", param_hint="--format")
    comparison = compare_runs(runs, level=level, baseline=baseline, paired=paired, intersect=intersect, n_resamples=bootstrap)
    for warning in comparison.warnings:
        typer.echo(f"warning: {warning}", err=True)
    text = write_comparison(comparison, fmt, out)
    if text is not None and (fmt == "md" or out is None):
        typer.echo(text, nl=False)
    if out is not None and fmt != "md":
        typer.echo(f"comparison written to {out}", err=True)


def register(app: typer.Typer) -> None:
    """Add `compare` to the top-level app."""
    app.command()(compare)

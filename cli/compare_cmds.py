"""`medembed compare`: several runs of any kind side by side."""

from __future__ import annotations

from pathlib import Path

import typer


def compare(
    runs: list[Path] = typer.Argument(..., metavar="RUNS", help="Run directories of any kind (each with metrics.json)."),
    level: str = typer.Option("study", help="image | study"),
    out: Path = typer.Option(None, "--out", "-o", help="Also write the table to this Markdown file."),
) -> None:
    """Print a Markdown table of several runs side by side (AUROC, kappa, sensitivity, specificity, F1 with CIs).

    Example: medembed compare runs/frac-logreg runs/frac-mlp runs/cnn runs/zeroshot
    """
    from medembed._files import atomic_write_text
    from medembed.protocol.report import compare_table, read_metrics_json
    from medembed.runs.record import read_record

    if level not in ("image", "study"):
        raise typer.BadParameter(f"expected image or study; got {level!r}", param_hint="--level")
    for run in runs:
        read_record(run)  # a directory that is not a valid run fails here, naming it
    table = compare_table({run.name: read_metrics_json(run / "metrics.json") for run in runs}, level=level)
    typer.echo(f"{level} level\n\n{table}")
    if out:
        atomic_write_text(out, table)


def register(app: typer.Typer) -> None:
    """Add `compare` to the top-level app."""
    app.command()(compare)

"""`medembed sweep`: encoders x heads x label budgets x seeds (and baselines) under one protocol, one results table."""

from __future__ import annotations

from pathlib import Path

import typer


def sweep(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Sweep config (TOML): manifest, encoders, heads, budgets, seeds, baselines."),
    baselines: bool = typer.Option(True, help="Run the config's baselines (CNN fine-tuning, autoencoder); --no-baselines skips them."),
) -> None:
    """Run every cell of a sweep not yet in OUT/results.csv (rerun to resume), then write results.md and figures.

    Example: medembed sweep data_manifests/fracatlas_sweep.toml
    """
    from medembed.sweep import load_config, run_sweep

    summary = run_sweep(load_config(config), baselines=baselines, log=typer.echo)
    for note in summary.notes:
        typer.echo(f"note: {note}")
    typer.echo(
        f"{summary.cells_run} cells run, {summary.cells_already_done} already in {summary.results_csv}, "
        f"in {summary.seconds:.0f} s"
    )
    typer.echo(f"table: {summary.results_md}  figures: {', '.join(str(path) for path in summary.figures)}")


def register(app: typer.Typer) -> None:
    app.command()(sweep)

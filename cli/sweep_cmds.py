"""`medembed sweep`: encoders x heads x label budgets x seeds (and baselines) under one protocol, one results table."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.options.tracking import TrackingOptions

from ._generate import command


def sweep(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Sweep config (TOML): manifest, encoders, heads, budgets, seeds, baselines."),
    baselines: bool = typer.Option(True, help="Run the config's baselines (CNN fine-tuning, autoencoder); --no-baselines skips them."),
    tracking: TrackingOptions = None,
) -> None:
    """Run every cell of a sweep not yet in OUT/results.csv (rerun to resume), then write results.md and figures.

    Example: medembed sweep data_manifests/fracatlas_sweep.toml
    """
    from medembed.sweep import load_config, run_sweep
    from medembed.tracking import check_tracking, track_sweep

    check_tracking(tracking)  # --track without MLflow: one line, before any cell runs
    loaded = load_config(config)
    summary = run_sweep(loaded, baselines=baselines, log=typer.echo)
    for note in summary.notes:
        typer.echo(f"note: {note}")
    typer.echo(
        f"{summary.cells_run} cells run, {summary.cells_already_done} already in {summary.results_csv}, "
        f"in {summary.seconds:.0f} s"
    )
    typer.echo(f"table: {summary.results_md}  figures: {', '.join(str(path) for path in summary.figures)}")
    run_id = track_sweep(tracking, loaded, summary)
    if run_id:
        typer.echo(f"tracked in MLflow: sweep run {run_id} with a nested run per results row, experiment {tracking.experiment!r} at {tracking.uri}")


def register(app: typer.Typer) -> None:
    command(app)(sweep)

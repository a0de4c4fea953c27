"""Corruption robustness of a run (`medembed evaluate RUN --corrupt noise,blur --severity 1..5 --manifest M --root R`)."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.corrupt import parse_corruptions, parse_severities
from medembed.extract import ExtractOptions
from medembed.robustness import RobustnessOptions, evaluate_corruptions


def evaluate_corrupt(
    run: Path, corrupt: str, severity: str, manifest: Path, root: Path, batch_size: int, device: str, bootstrap: int | None
) -> None:
    """Re-extract the test images under corruptions and report each metric's drop; resumable (stores in RUN/corrupt/).

    Example: medembed evaluate runs/frac-mlp --corrupt noise,blur,jpeg --severity 1..5 --manifest data_manifests/fracatlas.csv --root ../shared/data/fracatlas
    """
    options = RobustnessOptions(
        extract=ExtractOptions(batch_size=batch_size, device=device), n_resamples=1000 if bootstrap is None else bootstrap
    )
    result = evaluate_corruptions(
        run, manifest, root, parse_corruptions(corrupt), parse_severities(severity), options,
        on_extracted=lambda condition, summary: typer.echo(f"{condition.name:<11} {summary.format()}"),
    )
    level = "study" if "study" in result["clean"] else "image"
    clean = result["clean"][level]
    typer.echo(f"{level} level, clean: auroc {clean['auroc']['value']:.3f}  kappa {clean['kappa']['value']:.3f}")
    for condition in result["conditions"]:
        change = condition["change"][level]
        typer.echo(f"  {condition['corruption']:<9}{condition['severity']}  Δauroc {change['auroc']:+.3f}  Δkappa {change['kappa']:+.3f}")
    typer.echo(f"report: {run / 'robustness.md'}")

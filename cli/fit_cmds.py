"""`medembed fit`, `evaluate`, `predict`: stage 2, light heads on a store, and applying a fitted run."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medembed.fit import FitOptions, evaluate_run, fit_run
from medembed.heads import HEAD_NAMES


def _parse_params(items: list[str]) -> dict:
    """key=value head parameters; values parsed as JSON where possible (numbers, lists, true/false)."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected key=value, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def print_headline(metrics: dict) -> None:
    """AUROC, kappa, sensitivity, specificity and F1 with their intervals, per level."""
    for level in ("image", "study"):
        if level not in metrics:
            continue
        overall = metrics[level]["overall"]
        cells = []
        for name in ("auroc", "kappa", "sensitivity", "specificity", "f1"):
            value, ci = overall[name]["value"], overall[name].get("ci")
            cells.append(f"{name} {value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
        typer.echo(f"{level:<6} " + "  ".join(cells))


def fit(
    stores: list[Path] = typer.Argument(..., help="One or more embedding stores with the same fingerprint."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    head: str = typer.Option("logreg", "--head", help=f"One of: {', '.join(HEAD_NAMES)}."),
    param: list[str] = typer.Option(None, "--param", "-p", help="Head hyperparameter key=value, e.g. -p hidden=[256] -p dropout=0.2."),
    threshold: str = typer.Option("f1", "--threshold", help="f1 | youden | kappa | sensitivity:0.90 | specificity:0.90 | fixed:0.5 (chosen on val)."),
    calibration: str = typer.Option("none", "--calibration", help="none | platt | isotonic (fitted on val)."),
    aggregation: str = typer.Option("mean", "--aggregation", help="Study probability: mean (MURA's rule) or max of its images'."),
    seeds: int = typer.Option(1, "--seeds", help="Fit N times with seeds seed..seed+N-1 and report mean ± sd."),
    seed: int = typer.Option(0, "--seed"),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% intervals (0: none)."),
) -> None:
    """Fit a head on train, choose everything on val, evaluate on test; write a run directory.

    Examples:

      medembed fit fracatlas-effl0.h5 --head mlp --threshold f1 --out runs/frac-mlp

      medembed fit mura.h5 --head logreg --threshold kappa --calibration platt --seeds 5 --out runs/mura-logreg
    """
    options = FitOptions(
        head=head, head_params=_parse_params(param or []), threshold=threshold, calibration=calibration,
        aggregation=aggregation, seeds=seeds, seed=seed, n_resamples=bootstrap,
    )
    metrics = fit_run(stores, out, options)
    print_headline(metrics)
    typer.echo(f"run written to {out} (report: {out / 'report.md'})")


def evaluate(
    run: Path = typer.Argument(..., help="A run directory written by `medembed fit`."),
    store: list[Path] = typer.Option(None, "--store", help="Evaluate on these stores instead of the run's own (same fingerprint)."),
    split: str = typer.Option("test", help="Split to evaluate."),
    bootstrap: int = typer.Option(None, "--bootstrap", help="Bootstrap resamples (default: the run's)."),
    corrupt: str = typer.Option(None, "--corrupt", help="Robustness: re-extract the test images under corruptions noise,blur,contrast,gamma,jpeg (or all)."),
    severity: str = typer.Option("1..5", "--severity", help="With --corrupt: severities 1..5, a list 1,3,5, or one."),
    manifest: Path = typer.Option(None, "--manifest", help="With --corrupt: the manifest the run's store was extracted from."),
    root: Path = typer.Option(None, "--root", help="With --corrupt: folder the manifest's paths are relative to."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="With --corrupt: images per forward pass."),
    device: str = typer.Option("auto", help="With --corrupt: auto | cpu | cuda."),
) -> None:
    """Recompute a run's metrics, report and figures (on its test split, or other stores); or, with --corrupt,
    how its metrics drop on corrupted test images.

    Examples:

      medembed evaluate runs/frac-mlp

      medembed evaluate runs/frac-mlp --corrupt noise,blur,jpeg --severity 1..5 --manifest data_manifests/fracatlas.csv --root ../shared/data/fracatlas
    """
    if corrupt:
        from cli.robustness_cmds import evaluate_corrupt

        if manifest is None or root is None:
            raise typer.BadParameter("--corrupt needs --manifest and --root (the images to re-extract)")
        evaluate_corrupt(run, corrupt, severity, manifest, root, batch_size, device, bootstrap)
        return
    metrics = evaluate_run(run, stores=store or None, split=split, n_resamples=bootstrap)
    print_headline(metrics)
    typer.echo(f"report: {run / 'report.md'}")


def predict(
    run: Path = typer.Argument(..., help="A run directory written by `medembed fit`."),
    inputs: list[Path] = typer.Argument(..., help="Image files, folders of images, or one manifest CSV."),
    out: Path = typer.Option(..., "--out", "-o", help="CSV of image probabilities and decisions."),
    batch_size: int = typer.Option(32, "--batch-size", "-b"),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
) -> None:
    """Score new images with a fitted run: its own encoder, head, calibration and thresholds.

    Example: medembed predict runs/frac-mlp new_xrays/ --out predictions.csv
    """
    from medembed.extract import ExtractOptions
    from medembed.predict import predict as run_predict

    summary = run_predict(run, inputs, out, ExtractOptions(batch_size=batch_size, device=device))
    typer.echo(f"{summary.scored} of {summary.images} images scored, {summary.abnormal} called abnormal, {summary.failed} could not be read")
    typer.echo(f"wrote {summary.images_csv}" + (f" and {summary.studies_csv}" if summary.studies_csv else ""))


def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories (each with metrics.json)."),
    level: str = typer.Option("study", help="image | study"),
    out: Path = typer.Option(None, "--out", "-o", help="Also write the table to this Markdown file."),
) -> None:
    """Print a Markdown table of several runs side by side (AUROC, kappa, sensitivity, specificity, F1 with CIs).

    Example: medembed compare runs/frac-logreg runs/frac-mlp runs/frac-xgboost
    """
    from medembed.report import compare_table, read_metrics_json

    table = compare_table({run.name: read_metrics_json(run / "metrics.json") for run in runs}, level=level)
    typer.echo(f"{level} level, test split\n\n{table}")
    if out:
        out.write_text(table)


def register(app: typer.Typer) -> None:
    """Add the stage-2 commands to the top-level app."""
    for command in (fit, evaluate, predict, compare):
        app.command()(command)

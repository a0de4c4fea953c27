"""`medembed recalibrate`, and the printing of `medembed evaluate RUN --on TARGET`: taking a run to another site."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.options.recalibrate import RecalibrateOptions
from medembed.options.transfer import TransferOptions

from ._generate import command


def evaluate_on(run: Path, target: Path, root: Path | None, split: str, bootstrap: int | None, transfer: TransferOptions) -> dict:
    """External validation (called by `medembed evaluate --on`): print the comparison, drift and OOD lines; returns
    the result (external.json's content)."""
    from medembed.transfer.external import evaluate_on as run_external

    result = run_external(run, target, root=root, split=split, n_resamples=bootstrap, options=transfer)
    for level, metrics in (result.get("comparison") or {}).items():
        cells = [f"{m} {v['target']:.3f} (Δ {v['difference']:+.3f})" for m, v in metrics.items() if m in ("auroc", "sensitivity", "specificity", "kappa")]
        typer.echo(f"{level:<6} " + "  ".join(cells))
    drift = result["drift"]
    if "shift" in drift:
        typer.echo(f"shift  MMD² {drift['shift']['mmd2']:.4f}, p = {drift['shift']['p_value']:.4f}")
    prevalence = drift["prevalence"]
    typer.echo(f"called abnormal {prevalence['target_called_abnormal']:.1%} (run's val: {prevalence['source_called_abnormal']:.1%})")
    if "ood" in result:
        typer.echo(f"OOD flagged {result['ood']['flagged']:.1%} of {result['ood']['n']} (threshold at {result['ood']['false_alarm']:.0%} false alarms on val)")
    for note in result["notes"]:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"report: {Path(result['directory']) / 'report.md'}")
    return result


def recalibrate(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory of any kind."),
    target: Path = typer.Argument(..., metavar="TARGET", help="The target site's store (a manifest CSV with --root for image runs), with labels on some rows."),
    out: Path = typer.Option(..., "--out", "-o", help="The recalibrated run directory to write."),
    root: Path = typer.Option(None, "--root", help="For image runs: the folder the target manifest's paths are relative to."),
    options: RecalibrateOptions = None,
    transfer: TransferOptions = None,
) -> None:
    """Keep the scorer frozen; refit calibration and thresholds on a few labelled target images; evaluate on the rest.

    Examples:

      medembed recalibrate runs/frac-mlp other-hospital.h5 --labelled 50 --out runs/frac-mlp-other

      medembed recalibrate runs/frac-mlp other-hospital.h5 --labelled 50 --curve 10,25,50,100,200 --out runs/frac-mlp-other
    """
    from medembed.transfer.recalibrate import recalibrate as run_recalibrate

    result = run_recalibrate(run, target, out, options, root=root, transfer=transfer)
    typer.echo(f"refitted on {result['labelled']} labelled target images ({result['labelled_abnormal']} abnormal); evaluated on {result['evaluated']}")
    for which in ("before", "after"):
        overall = result[which]["image"]["overall"]
        label = "source thresholds" if which == "before" else "recalibrated     "
        typer.echo(f"{label}  " + "  ".join(f"{m} {overall[m]['value']:.3f}" for m in ("sensitivity", "specificity", "kappa", "auroc")))
    if "curve" in result:
        typer.echo(f"learning curve: {out / 'curve.md'}")
    typer.echo(f"run written to {out} (report: {out / 'report.md'})")


def register(app: typer.Typer) -> None:
    command(app)(recalibrate)

"""`medembed fit` and `evaluate`: stage 2, heads on a store, and re-evaluating any run."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.options.extract import EVALUATE_EXTRACT_SKIPS, ExtractOptions
from medembed.scorers.options import FitOptions
from medembed.options.robustness import RobustnessOptions
from medembed.options.transfer import TransferOptions
from medembed.options.tracking import TrackingOptions

from ._generate import command


def print_headline(metrics: dict) -> None:
    """AUROC, kappa, sensitivity, specificity and F1 per level, each as report.md's headline shows it (a run of
    several seeds: mean ± sd, with the first seed's interval beside it)."""
    from medembed.protocol.metrics import headline_leaf
    from medembed.protocol.report import format_cell

    for level in ("image", "study"):
        if level not in metrics:
            continue
        cells = [f"{name} {format_cell(headline_leaf(metrics, level, name), name)}" for name in ("auroc", "kappa", "sensitivity", "specificity", "f1")]
        typer.echo(f"{level:<6} " + "  ".join(cells))
    seeds = (metrics.get("over_seeds") or {}).get("seeds")
    if seeds:
        typer.echo(f"mean ± sd over seeds {', '.join(map(str, seeds))}; in parentheses seed {seeds[0]}'s value and bootstrap interval")


def fit(
    stores: list[Path] = typer.Argument(..., metavar="STORES", help="One or more embedding stores with the same fingerprint (with --ensemble: one store per encoder, joined by image id)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write (an earlier run there is replaced only once the new one is complete)."),
    options: FitOptions = None,
    tracking: TrackingOptions = None,
) -> None:
    """Fit a head on train, choose everything on val, evaluate on test; write a run directory.

    Examples:

      medembed fit fracatlas-effl0.h5 --head mlp --threshold f1 --out runs/frac-mlp

      medembed fit mura.h5 --head logreg --threshold kappa --calibration platt --seeds 5 --out runs/mura-logreg

      medembed fit mura.h5 --head sklearn:sklearn.svm.SVC -p probability=true --out runs/mura-svc

      medembed fit effl0.h5 effl1.h5 effl2.h5 --ensemble mean --head mlp --out runs/frac-ensemble

      medembed fit effl0.h5 --ensemble stack --head logreg,mlp,xgboost --out runs/frac-stack

      medembed fit mura.h5 --study-pooling attention --out runs/mura-attention
    """
    from medembed.fit import fit_run
    from medembed.tracking import check_tracking

    check_tracking(tracking)  # --track without MLflow: one line, before the fit
    metrics = fit_run(stores, out, options, log=typer.echo)
    print_headline(metrics)
    typer.echo(f"run written to {out} (report: {out / 'report.md'})")
    track(tracking, out, metrics, "fit")


def evaluate(
    run: Path = typer.Argument(..., metavar="RUN", help="A run directory of any kind (fit, baseline cnn, zeroshot)."),
    store: list[Path] = typer.Option(None, "--store", help="Evaluate on these stores instead of the run's own (same fingerprint)."),
    split: str = typer.Option(None, help="Split to evaluate: train | val | test (default test; with --on: all, or one split of the target)."),
    bootstrap: int = typer.Option(None, "--bootstrap", help="Bootstrap resamples (default: the run's)."),
    corrupt: str = typer.Option(None, "--corrupt", help="Robustness: re-read the test images under corruptions noise,blur,contrast,gamma,jpeg (or all)."),
    severity: str = typer.Option("1..5", "--severity", help="With --corrupt: severities 1..5, a list 1,3,5, or one."),
    manifest: Path = typer.Option(None, "--manifest", help="With --corrupt: the manifest of the run's images."),
    root: Path = typer.Option(None, "--root", help="With --corrupt, or --on a manifest: folder the manifest's paths are relative to; otherwise the folder of the images report.html's gallery shows (default: the root the store recorded)."),
    on: Path = typer.Option(None, "--on", help="External validation: score this store (a manifest with --root for image runs) with the run's calibration and thresholds."),
    extract: ExtractOptions = None,
    transfer: TransferOptions = None,
    tracking: TrackingOptions = None,
) -> None:
    """Recompute a run's metrics, report and figures (on its test split, or other stores) into RUN/evaluations/NAME/
    (NAME says what was asked, e.g. test-bootstrap200-by-site; the fit's own results are never rewritten); or,
    with --corrupt, how its metrics drop on corrupted test images.

    Examples:

      medembed evaluate runs/frac-mlp

      medembed evaluate runs/frac-mlp --corrupt noise,blur,jpeg --severity 1..5 --manifest data_manifests/fracatlas.csv --root ../shared/data/fracatlas

      medembed evaluate runs/frac-mlp --on other-hospital.h5 --by site,sex
    """
    from medembed.tracking import check_tracking

    check_tracking(tracking)
    if on is not None:
        from .transfer_cmds import evaluate_on

        from medembed.transfer.external import external_metrics

        result = evaluate_on(run, on, root, split or "all", bootstrap, transfer)
        asked = {"on": str(on), "split": split or "all", "bootstrap": bootstrap, "transfer": vars(transfer), "written": result["directory"]}
        track(tracking, run, external_metrics(result), "evaluate-on", {"evaluate": asked}, figures=Path(result["directory"]) / "figures")
        return
    split = split or "test"
    if split not in ("train", "val", "test"):
        raise typer.BadParameter(f"expected train, val or test; got {split!r}", param_hint="--split")
    if corrupt:
        if manifest is None or root is None:
            raise typer.BadParameter("--corrupt needs --manifest and --root (the images to re-read)", param_hint="--corrupt")
        result = _evaluate_corrupt(run, corrupt, severity, manifest, root, RobustnessOptions(extract, 1000 if bootstrap is None else bootstrap))
        conditions = {"clean": result["clean"], **{f"{c['corruption']}-{c['severity']}": c["metrics"] for c in result["conditions"]}}
        track(tracking, run, conditions, "evaluate-corrupt", {"evaluate": {"corrupt": corrupt, "severity": severity, "manifest": str(manifest)}})
        return
    from medembed.evaluate import evaluate_run, evaluation_directory, evaluation_name

    metrics = evaluate_run(run, stores=store or None, split=split, n_resamples=bootstrap, transfer=transfer, image_root=root)
    print_headline(metrics)
    written = evaluation_directory(run, evaluation_name(split, store or None, bootstrap, transfer))
    typer.echo(f"evaluation written to {written} (report: {written / 'report.md'}); the fit's own results in {run} are unchanged")
    asked = {"split": split, "stores": [str(s) for s in store or []], "bootstrap": bootstrap, "transfer": vars(transfer), "written": str(written)}
    track(tracking, run, metrics, "evaluate", {"evaluate": asked}, figures=written / "figures")


def track(tracking: TrackingOptions | None, directory: Path, metrics: dict, kind: str, params: dict | None = None,
          figures: Path | None = None) -> None:
    """Log a written run directory to MLflow when tracking is on (medembed.tracking), and say where."""
    from medembed.tracking import track_run

    run_id = track_run(tracking, directory, metrics, kind, params, figures=figures)
    if run_id:
        typer.echo(f"tracked in MLflow: run {run_id}, experiment {tracking.experiment!r} at {tracking.uri}")


def _evaluate_corrupt(run: Path, corrupt: str, severity: str, manifest: Path, root: Path, options: RobustnessOptions) -> dict:
    from medembed.data.corrupt import parse_corruptions, parse_severities
    from medembed.robustness import evaluate_corruptions

    result = evaluate_corruptions(
        run, manifest, root, parse_corruptions(corrupt), parse_severities(severity), options,
        log=typer.echo,  # one line per condition; a failed image is named once
    )
    level = "study" if "study" in result["clean"] else "image"
    clean = result["clean"][level]
    typer.echo(f"{level} level, clean: auroc {clean['auroc']['value']:.3f}  kappa {clean['kappa']['value']:.3f}")
    for condition in result["conditions"]:
        change = condition["change"][level]
        typer.echo(f"  {condition['corruption']:<9}{condition['severity']}  Δauroc {change['auroc']:+.3f}  Δkappa {change['kappa']:+.3f}")
    typer.echo(f"report: {run / 'robustness.md'}")
    return result


def register(app: typer.Typer) -> None:
    """Add the stage-2 commands to the top-level app."""
    command(app)(fit)
    command(app, skip={ExtractOptions: EVALUATE_EXTRACT_SKIPS})(evaluate)

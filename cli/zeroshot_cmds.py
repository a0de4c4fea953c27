"""`medembed zeroshot`: score a MedSigLIP store against normal/abnormal text prompts, calibrated on val."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.fit_cmds import print_headline
from medembed.fit import FitOptions
from medembed.zeroshot import ZeroShotOptions, zeroshot_run


def zeroshot(
    stores: list[Path] = typer.Argument(..., help="One or more medsiglip stores (pooled output) with the same fingerprint."),
    model: str = typer.Option(..., "--model", help="Hub id or local directory of the full SigLIP checkpoint the store was extracted with."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    prompts: Path = typer.Option(None, "--prompts", help='JSON {"normal": [...], "abnormal": [...]}; {body_part} is filled per image. Default: the built-in ensemble.'),
    threshold: str = typer.Option("f1", "--threshold", help="f1 | youden | kappa | sensitivity:0.90 | specificity:0.90 | fixed:0.5 (chosen on val)."),
    calibration: str = typer.Option("none", "--calibration", help="none | platt | isotonic (fitted on val)."),
    aggregation: str = typer.Option("mean", "--aggregation", help="Study probability: mean (MURA's rule) or max of its images'."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% intervals (0: none)."),
    seed: int = typer.Option(0, "--seed"),
    revision: str = typer.Option(None, "--revision", help="Model revision (branch, tag or commit) on the hub."),
    device: str = typer.Option("auto", help="Where the text tower runs: auto | cpu | cuda."),
) -> None:
    """Zero-shot abnormality detection: image embeddings vs prompt ensembles, threshold chosen on val, test evaluated.

    Example: medembed zeroshot mura-medsiglip.h5 --model google/medsiglip-448 --threshold kappa --out runs/mura-zeroshot
    """
    fit_options = FitOptions(threshold=threshold, calibration=calibration, aggregation=aggregation, n_resamples=bootstrap, seed=seed)
    options = ZeroShotOptions(prompts=prompts, revision=revision, device=device)
    metrics = zeroshot_run(stores, model, out, fit_options, options)
    print_headline(metrics)
    typer.echo(f"run written to {out} (report: {out / 'report.md'}; prompts and text embeddings beside it)")

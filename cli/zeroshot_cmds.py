"""`medembed zeroshot`: score a MedSigLIP store against normal/abnormal text prompts, calibrated on val."""

from __future__ import annotations

from pathlib import Path

import typer

from medembed.options.protocol import ProtocolOptions
from medembed.options.zeroshot import ZeroShotOptions

from ._generate import command


def zeroshot(
    stores: list[Path] = typer.Argument(..., metavar="STORES", help="One or more medsiglip stores (pooled output) with the same fingerprint."),
    model: str = typer.Option(..., "--model", help="Hub id or local directory of the full SigLIP checkpoint the store was extracted with."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    protocol: ProtocolOptions = None,
    options: ZeroShotOptions = None,
) -> None:
    """Zero-shot abnormality detection: image embeddings vs prompt ensembles, threshold chosen on val, test evaluated.

    Example: medembed zeroshot mura-medsiglip.h5 --model google/medsiglip-448 --threshold kappa --out runs/mura-zeroshot
    """
    from medembed.zeroshot import zeroshot_run

    from .fit_cmds import print_headline

    metrics = zeroshot_run(stores, model, out, protocol, options)
    print_headline(metrics)
    typer.echo(f"run written to {out} (report: {out / 'report.md'}; prompts and text embeddings in {out / 'scorer'})")


def register(app: typer.Typer) -> None:
    command(app)(zeroshot)

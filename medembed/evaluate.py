"""Re-evaluate any run directory: its own test split (or other splits, other stores with its fingerprint), with
the transfer sections; rewrites its metrics, report, figures and predictions."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from medembed.errors import MedembedError
from medembed.options import check_positive
from medembed.options.transfer import TransferOptions
from medembed.protocol.steps import evaluate_split
from medembed.runs.inputs import run_inputs, with_manifest_columns
from medembed.runs.record import Evaluation, load_run, write_evaluation
from medembed.transfer.reference import run_reference
from medembed.transfer.sections import source_sections
from medembed.transfer.subgroups import check_columns


def evaluate_run(
    run_dir: Path, stores: list[Path] | None = None, split: str = "test", n_resamples: int | None = None, transfer: TransferOptions | None = None
) -> dict[str, Any]:
    """Re-evaluate any run directory on its inputs (or other stores with the same fingerprint); rewrites its
    metrics, report, figures and predictions, with the transfer sections (conformal coverage, OOD false alarms,
    subgroups of `transfer.by`). Returns the metrics."""
    run = load_run(run_dir)
    options = run.record.protocol
    if n_resamples is not None:
        check_positive("bootstrap", n_resamples, minimum=0)
        options = replace(options, n_resamples=n_resamples)
    rows = run_inputs(run).rows(split, stores)
    p = run.probabilities(rows)
    transfer = transfer or TransferOptions()
    if transfer.columns_from is not None:
        rows = with_manifest_columns(rows, transfer.columns_from)
    check_columns(rows, transfer.columns)  # a wrong --by fails before the bootstrap
    metrics = evaluate_split(p, rows, run.calibration, options, seed=options.seed)
    try:
        reference, unavailable = run_reference(run), ""
    except MedembedError as error:  # e.g. --store given and the run's own store gone: the metrics still come
        reference, unavailable = None, str(error)
    extras = lambda directory: source_sections(  # noqa: E731
        directory, reference, rows, p, run.calibration.image_threshold, transfer, options.n_resamples, options.seed, unavailable)
    write_evaluation(Path(run_dir), run.record, Evaluation(p, rows, metrics), extras=extras)
    return metrics

"""Writing a run directory of any kind (embedding heads, the CNN, zero-shot); `medembed.runs.record` reads it.

    run.json           the record (`medembed.runs.record.RunRecord`: one schema, with a `kind`)
    scorer/            the fitted scorer (no pickle: JSON, safetensors, XGBoost's own format)
    metrics.json       image and study level metrics with bootstrap intervals (and mean ± sd over seeds)
    report.md          the same as tables a reader can paste into a paper
    report.html        one self-contained page: metrics, figures, a case gallery (medembed.runs.html)
    figures/           ROC, PR, reliability, metric-vs-threshold, per-body-part bars (PNG at 300 dpi and PDF)
    predictions.csv    the evaluated split's image probabilities and decisions (and patients, where known)
    evaluations/NAME/  each later `medembed evaluate`, beside the fit's own files (see medembed.evaluate)

A run is written into a staging directory beside `out` and swapped in only when complete, so a failed fit
never loses the previous run in `out` nor leaves a mix of two runs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medembed._csv import text_cell
from medembed._files import atomic_write_json, atomic_write_text, replaced_directory
from medembed.protocol.figures import FigureContext, plot_figures
from medembed.protocol.metrics import aggregate_studies
from medembed.protocol.report import markdown_report, write_metrics_json
from medembed.protocol.splits import Split
from medembed.runs.provenance import run_provenance
from medembed.runs.record import RUN_FILE, SCORER_DIR, RunRecord
from medembed.scorers.contract import Scorer
from medembed.store import describe_preprocess


@dataclass
class Evaluation:
    """Calibrated probabilities of one split and their metrics."""

    p: np.ndarray  # [N] float64
    rows: Split
    metrics: dict[str, Any]


# Writes what the transfer kit adds to a run directory (its reference, figures) and returns report sections.
Extras = Callable[[Path], list[str]]


def write_run(out: Path, record: RunRecord, scorer: Scorer, evaluation: Evaluation, extras: Extras | None = None) -> None:
    """Write a complete run directory `out` (replacing an earlier one only once everything is written)."""
    with replaced_directory(out) as staging:
        scorer.save(staging / SCORER_DIR)
        write_evaluation(staging, record, evaluation, title=Path(out).name, extras=extras, scorer=scorer)
        # always this invocation's: a record derived from another run (recalibrate) must not keep that run's
        record = dataclasses.replace(record, provenance=run_provenance(Path(out), record.inputs, record.details))
        atomic_write_json(staging / RUN_FILE, asdict(record))


def write_evaluation(directory: Path, record: RunRecord, evaluation: Evaluation, title: str | None = None, extras: Extras | None = None,
                     scorer: Scorer | None = None, image_root: Path | None = None) -> None:
    """metrics.json, report.md, figures, predictions.csv and report.html of one evaluated split, into `directory`;
    `extras` writes its own files there and adds its sections to report.md. report.html's case gallery reads the
    images under `image_root` (default: the root the run's store recorded); `scorer` draws a token head's attention."""
    directory = Path(directory)
    p, rows, metrics = evaluation.p, evaluation.rows, evaluation.metrics
    calibration, options = record.decisions, record.protocol
    write_metrics_json(metrics, directory / "metrics.json")
    sections = extras(directory) if extras is not None else []
    report = markdown_report(metrics, title=f"medembed run: {title or directory.name}", context=report_context(record), sections=sections)
    atomic_write_text(directory / "report.md", report)
    figures = directory / "figures"
    figures.mkdir(exist_ok=True)
    body_parts = rows.body_part if (rows.body_part != "").all() else None
    figure_context = FigureContext(title or directory.name, record.scorer, record.fingerprint.get("encoder", ""), options.threshold)
    plot_figures(rows.y, p, calibration.image_threshold, figures, level="image", body_parts=body_parts, result=metrics["image"], context=figure_context)
    studies = aggregate_studies(p, rows.y, rows.study_id, how=options.aggregation, attributes={"body_part": rows.body_part})
    study_parts = studies.attributes["body_part"] if body_parts is not None else None
    plot_figures(studies.y, studies.p, calibration.study_threshold, figures, level="study", body_parts=study_parts, result=metrics["study"], context=figure_context)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    # patient_id (empty where the store has none) lets `compare` resample patients as the intervals do; the
    # probability is written exactly (shortest round-trip repr), so compare's paired metrics equal metrics.json's
    writer.writerow(["image_id", "study_id", "label", "probability", "abnormal", "patient_id"])
    patients = rows.patient_id if rows.has_patients else np.full(len(p), "")
    for image_id, study_id, label, prob, patient in zip(rows.image_id, rows.study_id, rows.y, p, patients):
        writer.writerow([text_cell(image_id), text_cell(study_id), int(label), repr(float(prob)), int(prob >= calibration.image_threshold), text_cell(patient)])
    atomic_write_text(directory / "predictions.csv", buffer.getvalue())
    from medembed.runs.html import write_html_report_safely

    write_html_report_safely(directory, record, p, rows, metrics, title=f"medembed run: {title or directory.name}", context=report_context(record),
                             scorer=scorer, image_root=image_root)


def report_context(record: RunRecord) -> dict[str, str]:
    """The run's settings as report.md lists them."""
    options = record.protocol
    return {
        "run kind": record.kind,
        "scorer": record.scorer,
        "threshold rule": options.threshold,
        "image threshold": f"{record.image_threshold:.4f}",
        "study threshold": f"{record.study_threshold:.4f}",
        "calibration": options.calibration,
        "study aggregation": options.aggregation,
        "encoder": record.fingerprint.get("encoder", ""),
        "model": record.fingerprint.get("model_id", ""),
        "preprocessing": describe_preprocess(record.preprocess) if record.preprocess else "",
        "preprocess hash": record.fingerprint.get("preprocess_hash", ""),
        "splits": ", ".join(f"{k} {v['images']} images ({v['abnormal']} abnormal)" for k, v in record.split_sizes.items()),
        **({"notes": "; ".join(record.notes)} if record.notes else {}),
    }

"""External validation: a run's own calibration and thresholds applied to another site's rows (`evaluate --on`).

Labelled target rows get every metric with bootstrap intervals, shown next to the run's own test metrics with
the difference and its interval (target and source resampled independently, the difference taken resample by
resample). Every row, labelled or not, gets the drift checks (embedding shift test against the run's train
sample, predicted prevalence vs the run's val), the OOD flag and a conformal set. Written into
RUN/external/<target name>/: external.json, report.md, figures/, predictions.csv.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from medembed._csv import text_cell
from medembed._files import atomic_write_text
from medembed.errors import MedembedError
from medembed.protocol.metrics import aggregate_studies, binary_metrics, resampled_metrics
from medembed.protocol.steps import Calibration, evaluate_split
from medembed.options.protocol import ProtocolOptions
from medembed.protocol.figures import plot_figures
from medembed.protocol.report import markdown_report, write_metrics_json
from medembed.runs.inputs import RunInputs, labelled, run_inputs
from medembed.runs.record import Run, load_run
from medembed.runs.writer import report_context
from medembed.protocol.splits import Split
from medembed.transfer.conformal import fit_conformal, prediction_sets, set_names
from medembed.transfer.drift import prevalence_shift, shift_test
from medembed.transfer.ood import embedding_matrix
from medembed.options.transfer import TransferOptions
from medembed.transfer.reference import NO_EMBEDDINGS, SiteReference, run_reference
from medembed.transfer.sections import (
    COMPARED,
    comparison_markdown,
    conformal_markdown,
    conformal_summary,
    drift_markdown,
    ood_markdown,
    ood_scores,
    save_subgroup_figure,
    subgroups_markdown,
)
from medembed.transfer.subgroups import check_columns, subgroup_metrics
from medembed.options.transfer import ALL_ROWS

EXTERNAL_DIR = "external"


def level_samples(p: np.ndarray, rows: Split, calibration: Calibration, how: str) -> dict[str, tuple]:
    """{level: (y, p, threshold, resampling groups)} at image level and, where studies exist, study level."""
    groups = rows.patient_id if rows.has_patients else rows.study_id
    samples = {"image": (rows.y, p, calibration.image_threshold, groups)}
    studies = aggregate_studies(p, rows.y, rows.study_id, how=how, groups=rows.patient_id if rows.has_patients else None)
    if len(studies.y) < len(rows.y):  # each image its own study: the study level would repeat the image level
        samples["study"] = (studies.y, studies.p, calibration.study_threshold, studies.groups if studies.groups is not None else studies.study_ids)
    return samples


def compare_metrics(source: dict[str, tuple], target: dict[str, tuple], n_resamples: int, seed: int) -> dict[str, Any]:
    """{level: {metric: {"source", "target", "difference", "difference_ci"}}} over the levels both have."""
    result: dict[str, Any] = {}
    for level in source.keys() & target.keys():
        (ys, ps, ts, gs), (yt, pt, tt, gt) = source[level], target[level]
        point_s, point_t = binary_metrics(ys, ps, ts), binary_metrics(yt, pt, tt)
        if n_resamples:
            resampled_s = resampled_metrics(ys, ps, ts, gs, n_resamples, seed)
            resampled_t = resampled_metrics(yt, pt, tt, gt, n_resamples, seed + 1)
        entry = {}
        for metric in COMPARED:
            ci = None
            if n_resamples:
                differences = resampled_t[metric] - resampled_s[metric]
                differences = differences[~np.isnan(differences)]
                ci = [float(v) for v in np.percentile(differences, [2.5, 97.5])] if differences.size else None
            entry[metric] = {"source": point_s[metric], "target": point_t[metric], "difference": point_t[metric] - point_s[metric], "difference_ci": ci}
        result[level] = entry
    return {level: result[level] for level in ("image", "study") if level in result}


def drift_checks(run: Run, reference: SiteReference, rows: Split, p: np.ndarray, options: TransferOptions) -> dict[str, Any]:
    """Shift test of the rows' embeddings vs the train sample, and predicted prevalence vs the run's val."""
    result: dict[str, Any] = {"prevalence": prevalence_shift(reference.val_p, p, run.calibration.image_threshold)}
    matrix = embedding_matrix(rows.X) if run_inputs(run).reads_embeddings else None
    if reference.has_embeddings and matrix is not None:
        result["shift"] = asdict(shift_test(reference.train_sample, matrix, options.permutations, seed=run.record.protocol.seed))
    else:
        result["unavailable"] = NO_EMBEDDINGS
    return result


def evaluate_on(run_dir: Path, target: Path, *, root: Path | None = None, split: str = ALL_ROWS, n_resamples: int | None = None,
                options: TransferOptions | None = None) -> dict[str, Any]:
    """External validation of run `run_dir` on `target` (a store, or a manifest under `root` for image runs).
    Writes RUN/external/<target stem>/ and returns external.json's content."""
    options = options or TransferOptions()
    run = load_run(run_dir)
    protocol: ProtocolOptions = run.record.protocol
    n_resamples = protocol.n_resamples if n_resamples is None else n_resamples
    inputs = run_inputs(run)
    rows, notes = inputs.target(target, root, split, options.columns_from)
    check_columns(rows, options.columns)
    reference = run_reference(run)
    p = run.probabilities(rows)
    result: dict[str, Any] = {
        "run": str(run_dir), "target": str(target), "split": split, "images": len(rows), "notes": notes,
        "thresholds": {"image": run.calibration.image_threshold, "study": run.calibration.study_threshold},
        "drift": drift_checks(run, reference, rows, p, options),
    }
    scored = ood_scores(reference, rows.X if inputs.reads_embeddings else None, options.false_alarm)
    if scored is not None:
        scores, cut = scored
        result["ood"] = {"false_alarm": options.false_alarm, "threshold": cut, "flagged": float((scores > cut).mean()), "n": len(scores)}
    quantiles = fit_conformal(reference.val_p, reference.val_y, options.alpha, options.class_conditional)
    known = labelled(rows)
    out = Path(run_dir) / EXTERNAL_DIR / Path(target).stem
    (out / "figures").mkdir(parents=True, exist_ok=True)
    sections = []
    if len(known) and len(np.unique(known.y)) == 2:
        p_known = p[rows.y >= 0]
        source = source_test_rows(inputs)
        metrics = evaluate_split(p_known, known, run.calibration, _with_resamples(protocol, n_resamples), seed=protocol.seed)
        result["metrics"] = metrics
        result["labelled"] = len(known)
        if source is not None:
            p_source = run.probabilities(source)
            result["comparison"] = compare_metrics(level_samples(p_source, source, run.calibration, protocol.aggregation),
                                                   level_samples(p_known, known, run.calibration, protocol.aggregation), n_resamples, protocol.seed)
            sections.append(comparison_markdown(result["comparison"], "source test", Path(target).stem))
        else:
            notes.append("the run's own test rows cannot be read here: no comparison with its test metrics")
        result["conformal"] = conformal_summary(reference, p_known, known.y, options.alphas)
        if options.columns:
            result["subgroups"] = subgroup_metrics(p_known, known, options.columns, run.calibration.image_threshold, n_resamples, protocol.seed)
            save_subgroup_figure(out, result["subgroups"])
        plot_figures(known.y, p_known, run.calibration.image_threshold, out / "figures", level="image", result=metrics["image"])
    else:
        notes.append(f"{len(known)} labelled target rows with {len(np.unique(known.y))} class(es): metrics, coverage and subgroups need both classes; drift and OOD need no labels")
    sections.append(drift_markdown(result["drift"]))
    sections.append(ood_markdown(result.get("ood"), where="the target"))
    if "conformal" in result:
        sections.append(conformal_markdown(result["conformal"], where="the labelled target rows"))
    if "subgroups" in result:
        sections.append(subgroups_markdown(result["subgroups"]))
    write_metrics_json(result, out / "external.json")
    atomic_write_text(out / "report.md", external_report(result, run, sections, title=f"External validation: {Path(run_dir).name} on {Path(target).name}"))
    write_predictions(out / "predictions.csv", rows, p, run.calibration.image_threshold, set_names(prediction_sets(p, quantiles)),
                      scored[0] if scored is not None else None, scored[1] if scored is not None else None)
    result["directory"] = str(out)
    return result


def _with_resamples(protocol: ProtocolOptions, n_resamples: int) -> ProtocolOptions:
    return replace(protocol, n_resamples=n_resamples)


def source_test_rows(inputs: RunInputs) -> Split | None:
    """The run's own test rows, or None when its inputs are not readable here."""
    try:
        return inputs.rows("test")
    except MedembedError:
        return None


def external_report(result: dict[str, Any], run: Run, sections: list[str], title: str) -> str:
    """report.md: the target's headline metrics (when labelled), the transfer sections, notes and the run's context."""
    context = {"target": result["target"], "rows": result["images"], **report_context(run.record)}
    if result["notes"]:
        sections = [*sections, "## Notes\n\n" + "\n".join(f"- {note}" for note in result["notes"])]
    if "metrics" in result:
        return markdown_report(result["metrics"], title=title, context=context, sections=sections)
    return "\n\n".join([f"# {title}", *sections, "## Context\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in context.items())]) + "\n"


def write_predictions(path: Path, rows: Split, p: np.ndarray, threshold: float, sets: np.ndarray,
                      ood: np.ndarray | None, ood_cut: float | None) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["image_id", "study_id", "label", "probability", "abnormal", "prediction_set", "ood_score", "ood"])
    for k, (image_id, study_id, label) in enumerate(zip(rows.image_id, rows.study_id, rows.y)):
        score = "" if ood is None else f"{ood[k]:.4f}"
        flag = "" if ood is None else int(ood[k] > ood_cut)
        writer.writerow([text_cell(image_id), text_cell(study_id), "" if label < 0 else int(label), f"{p[k]:.6f}",
                         int(p[k] >= threshold), sets[k], score, flag])
    atomic_write_text(path, buffer.getvalue())


def external_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """What experiment tracking logs of an `evaluate_on` result, as a metrics document: the target's labelled
    metrics (when it had labels), and the label-free figures as {"value"} leaves (shift MMD² and p, the share
    called abnormal against the run's val, the share flagged out of distribution)."""
    drift = result["drift"]
    found: dict[str, Any] = dict(result.get("metrics") or {})
    found["drift"] = {"target_called_abnormal": {"value": drift["prevalence"]["target_called_abnormal"]},
                      "source_called_abnormal": {"value": drift["prevalence"]["source_called_abnormal"]}}
    if "shift" in drift:
        found["drift"] |= {"shift_mmd2": {"value": drift["shift"]["mmd2"]}, "shift_p_value": {"value": drift["shift"]["p_value"]}}
    if "ood" in result:
        found["ood"] = {"flagged": {"value": result["ood"]["flagged"]}}
    return found

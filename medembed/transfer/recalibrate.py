"""Recalibration from a few labelled target images: the scorer stays frozen, only the probability calibration and
the thresholds are refitted (`medembed recalibrate RUN TARGET --labelled N --out RUN2`).

The N labelled images are a seeded sample grouped by patient (study where there is none) and stratified by
label, or the rows a column marks; the rest of the target is the evaluation set, scored both with the source
calibration and thresholds and with the refitted ones. RUN2 is a complete run directory: the same scorer, the
new calibration, its conformal reference taken from the N images, the source's train-embedding sample.
`recalibration_curve` repeats this over N and seeds (how many labels restore the operating point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medembed._files import atomic_write_text
from medembed.errors import MedembedError
from medembed.protocol.metrics import binary_metrics
from medembed.protocol.steps import Calibration, calibrate_on_val, evaluate_split
from medembed.options.protocol import ProtocolOptions
from medembed.protocol.report import markdown_table, write_metrics_json
from medembed.runs.inputs import labelled, run_inputs
from medembed.runs.record import Run, load_run
from medembed.runs.writer import Evaluation, write_run
from medembed.scorers.contract import positive_scores
from medembed.protocol.splits import Split
from medembed.options.transfer import TransferOptions
from medembed.transfer.reference import REFERENCE_DIR, run_reference
from medembed.transfer.sections import source_sections
from medembed.transfer.subgroups import check_columns
from medembed.options.recalibrate import RecalibrateOptions

OPERATING = ("sensitivity", "specificity", "kappa", "ppv", "auroc")
TRUE_MARKS = ("1", "true", "yes", "y")


def labelled_sample(rows: Split, n: int, seed: int) -> np.ndarray:
    """Indices of about n rows: whole patients (studies) drawn in seeded order from each label stratum (a
    patient's stratum: abnormal if any image is), each stratum in proportion to its images, at least one
    patient of each class. The rest of the rows must keep both classes too."""
    units = rows.patient_id if rows.has_patients else rows.study_id
    if n >= len(rows):
        raise MedembedError(f"--labelled {n}: the target has only {len(rows)} labelled rows; some must remain to evaluate on")
    names, unit_of_row = np.unique(units, return_inverse=True)
    unit_label = np.zeros(len(names), dtype=np.int8)
    np.maximum.at(unit_label, unit_of_row, rows.y)
    unit_size = np.bincount(unit_of_row, minlength=len(names))
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    share_abnormal = unit_size[unit_label == 1].sum() / len(rows)
    wanted = {1: max(1, round(n * share_abnormal)), 0: None}
    for label in (1, 0):
        candidates = rng.permutation(np.flatnonzero(unit_label == label))
        if not len(candidates):
            raise MedembedError(f"the labelled target rows have no {'abnormal' if label else 'normal'} image; recalibration needs both classes")
        goal = wanted[label] if label == 1 else n - int(unit_size[chosen].sum())
        taken = 0
        for unit in candidates:
            if taken >= max(goal, 1):
                break
            chosen.append(int(unit))
            taken += int(unit_size[unit])
    return np.flatnonzero(np.isin(unit_of_row, chosen))


def marked_rows(rows: Split, column: str) -> np.ndarray:
    """Indices of the rows whose `column` value marks them as labelled (1/true/yes)."""
    from medembed.transfer.subgroups import row_column

    values = np.char.lower(row_column(rows, column))
    chosen = np.flatnonzero(np.isin(values, TRUE_MARKS))
    if not len(chosen):
        raise MedembedError(f"--labelled-column {column}: no row is marked ({', '.join(TRUE_MARKS)})")
    return chosen


@dataclass
class Refit:
    """A calibration refitted on labelled target rows, and the target evaluation rows scored both ways."""

    calibration: Calibration
    protocol: ProtocolOptions
    sample: np.ndarray  # indices into the labelled target rows
    p_sample: np.ndarray
    rest: Split
    p_rest_before: np.ndarray
    p_rest_after: np.ndarray


def refit(run: Run, rows: Split, raw: np.ndarray, sample: np.ndarray, options: RecalibrateOptions) -> Refit:
    """Calibration and thresholds fitted on rows[sample] (raw scores `raw` [N] of every row), evaluated on the rest."""
    protocol = replace(run.record.protocol, calibration=options.calibration, threshold=options.threshold or run.record.protocol.threshold)
    picked = rows.take(sample)
    if len(np.unique(picked.y)) < 2:
        raise MedembedError(f"the {len(sample)} labelled target images hold a single class; label images of both classes")
    calibration = calibrate_on_val(raw[sample], picked, protocol)
    rest_mask = np.ones(len(rows), dtype=bool)
    rest_mask[sample] = False
    if not rest_mask.any():
        raise MedembedError("every target row is labelled: none remains to evaluate the recalibration on")
    before = run.calibration.calibrator.transform(raw[rest_mask])
    return Refit(calibration, protocol, sample, calibration.calibrator.transform(raw[sample]), rows.take(np.flatnonzero(rest_mask)),
                 before, calibration.calibrator.transform(raw[rest_mask]))


def recalibrate(run_dir: Path, target: Path, out: Path, options: RecalibrateOptions | None = None, *, root: Path | None = None,
                transfer: TransferOptions | None = None) -> dict[str, Any]:
    """Refit calibration and thresholds of `run_dir` on labelled target images, write RUN2 `out`, return
    {"before": metrics with the source calibration and thresholds, "after": with the refitted ones, ...} on the
    rest of the target."""
    options = options or RecalibrateOptions()
    transfer = transfer or TransferOptions()
    if Path(out).resolve().is_relative_to(Path(run_dir).resolve()):  # the source run is read, never rewritten
        raise MedembedError(f"{out}: is the source run {run_dir} or inside it; recalibrate writes a new run: give another --out")
    run = load_run(run_dir)
    rows, notes = run_inputs(run).target(target, root, options.split, transfer.columns_from)
    rows = labelled(rows)
    if not len(rows):
        raise MedembedError(f"{target}: no labelled rows; recalibration needs labels on some target images")
    check_columns(rows, transfer.columns)
    raw = positive_scores(run.scorer, rows.X, {"body_part": rows.body_part, "study_id": rows.study_id})
    sample = marked_rows(rows, options.labelled_column) if options.labelled_column else labelled_sample(rows, options.labelled, options.seed)
    fitted = refit(run, rows, raw, sample, options)
    evaluation_protocol = replace(fitted.protocol, n_resamples=options.n_resamples, seed=options.seed)
    after = evaluate_split(fitted.p_rest_after, fitted.rest, fitted.calibration, evaluation_protocol, seed=options.seed)
    before = evaluate_split(fitted.p_rest_before, fitted.rest, run.calibration, evaluation_protocol, seed=options.seed)
    how = "the rows marked in " + options.labelled_column if options.labelled_column else f"a grouped, stratified sample (seed {options.seed})"
    details = {
        "target": str(Path(target).resolve()), "labelled": int(len(sample)), "labelled_abnormal": int(rows.y[sample].sum()), "chosen_by": how,
        "evaluated": len(fitted.rest), "source_calibration": run.record.calibration,
        "source_thresholds": {"image": run.calibration.image_threshold, "study": run.calibration.study_threshold},
        "labelled_ids": rows.image_id[sample].tolist(),
    }
    record = replace(
        run.record,
        options=replace(run.record.options, calibration=fitted.protocol.calibration, threshold=fitted.protocol.threshold),
        image_threshold=fitted.calibration.image_threshold, study_threshold=fitted.calibration.study_threshold,
        calibration=fitted.calibration.calibrator.to_dict(),
        notes=[*run.record.notes, *notes, f"recalibrated from {Path(run_dir).name} on {len(sample)} labelled images of {Path(target).name} "
               f"({how}); report metrics are on the other {len(fitted.rest)} target images"],
        details={**run.record.details, "recalibration": details},
    )
    source_reference = run_reference(run)
    reference = replace(source_reference, val_p=fitted.p_sample, val_y=rows.y[sample].astype(np.int8))
    if source_reference.has_embeddings:
        reference._ood = source_reference.ood_model()

    def extras(directory: Path) -> list[str]:
        reference.save(Path(directory) / REFERENCE_DIR)
        sections = source_sections(directory, reference, fitted.rest, fitted.p_rest_after, fitted.calibration.image_threshold, transfer,
                                   options.n_resamples, options.seed)
        return [recalibration_markdown(before, after, details), *sections]

    write_run(out, record, run.scorer, Evaluation(fitted.p_rest_after, fitted.rest, after), extras=extras)
    result = {"before": before, "after": after, **{k: v for k, v in details.items() if k != "labelled_ids"}}
    if options.sizes:
        curve = recalibration_curve(run, rows, raw, options.sizes, options.curve_seeds, options)
        write_curve(Path(out), curve)
        result["curve"] = curve
    write_metrics_json(result, Path(out) / "recalibration.json")
    return result


def recalibration_markdown(before: dict, after: dict, details: dict) -> str:
    header = ["metric", "source calibration and thresholds", "recalibrated"]
    rows = []
    for level in ("image", "study"):
        if level in after:
            rows += [[f"{name} ({level})", _value(before[level]["overall"][name]["value"]), _value(after[level]["overall"][name]["value"])] for name in OPERATING]
    return "\n".join([
        "## Recalibration", "",
        f"Scorer frozen; calibration and thresholds refitted on {details['labelled']} labelled target images ({details['labelled_abnormal']} abnormal, "
        f"{details['chosen_by']}); both columns on the other {details['evaluated']} target images.", "", *markdown_table(header, rows),
    ])


def _value(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def recalibration_curve(run: Run, rows: Split, raw: np.ndarray, sizes: list[int], seeds: int, options: RecalibrateOptions) -> dict[str, Any]:
    """Image-level operating point on the rest of the target after refitting on N labelled images, per N and
    seed, next to the source calibration and thresholds on the same rest: {"draws": [...], "summary": {N: ...}}."""
    draws = []
    for n in sizes:
        if n >= len(rows):
            continue
        for seed in range(options.seed, options.seed + seeds):
            sample = labelled_sample(rows, n, seed)
            try:
                fitted = refit(run, rows, raw, sample, options)
            except MedembedError as error:  # e.g. a sample a calibration cannot be fitted on: recorded, not fatal
                draws.append({"n": n, "seed": seed, "labelled": len(sample), "error": str(error)})
                continue
            before = binary_metrics(fitted.rest.y, fitted.p_rest_before, run.calibration.image_threshold)
            after = binary_metrics(fitted.rest.y, fitted.p_rest_after, fitted.calibration.image_threshold)
            draws.append({"n": n, "seed": seed, "labelled": len(sample), "threshold": fitted.calibration.image_threshold,
                          "before": {m: before[m] for m in OPERATING}, "after": {m: after[m] for m in OPERATING}})
    summary = {}
    for n in sorted({d["n"] for d in draws}):
        ok = [d for d in draws if d["n"] == n and "after" in d]
        summary[str(n)] = {"draws": len(ok), "failed": sum(1 for d in draws if d["n"] == n and "error" in d)}
        if ok:
            summary[str(n)] |= {which: {m: _mean_sd([d[which][m] for d in ok]) for m in OPERATING} for which in ("before", "after")}
    return {"sizes": sizes, "seeds": seeds, "draws": draws, "summary": summary}


def _mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample sd (NaN for one value), undefined values left out."""
    array = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(array)), "sd": float(np.nanstd(array, ddof=1)) if len(array) > 1 else math.nan}


def write_curve(directory: Path, curve: dict[str, Any]) -> None:
    """curve.json, curve.md and figures/recalibration_curve.png."""
    write_metrics_json(curve, directory / "curve.json")
    rows = []
    for n, entry in curve["summary"].items():
        if not entry.get("draws"):
            continue
        rows.append([n, str(entry["draws"])] + [f"{entry[w][m]['mean']:.3f} ± {entry[w][m]['sd']:.3f}" for m in ("sensitivity", "specificity", "kappa") for w in ("before", "after")])
    header = ["N", "draws"] + [f"{m} {w}" for m in ("sensitivity", "specificity", "kappa") for w in ("source", "recalibrated")]
    atomic_write_text(directory / "curve.md", "\n".join(["# Recalibration learning curve", "",
                      "Mean ± sd over seeds, image level, on the target images not labelled.", "", *markdown_table(header, rows)]) + "\n")
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    sizes = [int(n) for n, e in curve["summary"].items() if e.get("draws")]
    for ax, metric in zip(figure.subplots(1, 3), ("sensitivity", "specificity", "kappa")):
        for which, style in (("before", ":"), ("after", "-")):
            means = np.array([curve["summary"][str(n)][which][metric]["mean"] for n in sizes])
            sds = np.nan_to_num(np.array([curve["summary"][str(n)][which][metric]["sd"] for n in sizes]))
            ax.plot(sizes, means, style, marker="o", label="source thresholds" if which == "before" else "recalibrated")
            ax.fill_between(sizes, means - sds, means + sds, alpha=0.15)
        ax.set(xscale="log", xlabel="labelled target images", title=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    (directory / "figures").mkdir(exist_ok=True)
    figure.savefig(directory / "figures" / "recalibration_curve.png", dpi=120)

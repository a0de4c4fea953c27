"""Corruption robustness of a fitted run: re-embed the test images under corruptions, score, report the metric drop.

For each corruption x severity the run's own encoder re-extracts the manifest's test split through a
`CorruptedPreprocess` into a cache store under ``RUN/corrupt/``. The clean baseline is the run's own store when it
holds every test image with the run's fingerprint (those embeddings are what the run was evaluated on: embedding
them again would only repeat the work); otherwise a clean extraction into ``RUN/corrupt/clean.h5`` joins them. The run's head, probability calibration and
thresholds (chosen on clean val, never touched here) score each store, and every condition is evaluated on the
images all conditions embedded. Stores resume like any extraction, so an interrupted sweep picks up where it stopped.

Outputs in the run directory: ``robustness.json`` (every metric per condition, and its change vs clean),
``robustness.md`` (AUROC and kappa per corruption and severity, with the drop) and ``figures/robustness.png``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from medembed._files import atomic_write_text
from medembed.data.corrupt import CORRUPTIONS, PARAMETER_UNITS, SEVERITY_TABLE, CorruptedPreprocess, describe_parameter, parameter
from medembed.errors import MedembedError
from medembed.protocol.metrics import METRICS
from medembed.data.manifest import Manifest, read_manifest
from medembed.options.protocol import ProtocolOptions
from medembed.protocol.steps import evaluate_split
from medembed.protocol.report import format_cell, write_metrics_json
from medembed.runs.inputs import RunInputs, Scored, StoreInputs, run_inputs
from medembed.runs.record import Run, load_run
from medembed.protocol.splits import Split
from medembed.options.robustness import RobustnessOptions
from medembed.store import open_store

CLEAN = "clean"
TABLE_METRICS = ("auroc", "kappa")  # the Markdown table and the figure; the JSON has every metric
_METRIC_NAMES = {"auroc": "AUROC", "kappa": "Kappa"}


@dataclass(frozen=True)
class Condition:
    """One extraction of the test images: clean (severity 0) or a corruption at a severity."""

    corruption: str
    severity: int

    @property
    def name(self) -> str:
        """"clean" or e.g. "blur-3": the cache store's file stem."""
        return CLEAN if self.corruption == CLEAN else f"{self.corruption}-{self.severity}"


def labelled_test_split(manifest_path: Path) -> tuple[Manifest, list[str]]:
    """The labelled rows of the manifest's test split, and notes on rows left out."""
    manifest = read_manifest(manifest_path)
    test = manifest.subset(manifest.split == "test")
    if len(test) == 0:
        raise MedembedError(f"{manifest_path}: no rows with split=test; give the manifest the run's store was extracted from")
    labelled = test.label >= 0
    notes = [] if labelled.all() else [f"{int((~labelled).sum())} test rows without a label left out"]
    if not labelled.any():
        raise MedembedError(f"{manifest_path}: the test split has no labels; robustness needs labelled test images")
    return test.subset(labelled), notes


def evaluate_corruptions(
    run_dir: Path,
    manifest_path: Path,
    root: Path,
    corruptions: Sequence[str],
    severities: Sequence[int],
    options: RobustnessOptions | None = None,
    on_extracted: Callable[[Condition, Scored], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Metrics of run `run_dir` on the manifest's test images (paths under `root`), clean and corrupted.

    Writes robustness.json, robustness.md and figures/robustness.png into the run directory and returns the
    JSON's content: {"clean": {level: {metric: {"value", "ci"}}}, "conditions": [{"corruption", "severity",
    "parameter", "metrics": {...}, "change": {level: {metric: corrupted - clean}}}], "images", "notes", ...}.
    `on_extracted(condition, scored)` is called after each condition is read; `log` gets one progress line per
    condition (`progress_line`: an image that fails to be read is named once, not again under every corruption).
    """
    options = options or RobustnessOptions()
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    inputs = run_inputs(run)
    clean_spec = inputs.preprocess_spec()  # an embedding run's encoder is rebuilt and checked here, once
    test, notes = labelled_test_split(Path(manifest_path))
    conditions = [Condition(CLEAN, 0)] + [Condition(c, s) for c in corruptions for s in severities]
    for condition in conditions[1:]:
        parameter(condition.corruption, condition.severity)  # fail on a bad name before hours of extraction
    scored: dict[Condition, Split] = {}
    reported: dict[str, str] = {}  # failed images already named in a progress line
    for condition in conditions:
        store = run_dir / "corrupt" / f"{condition.name}.h5"
        read, from_store = (clean_from_store(inputs, test), True) if condition.corruption == CLEAN else (None, False)
        if read is None:
            spec = None if condition.corruption == CLEAN else CorruptedPreprocess(clean_spec, condition.corruption, condition.severity)
            read, from_store = inputs.score(test, Path(root), store, options.extract, preprocess=spec), False
        if from_store:
            notes.append(f"clean condition: the run's own store ({', '.join(run.record.inputs['stores'])}), not embedded again")
        scored[condition] = read.rows
        if on_extracted:
            on_extracted(condition, read)
        if log:
            log(progress_line(condition, read, reported, from_store))
    rows, dropped = _common_rows(scored, root)
    if dropped:
        notes.append(f"{dropped} test images not scored under every condition left out (see the failed tables of RUN/corrupt/*.h5)")
    n_images = len(rows[conditions[0]])
    expected = run.record.split_sizes.get("test", {}).get("images")
    if expected is not None and expected != n_images:
        notes.append(f"evaluated on {n_images} test images; the run was evaluated on {expected}")
    protocol = replace(run.record.protocol, n_resamples=options.n_resamples)
    metrics = {condition: _overall(run, rows[condition], protocol) for condition in conditions}
    result = {
        "run": str(run_dir),
        "manifest": str(manifest_path),
        "root": str(root),
        "images": n_images,
        "thresholds": {"image": run.calibration.image_threshold, "study": run.calibration.study_threshold},
        "severity_table": {name: list(values) for name, values in SEVERITY_TABLE.items()},
        "notes": notes,
        "clean": metrics[conditions[0]],
        "conditions": [_condition_entry(condition, metrics[condition], metrics[conditions[0]]) for condition in conditions[1:]],
    }
    write_metrics_json(result, run_dir / "robustness.json")
    atomic_write_text(run_dir / "robustness.md", robustness_markdown(result, title=f"Corruption robustness: {run_dir.name}"))
    (run_dir / "figures").mkdir(exist_ok=True)
    robustness_figure(result).savefig(run_dir / "figures" / "robustness.png", dpi=120)
    return result


def clean_from_store(inputs: RunInputs, test: Manifest) -> Scored | None:
    """The clean test rows of `test` from the run's own store(s), when they hold (or list as failed) every one of its
    images with the run's fingerprint; None when they do not (or are gone): the clean images are then embedded."""
    if not isinstance(inputs, StoreInputs):  # image scorers decode pixels; ensembles take no corruption
        return None
    try:
        rows = inputs.rows("test")  # refuses a store whose fingerprint is not the run's
        failed: dict[str, str] = {}
        for store in inputs.run.record.inputs["stores"]:
            failed.update(open_store(Path(store)).failed())
    except (MedembedError, OSError):
        return None
    wanted = set(test.image_id.tolist())
    held = set(rows.image_id.tolist())
    if not wanted <= held | set(failed):
        return None
    order = {image_id: i for i, image_id in enumerate(rows.image_id.tolist())}
    keep = np.array([order[i] for i in test.image_id.tolist() if i in order], dtype=np.intp)
    kept = rows.take(keep)
    if not np.array_equal(kept.y, test.label[np.isin(test.image_id, kept.image_id)].astype(kept.y.dtype)):
        return None  # the manifest labels these images otherwise: embed them as it says
    return Scored(kept, {i: failed[i] for i in test.image_id.tolist() if i in failed and i not in held})


def progress_line(condition: Condition, read: Scored, reported: dict[str, str], from_store: bool = False) -> str:
    """One condition's progress: its counts (the extraction's summary line), and only the images that failed here
    and were not named before (`reported`, updated): a truncated file fails under every corruption, said once."""
    if from_store:
        head = f"{len(read.rows)} test images from the run's store (not embedded again)" + (f", {len(read.failed)} could not be read" if read.failed else "")
    elif read.extraction is not None:
        head = read.extraction.format().splitlines()[0]
    else:
        head = f"{len(read.rows)} images read, {len(read.failed)} could not be"
    new = {image_id: reason for image_id, reason in read.failed.items() if image_id not in reported}
    repeated = len(read.failed) - len(new)
    reported.update(new)
    parts = [f"{condition.name:<11} {head}"]
    if repeated:
        parts.append(f"  ({repeated} of them named above)")
    if new:
        shown = ", ".join(f"{image_id} ({reason})" for image_id, reason in list(new.items())[:5])
        parts.append(f"  failed: {shown}" + (f" and {len(new) - 5} more" if len(new) > 5 else ""))
    return "\n".join(parts)


def _condition_entry(condition: Condition, metrics: dict, clean: dict) -> dict[str, Any]:
    """One corrupted condition's JSON entry: its metrics and each metric's change vs clean (corrupted - clean)."""
    return {
        "corruption": condition.corruption,
        "severity": condition.severity,
        "parameter": parameter(condition.corruption, condition.severity),
        "parameter_unit": PARAMETER_UNITS[condition.corruption],
        "metrics": metrics,
        "change": {level: {m: metrics[level][m]["value"] - clean[level][m]["value"] for m in METRICS} for level in clean},
    }


def _common_rows(scored: dict[Condition, Split], root: Path) -> tuple[dict[Condition, Split], int]:
    """Each condition's rows restricted to the ids every condition scored, in one order; and how many were dropped."""
    clean_ids = next(iter(scored.values())).image_id
    if len(clean_ids) == 0:
        raise MedembedError(f"no test image could be read from {root}; check --root")
    common = set(clean_ids)
    for rows in scored.values():
        common &= set(rows.image_id)
    order = sorted(common)
    result = {}
    for condition, rows in scored.items():
        position = {image_id: i for i, image_id in enumerate(rows.image_id)}
        result[condition] = rows.take(np.array([position[i] for i in order], dtype=np.intp))
    return result, len(clean_ids) - len(order)


def _overall(run: Run, rows: Split, options: ProtocolOptions) -> dict[str, dict[str, dict]]:
    """{level: {metric: {"value", "ci"}}} of the run's calibrated probabilities and thresholds on `rows`."""
    result = evaluate_split(run.probabilities(rows), rows, run.calibration, options, seed=options.seed)
    return {level: result[level]["overall"] for level in ("image", "study") if level in result}


def robustness_markdown(result: dict[str, Any], *, title: str) -> str:
    """A Markdown report: per level, one row per condition with AUROC and kappa and their change vs clean."""
    lines = [f"# {title}", ""]
    lines.append(
        f"{result['images']} test images; the run's calibration and thresholds (image {result['thresholds']['image']:.4f}, "
        f"study {result['thresholds']['study']:.4f}), chosen on clean val, are applied unchanged. "
        "Values: point estimate (95% bootstrap interval); Δ = corrupted − clean."
    )
    for level in result["clean"]:
        header = ["Corruption", "Severity", "Parameter"]
        for metric in TABLE_METRICS:
            header += [_METRIC_NAMES[metric], f"Δ {_METRIC_NAMES[metric]}"]
        table = [[CLEAN, "", ""] + [cell for m in TABLE_METRICS for cell in (format_cell(result["clean"][level][m], m), "")]]
        for condition in result["conditions"]:
            table.append(
                [condition["corruption"], str(condition["severity"]), describe_parameter(condition["corruption"], condition["severity"])]
                + [
                    cell
                    for m in TABLE_METRICS
                    for cell in (format_cell(condition["metrics"][level][m], m), _signed(condition["change"][level][m]))
                ]
            )
        lines += ["", f"## {level.capitalize()} level", ""]
        lines += ["| " + " | ".join(header) + " |", "|---|---:|---:" + "|---:" * (len(header) - 3) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in table]
    lines += ["", "## Corruptions", "", "Severity tables (ImageNet-C where it has the corruption; see medembed.data.corrupt):", ""]
    lines += [f"- **{name}** ({PARAMETER_UNITS.get(name, '')}): {', '.join(f'{v:g}' for v in values)}" for name, values in result["severity_table"].items()]
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def _signed(change: float) -> str:
    return "n/a" if change is None or np.isnan(change) else f"{change:+.3f}"


def robustness_figure(result: dict[str, Any]) -> Figure:
    """AUROC and kappa against severity (0 = clean), one line per corruption; one row of panels per level."""
    levels = list(result["clean"])
    figure = Figure(figsize=(5.0 * len(TABLE_METRICS), 4.0 * len(levels)), layout="constrained")
    axes = figure.subplots(len(levels), len(TABLE_METRICS), squeeze=False)
    corruptions = [c for c in CORRUPTIONS if any(row["corruption"] == c for row in result["conditions"])]
    for row, level in enumerate(levels):
        for col, metric in enumerate(TABLE_METRICS):
            ax = axes[row][col]
            clean = result["clean"][level][metric]["value"]
            for corruption in corruptions:
                points = [(0, clean)] + [
                    (c["severity"], c["metrics"][level][metric]["value"]) for c in result["conditions"] if c["corruption"] == corruption
                ]
                ax.plot(*zip(*points), marker="o", label=corruption)
            ax.axhline(clean, linestyle=":", color="grey", label="clean")
            ax.set(title=f"{_METRIC_NAMES[metric]}, {level} level", xlabel="severity (0 = clean)", ylabel=_METRIC_NAMES[metric])
            ax.set_xticks(range(0, 6))
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    return figure

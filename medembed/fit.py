"""Stage 2 end to end: fit a head on a store, calibrate on val, evaluate on test, write a run directory.

Train on ``train``, choose everything (the head's hyperparameters, probability calibration, thresholds) on
``val``, report on ``test``. A run directory holds::

    run.json           options, store fingerprint and provenance, thresholds, calibration, split sizes
    head/              the fitted head (no pickle: JSON, safetensors or XGBoost's own format)
    metrics.json       image and study level metrics with bootstrap intervals (and mean ± sd over seeds)
    report.md          the same as tables a reader can paste into a paper
    figures/*.png      ROC, PR, reliability, metric-vs-threshold, per-body-part bars
    predictions.csv    test-set image probabilities and decisions
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medembed import __version__
from medembed.calibrate import Calibrator, choose_threshold, fit_calibrator
from medembed.errors import MedembedError
from medembed.evaluate import aggregate_studies, evaluate_predictions, summarize_seeds
from medembed.heads import Head, load_head, make_head
from medembed.manifest import assign_grouped_split
from medembed.report import markdown_report, plot_figures, write_metrics_json
from medembed.store import EmbeddingTable, fingerprint_mismatch, open_store, read_stores

RUN_FORMAT_VERSION = 1


@dataclass
class FitOptions:
    """Everything `medembed fit` can be told; stored in run.json so a run is reproducible."""

    head: str = "logreg"
    head_params: dict[str, Any] = field(default_factory=dict)
    threshold: str = "f1"  # f1 | youden | kappa | sensitivity:0.90 | specificity:0.90 | fixed:0.5
    calibration: str = "none"  # none | platt | isotonic
    aggregation: str = "mean"  # study probability: mean of its images' (MURA's rule) or max
    val_fraction: float = 0.125  # carved from train, grouped by patient, only when the store has no val split
    seeds: int = 1
    n_resamples: int = 1000
    seed: int = 0


@dataclass
class Split:
    """One split's embeddings, labels and grouping columns."""

    X: np.ndarray  # [N, D] float16 | float32
    y: np.ndarray  # [N] int8 {0, 1}
    image_id: np.ndarray
    study_id: np.ndarray  # image id where the store has none: each image its own study
    patient_id: np.ndarray  # study id where the store has none: the resampling / grouping unit
    body_part: np.ndarray
    has_patients: bool

    @classmethod
    def from_columns(cls, X: np.ndarray | None, label: np.ndarray, image_id: np.ndarray, columns: dict[str, np.ndarray]) -> Split:
        """From aligned columns (a store table's or a manifest's); X is None for image-level models (CNN baselines)."""
        image_id = np.asarray(image_id).astype(str)
        study_col, patient_col = (np.asarray(columns[c]).astype(str) for c in ("study_id", "patient_id"))
        study = np.where(study_col != "", study_col, image_id)
        patient = np.where(patient_col != "", patient_col, study)
        return cls(X, np.asarray(label).astype(np.int8), image_id, study, patient,
                   np.asarray(columns["body_part"]).astype(str), bool((patient_col != "").any()))

    @classmethod
    def from_table(cls, table: EmbeddingTable) -> Split:
        """The rows of a store table."""
        return cls.from_columns(table.embeddings, table.label, table.image_id, table.columns)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Calibration:
    """What is chosen on val after the model: probability calibration and image/study thresholds."""

    calibrator: Calibrator
    image_threshold: float
    study_threshold: float


@dataclass
class FittedRun:
    """A head with its calibration and thresholds: everything needed to score new embeddings."""

    head: Head
    calibration: Calibration
    info: dict[str, Any]

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        """Calibrated abnormality probability per image, [N] float64."""
        return self.calibration.calibrator.transform(self.head.predict_proba(X)[:, 1])


def load_splits(stores: list[Path], options: FitOptions) -> tuple[dict[str, Split], dict[str, str], list[str]]:
    """Train/val/test splits of one or more stores (one fingerprint), checked for leakage and bad values.

    Returns the splits, the fingerprint and notes (e.g. rows dropped for unknown labels, a carved val split).
    """
    table, fingerprint = read_stores(stores)
    notes: list[str] = []
    failed = sum(len(open_store(s).failed()) for s in stores)
    if failed:
        notes.append(f"{failed} images the extractor could not read (the store's failed table) are not scored")
    if len(table) == 0:
        raise MedembedError(f"{', '.join(map(str, stores))}: the store has no rows")
    labelled = table.label >= 0
    if not labelled.any():
        raise MedembedError(f"{stores[0]}: the store has no labels (label column is all unknown); fit needs labelled rows")
    if not labelled.all():
        notes.append(f"{int((~labelled).sum())} rows without a label left out")
        table = table.subset(labelled)
    bad = ~np.isfinite(table.embeddings.astype(np.float32)).all(axis=1)
    if bad.any():
        raise MedembedError(f"{int(bad.sum())} embeddings are NaN or infinite, e.g. image ids {table.image_id[bad][:5].tolist()}; re-extract them")
    split = table.columns["split"].astype(str)
    if not (split == "test").any():
        raise MedembedError("the store has no test split; build the manifest with a split column (train/val/test)")
    if not (split == "val").any():
        split = _carve_val(Split.from_table(table), split, options, notes)
        table.columns["split"] = split.astype(object)
    splits = {name: Split.from_table(table.subset(split == name)) for name in ("train", "val", "test")}
    _check_no_leakage(splits)
    for name in ("train", "val"):
        if len(np.unique(splits[name].y)) < 2:
            raise MedembedError(f"the {name} split has a single class ({len(splits[name])} rows, all label {splits[name].y[:1].tolist()}); both classes are needed")
    return splits, fingerprint, notes


def _carve_val(rows: Split, split: np.ndarray, options: FitOptions, notes: list[str]) -> np.ndarray:
    train = split == "train"
    strata = np.char.add(rows.y[train].astype(str), rows.body_part[train])
    carved = assign_grouped_split(
        rows.patient_id[train], strata, {"train": 1 - options.val_fraction, "val": options.val_fraction}, seed=options.seed
    )
    split = split.copy()
    split[train] = carved
    unit = "patient" if rows.has_patients else "study"
    notes.append(f"no val split in the store: {int((carved == 'val').sum())} train images carved into val, grouped by {unit}")
    return split


def _check_no_leakage(splits: dict[str, Split]) -> None:
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        for patient in np.unique(rows.patient_id):
            if patient in seen and seen[patient] != name:
                unit = "patient" if rows.has_patients else "study"
                raise MedembedError(f"leakage: {unit} {patient!r} is in both {seen[patient]} and {name}; fix the manifest's split")
            seen[patient] = name


def fit_once(splits: dict[str, Split], options: FitOptions, seed: int) -> FittedRun:
    """Fit the head on train, then calibration and image/study thresholds on val."""
    train, val = splits["train"], splits["val"]
    head = make_head(options.head, seed=seed, **options.head_params)
    head.fit(train.X, train.y, val.X, val.y)
    calibration = calibrate_on_val(head.predict_proba(val.X)[:, 1], val, options)
    return FittedRun(head, calibration, info={"seed": seed, "selection": getattr(head, "selection_", {})})


def calibrate_on_val(raw_val: np.ndarray, val: Split, options: FitOptions) -> Calibration:
    """Fit probability calibration on val scores [N], then the image and study thresholds on the calibrated ones."""
    calibrator = fit_calibrator(options.calibration, val.y, raw_val)
    p_val = calibrator.transform(raw_val)
    studies = aggregate_studies(p_val, val.y, val.study_id, how=options.aggregation)
    return Calibration(
        calibrator,
        image_threshold=choose_threshold(val.y, p_val, options.threshold),
        study_threshold=choose_threshold(studies.y, studies.p, options.threshold),
    )


def evaluate_split(p: np.ndarray, rows: Split, calibration: Calibration, options: FitOptions, seed: int = 0) -> dict:
    """Metrics of calibrated probabilities p [N] on one split: image and study level, per body part, bootstrap CIs."""
    return evaluate_predictions(
        rows.y, p, calibration.image_threshold,
        study_ids=rows.study_id,
        patient_ids=rows.patient_id if rows.has_patients else None,
        body_parts=rows.body_part if (rows.body_part != "").all() else None,
        study_threshold=calibration.study_threshold,
        how=options.aggregation,
        n_resamples=options.n_resamples,
        seed=seed,
    )


def fit_run(stores: list[Path], out: Path, options: FitOptions) -> dict[str, Any]:
    """Fit, calibrate and evaluate on the stores; write the run directory `out`. Returns the metrics."""
    splits, fingerprint, notes = load_splits([Path(s) for s in stores], options)
    test = splits["test"]
    runs = [fit_once(splits, options, seed=options.seed + k) for k in range(options.seeds)]
    results = [evaluate_split(run.probabilities(test.X), test, run.calibration, options, seed=options.seed) for run in runs]
    best = runs[0]
    out.mkdir(parents=True, exist_ok=True)
    best.head.save(out / "head")
    store = open_store(stores[0])
    run_json = run_record(options, best.calibration, splits, fingerprint, notes) | {
        "stores": [str(Path(s).resolve()) for s in stores],
        "encoder_options": json.loads(str(store.attrs.get("encoder_options", "{}"))),
        "preprocess": store.attrs.get("preprocess", ""),
        "seeds": [run.info for run in runs],
    }
    _write_json(out / "run.json", run_json)
    metrics = results[0] if len(results) == 1 else {**results[0], "over_seeds": summarize_seeds(results)}
    write_outputs(best.probabilities(test.X), test, best.calibration, metrics, out, options, run_json)
    return metrics


def run_record(options: FitOptions, calibration: Calibration, splits: dict[str, Split], fingerprint: dict[str, str], notes: list[str]) -> dict[str, Any]:
    """The run.json fields every kind of run shares (embedding heads and image-level baselines)."""
    return {
        "format_version": RUN_FORMAT_VERSION,
        "medembed_version": __version__,
        "fingerprint": fingerprint,
        "options": asdict(options),
        "image_threshold": calibration.image_threshold,
        "study_threshold": calibration.study_threshold,
        "calibration": calibration.calibrator.to_dict(),
        "split_sizes": {name: {"images": len(rows), "abnormal": int(rows.y.sum()), "studies": int(len(np.unique(rows.study_id)))} for name, rows in splits.items()},
        "notes": notes,
    }


def load_run(run_dir: Path) -> tuple[FittedRun, dict[str, Any]]:
    """A run directory's fitted head, calibration and thresholds, and its run.json."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise MedembedError(f"{run_dir}: not a medembed run directory (no run.json)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MedembedError(f"{path}: not valid JSON ({error})") from None
    if info.get("format_version") != RUN_FORMAT_VERSION:
        raise MedembedError(f"{path}: run format {info.get('format_version')!r} is not supported by this medembed")
    calibration = Calibration(
        Calibrator.from_dict(info["calibration"]), float(info["image_threshold"]), float(info["study_threshold"])
    )
    return FittedRun(load_head(Path(run_dir) / "head"), calibration, info), info


def evaluate_run(run_dir: Path, stores: list[Path] | None = None, split: str = "test", n_resamples: int | None = None) -> dict[str, Any]:
    """Re-evaluate a run directory on its stores (or others with the same fingerprint); rewrites its outputs."""
    run, info = load_run(run_dir)
    options = FitOptions(**info["options"])
    if n_resamples is not None:
        options.n_resamples = n_resamples
    stores = [Path(s) for s in (stores or info["stores"])]
    for store in stores:
        diff = fingerprint_mismatch(info["fingerprint"], open_store(store).fingerprint)
        if diff:
            raise MedembedError(f"{store}: embeddings differ from the ones this run was fitted on ({'; '.join(diff)})")
    splits, _, _ = load_splits(stores, options)
    rows = splits[split]
    p = run.probabilities(rows.X)
    metrics = evaluate_split(p, rows, run.calibration, options, seed=options.seed)
    write_outputs(p, rows, run.calibration, metrics, Path(run_dir), options, info)
    return metrics


def write_outputs(p: np.ndarray, rows: Split, calibration: Calibration, metrics: dict, out: Path, options: FitOptions, info: dict) -> None:
    """metrics.json, report.md, figures and predictions.csv of calibrated probabilities p [N] on `rows`."""
    write_metrics_json(metrics, out / "metrics.json")
    context = {
        "head": options.head,
        "threshold rule": options.threshold,
        "image threshold": f"{calibration.image_threshold:.4f}",
        "study threshold": f"{calibration.study_threshold:.4f}",
        "calibration": options.calibration,
        "study aggregation": options.aggregation,
        "encoder": info["fingerprint"].get("encoder", ""),
        "model": info["fingerprint"].get("model_id", ""),
        "preprocess hash": info["fingerprint"].get("preprocess_hash", ""),
        "splits": ", ".join(f"{k} {v['images']} images ({v['abnormal']} abnormal)" for k, v in info["split_sizes"].items()),
        **({"notes": "; ".join(info["notes"])} if info.get("notes") else {}),
    }
    (out / "report.md").write_text(markdown_report(metrics, title=f"medembed run: {out.name}", context=context))
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    body_parts = rows.body_part if (rows.body_part != "").all() else None
    plot_figures(rows.y, p, calibration.image_threshold, figures, level="image", body_parts=body_parts, result=metrics["image"])
    studies = aggregate_studies(p, rows.y, rows.study_id, how=options.aggregation, attributes={"body_part": rows.body_part})
    study_parts = studies.attributes["body_part"] if body_parts is not None else None
    plot_figures(studies.y, studies.p, calibration.study_threshold, figures, level="study", body_parts=study_parts, result=metrics["study"])
    tmp = out / "predictions.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "study_id", "label", "probability", "abnormal"])
        for row in zip(rows.image_id, rows.study_id, rows.y, p, (p >= calibration.image_threshold).astype(int)):
            writer.writerow([row[0], row[1], int(row[2]), f"{row[3]:.6f}", row[4]])
    os.replace(tmp, out / "predictions.csv")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)

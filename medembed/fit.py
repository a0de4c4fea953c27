"""Stage 2 end to end: fit a head on a store under the protocol, write a run directory; re-evaluate any run.

Train on ``train``, choose everything (the head's hyperparameters, probability calibration, thresholds) on
``val``, report on ``test`` (`medembed.protocol`). The data comes from `medembed.splits`, the run directory is
`medembed.runs`'s, so the CNN and zero-shot runs are evaluated by the same code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medembed.errors import MedembedError
from medembed.evaluate import summarize_seeds
from medembed.heads import make_head
from medembed.manifest import read_manifest
from medembed.options import check_positive, option
from medembed.protocol import ProtocolOptions, evaluate_split, fit_and_evaluate
from medembed.runs import Evaluation, Run, RunRecord, load_run, write_evaluation, write_run
from medembed.splits import Split, load_splits, manifest_splits, split_sizes
from medembed.store import fingerprint_mismatch, open_store


@dataclass
class FitOptions(ProtocolOptions):
    """Everything `medembed fit` can be told; stored in run.json so a run is reproducible."""

    head: str = option("logreg", "Head: logreg | mlp | xgboost | sklearn:MODULE.CLASS (any scikit-learn classifier).")
    head_params: dict[str, Any] = option(help="Head hyperparameter key=value, e.g. -p hidden=[256] -p dropout=0.2.", flag="--param -p", factory=dict)
    seeds: int = option(1, "Fit N times with seeds seed..seed+N-1 and report mean ± sd.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("seeds", self.seeds)
        if not isinstance(self.head_params, dict):
            raise MedembedError(f"option head_params must be a mapping, got {self.head_params!r}")
        make_head(self.head, **self.head_params)  # an unknown head or a bad hyperparameter fails here, before any fit


def fit_run(stores: list[Path], out: Path, options: FitOptions) -> dict[str, Any]:
    """Fit, calibrate and evaluate on the stores; write the run directory `out`. Returns the test metrics."""
    stores = [Path(s) for s in stores]
    for store in stores:
        if open_store(store).being_written():  # its splits would be a moving subset: refuse rather than fit on it
            raise MedembedError(open_store(store).partial_reason())
    splits, fingerprint, notes = load_splits(stores, val_fraction=options.val_fraction, seed=options.seed)
    notes += [reason for reason in (open_store(s).partial_reason() for s in stores) if reason]
    fitted = [
        fit_and_evaluate(make_head(options.head, seed=options.seed + k, **options.head_params), splits, options, options.seed + k)
        for k in range(options.seeds)
    ]
    best = fitted[0]
    metrics = best.metrics if len(fitted) == 1 else {**best.metrics, "over_seeds": summarize_seeds([f.metrics for f in fitted])}
    store = open_store(stores[0])
    record = RunRecord(
        kind="head",
        scorer=options.head,
        consumes="embeddings",
        fingerprint=fingerprint,
        options=asdict(options),
        image_threshold=best.calibration.image_threshold,
        study_threshold=best.calibration.study_threshold,
        calibration=best.calibration.calibrator.to_dict(),
        split_sizes=split_sizes(splits),
        inputs={"stores": [str(s.resolve()) for s in stores]},
        encoder_options=json.loads(str(store.attrs.get("encoder_options", "{}"))),
        preprocess=str(store.attrs.get("preprocess", "")),
        notes=notes,
        details={"seeds": [{"seed": f.seed, "selection": getattr(f.scorer, "selection_", {})} for f in fitted]},
    )
    write_run(out, record, best.scorer, Evaluation(best.p_test, splits["test"], metrics))
    return metrics


def run_rows(run: Run, split: str = "test", stores: list[Path] | None = None) -> Split:
    """The labelled rows of `split` that `run`'s scorer consumes: from its stores (or others with the same
    fingerprint) for embedding scorers, from its manifest's images for image scorers."""
    record, options = run.record, run.record.protocol
    if record.consumes == "embeddings":
        stores = [Path(s) for s in (stores or record.inputs["stores"])]
        for store in stores:
            diff = fingerprint_mismatch(record.fingerprint, open_store(store).fingerprint)
            if diff:
                raise MedembedError(f"{store}: embeddings differ from the ones this run was fitted on ({'; '.join(diff)})")
        splits, _, _ = load_splits(stores, val_fraction=options.val_fraction, seed=options.seed)
        return splits[split]
    if stores:
        raise MedembedError(f"{run.directory}: a {record.kind} run scores images, not stores; evaluate it on its manifest")
    manifest = read_manifest(Path(record.inputs["manifest"]))
    splits, kept, _ = manifest_splits(manifest, val_fraction=options.val_fraction, seed=options.seed)
    wanted = manifest.subset(kept[np.isin(manifest.image_id[kept], splits[split].image_id)])
    pixels, decoded, _ = run.scorer.load_images(wanted, Path(record.inputs["image_root"]))
    by_id = {image_id: i for i, image_id in enumerate(splits[split].image_id)}
    return splits[split].take(np.array([by_id[i] for i in wanted.image_id[decoded]], dtype=np.int64), X=pixels)


def evaluate_run(run_dir: Path, stores: list[Path] | None = None, split: str = "test", n_resamples: int | None = None) -> dict[str, Any]:
    """Re-evaluate any run directory on its inputs (or other stores with the same fingerprint); rewrites its
    metrics, report, figures and predictions. Returns the metrics."""
    run = load_run(run_dir)
    options = run.record.protocol
    if n_resamples is not None:
        check_positive("bootstrap", n_resamples, minimum=0)
        options.n_resamples = n_resamples
    rows = run_rows(run, split, stores)
    p = run.probabilities(rows)
    metrics = evaluate_split(p, rows, run.calibration, options, seed=options.seed)
    write_evaluation(Path(run_dir), run.record, Evaluation(p, rows, metrics))
    return metrics

"""`medembed baseline cnn`: fine-tune the CNN baseline on a manifest's images under the same protocol as the heads
(train fits, val chooses, test reports) and write its run directory. The estimator is
`medembed.scorers.baselines.cnn.CNNScorer`; this workflow decodes, fits, evaluates and writes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medembed.data.manifest import SPLITS
from medembed.errors import MedembedError
from medembed.options.baselines import CNNOptions, CNNRunOptions, check_cnn_options
from medembed.options.protocol import ProtocolOptions
from medembed.protocol.splits import Split, manifest_splits, split_sizes
from medembed.protocol.steps import fit_and_evaluate
from medembed.runs.record import RunRecord
from medembed.runs.writer import Evaluation, write_run
from medembed.scorers.baselines._data import failed_note, read_checked_manifest
from medembed.scorers.baselines._training import StageTimer
from medembed.scorers.baselines.cnn import KIND, CNNScorer
from medembed.store import make_fingerprint
from medembed.transfer.sections import fitted_extras


@dataclass
class CNNRun:
    """What one baseline run did: its metrics, training history, left-out images and timings."""

    out: Path
    metrics: dict
    history: dict  # epochs, train_loss, val_auroc per epoch, best_epoch (1-based)
    failed: dict[str, str]  # image id -> why it could not be decoded
    seconds: dict[str, float] = field(default_factory=dict)  # decode, train, evaluate, total


def run_cnn_baseline(
    manifest_path: Path,
    root: Path,
    out: Path,
    options: CNNOptions | None = None,
    protocol: ProtocolOptions | None = None,
    log: Callable[[str], None] | None = None,
    train_ids: Any = None,
) -> CNNRun:
    """Fine-tune the CNN on the manifest's train rows, calibrate on val, evaluate on test; write the run `out`.

    `protocol` gives the shared rules (threshold rule, calibration, study aggregation, bootstrap). Rows without a
    label or split are not used; images that cannot be decoded are left out and named in run.json. `train_ids`,
    when given, keeps only those train images (a sweep's label budget). `log` receives one line per stage and epoch.
    """
    options = options or CNNOptions()
    protocol = ProtocolOptions.of(protocol or ProtocolOptions())  # also when given fit's options
    log = log or (lambda line: None)
    check_cnn_options(options)
    out = Path(out)
    timer = StageTimer()
    manifest = read_checked_manifest(manifest_path, SPLITS)
    if train_ids is not None:
        manifest = manifest.subset((manifest.split != "train") | np.isin(manifest.image_id, np.asarray(list(train_ids))))
    splits, kept, notes = manifest_splits(manifest, val_fraction=protocol.val_fraction, seed=protocol.seed)
    scorer = CNNScorer(options)
    pixels, decoded, failed = scorer.load_images(manifest.subset(kept), root)
    log(f"decoded {int(decoded.sum())} images in {timer.done('decode'):.1f} s ({len(failed)} could not be decoded)")
    if failed:
        notes.append(failed_note(failed))
    splits = _decoded_splits(splits, manifest.image_id[kept][decoded], pixels)

    fitted = fit_and_evaluate(scorer, splits, protocol, options.seed, fit_params={"log": log})
    timer.done("train")
    fingerprint = make_fingerprint(
        encoder=KIND, model_id=scorer.model_id_, revision=scorer.revision_, weights_sha256=scorer.weights_sha256(),
        embedding_kind="abnormality_logit", preprocess_hash=scorer.preprocess.hash(), dtype="float32",
    )
    record = RunRecord(
        kind=CNNScorer.kind, scorer=KIND, consumes=CNNScorer.consumes, fingerprint=fingerprint,
        options=CNNRunOptions(**asdict(protocol), head=KIND, head_params=asdict(options)),
        image_threshold=fitted.calibration.image_threshold, study_threshold=fitted.calibration.study_threshold,
        calibration=fitted.calibration.calibrator.to_dict(), split_sizes=split_sizes(splits),
        inputs={"manifest": str(Path(manifest_path).resolve()), "image_root": str(Path(root).resolve())},
        preprocess=scorer.preprocess.to_json(), notes=notes,
        details={"training": scorer.history_, "failed_images": failed},
    )
    timer.done("evaluate")
    record.details["timing_seconds"] = timer.summary()
    extras = fitted_extras(fitted, splits, protocol.seed, protocol.n_resamples)  # val scores for conformal sets
    write_run(out, record, scorer, Evaluation(fitted.p_test, splits["test"], fitted.metrics), extras=extras)
    return CNNRun(out, fitted.metrics, scorer.history_, failed, record.details["timing_seconds"])


def _decoded_splits(splits: dict[str, Split], decoded_ids: np.ndarray, pixels: torch.Tensor) -> dict[str, Split]:
    """Each split's rows whose images decoded, with their cached pixels as X (`pixels` aligned with `decoded_ids`)."""
    position = {image_id: i for i, image_id in enumerate(decoded_ids)}
    result = {}
    for name, rows in splits.items():
        keep = np.array([i for i, image_id in enumerate(rows.image_id) if image_id in position], dtype=np.int64)
        take = torch.from_numpy(np.array([position[rows.image_id[i]] for i in keep], dtype=np.int64))
        result[name] = rows.take(keep, X=pixels[take])
    for name in ("train", "val"):
        if len(np.unique(result[name].y)) < 2:
            raise MedembedError(f"the {name} split has {len(result[name])} decodable images of a single class; both classes are needed")
    if len(result["test"]) == 0:
        raise MedembedError("no test image could be decoded")
    return result

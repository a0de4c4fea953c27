"""`medembed zeroshot`: score a MedSigLIP store with its text tower's prompts, choose the threshold and calibration
on val, evaluate on test, and write the run directory. The estimator is `medembed.scorers.zeroshot.ZeroShotScorer`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medembed.encoders import get_encoder
from medembed.encoders.runtime import resolve_device
from medembed.options.protocol import ProtocolOptions
from medembed.options.zeroshot import ZeroShotOptions
from medembed.protocol.splits import load_splits, split_sizes
from medembed.protocol.steps import fit_and_evaluate
from medembed.runs.record import RunRecord
from medembed.runs.writer import Evaluation, write_run
from medembed.scorers.zeroshot import (
    GENERIC_BODY_PART,
    SCORE_RULE,
    PromptClassifier,
    SiglipTextTower,
    ZeroShotScorer,
    body_part_phrase,
    check_store_matches,
    load_prompts,
)
from medembed.store import open_store
from medembed.transfer.sections import fitted_extras


def zeroshot_run(
    stores: list[Path],
    model_id: str,
    out: Path,
    protocol: ProtocolOptions | None = None,
    options: ZeroShotOptions | None = None,
) -> dict[str, Any]:
    """Zero-shot scores of a medsiglip store with `model_id`'s text tower; threshold and calibration on val, metrics
    on test (the protocol's rules: threshold, calibration, aggregation, bootstrap); writes the run directory `out`.
    Returns the test metrics.
    """
    options = options or ZeroShotOptions()
    protocol = ProtocolOptions.of(protocol or ProtocolOptions())  # also when given fit's options
    prompts = load_prompts(options.prompts)
    stores = [Path(s) for s in stores]
    encoder = get_encoder(
        "medsiglip", model_id=model_id, revision=options.revision, cache_dir=options.cache_dir, local_files_only=options.local_files_only
    )
    checkpoint_fingerprint = encoder.fingerprint()
    same_model_notes = check_store_matches(open_store(stores[0]).fingerprint, checkpoint_fingerprint, stores[0])
    splits, fingerprint, notes = load_splits(stores, val_fraction=protocol.val_fraction, seed=protocol.seed)
    notes += same_model_notes
    tower = SiglipTextTower(encoder.checkpoint, resolve_device(options.device))
    # Every body part of the store, and the generic phrase for images without one (predict on new files).
    phrases = [body_part_phrase(part) for rows in splits.values() for part in rows.body_part] + [GENERIC_BODY_PART]
    scorer = ZeroShotScorer(PromptClassifier.build(tower, prompts, phrases))
    fitted = fit_and_evaluate(scorer, splits, protocol, protocol.seed)
    store = open_store(stores[0])
    record = RunRecord(
        kind=ZeroShotScorer.kind, scorer="zeroshot", consumes=ZeroShotScorer.consumes, fingerprint=fingerprint,
        options=protocol, image_threshold=fitted.calibration.image_threshold,
        study_threshold=fitted.calibration.study_threshold, calibration=fitted.calibration.calibrator.to_dict(),
        # Zero-shot never looks at train: val chooses the threshold and calibration, test is evaluated.
        split_sizes=split_sizes({name: splits[name] for name in ("val", "test")}),
        inputs={"stores": [str(s.resolve()) for s in stores]},
        encoder_options=json.loads(str(store.attrs.get("encoder_options", "{}"))),
        preprocess=str(store.attrs.get("preprocess", "")), notes=notes,
        details={
            "text_model": {
                "model_id": model_id,
                "revision": checkpoint_fingerprint["revision"],
                "weights_sha256": checkpoint_fingerprint["weights_sha256"],
                "max_length": tower.max_length,
                "padding": "max_length",
            },
            "score": SCORE_RULE,
            "prompt_templates": prompts,
        },
    )
    extras = fitted_extras(fitted, splits, protocol.seed, protocol.n_resamples)  # val scores and a train sample for transfer checks
    write_run(out, record, scorer, Evaluation(fitted.p_test, splits["test"], fitted.metrics), extras=extras)
    return fitted.metrics

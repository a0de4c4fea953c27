"""The protocol every scorer goes through: fit on train (val for early stopping), calibrate probabilities and
choose the image and study thresholds on val, evaluate on test with bootstrap intervals.

The test split is never used to choose anything. The same functions serve the embedding heads, the fine-tuned
CNN, the zero-shot prompt classifier and anything else that implements the scorer contract (`medembed.scorers.contract`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medembed.protocol.calibrate import Calibrator, choose_threshold, fit_calibrator
from medembed.protocol.metrics import aggregate_studies, evaluate_predictions
from medembed.scorers.contract import positive_scores
from medembed.protocol.splits import Split
from medembed.options.protocol import ProtocolOptions


@dataclass
class Calibration:
    """What is chosen on val after the scorer: probability calibration and image/study thresholds."""

    calibrator: Calibrator
    image_threshold: float
    study_threshold: float


# How many val images of each class the choices made on val need before they mean much (heuristics, see the README):
# - a threshold rule picks one cut among the val scores; with k images of a class, that class's rate (sensitivity or
#   specificity) moves in steps of 1/k and its standard error at 0.8 is sqrt(0.8 * 0.2 / k): 0.09 at k = 20, so the
#   chosen threshold shifts from one val sample to the next below ~20 of the rarer class;
# - Platt scaling fits 2 parameters: ~10 images of each class; isotonic regression fits a step per distinct score
#   and overfits small sets (scikit-learn's guide: it does as well as Platt from ~1000 images): ~50 of each class.
MIN_THRESHOLD_PER_CLASS = 20
MIN_CALIBRATION_PER_CLASS = {"none": 0, "platt": 10, "isotonic": 50}


def val_shortfalls(y: np.ndarray, options: ProtocolOptions) -> list[str]:
    """What val (labels y [N]) is too small to choose well under `options`: each as "what (needs N; why)"; [] when
    it suffices. A fixed threshold chooses nothing on val."""
    rarer = int(min(y.sum(), len(y) - y.sum()))
    found = []
    if not options.threshold.startswith("fixed") and rarer < MIN_THRESHOLD_PER_CLASS:
        found.append(f"the {options.threshold} threshold (needs >= {MIN_THRESHOLD_PER_CLASS} of each class to be stable)")
    needed = MIN_CALIBRATION_PER_CLASS[options.calibration]
    if rarer < needed:
        found.append(f"{options.calibration} calibration (needs >= {needed} of each class)")
    return found


def val_size_warning(y: np.ndarray, shortfalls: list[str], split: str = "val") -> str:
    """One line: the split's counts and what they are too few for ("" when nothing is short)."""
    if not shortfalls:
        return ""
    abnormal = int(y.sum())
    return (f"the {split} split is small: {len(y)} images ({abnormal} abnormal, {len(y) - abnormal} normal), too few for "
            + "; ".join(shortfalls) + "; what it chooses may not carry over to test")


def calibrate_on_val(raw_val: np.ndarray, val: Split, options: ProtocolOptions) -> Calibration:
    """Fit probability calibration on val scores [N], then the image and study thresholds on the calibrated ones."""
    calibrator = fit_calibrator(options.calibration, val.y, raw_val)
    p_val = calibrator.transform(raw_val)
    studies = aggregate_studies(p_val, val.y, val.study_id, how=options.aggregation)
    return Calibration(
        calibrator,
        image_threshold=choose_threshold(val.y, p_val, options.threshold),
        study_threshold=choose_threshold(studies.y, studies.p, options.threshold),
    )


def evaluate_split(p: np.ndarray, rows: Split, calibration: Calibration, options: ProtocolOptions, seed: int = 0) -> dict[str, Any]:
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


@dataclass
class Fitted:
    """One seed's scorer, its calibration chosen on val, and its test evaluation."""

    scorer: Any
    calibration: Calibration
    p_test: np.ndarray  # [N] float64, calibrated
    metrics: dict[str, Any]
    seed: int


def fit_and_evaluate(
    scorer: Any, splits: dict[str, Split], options: ProtocolOptions, seed: int, *,
    bootstrap_seed: int | None = None, fit_params: dict[str, Any] | None = None,
) -> Fitted:
    """The protocol for one unfitted scorer: fit on train (val as eval_set, plus `fit_params`), calibrate and
    choose thresholds on val, evaluate on test."""
    train, val, test = splits["train"], splits["val"], splits["test"]
    scorer.fit(train.X, train.y, eval_set=[(val.X, val.y)], **(fit_params or {}))
    calibration = calibrate_on_val(positive_scores(scorer, val.X, {"body_part": val.body_part, "study_id": val.study_id}), val, options)
    p_test = calibration.calibrator.transform(positive_scores(scorer, test.X, {"body_part": test.body_part, "study_id": test.study_id}))
    metrics = evaluate_split(p_test, test, calibration, options, seed=options.seed if bootstrap_seed is None else bootstrap_seed)
    return Fitted(scorer, calibration, p_test, metrics, seed)

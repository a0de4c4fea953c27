"""Time the patient-level bootstrap at MURA's scale: 40,561 images of ~15,000 patients, 1,000 resamples.

Run from the repository root: ``python tests/benchmarks/bench_evaluate.py`` (options: --images, --groups, --resamples,
--seed). Prints one line per timed step with wall-clock and CPU seconds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from medembed.protocol.metrics import bootstrap_metrics, evaluate_predictions


def synthetic_cohort(n_images: int, n_groups: int, seed: int) -> dict[str, np.ndarray]:
    """Images [n_images] spread over n_groups patients (two images a study), scores that separate the classes."""
    rng = np.random.default_rng(seed)
    study = np.arange(n_images) // 2
    n_studies = study[-1] + 1
    if n_groups > n_studies:
        raise SystemExit(f"--groups {n_groups} exceeds the {n_studies} studies of {n_images} images")
    # Every patient gets at least one study; the rest of the studies go to random patients.
    patient_of_study = np.sort(np.r_[np.arange(n_groups), rng.integers(0, n_groups, n_studies - n_groups)])
    patient = patient_of_study[study]
    y = rng.integers(0, 2, n_studies)[study]
    p = np.clip(0.35 * y + 0.65 * rng.random(n_images), 0, 1)
    parts = np.array(["XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST"])
    return {
        "y": y,
        "p": p,
        "study_ids": study.astype(str),
        "patient_ids": patient.astype(str),
        "body_parts": parts[patient % len(parts)],
    }


@contextmanager
def _timed(label: str) -> Iterator[None]:
    """Print wall-clock and CPU seconds of the block (CPU time is steadier on a shared machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    print(f"{label}: {time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} s CPU", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40_561)
    parser.add_argument("--groups", type=int, default=15_000)
    parser.add_argument("--resamples", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cohort = synthetic_cohort(args.images, args.groups, args.seed)
    n_patients = len(np.unique(cohort["patient_ids"]))

    with _timed(f"bootstrap_metrics: {args.images} images, {n_patients} patients, {args.resamples} resamples"):
        bootstrap_metrics(cohort["y"], cohort["p"], 0.5, cohort["patient_ids"], n_resamples=args.resamples, seed=0)
    n_parts = len(np.unique(cohort["body_parts"]))
    tables = f"image + study level, overall + {n_parts} body parts"
    with _timed(f"evaluate_predictions: {tables}, {args.resamples} resamples per table"):
        evaluate_predictions(
            cohort["y"],
            cohort["p"],
            0.5,
            study_ids=cohort["study_ids"],
            patient_ids=cohort["patient_ids"],
            body_parts=cohort["body_parts"],
            n_resamples=args.resamples,
        )


if __name__ == "__main__":
    main()

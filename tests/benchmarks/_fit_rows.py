"""What the FracAtlas comparison benchmarks share: one timed `fit_run` as a table row, and its metric cells."""

from __future__ import annotations

import time
from pathlib import Path

from medembed.scorers.options import FitOptions
from medembed.fit import fit_run

METRICS = ("auroc", "kappa")


def timed_fit(stores: list[Path], run_dir: Path, options: FitOptions) -> dict:
    """Fit `options.seeds` seeds; study-level test AUROC and kappa (seed 0 with its interval, mean and sd over
    seeds) and the fit seconds per seed."""
    started = time.perf_counter()
    metrics = fit_run(stores, run_dir, options)
    seconds = time.perf_counter() - started
    study, spread = metrics["study"]["overall"], metrics["over_seeds"]["study"]["overall"]
    return {
        "fit_seconds_per_seed": seconds / options.seeds,
        **{f"{m}_seed0": study[m]["value"] for m in METRICS},
        **{f"{m}_ci": study[m]["ci"] for m in METRICS},
        **{f"{m}_mean": spread[m]["mean"] for m in METRICS},
        **{f"{m}_sd": spread[m]["sd"] for m in METRICS},
    }


def metric_cells(row: dict) -> str:
    """'AUROC mean ± sd | seed 0 [CI] | kappa mean ± sd | seed 0 [CI]' for a `timed_fit` row."""
    return " | ".join(
        f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_sd']:.3f} | {row[f'{m}_seed0']:.3f} [{row[f'{m}_ci'][0]:.3f}, {row[f'{m}_ci'][1]:.3f}]"
        for m in METRICS
    )

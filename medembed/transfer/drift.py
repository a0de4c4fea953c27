"""Drift before labels exist: a two-sample shift test on embeddings and the shift in predicted prevalence.

The shift score is the unbiased squared maximum mean discrepancy (Gretton et al. 2012) with a Gaussian kernel
exp(-|x - y|^2 / (2 h^2)), h the median pairwise distance of the pooled sample (the median heuristic). Its p-value
is a permutation test: (1 + #{permuted MMD^2 >= observed}) / (1 + permutations), the pooled rows' labels
shuffled with a seeded generator. All permutations share one kernel matrix, scored as a matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist

from medembed.protocol.calibrate import check_probabilities
from medembed.errors import MedembedError

MAX_ROWS = 1000  # per sample: the kernel matrix is (2 x MAX_ROWS)^2


@dataclass(frozen=True)
class ShiftTest:
    """MMD^2 of target vs reference, its permutation p-value, and the sizes and bandwidth used."""

    mmd2: float
    p_value: float
    n_reference: int
    n_target: int
    bandwidth: float
    permutations: int


def mmd2_unbiased(kernel: np.ndarray, in_first: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 from a pooled kernel matrix [n, n] and membership [n] or [n, P] bool (True: first sample)."""
    a = np.asarray(in_first, dtype=np.float64)
    a = a[:, None] if a.ndim == 1 else a
    b = 1.0 - a
    n_a, n_b = a.sum(axis=0), b.sum(axis=0)
    ka, kb = kernel @ a, kernel @ b
    diagonal = np.diag(kernel)
    sum_aa = (a * ka).sum(axis=0) - diagonal @ a
    sum_bb = (b * kb).sum(axis=0) - diagonal @ b
    sum_ab = (a * kb).sum(axis=0)
    result = sum_aa / (n_a * (n_a - 1)) + sum_bb / (n_b * (n_b - 1)) - 2 * sum_ab / (n_a * n_b)
    return result if np.ndim(in_first) > 1 else result[0]


def shift_test(reference: np.ndarray, target: np.ndarray, permutations: int = 500, seed: int = 0) -> ShiftTest:
    """MMD two-sample test of target [M, D] against reference [N, D] (each subsampled to MAX_ROWS, seeded)."""
    rng = np.random.default_rng(seed)
    reference, target = (np.asarray(x, dtype=np.float64) for x in (reference, target))
    if reference.ndim != 2 or target.ndim != 2 or reference.shape[1] != target.shape[1]:
        raise MedembedError(f"shift test: embeddings [N, D] of one dimension expected; got {reference.shape} and {target.shape}")
    if len(reference) < 2 or len(target) < 2:
        raise MedembedError(f"shift test needs at least 2 rows in each sample; got {len(reference)} and {len(target)}")
    if permutations < 1:
        raise MedembedError(f"shift test needs at least 1 permutation; got {permutations}")
    reference, target = (x[np.sort(rng.choice(len(x), MAX_ROWS, replace=False))] if len(x) > MAX_ROWS else x for x in (reference, target))
    pooled = np.vstack([reference, target])
    distances = cdist(pooled, pooled, "sqeuclidean")
    bandwidth = float(np.sqrt(np.median(distances[np.triu_indices(len(pooled), 1)])))
    kernel = np.exp(-distances / (2 * max(bandwidth, 1e-12) ** 2))
    first = np.r_[np.ones(len(reference), bool), np.zeros(len(target), bool)]
    observed = float(mmd2_unbiased(kernel, first))
    shuffled = np.stack([rng.permutation(first) for _ in range(permutations)], axis=1)
    null = mmd2_unbiased(kernel, shuffled)
    p_value = float((1 + np.sum(null >= observed - 1e-12)) / (1 + permutations))
    return ShiftTest(observed, p_value, len(reference), len(target), bandwidth, permutations)


def prevalence_shift(p_source: np.ndarray, p_target: np.ndarray, threshold: float) -> dict[str, float]:
    """Predicted prevalence at the source (val) and the target: share called abnormal (p >= threshold) and mean
    calibrated probability, with the target / source ratio of calls (NaN when the source calls none)."""
    p_source, p_target = check_probabilities(p_source), check_probabilities(p_target)
    source_calls, target_calls = float((p_source >= threshold).mean()), float((p_target >= threshold).mean())
    return {
        "threshold": float(threshold),
        "source_called_abnormal": source_calls,
        "target_called_abnormal": target_calls,
        "called_ratio": target_calls / source_calls if source_calls else float("nan"),
        "source_mean_probability": float(p_source.mean()),
        "target_mean_probability": float(p_target.mean()),
    }

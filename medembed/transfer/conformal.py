"""Split-conformal prediction sets for the binary abnormality call (Vovk et al. 2005; Angelopoulos & Bates 2021).

The nonconformity score of an image with label k is 1 - P(k): s = p for "normal", s = 1 - p for "abnormal",
where p is the run's calibrated P(abnormal). On n calibration (val) images the quantile is the
ceil((n + 1)(1 - alpha))-th smallest score (infinite when that exceeds n: every set then holds that class), and a
new image's set holds every class whose score is at most the quantile. Then P(y in set) >= 1 - alpha for an
exchangeable test image (marginal). The class-conditional variant (Mondrian) takes one quantile per class over
the calibration images of that class, so the guarantee holds within each class.

A set is {normal}, {abnormal}, {both} (the model cannot tell at this alpha: refer) or {} (neither class is
plausible, possible with marginal quantiles below 0.5: also referred).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medembed.protocol.calibrate import check_probabilities, check_scores
from medembed.errors import MedembedError
from medembed.options.transfer import check_alpha

SET_NAMES = ("empty", "normal", "abnormal", "both")  # indexed by 1 * has_normal + 2 * has_abnormal
REFERRED = ("both", "empty")


@dataclass(frozen=True)
class ConformalQuantiles:
    """The score quantile each class's membership is tested against (equal for the marginal variant)."""

    alpha: float
    class_conditional: bool
    normal: float
    abnormal: float


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest of n calibration scores; inf when that rank exceeds n."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * (1 - check_alpha(alpha)) - 1e-12)  # float slack: 0.9 * 10 is 9.000000000000002
    return float(scores[rank - 1]) if rank <= len(scores) else math.inf


def min_calibration_size(alpha: float) -> int:
    """The fewest calibration scores with a finite quantile at `alpha`: ceil((n + 1)(1 - alpha)) <= n, i.e.
    n >= 1 / alpha - 1 (9 at alpha 0.1, 19 at 0.05). Below it every set holds that class."""
    return math.ceil(1 / check_alpha(alpha) - 1 - 1e-9)


def conformal_shortfalls(y_cal: np.ndarray, alphas: tuple[float, ...]) -> list[str]:
    """Which conformal quantiles the calibration labels y_cal [n] are too few for (marginal: all images; class-
    conditional: each class's), one "what (needs N)" per variant; [] when every quantile is finite."""
    y = np.asarray(y_cal).astype(int)
    counts = {"marginal": (len(y), "images"), "class-conditional": (int(min(y.sum(), len(y) - y.sum())), "of each class")}
    short = []
    for variant, (n, per) in counts.items():
        failing = [alpha for alpha in alphas if n < min_calibration_size(alpha)]
        if failing:
            needs = ", ".join(f">= {min_calibration_size(a)} at alpha {a:g}" for a in failing)
            short.append(f"{variant} conformal sets (a finite quantile needs {needs} {per}; below, every set holds that class)")
    return short


def fit_conformal(p_cal: np.ndarray, y_cal: np.ndarray, alpha: float, class_conditional: bool = False) -> ConformalQuantiles:
    """Quantiles from calibrated P(abnormal) p_cal [n] and labels y_cal [n] of the calibration (val) images."""
    y, p = check_scores(y_cal, p_cal)
    scores = np.where(y == 1, 1 - p, p)
    if not class_conditional:
        q = conformal_quantile(scores, alpha)
        return ConformalQuantiles(alpha, False, q, q)
    if y.min() == y.max():
        raise MedembedError(f"class-conditional conformal sets need both classes among the {len(y)} calibration images")
    return ConformalQuantiles(alpha, True, conformal_quantile(scores[y == 0], alpha), conformal_quantile(scores[y == 1], alpha))


def prediction_sets(p: np.ndarray, quantiles: ConformalQuantiles) -> np.ndarray:
    """[N, 2] bool: column 0 "normal is in the set", column 1 "abnormal is in the set", for P(abnormal) p [N]."""
    p = check_probabilities(p)
    return np.stack([p <= quantiles.normal, 1 - p <= quantiles.abnormal], axis=1)


def set_names(sets: np.ndarray) -> np.ndarray:
    """[N] str: "normal", "abnormal", "both" or "empty" for [N, 2] membership."""
    return np.asarray(SET_NAMES)[sets[:, 0].astype(int) + 2 * sets[:, 1].astype(int)]


def coverage(sets: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Empirical coverage (true label in the set) overall and per class, the refer rate (sets that are not one
    class) and the share of each set kind, on labelled images y [N]."""
    y = np.asarray(y).astype(int)
    if len(y) != len(sets):
        raise MedembedError(f"{len(sets)} prediction sets but {len(y)} labels")
    covered = sets[np.arange(len(y)), y]
    names = set_names(sets)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if len(values) else math.nan

    return {
        "n": len(y),
        "coverage": mean(covered),
        "coverage_normal": mean(covered[y == 0]),
        "coverage_abnormal": mean(covered[y == 1]),
        "refer_rate": mean(np.isin(names, REFERRED)),
        **{f"share_{name}": mean(names == name) for name in SET_NAMES},
    }

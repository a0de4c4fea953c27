"""Split-conformal sets: the quantile by hand, the sets by hand, and the coverage guarantee on a known distribution."""

import math

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.transfer.conformal import (
    ConformalQuantiles,
    conformal_quantile,
    coverage,
    fit_conformal,
    prediction_sets,
    set_names,
)


def test_quantile_is_the_ceil_n_plus_1_rank_by_hand():
    scores = np.arange(1, 11) / 10  # 0.1 .. 1.0, n = 10
    assert conformal_quantile(scores[::-1], 0.2) == pytest.approx(0.9)  # rank ceil(11 * 0.8) = 9
    assert conformal_quantile(scores, 0.1) == pytest.approx(1.0)  # rank ceil(9.9) = 10
    assert conformal_quantile(scores, 0.05) == math.inf  # rank 11 > n: every set holds the class


def test_sets_by_hand():
    # val: normal images with p 0.1, 0.2, 0.3 and abnormal with p 0.6, 0.9 -> scores 0.1, 0.2, 0.3, 0.4, 0.1
    p_val, y_val = np.array([0.1, 0.2, 0.3, 0.6, 0.9]), np.array([0, 0, 0, 1, 1])
    quantiles = fit_conformal(p_val, y_val, alpha=0.34)  # rank ceil(6 * 0.66) = 4 -> sorted scores [.1 .1 .2 .3 .4] -> 0.3
    assert quantiles.normal == quantiles.abnormal == pytest.approx(0.3)
    sets = prediction_sets(np.array([0.05, 0.5, 0.95, 0.3]), quantiles)
    assert set_names(sets).tolist() == ["normal", "empty", "abnormal", "normal"]
    conditional = fit_conformal(p_val, y_val, alpha=0.25, class_conditional=True)
    # normal scores [.1 .2 .3]: rank ceil(4 * .75) = 3 -> 0.3; abnormal scores [.1 .4]: rank ceil(3 * .75) = 3 > 2 -> inf
    assert (conditional.normal, conditional.abnormal) == (pytest.approx(0.3), math.inf)
    assert set_names(prediction_sets(np.array([0.2, 0.9]), conditional)).tolist() == ["both", "abnormal"]


def test_coverage_counts_by_hand():
    sets = np.array([[True, False], [True, True], [False, True], [False, False]])
    result = coverage(sets, np.array([0, 1, 0, 1]))
    assert result["coverage"] == 0.5 and result["coverage_normal"] == 0.5 and result["coverage_abnormal"] == 0.5
    assert result["refer_rate"] == 0.5 and result["share_both"] == 0.25 and result["share_empty"] == 0.25


def _draw(rng, n):
    """A known distribution: 30% abnormal; P(abnormal) ~ Beta(5, 2) for abnormal and Beta(2, 5) for normal images."""
    y = (rng.random(n) < 0.3).astype(np.int8)
    return np.where(y == 1, rng.beta(5, 2, n), rng.beta(2, 5, n)), y


@pytest.mark.parametrize("alpha", [0.1, 0.05])
def test_coverage_guarantee_on_a_known_distribution(alpha):
    rng = np.random.default_rng(0)
    n_cal, n_test, trials = 200, 500, 300
    marginal, per_class = [], []
    for _ in range(trials):
        p_cal, y_cal = _draw(rng, n_cal)
        p_test, y_test = _draw(rng, n_test)
        marginal.append(coverage(prediction_sets(p_test, fit_conformal(p_cal, y_cal, alpha)), y_test)["coverage"])
        c = coverage(prediction_sets(p_test, fit_conformal(p_cal, y_cal, alpha, class_conditional=True)), y_test)
        per_class.append((c["coverage_normal"], c["coverage_abnormal"]))
    # 1 - alpha <= E[coverage] <= 1 - alpha + 1 / (n + 1); the mean over 300 trials has sd < 0.002
    assert 1 - alpha - 0.005 <= np.mean(marginal) <= 1 - alpha + 1 / (n_cal + 1) + 0.005
    normal, abnormal = np.mean(per_class, axis=0)
    assert normal >= 1 - alpha - 0.005 and abnormal >= 1 - alpha - 0.01


def test_bad_alpha_and_single_class_are_one_line_errors():
    with pytest.raises(MedembedError, match="alpha must be in"):
        fit_conformal(np.array([0.2]), np.array([0]), 1.5)
    with pytest.raises(MedembedError, match="both classes"):
        fit_conformal(np.array([0.2, 0.3]), np.array([0, 0]), 0.1, class_conditional=True)
    assert isinstance(fit_conformal(np.array([0.2, 0.3]), np.array([0, 0]), 0.1), ConformalQuantiles)

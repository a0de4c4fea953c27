"""The MMD shift test and the predicted-prevalence shift, against hand-computed values."""

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.transfer.drift import mmd2_unbiased, prevalence_shift, shift_test


def test_unbiased_mmd_by_hand():
    kernel = np.array([[1.0, 0.5, 0.1, 0.2], [0.5, 1.0, 0.3, 0.0], [0.1, 0.3, 1.0, 0.6], [0.2, 0.0, 0.6, 1.0]])
    first = np.array([True, True, False, False])
    # within first: 2 * 0.5 / (2 * 1); within second: 2 * 0.6 / 2; across: (0.1 + 0.2 + 0.3 + 0.0) / 4
    assert mmd2_unbiased(kernel, first) == pytest.approx(0.5 + 0.6 - 2 * 0.15)
    both = mmd2_unbiased(kernel, np.stack([first, ~first], axis=1))  # the statistic is symmetric in the samples
    assert both == pytest.approx([0.8, 0.8])


def test_same_distribution_is_not_flagged_and_a_shift_is():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((200, 8))
    same = shift_test(reference, rng.standard_normal((150, 8)), permutations=200, seed=0)
    shifted = shift_test(reference, rng.standard_normal((150, 8)) + 0.5, permutations=200, seed=0)
    assert same.p_value > 0.05
    assert shifted.p_value == pytest.approx(1 / 201) and shifted.mmd2 > same.mmd2


def test_shift_test_refuses_mismatched_inputs():
    with pytest.raises(MedembedError, match="one dimension"):
        shift_test(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(MedembedError, match="at least 2 rows"):
        shift_test(np.zeros((5, 3)), np.zeros((1, 3)))


def test_prevalence_shift_by_hand():
    result = prevalence_shift(np.array([0.1, 0.6, 0.2, 0.7]), np.array([0.6, 0.8, 0.9, 0.1]), threshold=0.5)
    assert result["source_called_abnormal"] == 0.5 and result["target_called_abnormal"] == 0.75
    assert result["called_ratio"] == pytest.approx(1.5)
    assert result["source_mean_probability"] == pytest.approx(0.4) and result["target_mean_probability"] == pytest.approx(0.6)

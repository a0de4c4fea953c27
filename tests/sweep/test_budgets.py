"""budget_subset: nested, whole groups, stratified by label, seeded, independent of row order."""

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.sweep import budget_subset

FRACTIONS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]


def patients(n_patients=400, seed=0):
    """Patients with 1-4 images each; about 18% of patients have an abnormal study (all their images abnormal)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_patients)
    abnormal = rng.random(n_patients) < 0.18
    groups = np.repeat([f"patient{p}" for p in range(n_patients)], sizes)
    labels = np.repeat(abnormal.astype(int), sizes)
    return groups, labels


def test_budgets_are_nested_whole_groups_and_full_at_one():
    groups, labels = patients()
    masks = budget_subset(groups, labels, FRACTIONS, seed=3)
    assert list(masks) == FRACTIONS
    for small, large in zip(FRACTIONS, FRACTIONS[1:]):
        assert not (masks[small] & ~masks[large]).any(), f"{small} is not inside {large}"
        assert masks[small].sum() < masks[large].sum()
    assert masks[1.0].all()
    for mask in masks.values():
        for group in np.unique(groups):
            rows = mask[groups == group]
            assert rows.all() or not rows.any(), f"{group} is split by the budget"


def test_each_class_keeps_its_share_and_a_minimum():
    groups, labels = patients()
    masks = budget_subset(groups, labels, FRACTIONS, seed=0)
    for fraction, mask in masks.items():
        for label in (0, 1):
            taken, available = int((labels[mask] == label).sum()), int((labels == label).sum())
            assert taken >= min(2, available)
            # Whole groups of up to 4 images: at most one group's worth above the share (or the minimum of 2).
            assert taken <= max(np.ceil(fraction * available), 2) + 3
            assert taken >= np.ceil(fraction * available)


def test_seeded_and_independent_of_row_order():
    groups, labels = patients()
    first = budget_subset(groups, labels, [0.1], seed=7)[0.1]
    assert np.array_equal(first, budget_subset(groups, labels, [0.1], seed=7)[0.1])
    assert not np.array_equal(first, budget_subset(groups, labels, [0.1], seed=8)[0.1])
    order = np.random.default_rng(1).permutation(len(groups))
    shuffled = budget_subset(groups[order], labels[order], [0.1], seed=7)[0.1]
    assert np.array_equal(shuffled, first[order])


def test_a_group_with_any_abnormal_image_counts_as_abnormal():
    groups = np.array(["a", "a", "b", "c", "d", "e", "f"])
    labels = np.array([0, 1, 1, 0, 0, 0, 0])
    mask = budget_subset(groups, labels, [0.01], seed=0)[0.01]
    # Both abnormal-stratum groups are needed for 2 abnormal images; a's normal image comes with it.
    assert mask[:3].all()
    assert (labels[mask] == 0).sum() >= 2


@pytest.mark.parametrize("fraction", [0, 1.5, -0.1, True, "half"])
def test_bad_fractions_are_refused(fraction):
    with pytest.raises(MedembedError, match="budget"):
        budget_subset(["a", "b"], [0, 1], [fraction], seed=0)


def test_labels_must_be_binary_and_aligned():
    with pytest.raises(MedembedError, match="0 or 1"):
        budget_subset(["a", "b"], [0, 2], [0.5], seed=0)
    with pytest.raises(MedembedError, match="aligned"):
        budget_subset(["a", "b", "c"], [0, 1], [0.5], seed=0)

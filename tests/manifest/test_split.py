"""Grouped, stratified, seeded split assignment."""

import numpy as np
import pytest

from medembed.data.manifest import ManifestError, assign_grouped_split

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
MAX_GROUP = 6  # rows in the largest group _rows makes


def _rows(n_groups: int = 600, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rows of groups of 1-6 images; each group has one stratum (part/label), skewed like real data."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, MAX_GROUP + 1, n_groups)
    strata_names, shares = ["wrist/0", "wrist/1", "hand/0", "hand/1", "hip/1"], [0.4, 0.2, 0.2, 0.15, 0.05]
    stratum_of_group = rng.choice(strata_names, n_groups, p=shares)
    groups = np.repeat([f"p{g:04d}" for g in range(n_groups)], sizes).astype(object)
    strata = np.repeat(stratum_of_group, sizes).astype(object)
    return groups, strata


def _split_of_each_group(groups: np.ndarray, split: np.ndarray) -> dict:
    assigned: dict = {}
    for group, name in zip(groups, split):
        assigned.setdefault(group, set()).add(name)
    return assigned


def test_groups_stay_whole_and_sizes_follow_fractions() -> None:
    groups, strata = _rows()
    split = assign_grouped_split(groups, strata, FRACTIONS, seed=0)
    assert all(len(names) == 1 for names in _split_of_each_group(groups, split).values())
    for name, share in FRACTIONS.items():
        assert abs(np.sum(split == name) - share * len(split)) <= MAX_GROUP  # off by less than one group
        for stratum in np.unique(strata):
            in_stratum = strata == stratum
            assert abs(np.sum(split[in_stratum] == name) - share * in_stratum.sum()) <= 2 * MAX_GROUP, (name, stratum)


def test_deterministic_for_a_seed_and_independent_of_row_order() -> None:
    groups, strata = _rows()
    first = assign_grouped_split(groups, strata, FRACTIONS, seed=3)
    assert first.tolist() == assign_grouped_split(groups, strata, FRACTIONS, seed=3).tolist()
    order = np.random.default_rng(0).permutation(len(groups))
    shuffled = assign_grouped_split(groups[order], strata[order], FRACTIONS, seed=3)
    assert shuffled.tolist() == first[order].tolist()
    assert first.tolist() != assign_grouped_split(groups, strata, FRACTIONS, seed=4).tolist()


def test_a_group_spanning_strata_stays_whole() -> None:
    groups = np.array(["a", "a", "a", "b", "c", "d", "e"], dtype=object)
    strata = np.array(["x", "y", "y", "x", "y", "x", "y"], dtype=object)
    split = assign_grouped_split(groups, strata, {"train": 0.5, "test": 0.5}, seed=0)
    assert len(set(split[:3])) == 1


def test_zero_fraction_split_is_never_used_and_no_strata_works() -> None:
    groups, _ = _rows(100)
    split = assign_grouped_split(groups, None, {"train": 0.8, "val": 0.0, "test": 0.2}, seed=0)
    assert set(split) == {"train", "test"}


@pytest.mark.parametrize("fractions", [{"train": 0.7, "test": 0.2}, {"train": 1.2, "test": -0.2}, {}])
def test_fractions_must_be_shares_summing_to_one(fractions: dict) -> None:
    with pytest.raises(ManifestError, match="sum to 1"):
        assign_grouped_split(["a"], None, fractions, seed=0)


def test_groups_and_strata_must_align() -> None:
    with pytest.raises(ManifestError, match="groups has 2 rows but strata has 1"):
        assign_grouped_split(["a", "b"], ["x"], FRACTIONS, seed=0)
    assert assign_grouped_split([], [], FRACTIONS, seed=0).tolist() == []

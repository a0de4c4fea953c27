"""Seeded, grouped, stratified assignment of rows to splits (no group ever straddles two splits)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medembed.data.manifest.table import ManifestError, text_column


def _check_fractions(fractions: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    names = list(fractions)
    shares = np.array([float(fractions[name]) for name in names])
    if not names or (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
        raise ManifestError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    return names, shares


def _majority_stratum(row_group: np.ndarray, row_stratum: np.ndarray, n_groups: int) -> np.ndarray:
    """[G] index of each group's most frequent stratum, ties going to the first in sorted order."""
    n_strata = int(row_stratum.max()) + 1
    pairs, counts = np.unique(row_group.astype(np.int64) * n_strata + row_stratum, return_counts=True)
    pair_group, pair_stratum = pairs // n_strata, pairs % n_strata
    order = np.lexsort((pair_stratum, -counts, pair_group))
    first_of_group = np.ones(len(order), dtype=bool)
    first_of_group[1:] = pair_group[order][1:] != pair_group[order][:-1]
    group_stratum = np.empty(n_groups, dtype=np.intp)
    group_stratum[pair_group[order][first_of_group]] = pair_stratum[order][first_of_group]
    return group_stratum


def assign_grouped_split(
    groups: Sequence[str] | np.ndarray,
    strata: Sequence[str] | np.ndarray | None,
    fractions: Mapping[str, float],
    seed: int,
) -> np.ndarray:
    """Assign each row a split so that every group lies wholly in one split, stratified and seeded.

    groups: [N] group of each row (e.g. ``Manifest.group_ids()``). strata: [N] stratum of each row (e.g.
    label and body part, ``"wrist/1"``) or None; a group whose rows span strata counts in its most
    frequent one. fractions: split name -> share of rows, summing to 1 (e.g. ``{"train": .7, "val": .1,
    "test": .2}``). Returns [N] object array of split names.

    Groups are shuffled within each stratum, then dealt one at a time to the split furthest below its
    share of the rows dealt so far, so each stratum and the whole are within about one group of the
    fractions. The answer depends only on the (group, stratum) pairs and the seed, not on row order.
    """
    names, shares = _check_fractions(fractions)
    groups = text_column("groups", groups)
    strata = np.full(len(groups), "", dtype=object) if strata is None else text_column("strata", strata)
    if len(strata) != len(groups):
        raise ManifestError(f"groups has {len(groups)} rows but strata has {len(strata)}")
    if len(groups) == 0:
        return np.array([], dtype=object)

    group_keys, row_group = np.unique(groups, return_inverse=True)
    _, row_stratum = np.unique(strata, return_inverse=True)
    group_sizes = np.bincount(row_group)
    group_stratum = _majority_stratum(row_group, row_stratum, len(group_keys))

    rng = np.random.default_rng(seed)
    deal_order = [rng.permutation(np.flatnonzero(group_stratum == s)) for s in range(int(group_stratum.max()) + 1)]
    group_split = np.empty(len(group_keys), dtype=np.intp)
    dealt = np.zeros(len(names))
    total = 0
    for group in np.concatenate(deal_order):
        total += group_sizes[group]
        chosen = int(np.argmax(shares * total - dealt))
        group_split[group] = chosen
        dealt[chosen] += group_sizes[group]
    return np.array(names, dtype=object)[group_split[row_group]]

"""Seeded, grouped, stratified assignment of rows to splits (no group ever straddles two splits).

``assign_splits`` splits any manifest (the rows without a split, or all of them), vectorised; the FracAtlas and
MURA builders keep ``assign_grouped_split``, the sequential deal their committed manifests were made with, so
those files reproduce byte for byte."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medembed.data.manifest._units import default_columns, group_name, majority_stratum, row_groups, row_strata
from medembed.data.manifest.table import SPLITS, Manifest, ManifestError, format_rows, listing, text_column
from medembed.options.manifest import SplitOptions


def _check_fractions(fractions: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    names = list(fractions)
    shares = np.array([float(fractions[name]) for name in names])
    if not names or (shares < 0).any() or not np.isclose(shares.sum(), 1.0):
        raise ManifestError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    return names, shares


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
    group_stratum = majority_stratum(row_group, row_stratum, len(group_keys))

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


_EPS = 1e-9  # guards floor() against 0.7 * 10 = 6.999...


def _round_counts(totals: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """[S, J] int rows of each stratum per split: each the floor or ceiling of ``totals[s] * shares[j]``, each row
    summing to ``totals[s]``, and each column within one of ``totals.sum() * shares[j]`` (controlled rounding).

    Floors first; a stratum's leftover rows go to the splits furthest behind their share of the leftovers so far
    (a sequential deal over the strata with leftovers, at most one per stratum and split)."""
    quota = totals[:, None] * shares[None, :]
    counts = np.floor(quota + _EPS).astype(np.int64)
    fraction = np.where(quota - counts > _EPS, quota - counts, 0.0)  # 0.5 * 18 - 9 = 2e-15 is no fraction
    leftover = totals - counts.sum(axis=1)
    behind = [0.0] * len(shares)
    for s in np.flatnonzero(leftover > 0).tolist():
        row = fraction[s].tolist()
        behind = [b + f for b, f in zip(behind, row)]
        eligible = sorted((j for j in range(len(row)) if row[j] > 0), key=lambda j: (-behind[j], -row[j], j))
        for j in eligible[: int(leftover[s])]:
            counts[s, j] += 1
            behind[j] -= 1.0
    return counts


def _carried_cuts(targets: np.ndarray, group_ends: np.ndarray, first_group: np.ndarray) -> np.ndarray:
    """[S, K] row positions where each stratum's split blocks end, at group edges, nearest the targets.

    targets: [S, K] ideal cumulative rows at each cut. group_ends: [G] each group's end (rows from its stratum's
    start), groups ordered by stratum. first_group: [S + 1] where each stratum's groups begin in that order.
    How far each cut overshoots is carried to the next stratum's same cut, so over all strata each cut stays
    within half a group of its target and each split within one group of its share."""
    cuts = np.zeros(targets.shape, dtype=np.int64)
    carry = np.zeros(targets.shape[1])
    for s in range(len(targets)):
        edges = np.concatenate(([0], group_ends[first_group[s] : first_group[s + 1]]))
        lowest = 0
        for k in range(targets.shape[1]):
            want = targets[s, k] - carry[k]
            i = int(np.clip(np.searchsorted(edges, want), 1, len(edges) - 1))
            cut = edges[i - 1] if want - edges[i - 1] <= edges[i] - want else edges[i]
            cut = max(int(cut), lowest)
            carry[k] += cut - targets[s, k]
            cuts[s, k] = lowest = cut
    return cuts


def _deal(size: np.ndarray, stratum: np.ndarray, rand: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """[G] split index of each group: groups shuffled (by ``rand``) within each stratum, each stratum cut into
    consecutive blocks of its rounded share of rows per split. size, stratum, rand: [G]; shares: [J], sum 1."""
    used = np.flatnonzero(shares > 0)  # a zero share gets no block (not even a carried one)
    shares = shares[used] / shares[used].sum()
    order = np.lexsort((rand, stratum))
    size_o, stratum_o = size[order], stratum[order]
    n_strata = int(stratum.max()) + 1
    totals = np.bincount(stratum, weights=size, minlength=n_strata).astype(np.int64)
    stratum_start = np.concatenate(([0], np.cumsum(totals)[:-1]))
    start_o = np.cumsum(size_o) - size_o - stratum_start[stratum_o]  # rows before each group in its stratum
    if (size == 1).all() or len(shares) == 1:
        cuts = np.cumsum(_round_counts(totals, shares), axis=1)[:, :-1]  # singletons meet these counts exactly
    else:  # whole groups: cut near each stratum's exact quotas, carrying the overshoot on
        first_group = np.concatenate(([0], np.cumsum(np.bincount(stratum, minlength=n_strata))))
        targets = np.cumsum(totals[:, None] * shares[None, :], axis=1)[:, :-1]
        cuts = _carried_cuts(targets, start_o + size_o, first_group)
    block = (start_o[:, None] >= cuts[stratum_o]).sum(axis=1)
    split = np.empty(len(size), dtype=np.intp)
    split[order] = used[block]
    return split


def _check_split_values(split: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isin(split, (*SPLITS, "")))
    if len(bad):
        raise ManifestError(
            f"column split must hold {', '.join(SPLITS)} or nothing; {format_rows(bad + 1)} "
            f"hold{'' if len(bad) > 1 else 's'} {listing(split[bad], quote=True)}"
        )


def _existing_splits(manifest: Manifest, group: np.ndarray, code: np.ndarray, group_by: str | None) -> np.ndarray:
    """[G] index into SPLITS of the split a group's rows already have (code: [N], -1 = none), -1 where none has one.

    A group whose rows already lie in two splits is an error naming it and its rows."""
    n_groups = int(group.max()) + 1
    has = code >= 0
    pairs = np.unique(group[has].astype(np.int64) * len(SPLITS) + code[has])
    pair_group = pairs // len(SPLITS)
    spanning = np.flatnonzero(np.bincount(pair_group, minlength=n_groups) > 1)
    if len(spanning):
        rows = np.flatnonzero((group == spanning[0]) & has)
        found = ", ".join(SPLITS[c] for c in sorted(set(code[rows])))
        raise ManifestError(
            f"{len(spanning)} group(s) already span splits, e.g. {group_name(manifest, rows, group_by)} "
            f"({format_rows(rows + 1)} in {found}); fix the split column or pass --overwrite to reassign every row"
        )
    existing = np.full(n_groups, -1, dtype=np.intp)
    existing[pair_group] = pairs % len(SPLITS)
    return existing


def _check_no_leakage(manifest: Manifest, group_by: str | None) -> None:
    """The manifest validation's leakage errors (a patient or study in several splits), raised as one line."""
    from medembed.data.manifest.validate import leakage_problems

    leaks = leakage_problems(manifest)
    if leaks:
        hint = f" (grouped by {group_by}: group by patient_id instead)" if group_by not in (None, "patient_id") else ""
        raise ManifestError(f"the splits leak: {leaks[0].message}{hint}")


def assign_splits(manifest: Manifest, options: SplitOptions | None = None) -> Manifest:
    """``manifest`` with a split (train/val/test) for every row, as ``options`` say (default SplitOptions()).

    Rows are split in groups (``_units.row_groups``: patient or ``group_by``, and study), so no group lies in two
    splits; groups are shuffled by the seed within each stratum (their most frequent combination of the
    ``stratify`` columns) and each stratum is cut into blocks of its share of rows. Counts per split are within
    one group of the ratios overall and (singleton groups) within one row per stratum. Rows that already have a
    split keep it, and so do the other rows of their group, unless ``overwrite``; the remaining groups are dealt
    so that the whole comes as near the ratios as it can. The result depends only on the rows' content and the
    seed, not their order. Raises ManifestError for an unknown column, a split value other than train/val/test,
    a group already in two splits, or (``group_by`` other than patients) a result the validation finds leaking.
    """
    options = options or SplitOptions()
    if options.fractions is None or len(manifest) == 0:
        return manifest
    shares = np.array([options.fractions[name] for name in SPLITS])
    split = np.full(len(manifest), "", dtype=object) if options.overwrite else manifest.split.copy()
    _check_split_values(split)
    group = row_groups(manifest, options.group_by)
    columns = options.stratify_columns
    strata = row_strata(manifest, default_columns(manifest, ("label", "body_part")) if columns is None else columns)
    code = np.full(len(manifest), -1, dtype=np.intp)
    for index, name in enumerate(SPLITS):
        code[split == name] = index
    existing = _existing_splits(manifest, group, code, options.group_by)
    code = existing[group]  # a group's unassigned rows join its assigned ones

    free = code < 0
    if free.any():
        # what the free rows should add for the whole to come nearest the ratios
        need = np.clip(shares * len(manifest) - np.bincount(code[~free], minlength=len(SPLITS)), 0, None)
        free_shares = need / need.sum() if need.sum() > 0 else shares
        free_groups, row_group = np.unique(group[free], return_inverse=True)
        row_group = row_group.ravel()
        group_stratum = majority_stratum(row_group, strata[free], len(free_groups))
        group_stratum = np.unique(group_stratum, return_inverse=True)[1].ravel()  # numbered 0.. without gaps
        rand = np.random.default_rng(options.seed).random(int(group.max()) + 1)[free_groups]
        dealt = _deal(np.bincount(row_group), group_stratum, rand, free_shares)
        code[free] = dealt[row_group]
    result = Manifest({**manifest.columns, "split": np.array(SPLITS, dtype=object)[code]})
    _check_no_leakage(result, options.group_by)
    return result

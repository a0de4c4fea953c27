"""Seeded, stratified samples of a manifest: a small balanced manifest to try things on."""

from __future__ import annotations

import numpy as np

from medembed.data.manifest._units import default_columns, majority_stratum, row_groups, row_strata
from medembed.data.manifest.table import Manifest, ManifestError
from medembed.options.manifest import SampleOptions


def allocate(n: int, sizes: np.ndarray) -> np.ndarray:
    """[S] int how many of ``n`` go to each stratum of ``sizes`` ([S] rows, each >= 1, summing to >= n).

    Proportional (largest remainder; ties to the larger, then the earlier stratum), with at least one for every
    stratum when ``n`` is at least the number of strata: strata whose quota is under one get one, and the rest
    is shared among the others in proportion. Never more than a stratum holds."""
    sizes = np.asarray(sizes, dtype=np.int64)
    count = np.zeros(len(sizes), dtype=np.int64)
    shared = np.ones(len(sizes), dtype=bool)
    if n >= len(sizes):
        while True:  # a stratum given its one lowers the others' quotas, which may push more under one
            quota = (n - (~shared).sum()) * sizes / sizes[shared].sum()
            small = shared & (quota < 1)
            if not small.any():
                break
            shared &= ~small
            count[small] = 1
    rest = n - count.sum()
    quota = np.where(shared, rest * sizes / sizes[shared].sum(), 0.0)
    floor = np.floor(quota + 1e-9).astype(np.int64)
    count[shared] = floor[shared]
    remainder = np.where(shared, quota - floor, -1.0)
    extra = rest - floor[shared].sum()
    count[np.lexsort((np.arange(len(sizes)), -sizes, -remainder))[:extra]] += 1
    return count


def sample_manifest(manifest: Manifest, options: SampleOptions) -> Manifest:
    """A seeded sample of ``options.n`` rows, stratified, with all of the manifest's columns and in its row order.

    Strata are the combinations of ``options.stratify`` (default: label and split, those the manifest has);
    each gets its ``allocate`` share, drawn at random within it. With ``options.groups`` (or a ``group_by``) whole
    groups are drawn (patients, as ``assign_splits`` groups them) until each stratum has about its share: a
    group is taken while its middle row falls within the share (the first always), so the total is about n.
    The sample depends only on the rows' content and the seed, not their order. Raises ManifestError for an
    unknown column or an n larger than the manifest."""
    if options.n > len(manifest):
        raise ManifestError(f"cannot sample {options.n} rows from a manifest of {len(manifest)} rows")
    columns = options.stratify_columns
    columns = default_columns(manifest, ("label", "split")) if columns is None else columns
    strata = row_strata(manifest, columns)
    if options.groups or options.group_by is not None:
        unit = row_groups(manifest, options.group_by)
    else:  # every row its own unit, numbered by image_id so that row order does not matter
        unit = np.empty(len(manifest), dtype=np.intp)
        unit[np.argsort(manifest.image_id, kind="stable")] = np.arange(len(manifest))
    n_units = int(unit.max()) + 1
    size = np.bincount(unit, minlength=n_units)
    unit_stratum = np.unique(majority_stratum(unit, strata, n_units), return_inverse=True)[1].ravel()
    stratum_rows = np.bincount(unit_stratum, weights=size).astype(np.int64)
    share = allocate(options.n, stratum_rows)

    order = np.lexsort((np.random.default_rng(options.seed).random(n_units), unit_stratum))
    size_o, stratum_o = size[order], unit_stratum[order]
    stratum_start = np.concatenate(([0], np.cumsum(stratum_rows)[:-1]))
    before = np.cumsum(size_o) - size_o - stratum_start[stratum_o]  # rows drawn in the stratum before this unit
    taken_o = (before + size_o / 2 < share[stratum_o]) | ((before == 0) & (share[stratum_o] > 0))
    taken = np.zeros(n_units, dtype=bool)
    taken[order] = taken_o
    return manifest.subset(taken[unit])

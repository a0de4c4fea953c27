"""The units splits and samples work on: groups of rows that must stay together, and strata to balance.

Both are numbered canonically (by sorted ids and values, never by row position), so what is built on them
depends only on the manifest's content and a seed, not on the order of its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import numpy as np

from medembed.data.manifest.table import Manifest, ManifestError

_JOIN = "\x1f"  # joins several columns' values into one stratum key (a control character no value holds)


def _column(manifest: Manifest, name: str, what: str) -> np.ndarray:
    if name not in manifest.columns:
        raise ManifestError(f"no column {name!r} to {what}; the manifest has {', '.join(manifest.columns)}")
    return manifest.columns[name]


def row_groups(manifest: Manifest, group_by: str | None = None) -> np.ndarray:
    """[N] intp group of each row, numbered 0..G-1 by each group's smallest image_id.

    Rows are in one group when they share a study (``Manifest.study_ids``: an image without a study is its own)
    or a non-empty value of ``group_by`` (default ``patient_id``), and transitively so: a group is a connected
    component of rows linked by either, so no split can cut a patient or a study."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(manifest)
    linking = _column(manifest, group_by, "group by") if group_by is not None else manifest.patient_id
    rows, nodes, offset = [], [], n
    for key in (manifest.study_ids(), linking):
        present = np.flatnonzero(key != "")
        values, index = np.unique(key[present], return_inverse=True)
        rows.append(present)
        nodes.append(index.ravel() + offset)
        offset += len(values)
    rows, nodes = np.concatenate(rows), np.concatenate(nodes)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, nodes)), shape=(offset, offset))
    _, component = connected_components(graph, directed=False)
    component = component[:n]
    # number components by their smallest image_id, so the numbering does not depend on row order
    by_id = np.argsort(manifest.image_id, kind="stable")
    labels, first = np.unique(component[by_id], return_index=True)
    rank = np.empty(int(component.max()) + 1, dtype=np.intp)
    rank[labels[np.argsort(first)]] = np.arange(len(labels))
    return rank[component]


def default_columns(manifest: Manifest, candidates: Sequence[str]) -> tuple[str, ...]:
    """Those of ``candidates`` the manifest has with at least one value."""
    return tuple(name for name in candidates if name in manifest.columns and (manifest.columns[name] != "").any())


def row_strata(manifest: Manifest, columns: Sequence[str], what: str = "stratify by") -> np.ndarray:
    """[N] intp stratum of each row: its combination of ``columns`` values, numbered in sorted order (all 0 if none)."""
    if not columns:
        return np.zeros(len(manifest), dtype=np.intp)
    values = [_column(manifest, name, what) for name in columns]
    keys = reduce(lambda joined, column: joined + _JOIN + column, values[1:], values[0])
    return np.unique(keys, return_inverse=True)[1].ravel().astype(np.intp)


def majority_stratum(row_group: np.ndarray, row_stratum: np.ndarray, n_groups: int) -> np.ndarray:
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


def group_name(manifest: Manifest, rows: np.ndarray, group_by: str | None) -> str:
    """How an error names the group of ``rows``: its group_by/patient value, else its study."""
    key = manifest.columns[group_by] if group_by is not None else manifest.patient_id
    values = sorted(set(key[rows]) - {""})
    if values:
        return f"{group_by or 'patient_id'} {values[0]!r}"
    return f"study {min(manifest.study_ids()[rows])!r}"

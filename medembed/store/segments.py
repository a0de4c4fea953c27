"""The segmented layout: where a store's segments live, the index that lists them, and the checks that the
files fit together.

A store being written (or resumed with little new work) is segmented: ``<store>`` is then a small index
file (schema_version 2, attrs layout="segments") whose row datasets are HDF5 virtual datasets over sealed
segment files in ``<store>.segments/`` beside it (same datasets as a plain file, referenced by relative
paths, so the folder moves whole), plus the failed table. Plain h5py readers see the same names either way.
medembed reads segments directly (a missing segment is an error, never HDF5's silent fill value). An index is
never followed outside its folder: every entry of its `segments` attribute must name a seg-NNNNNN.h5 inside
``<store>.segments/`` (resolved, symbolic links followed), once. Before the first rows are read, a reader checks
that the files fit together (each segment's row counts, the index's virtual sources against the segments it
lists, no id twice: metadata and the ids only) and refuses in one line otherwise; `verify` also reads every
chunk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from medembed.store.schema import (
    COLUMNS,
    StoreError,
    _name_of,
    _tokens_dataset,
    text_problem,
)

_SEGMENT_NAME = re.compile(r"seg-[0-9]{6,}\.h5")  # what the writer names segments (seg-000001.h5)


@dataclass
class _Segment:
    """One sealed segment file of a segmented store, as its index lists it."""

    file: str  # relative to the store's folder: <store>.segments/seg-000001.h5
    rows: int
    extra: list[str] = field(default_factory=list)  # the extra columns it holds

    def as_json(self) -> dict:
        return {"file": self.file, "rows": self.rows, "extra": self.extra}


def _segments_dir(path: Path) -> Path:
    """Where a segmented store keeps its segments: a folder beside it, <store>.segments/."""
    return path.with_name(path.name + ".segments")


def _segments_in(path: Path, attrs: Mapping[str, object]) -> list[_Segment] | None:
    """The segments the index `path` lists, or None for a plain file.

    The `segments` attribute must be a JSON list of {"file": str, "rows": int >= 0, "extra": [str, ...]}, each
    file a segment of this store (<store>.segments/seg-NNNNNN.h5, resolving inside that folder, symbolic
    links followed) and listed once: an index is never followed outside its folder. Anything else is a
    one-line StoreError naming the store and the entry.
    """
    if attrs.get("layout") != "segments":
        return None
    what = f"{path}: index attribute 'segments'"
    if "segments" not in attrs:
        raise StoreError(f"{what} is missing; the index is damaged")
    try:
        entries = json.loads(str(attrs["segments"]))
    except (ValueError, RecursionError):
        raise StoreError(f"{what} is not JSON; the index is damaged") from None
    if not isinstance(entries, list):
        raise StoreError(f"{what} is not a list of segments (got {type(entries).__name__}); the index is damaged")
    folder = _segments_dir(path)
    inside = folder.resolve()
    segments: list[_Segment] = []
    seen: dict[Path, int] = {}
    for k, entry in enumerate(entries):
        where = f"{what} entry {k}"
        if not isinstance(entry, dict):
            raise StoreError(f"{where} is not an object with file, rows and extra (got {type(entry).__name__})")
        file, rows, extra = entry.get("file"), entry.get("rows"), entry.get("extra", [])
        if not isinstance(file, str):
            raise StoreError(f"{where}: 'file' must be a string, got {file!r}")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise StoreError(f"{where}: 'rows' must be a non-negative integer, got {rows!r}")
        if not isinstance(extra, list) or not all(isinstance(c, str) and c and text_problem(c) is None for c in extra):
            raise StoreError(f"{where}: 'extra' must be a list of column names, got {extra!r}")
        name = file[len(folder.name) + 1:] if file.startswith(folder.name + "/") else ""
        resolved = (path.parent / file).resolve() if _SEGMENT_NAME.fullmatch(name) else None
        if resolved is None or resolved.parent != inside:
            renamed = re.fullmatch(r"([^/]+\.segments)/seg-[0-9]{6,}\.h5", file)
            raise StoreError(
                f"{where}: file {file!r} is not a segment inside {folder.name}/ (expected {folder.name}/seg-NNNNNN.h5); "
                "refusing to read outside the store's folder"
                + (f" (a segmented store keeps the name it was written under: its index names {renamed[1]}/)" if renamed else "")
            )
        if resolved in seen:
            raise StoreError(f"{where}: file {file!r} is the file of entry {seen[resolved]} again; a segment is listed once")
        seen[resolved] = k
        segments.append(_Segment(file, rows, list(extra)))
    return segments


@dataclass
class _Source:
    """A file holding rows of a store: the plain file itself or one segment; `first` is its first row."""

    path: Path
    rows: int
    first: int
    extra: list[str]
    label: str  # how problems name it: '' for a plain file, 'segment seg-000001.h5 ' otherwise


def _row_names(token_shapes: Mapping[str, tuple[int, int]]) -> tuple[str, ...]:
    """The row datasets every row file has: embeddings, ids, the standard columns and each token level."""
    return ("embeddings", "image_id") + COLUMNS + tuple(_tokens_dataset(level) for level in token_shapes)


def _tail(name: str, dim: int, token_shapes: Mapping[str, tuple[int, int]]) -> tuple[int, ...]:
    """The shape of one row of the row dataset `name`: (D,) embeddings, (T, C) token grids, () columns."""
    if name == "embeddings":
        return (dim,)
    if name.startswith("tokens/"):
        return tuple(token_shapes.get(_name_of(name.split("/", 1)[1]), ()))
    return ()


def _shape_problems(f: h5py.File, source: _Source, names: Sequence[str], dim: int,
                    token_shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """Row datasets of one row file that are missing or do not have its rows (and the row shape): metadata only."""
    problems: list[str] = []
    for name in names:
        try:  # the low-level open: half the cost of h5py's Dataset objects, which a check of every segment adds up
            shape = h5py.h5d.open(f.id, name.encode()).shape
        except (KeyError, ValueError, TypeError, OSError):  # missing, or a group
            problems.append(f"{source.label}dataset {name!r} is missing")
            continue
        tail = _tail(name, dim, token_shapes)
        if not shape or shape[0] != source.rows:
            problems.append(f"{source.label}{name!r} has {shape[0] if shape else 0} rows, the index lists {source.rows}")
        elif tuple(shape[1:]) != tail:
            problems.append(f"{source.label}{name!r} has rows of shape {list(shape[1:])}, expected {list(tail)}")
    return problems


def _index_problems(f: h5py.File, segments: Sequence[_Segment], names: Sequence[str]) -> list[str]:
    """Where the virtual datasets of the index `f` disagree with its `segments` attribute (metadata only).

    Each row dataset of `names` must be a virtual dataset whose sources are, in row order, the same-named
    dataset of each listed segment that holds it (the file as listed: a relative path inside
    <store>.segments/), each over exactly that segment's rows; no other dataset may be virtual. What plain
    h5py readers see through the index is then what medembed reads from the segments.
    """
    problems: list[str] = []
    total = sum(s.rows for s in segments)
    expected = set(names)

    def other_virtual(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and obj.is_virtual and name not in expected:
            problems.append(f"index dataset {name!r} is virtual but is no row dataset of the store (its segments attribute lists none)")

    f.visititems(other_virtual)
    for name in names:
        if name not in f or not isinstance(f[name], h5py.Dataset):
            problems.append(f"index dataset {name!r} is missing, expected {total} rows (plain h5py readers see it)")
            continue
        dataset = f[name]
        if not dataset.shape or dataset.shape[0] != total:
            found = dataset.shape[0] if dataset.shape else 0
            problems.append(f"index dataset {name!r} has {found} rows, expected {total} (plain h5py readers see it)")
            continue
        extra = _name_of(name.split("/", 1)[1]) if name.startswith("extra/") else None
        want, first = [], 0
        for segment in segments:
            if segment.rows and (extra is None or extra in segment.extra):
                # as `_virtual_dataset` writes them: '%' doubled
                want.append((segment.file.replace("%", "%%"), name.replace("%", "%%"), first, segment.rows))
            first += segment.rows
        if not dataset.is_virtual:
            if want:
                problems.append(f"index dataset {name!r} is not a virtual dataset over the segments its segments attribute lists")
            continue
        problem = _source_mismatch(name, sorted(_virtual_sources(dataset), key=lambda source: source[2]), want)
        if problem:
            problems.append(problem)
    return problems


def _virtual_sources(dataset: h5py.Dataset) -> list[tuple[str, str, int, int]]:
    """(file, dataset, first row, rows) of each source of a virtual dataset; first row -1 where a source is
    not what medembed writes (a whole source dataset mapped onto one block of whole rows)."""
    sources = []
    tail = dataset.shape[1:]
    for source in dataset.virtual_sources():
        first, rows = -1, 0
        try:
            if source.vspace.get_select_type() == h5py.h5s.SEL_HYPERSLABS and source.src_space.get_select_type() == h5py.h5s.SEL_ALL:
                start, end = source.vspace.get_select_bounds()
                whole_rows = all(a == 0 and b == n - 1 for a, b, n in zip(start[1:], end[1:], tail))
                block = (end[0] - start[0] + 1) * int(np.prod(tail, dtype=np.int64))
                if whole_rows and source.vspace.get_select_npoints() == block:
                    first, rows = int(start[0]), int(end[0] - start[0] + 1)
        except ValueError:  # a selection without bounds: not a block
            pass
        sources.append((source.file_name, source.dset_name, first, rows))
    return sources


def _source_mismatch(name: str, got: Sequence[tuple[str, str, int, int]], want: Sequence[tuple[str, str, int, int]]) -> str | None:
    """The first way the virtual sources `got` of the index dataset `name` differ from the segments' `want`, or None."""
    for have, should in zip(got, want):
        if have == should:
            continue
        file, dataset, first, rows = have
        where = f"rows {first}-{first + rows - 1}" if first >= 0 else "rows that are not one block of whole rows"
        listed = f"lists {should[0]!r} for rows {should[2]}-{should[2] + should[3] - 1}"
        if (file, dataset) != should[:2]:
            return f"index dataset {name!r} reads {where} from {file!r} dataset {dataset!r}, but its segments attribute {listed}"
        return f"index dataset {name!r} reads {where} from {file!r}, but its segments attribute {listed}"
    if len(got) != len(want):
        more = f" (the first one more: {got[len(want)][0]!r} dataset {got[len(want)][1]!r})" if len(got) > len(want) else ""
        return f"index dataset {name!r} has {len(got)} virtual source(s), its segments attribute lists {len(want)}{more}"
    return None


def _verify_rows(f: h5py.File, source: _Source, names: Sequence[str]) -> list[str]:
    """Problems of one row file: missing or misaligned datasets, damaged chunks, values out of range."""
    problems: list[str] = []
    where = f" ({source.label.strip()})" if source.label else ""
    for name in names:
        if name not in f:
            problems.append(f"{source.label}dataset {name!r} is missing")
            continue
        dataset = f[name]
        if dataset.shape[0] != source.rows:
            problems.append(f"{source.label}{name!r} has {dataset.shape[0]} rows, expected {source.rows}")
        step = dataset.chunks[0] if dataset.chunks else max(1, dataset.shape[0])
        for start in range(0, dataset.shape[0], step):
            first, last = source.first + start, source.first + min(start + step, dataset.shape[0]) - 1
            try:
                block = dataset[start : start + step]
            except OSError as error:
                problems.append(f"{name!r} rows {first}-{last} are damaged ({error}){where}")
                continue
            if name == "embeddings" or name.startswith("tokens/"):
                bad = ~np.isfinite(block.astype(np.float32)).reshape(len(block), -1).all(axis=1)
                if bad.any():
                    problems.append(f"{name} rows {(np.flatnonzero(bad) + first)[:5].tolist()} are not finite ({int(bad.sum())} in rows {first}-{last})")
            elif name == "label":
                bad = ~np.isin(block, (-1, 0, 1))
                if bad.any():
                    problems.append(f"label rows {(np.flatnonzero(bad) + first)[:5].tolist()} hold values outside -1/0/1")
    return problems

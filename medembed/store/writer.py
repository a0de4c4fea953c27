"""Writing a store crash-safely: `StoreWriter` (append, failed images, column updates, folds into sealed
segments, consolidation into one plain file, the writer lock) and `consolidate_store`.

HDF5 itself is not safe against a process killed mid-write (its metadata cache can be half flushed), so the
writer never modifies an HDF5 file in place. Each appended batch goes to the write-ahead log first (see
`medembed.store.wal`). Every ``fold_every_rows`` rows the log is folded: its rows go to a new segment (temp
file, fsync, rename) and a new index listing it replaces the old one (temp, fsync, ``os.replace``), so a fold
costs what it adds, not what the store holds. Rows already stored are skipped on fold, so a kill between the
replace and the log's removal never duplicates a row; segments no index lists (a kill before the replace) are
removed by the next writer. At the end of a run the store is consolidated into one plain file (temp, fsync,
replace) when that is cheap relative to the run (see `StoreWriter.close`), else by
`medembed merge <store> --out <store>`. A writer holds an exclusive ``flock`` on ``<store>.lock``; a second
writer is refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from medembed._version import __version__
from medembed._files import ExclusiveLock, LockBusy
from medembed.options.extract import DTYPES
from medembed.store.reader import (
    EmbeddingTable,
    _apply_updates,
    _concat,
    _extras_in,
    _lock_path,
    _open_h5,
    _read_dataset,
    _record_table,
    _strings,
    open_store,
)
from medembed.store.schema import (
    COLUMNS,
    FINGERPRINT_KEYS,
    PLAIN_SCHEMA_VERSION,
    SCHEMA_VERSION,
    STRING_COLUMNS,
    ProvenanceWarning,
    StoreError,
    StoreWarning,
    _check_name,
    _describe_levels,
    _extra_dataset,
    _name_of,
    _storable_text,
    _tokens_dataset,
    collect_provenance,
    fingerprint_mismatch,
    normalise_token_shapes,
    provenance_differences,
    text_problem,
    unrecorded_keys,
)
from medembed.store.segments import _Segment, _segments_dir
from medembed.store.wal import (
    _encode_record,
    _kept_pending,
    _log_path,
    _open_log,
    _pending_updates,
    _scan_log,
    _split_body,
)

_STR = h5py.string_dtype("utf-8")
_TARGET_CHUNK_BYTES = 1 << 20
_UPDATE_BATCH = 10_000  # ids per "columns" log record
_COPY_ROWS_BYTES = 64 << 20  # row data is written in blocks of about this size (bounded extra memory)
_FOLD_BYTES = 1 << 30  # a fold also happens once the log holds this much (token grids make rows large)
# A store whose rows take at most this is consolidated at the end of every run (the copy is cheap anyway).
_ALWAYS_CONSOLIDATE_BYTES = 256 << 20


def _writer_lock(store_path: Path) -> ExclusiveLock:
    """The store's writer lock (<store>.lock): one writer at a time, released by the kernel if it dies."""
    try:
        return ExclusiveLock(_lock_path(store_path))
    except LockBusy as busy:
        raise StoreError(
            f"{store_path}: another process (pid {busy.holder}) is writing this store; "
            "wait for it to finish or stop it (two writers on one store are refused)"
        ) from None


def _chunk_rows(row_bytes: int, rows: int | None = None) -> int:
    """Rows per chunk of about 1 MiB (no more than `rows`, so a small file is not padded to a whole chunk)."""
    chunk = max(1, _TARGET_CHUNK_BYTES // max(1, row_bytes))
    return max(1, min(chunk, rows)) if rows else chunk


def _create_row_datasets(
    f: h5py.File, dim: int, dtype: str, token_shapes: Mapping[str, tuple[int, int]], extras: Sequence[str], rows: int | None = None
) -> None:
    """The empty, resizable row datasets of a plain file or a segment (`rows`: what it will hold, if known)."""
    itemsize = np.dtype(dtype).itemsize
    string_chunk = max(1, min(4096, rows)) if rows else 4096
    f.create_dataset("embeddings", (0, dim), dtype=dtype, maxshape=(None, dim), chunks=(_chunk_rows(dim * itemsize, rows), dim), fletcher32=True)
    f.create_dataset("image_id", (0,), dtype=_STR, maxshape=(None,), chunks=(string_chunk,))
    f.create_dataset("label", (0,), dtype=np.int8, maxshape=(None,), chunks=(string_chunk,), fletcher32=True)
    for name in STRING_COLUMNS + tuple(_extra_dataset(c) for c in extras):
        f.create_dataset(name, (0,), dtype=_STR, maxshape=(None,), chunks=(string_chunk,))
    for level, (t, c) in token_shapes.items():
        f.create_dataset(
            _tokens_dataset(level), (0, t, c), dtype=dtype, maxshape=(None, t, c),
            chunks=(_chunk_rows(t * c * itemsize, rows), t, c), fletcher32=True,
        )


def _append_arrays(f: h5py.File, embeddings: np.ndarray, tokens: Mapping[str, np.ndarray]) -> None:
    """Append rows of embeddings and token grids (the numeric row data) to the end of a file's datasets."""
    n0, n = f["embeddings"].shape[0], len(embeddings)
    f["embeddings"].resize(n0 + n, axis=0)
    f["embeddings"][n0:] = embeddings
    for level, grid in tokens.items():
        name = _tokens_dataset(level)
        f[name].resize(n0 + n, axis=0)
        f[name][n0:] = grid


def _write_columns(f: h5py.File, image_id: np.ndarray, columns: Mapping[str, np.ndarray]) -> None:
    """Write the ids, labels and string columns (standard and extra) of every row of a file at once."""
    # object arrays, not lists: h5py converts them to variable-length strings about twice as fast
    f["image_id"].resize(len(image_id), axis=0)
    f["image_id"][:] = np.asarray(image_id, dtype=object)
    f["label"].resize(len(image_id), axis=0)
    f["label"][:] = np.asarray(columns["label"], dtype=np.int8)
    for name, values in columns.items():
        if name == "label":
            continue
        target = name if name in STRING_COLUMNS else _extra_dataset(name)
        if target not in f:
            f.create_dataset(target, (0,), dtype=_STR, maxshape=(None,), chunks=(max(1, min(4096, len(image_id))),))
        f[target].resize(len(values), axis=0)
        f[target][:] = np.asarray(values, dtype=object)


def _write_failed(f: h5py.File, failed: Mapping[str, str]) -> None:
    for name, values in (("failed/image_id", list(failed)), ("failed/reason", list(failed.values()))):
        if name not in f:
            f.create_dataset(name, (0,), dtype=_STR, maxshape=(None,), chunks=(4096,))
        f[name].resize(len(values), axis=0)
        f[name][:] = values


def _store_attrs(
    dim: int, dtype: str, fingerprint: Mapping[str, str], metadata: Mapping[str, object], provenance: Mapping[str, str],
    token_shapes: Mapping[str, tuple[int, int]],
) -> dict[str, object]:
    attrs: dict[str, object] = {
        "schema_version": PLAIN_SCHEMA_VERSION,
        "fingerprint": json.dumps(dict(fingerprint), sort_keys=True),
        **{key: str(fingerprint.get(key, "")) for key in FINGERPRINT_KEYS},
        "dim": dim,
        "medembed_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in metadata.items():
        attrs[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    attrs["provenance"] = json.dumps(dict(provenance))
    attrs["token_levels"] = json.dumps({level: list(shape) for level, shape in token_shapes.items()})
    attrs["dtype"] = dtype
    return attrs


def _create_h5(
    path: Path,
    dim: int,
    dtype: str,
    fingerprint: Mapping[str, str],
    metadata: Mapping[str, object],
    provenance: Mapping[str, str],
    token_shapes: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """A new, empty plain store (temp file, fsync, rename)."""
    tmp = _tmp_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            _create_row_datasets(f, dim, dtype, token_shapes or {}, ())
            _write_failed(f, {})
            f.attrs.update(_store_attrs(dim, dtype, fingerprint, metadata, provenance, token_shapes or {}))
        _fsync(tmp)
    except (OSError, RuntimeError) as error:  # e.g. no space left: HDF5's message spans lines
        tmp.unlink(missing_ok=True)
        reason = os.strerror(error.errno) if getattr(error, "errno", None) else str(error).splitlines()[0]
        raise StoreError(f"{path}: cannot create the store ({reason} under {path.parent})") from None
    os.replace(tmp, path)
    _fsync(path.parent)


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _rows_bound(rows: int, strings: int, dim: int, dtype: str, token_shapes: Mapping[str, tuple[int, int]]) -> int:
    """An upper bound of the bytes a file of `rows` rows (and `strings` bytes of text) takes: every chunk
    padded, the strings' heap and 16-byte references, a margin for HDF5's own metadata."""
    itemsize = np.dtype(dtype).itemsize
    numeric = 0
    for row_bytes in [dim * itemsize] + [t * c * itemsize for t, c in token_shapes.values()]:
        chunk = _chunk_rows(row_bytes, rows or None)
        numeric += (rows // chunk + 2) * (chunk * row_bytes + 4096)
    columns = (6 + 8) * (rows // 4096 + 2) * (4096 * 16 + 4096)  # references of up to 14 string columns
    return int(1.25 * (numeric + columns + strings + rows * 64)) + (1 << 20)


def _text_bytes(values: Sequence[object]) -> int:
    """An upper bound of the UTF-8 bytes of `values` with per-string overhead (4 bytes a character at most)."""
    return 4 * sum(map(len, map(str, values))) + 32 * len(values)


def _reserve(path: Path, extra: int) -> None:
    """Allocate `extra` bytes beyond the end of `path` (HDF5 trims the file back to what it used on close)."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, size + extra)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise
            # no fallocate on this file system: at least check the free space
            if shutil.disk_usage(path.parent).free < extra:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
    finally:
        os.close(fd)


def _new_h5(path: Path, reserve: int) -> h5py.File:
    """A new HDF5 file opened for writing with `reserve` bytes allocated first: HDF5 does not survive running
    out of space mid-write (h5py crashes the process, up to a segfault at exit), so a disk too full fails here."""
    h5py.File(path, "w").close()
    _reserve(path, reserve)
    return h5py.File(path, "r+")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _label_value(value: object) -> int:
    return int(value) if str(value) not in ("", "-1", "None", "nan") else -1


def _text_value(value: object) -> str:
    """A manifest value as stored text: missing values (None, NaN) are ""."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _write_index(
    path: Path, attrs: Mapping[str, object], segments: Sequence[_Segment], failed: Mapping[str, str], next_segment: int,
    dim: int, dtype: str, token_shapes: Mapping[str, tuple[int, int]],
) -> None:
    """Replace the store file by an index over `segments` (temp, fsync, os.replace): attrs, the failed table,
    and virtual datasets joining the segments' row datasets, so plain h5py readers see every row."""
    tmp = _tmp_path(path)
    total = sum(s.rows for s in segments)
    extras = sorted({c for s in segments for c in s.extra})
    reserve = (len(segments) + 1) * 2048 * (8 + len(token_shapes) + len(extras)) + _text_bytes(list(failed) + list(failed.values())) * 3 + (1 << 20)
    with _new_h5(tmp, reserve) as f:
        f.attrs.update({k: v for k, v in attrs.items() if k not in ("layout", "segments", "next_segment")})
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["layout"] = "segments"
        f.attrs["segments"] = json.dumps([s.as_json() for s in segments])
        f.attrs["next_segment"] = next_segment
        _write_failed(f, failed)
        columns = [("embeddings", (dim,), np.dtype(dtype)), ("image_id", (), _STR), ("label", (), np.dtype(np.int8))]
        columns += [(name, (), _STR) for name in STRING_COLUMNS]
        columns += [(_tokens_dataset(level), shape, np.dtype(dtype)) for level, shape in token_shapes.items()]
        columns += [(_extra_dataset(c), (), _STR) for c in extras]
        for name, tail, kind in columns:
            _virtual_dataset(f, name, tail, kind, segments, total)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _virtual_dataset(f: h5py.File, name: str, tail: tuple, kind: np.dtype, segments: Sequence[_Segment], total: int) -> None:
    """`name` as a virtual dataset over the segments holding it (relative paths: the store folder can move)."""
    if total == 0:
        f.create_dataset(name, (0, *tail), dtype=kind, maxshape=(None, *tail))
        return
    layout = h5py.VirtualLayout((total, *tail), dtype=kind)
    first = 0
    extra = _name_of(name.split("/", 1)[1]) if name.startswith("extra/") else None
    for segment in segments:
        if segment.rows and (extra is None or extra in segment.extra):
            # '%' starts a printf-style field in VDS source names, so it is doubled
            source = h5py.VirtualSource(segment.file.replace("%", "%%"), name.replace("%", "%%"), shape=(segment.rows, *tail), dtype=kind)
            layout[first : first + segment.rows] = source
        first += segment.rows
    f.create_virtual_dataset(name, layout, fillvalue=None if kind == _STR else (-1 if name == "label" else 0))


def _failed_after(path: Path, records: Sequence[dict]) -> dict[str, str]:
    """The failed table of the store file `path` with `records` applied: a row that succeeded leaves it."""
    with _open_h5(path) as f:
        failed = dict(zip(_read_dataset(path, f, "failed/image_id"), _read_dataset(path, f, "failed/reason")))
    for record in records:
        if record["kind"] == "rows":
            for image_id in record["ids"]:
                failed.pop(image_id, None)
        failed.update(record.get("failed", {}))
    return failed


def _columns_only(record: dict, mask: np.ndarray) -> EmbeddingTable:
    """The ids and columns of a "rows" record's rows in `mask` (embeddings [n, 0]: they are written in blocks)."""
    table = _record_table(record)
    table.embeddings = np.zeros((len(table), 0), table.embeddings.dtype)
    return table if mask.all() else table.subset(mask)


def _append_blocks(f: h5py.File, blocks: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]]) -> None:
    """Append (embeddings, token grids) blocks, one per log record, joined into writes of about 64 MB: fewer
    partial-chunk writes than record by record, and no copy of everything at once."""
    start = 0
    while start < len(blocks):
        stop, size = start, 0
        while stop < len(blocks) and (stop == start or size < _COPY_ROWS_BYTES):
            size += blocks[stop][0].nbytes + sum(g.nbytes for g in blocks[stop][1].values())
            stop += 1
        part = blocks[start:stop]
        _append_arrays(f, np.concatenate([e for e, _ in part]), {level: np.concatenate([t[level] for _, t in part]) for level in part[0][1]})
        start = stop


def _write_segment(final: Path, table: EmbeddingTable, blocks: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]], dim: int,
                   dtype: str, token_shapes: Mapping[str, tuple[int, int]]) -> list[str]:
    """Seal the new rows (`table`'s ids and columns, `blocks` of their embeddings and token grids) into the
    new segment file `final` (temp, fsync, rename); returns the extra columns it holds."""
    tmp = final.with_name(final.name + ".tmp")
    extras = sorted(c for c in table.columns if c not in COLUMNS)
    text = _text_bytes(table.image_id) + sum(_text_bytes(v) for k, v in table.columns.items() if k != "label")
    with _new_h5(tmp, _rows_bound(len(table), text, dim, dtype, token_shapes)) as f:
        _create_row_datasets(f, dim, dtype, token_shapes, extras, len(table))
        _append_blocks(f, blocks)
        _write_columns(f, table.image_id, table.columns)
        f.attrs["medembed_segment"] = 1
    _fsync(tmp)
    os.replace(tmp, final)
    return extras


def _rewrite_segment(source: Path, final: Path, updates: Mapping[str, Mapping[str, object]]) -> list[str] | None:
    """A copy of the segment (or plain file) `source` as the new segment `final` with the column `updates`
    of its rows applied (other datasets copied chunk for chunk); its extra columns, or None (and no file)
    when no value of it changes."""
    with h5py.File(source, "r") as s:
        ids = _strings(s["image_id"])
        mine = {image_id: updates[image_id] for image_id in ids if image_id in updates}
        if not mine:
            return None
        extras = _extras_in(s)
        names = sorted({name for values in mine.values() for name in values})
        columns = {
            name: s["label"][:].astype(np.int8) if name == "label"
            else _strings(s[name]) if name in STRING_COLUMNS
            else _strings(s[_extra_dataset(name)]) if name in extras
            else np.full(len(ids), "", dtype=object)
            for name in names
        }
        changed = _apply_updates(ids, columns, mine)
        if not changed:
            return None
        tmp = final.with_name(final.name + ".tmp")
        with _new_h5(tmp, source.stat().st_size + sum(_text_bytes(columns[c]) for c in changed if c != "label") * 2 + (1 << 20)) as d:
            for key in s:
                if key == "extra":
                    group = d.create_group("extra")
                    for sub in s["extra"]:
                        if _name_of(sub) not in changed:
                            s.copy(s["extra"][sub], group, sub)
                elif key not in changed:
                    s.copy(s[key], d, key)
            d.attrs.update(dict(s.attrs))
            chunk = max(1, min(4096, len(ids)))
            for name in sorted(changed):
                target = name if name in COLUMNS else _extra_dataset(name)
                if name == "label":
                    d.create_dataset(target, data=columns[name], maxshape=(None,), chunks=(chunk,), fletcher32=True)
                else:
                    d.create_dataset(target, data=columns[name].tolist(), dtype=_STR, maxshape=(None,), chunks=(chunk,))
    _fsync(tmp)
    os.replace(tmp, final)
    return sorted(set(extras) | {c for c in changed if c not in COLUMNS})


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` as a second name of `source` (instant), or a copy where hard links are not allowed."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
        _fsync(tmp)
    os.replace(tmp, target)


class StoreWriter:
    """Appends batches to a store crash-safely; use as a context manager. One writer per store.

    `tokens` ({level: (T, C)}) makes every batch carry those token grids (`append(..., tokens=...)`); a
    resumed store must have the same levels. `provenance` (see `collect_provenance`, the default) is
    recorded when the store is created; resuming a store created in another environment warns
    (ProvenanceWarning), naming what differs. Every `fold_every_rows` rows the log becomes a new segment.
    `consolidate`: whether `close()` joins the segments into one plain file (None: when cheap relative to
    the run, see `close`). `discard_if_empty`: a `with` block that raises removes the store again (file and
    log) when this writer created it and no row was ever written to it (a first run that failed leaves no
    empty store); a store that existed before, or holds rows, is always kept.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        dim: int,
        fingerprint: Mapping[str, str],
        metadata: Mapping[str, object] | None = None,
        fold_every_rows: int = 50_000,
        provenance: Mapping[str, str] | None = None,
        tokens: Mapping[str, tuple[int, int]] | None = None,
        consolidate: bool | None = None,
        discard_if_empty: bool = False,
    ) -> None:
        self.path = Path(path)
        self.discard_if_empty = discard_if_empty
        dtype = str(fingerprint.get("dtype", ""))
        if dtype not in DTYPES:
            raise StoreError(f"{self.path}: fingerprint dtype must be one of {DTYPES}, got {dtype!r}")
        self.dim, self.dtype = dim, dtype
        self.token_shapes = normalise_token_shapes(self.path, tokens)
        self.fold_every_rows = fold_every_rows
        self.consolidate = consolidate
        self.provenance = dict(provenance) if provenance is not None else collect_provenance()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _writer_lock(self.path)
        try:
            _tmp_path(self.path).unlink(missing_ok=True)  # what a writer killed mid-fold or mid-consolidation left
            self.created = not self.path.exists()  # under the lock: no other writer creates it meanwhile
            if self.created:
                _create_h5(self.path, dim, dtype, fingerprint, metadata or {}, self.provenance, self.token_shapes)
            self._check_compatible(fingerprint)
            # Finish whatever a killed writer left in the log.
            scan = _scan_log(_log_path(self.path), dim, dtype)
            self.recovered = scan  # what the log held when this writer started (tests, diagnostics)
            if scan.skipped_records:
                warnings.warn(
                    f"{self.path}: skipped {scan.skipped_records} damaged write-ahead-log record(s) "
                    f"({scan.skipped_bytes} bytes); their rows are not in the store and a rerun embeds them again",
                    StoreWarning,
                    stacklevel=2,
                )
            if scan.dropped:
                warnings.warn(
                    f"{self.path}: dropped {len(scan.dropped)} logged entries HDF5 cannot store: "
                    f"{', '.join(scan.dropped[:5])}{' ...' if len(scan.dropped) > 5 else ''}",
                    StoreWarning,
                    stacklevel=2,
                )
            self._committed: set[str] = set(open_store(self.path)._committed_ids())  # ids folded into the store
            self._fold(scan.records)
            self._remove_orphans()
            store = open_store(self.path)
            self._done = store.image_ids()
            self._failed = store.failed()
            self._log = _open_log(self.path)
        except BaseException:
            self._lock.release()
            raise
        self.fingerprint = dict(fingerprint)
        self._unfolded: list[dict] = []  # records in the log since the last fold, kept to fold without rereading
        self._logged_rows = self._logged_bytes = 0
        self._appended_rows = 0  # rows this writer appended (the consolidation choice weighs them)
        self._log_failed = False  # an append failed (disk full): the log is kept as it is and folded by the next run

    def _check_compatible(self, fingerprint: Mapping[str, str]) -> None:
        store = open_store(self.path)
        diff = fingerprint_mismatch(store.fingerprint, fingerprint)
        if diff:
            hint = ""
            if "precision" in store.fingerprint and store.fingerprint.get("precision") != fingerprint.get("precision"):
                hint = f" (or continue it with --precision {store.fingerprint['precision']})" if store.fingerprint["precision"] else ""
            raise StoreError(
                f"{self.path} was written with another encoder, preprocessing or precision ({'; '.join(diff)} — store vs this run); "
                f"write to a new store instead{hint}"
            )
        if store.dim != self.dim:
            raise StoreError(f"{self.path}: store has dim {store.dim}, this run produces {self.dim}")
        if store.token_shapes != self.token_shapes:
            raise StoreError(
                f"{self.path} holds token grids of levels {_describe_levels(store.token_shapes)} but this run writes "
                f"{_describe_levels(self.token_shapes)}; write to a new store or keep the store's levels"
            )
        unchecked = unrecorded_keys(store.fingerprint, fingerprint)
        if unchecked:
            warnings.warn(
                f"{self.path} predates recording {', '.join(unchecked)}: this run's "
                f"{', '.join(f'{k}={fingerprint[k]!r}' for k in unchecked)} cannot be checked against its rows; "
                "extract into a new store to be sure they match",
                StoreWarning,
                stacklevel=3,
            )
        differences = provenance_differences(store.provenance, self.provenance)
        if differences:
            warnings.warn(
                f"{self.path} was created in another environment than this run's: {'; '.join(differences)} "
                "(the fingerprint matches, so rows are appended; `medembed info` shows the store's provenance)",
                ProvenanceWarning,
                stacklevel=3,
            )

    @property
    def failed(self) -> dict[str, str]:
        """Image id -> reason of the images recorded as failed (a copy)."""
        return dict(self._failed)

    def done_ids(self, include_failed: bool = True) -> set[str]:
        """Ids already embedded (and, by default, already recorded as failed): what a resumed run skips."""
        return self._done | set(self._failed) if include_failed else set(self._done)

    def _check_text(self, image_id: str, value: object, what: str) -> None:
        problem = text_problem(value)
        if problem:
            subject = f"image id {image_id!r}" if what == "image_id" else f"column {what!r} of image id {image_id!r} ({value!r})"
            raise StoreError(f"{self.path}: {subject} cannot be stored in HDF5: it {problem}")

    def _column_values(self, ids: list[str], name: str, values: Sequence) -> list:
        """One column's values as stored (labels as -1/0/1, the rest as text), checked against the ids."""
        values = list(values)
        if len(values) != len(ids):
            raise StoreError(f"{self.path}: column {name!r} has {len(values)} values for {len(ids)} ids")
        if name == "label":
            return [_label_value(v) for v in values]
        text = [_text_value(v) for v in values] if name not in STRING_COLUMNS else [str(v) for v in values]
        self._check_texts(ids, text, name)
        return text

    def _check_texts(self, ids: Sequence[str], values: Sequence[str], what: str) -> None:
        """`_check_text` of every value, by one check of them all joined (a batch is thousands of strings);
        only a batch with a problem is looked at value by value, to name it."""
        joined = "\n".join(values)
        try:
            joined.encode("utf-8")
            clean = "\x00" not in joined
        except UnicodeEncodeError:
            clean = False
        if not clean:
            for image_id, value in zip(ids, values):
                self._check_text(image_id, value, what)

    def _column_names(self, columns: Mapping[str, Sequence]) -> None:
        for name in columns:
            if name == "image_id":
                raise StoreError(f"{self.path}: 'image_id' is given as the ids, not as a column")
            if name not in COLUMNS:
                _check_name(self.path, name, "column")

    def _normalise_columns(self, ids: list[str], columns: Mapping[str, Sequence] | None) -> dict[str, list]:
        """Standard columns (defaults where not given) and any extra manifest columns, as stored."""
        columns = dict(columns or {})
        self._column_names(columns)
        defaults = {"label": [-1] * len(ids), **{c: [""] * len(ids) for c in STRING_COLUMNS}}
        return {
            name: self._column_values(ids, name, columns.get(name, defaults.get(name)))
            for name in list(COLUMNS) + sorted(c for c in columns if c not in COLUMNS)
        }

    def _check_tokens(self, n: int, tokens: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The batch's token grids as contiguous [n, T, C] arrays of the store dtype, one per store level."""
        given = dict(tokens or {})
        missing = [level for level in self.token_shapes if level not in given]
        unexpected = sorted(str(level) for level in given if level not in self.token_shapes)
        if missing or unexpected:
            parts = ([f"missing level(s) {', '.join(map(repr, missing))}"] if missing else []) + (
                [f"unexpected level(s) {', '.join(map(repr, unexpected))}"] if unexpected else []
            )
            raise StoreError(f"{self.path}: the batch's token grids do not match the store's levels ({_describe_levels(self.token_shapes)}): {'; '.join(parts)}")
        grids = {}
        for level, (t, c) in self.token_shapes.items():
            grid = np.ascontiguousarray(given[level], dtype=self.dtype)
            if grid.shape != (n, t, c):
                raise StoreError(f"{self.path}: token level {level!r} has shape {tuple(grid.shape)}, expected ({n}, {t}, {c})")
            grids[level] = grid
        return grids

    def append(
        self,
        image_ids: Sequence[str],
        embeddings: np.ndarray,
        columns: Mapping[str, Sequence] | None = None,
        failed: Mapping[str, str] | None = None,
        tokens: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append one batch: ids [B], embeddings [B, D] (cast to the store dtype), optional aligned columns
        (the standard ones and any extra manifest column, stored as text), the token grids {level: [B, T, C]}
        of every store level, and the batch's failed images (id -> reason) in the same atomic record.

        Durable against SIGKILL once this returns. Ids already in the store are refused, and so are ids or
        column values HDF5 cannot store (a NUL byte, a lone surrogate): nothing of the batch is logged then.
        """
        ids = [str(i) for i in image_ids]
        self._check_texts(ids, ids, "image_id")
        embeddings = np.ascontiguousarray(embeddings, dtype=self.dtype)
        if embeddings.shape != (len(ids), self.dim):
            raise StoreError(f"{self.path}: batch of {len(ids)} ids has embeddings of shape {embeddings.shape}, expected ({len(ids)}, {self.dim})")
        duplicates = [i for i in ids if i in self._done]
        if len(set(ids)) != len(ids):
            duplicates += sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise StoreError(f"{self.path}: image ids already in the store: {duplicates[:5]} ({len(duplicates)} in all)")
        record_columns = self._normalise_columns(ids, columns)
        grids = self._check_tokens(len(ids), tokens)
        failed = self._failed_entries(failed or {})
        header = {"kind": "rows", "ids": ids, "columns": record_columns, "failed": failed}
        if grids:
            header["tokens"] = [[level, t, c] for level, (t, c) in self.token_shapes.items()]
        body = b"".join([embeddings.tobytes()] + [grids[level].tobytes() for level in self.token_shapes])
        self._write(header, body)
        # Kept as read-only views of the bytes written, so a caller reusing its buffers cannot change them.
        record = dict(header)
        _split_body(record, body, self.dim, self.dtype)
        self._unfolded.append(record)
        self._done.update(ids)
        for image_id in ids:
            self._failed.pop(image_id, None)
        self._failed.update(failed)
        self._logged_rows += len(ids)
        self._logged_bytes += len(body)
        self._appended_rows += len(ids)
        if self._logged_rows >= self.fold_every_rows or self._logged_bytes >= _FOLD_BYTES:
            self.flush()

    def _failed_entries(self, failed: Mapping[str, str]) -> dict[str, str]:
        entries = {str(k): _storable_text(v) for k, v in failed.items()}
        for image_id in entries:
            self._check_text(image_id, image_id, "image_id")
        return entries

    def add_failed(self, image_ids: Sequence[str], reasons: Sequence[str]) -> None:
        """Record images that could not be embedded, with a short reason each."""
        ids, reasons = [str(i) for i in image_ids], [str(r) for r in reasons]
        if len(ids) != len(reasons):
            raise StoreError(f"{self.path}: {len(ids)} failed ids but {len(reasons)} reasons")
        if ids:
            failed = self._failed_entries(dict(zip(ids, reasons)))
            header = {"kind": "failed", "failed": failed}
            self._write(header, b"")
            self._unfolded.append(header)
            self._failed.update(failed)

    def update_columns(self, image_ids: Sequence[str], columns: Mapping[str, Sequence]) -> int:
        """Set manifest columns (label, study_id, patient_id, body_part, split, or any extra column such as
        view or site) of rows already stored, e.g. after the manifest was edited; ids not stored are
        ignored. Only the given columns are changed.

        Returns how many rows' values changed. Logged like a batch (durable once this returns, applied on fold).
        """
        ids = [str(i) for i in image_ids]
        self._column_names(columns)
        new = {name: self._column_values(ids, name, values) for name, values in columns.items()}
        current = open_store(self.path).read_columns()
        index = {image_id: row for row, image_id in enumerate(current.image_id)}
        blank = np.full(len(current), "", dtype=object)
        changed = [
            k for k, image_id in enumerate(ids)
            if image_id in index and any(current.columns.get(name, blank)[index[image_id]] != values[k] for name, values in new.items())
        ]
        for start in range(0, len(changed), _UPDATE_BATCH):
            part = changed[start : start + _UPDATE_BATCH]
            header = {
                "kind": "columns",
                "ids": [ids[k] for k in part],
                "columns": {name: [values[k] for k in part] for name, values in new.items()},
                "failed": {},
            }
            self._write(header, b"")
            self._unfolded.append(header)
        return len(changed)

    def _write(self, header: dict, body: bytes) -> None:
        # Unbuffered: the record is in the kernel (kept even if this process is killed) once this returns. A
        # failed write (disk full) is cut off again, so the log ends with the last whole record.
        record = _encode_record(header, body)
        start = self._log.tell()
        try:
            written = 0
            while written < len(record):
                written += self._log.write(memoryview(record)[written:])
        except OSError as error:
            self._log_failed = True
            try:
                os.ftruncate(self._log.fileno(), start)
            except OSError:
                pass  # a torn tail is dropped by the next writer anyway
            raise StoreError(
                f"{_log_path(self.path)}: cannot append to the write-ahead log ({error.strerror or error}); "
                "the rows written before are kept: make room and rerun the same command to resume"
            ) from None

    def flush(self) -> None:
        """Fold the log into a new segment now (plain h5py readers then see every row)."""
        self._log.close()
        self._fold(self._unfolded)
        self._log = _open_log(self.path)
        self._unfolded, self._logged_rows, self._logged_bytes = [], 0, 0

    def _fold(self, records: Sequence[dict], consolidate: bool = False) -> None:
        """Apply log records to the store, then drop the log: as a new segment and a new index (the cost is
        what the records add), or, with `consolidate`, by writing the whole store as one plain file."""
        log = _log_path(self.path)
        if not records and not consolidate:
            log.unlink(missing_ok=True)
            return
        kept = [(rec, mask) for rec, mask in _kept_pending(self._committed, records) if mask.any()]
        table = _concat([_columns_only(rec, mask) for rec, mask in kept]) if kept else None
        blocks = [
            (rec["embeddings"] if mask.all() else rec["embeddings"][mask],
             {level: rec["tokens"][level] if mask.all() else rec["tokens"][level][mask] for level in self.token_shapes})
            for rec, mask in kept
        ]
        updates = _pending_updates(records)
        failed = _failed_after(self.path, records)
        try:
            if consolidate:
                self._consolidate(table, blocks, updates, failed)
            else:
                self._add_segment(table, blocks, updates, failed)
        except BaseException as error:
            _tmp_path(self.path).unlink(missing_ok=True)
            if not isinstance(error, OSError):
                raise
            raise StoreError(
                f"{self.path}: cannot fold the write-ahead log into the store ({error.strerror or error} "
                f"under {self.path.parent}); nothing was lost: make room and rerun to finish"
            ) from None
        log.unlink(missing_ok=True)
        if table is not None:
            self._committed.update(table.image_id)
        self._remove_orphans()

    def _add_segment(self, table: EmbeddingTable | None, blocks: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]],
                     updates: Mapping[str, Mapping[str, object]], failed: Mapping[str, str]) -> None:
        """Seal the new rows into a segment, rewrite the segments whose columns `updates` change, and replace
        the index by one listing them. A plain store first becomes segment 0 (a hard link: no copy)."""
        store = open_store(self.path)
        folder = _segments_dir(self.path)
        folder.mkdir(exist_ok=True)
        if store.segments is not None:
            segments, serial, base = list(store.segments), int(store.attrs.get("next_segment", len(store.segments))), None
        else:
            base = _Segment(f"{folder.name}/seg-000000.h5", store.committed_rows, store._plain_extras)
            segments, serial = ([base] if base.rows else []), 1
        replaced = []
        for k, segment in enumerate(segments if updates else ()):
            name = f"{folder.name}/seg-{serial:06d}.h5"
            source = self.path if segment is base else self.path.parent / segment.file
            extras = _rewrite_segment(source, self.path.parent / name, updates)
            if extras is not None:
                replaced.append(segment)
                segments[k] = _Segment(name, segment.rows, extras)
                serial += 1
        if table is not None:
            name = f"{folder.name}/seg-{serial:06d}.h5"
            extras = _write_segment(self.path.parent / name, table, blocks, self.dim, self.dtype, self.token_shapes)
            segments.append(_Segment(name, len(table), extras))
            serial += 1
        if base is not None and base in segments:
            _link_or_copy(self.path, self.path.parent / base.file)
        _fsync(folder)
        _write_index(self.path, store.attrs, segments, failed, serial, self.dim, self.dtype, self.token_shapes)
        for segment in replaced:
            if segment is not base:
                (self.path.parent / segment.file).unlink(missing_ok=True)

    def _consolidate(self, table: EmbeddingTable | None, blocks: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]],
                     updates: Mapping[str, Mapping[str, object]], failed: Mapping[str, str]) -> None:
        """Write the store (its row files, then the new rows, with `updates` applied) as one plain file in
        its place (temp, fsync, replace); the segments go after."""
        store = open_store(self.path)
        sources = store._sources()
        stored_text = sum(s.path.stat().st_size for s in sources if s.path.exists())
        new_text = (_text_bytes(table.image_id) + sum(_text_bytes(v) for k, v in table.columns.items() if k != "label")) if table is not None else 0
        columns = {"label": store._read_committed("label").astype(np.int8), **{c: store._read_committed(c) for c in STRING_COLUMNS}}
        for name in sorted({c for s in sources for c in s.extra}):
            columns[name] = store._read_committed(_extra_dataset(name))
        merged = EmbeddingTable(np.zeros((store.committed_rows, 0), self.dtype), store._committed_ids(), columns)
        if table is not None:
            merged = _concat([merged, table])
        _apply_updates(merged.image_id, merged.columns, updates)
        total = len(merged)
        extras = sorted(c for c in merged.columns if c not in COLUMNS)
        tmp = _tmp_path(self.path)
        bound = stored_text + _rows_bound(total, new_text, self.dim, self.dtype, self.token_shapes)
        with _new_h5(tmp, bound) as f:
            f.attrs.update({k: v for k, v in store.attrs.items() if k not in ("layout", "segments", "next_segment")})
            f.attrs["schema_version"] = PLAIN_SCHEMA_VERSION
            _create_row_datasets(f, self.dim, self.dtype, self.token_shapes, extras, total)
            _write_failed(f, failed)
            itemsize = np.dtype(self.dtype).itemsize
            block = max(1, _COPY_ROWS_BYTES // (itemsize * (self.dim + sum(t * c for t, c in self.token_shapes.values()))))
            for source in sources:
                with store._open_source(source) as s:
                    for start in range(0, source.rows, block):
                        part = slice(start, min(start + block, source.rows))
                        _append_arrays(
                            f, _read_dataset(source.path, s, "embeddings", part),
                            {level: _read_dataset(source.path, s, _tokens_dataset(level), part) for level in self.token_shapes},
                        )
            _append_blocks(f, blocks)
            _write_columns(f, merged.image_id, merged.columns)
        _fsync(tmp)
        os.replace(tmp, self.path)
        _fsync(self.path.parent)

    def _remove_orphans(self) -> None:
        """Delete segment files the index does not list (a fold killed before its index replace, segments a
        rewrite or a consolidation superseded); the folder itself once empty."""
        folder = _segments_dir(self.path)
        if not folder.is_dir():
            return
        listed = {Path(s.file).name for s in open_store(self.path).segments or ()}
        for entry in folder.iterdir():
            if entry.name.startswith("seg-") and entry.name.endswith((".h5", ".h5.tmp")) and entry.name not in listed:
                entry.unlink(missing_ok=True)
        if not listed:
            try:
                folder.rmdir()
            except OSError:
                pass  # something else lives there: leave it

    def _should_consolidate(self) -> bool:
        """Whether close() writes one plain file: when asked to, or when cheap relative to the run (the rows
        are small, or this run appended at least half of them, so the copy at most doubles its writes)."""
        if self.consolidate is not None:
            return self.consolidate
        total = len(self._committed) + sum(len(r["ids"]) for r in self._unfolded if r["kind"] == "rows")
        row_bytes = np.dtype(self.dtype).itemsize * (self.dim + sum(t * c for t, c in self.token_shapes.values()))
        return total * row_bytes <= _ALWAYS_CONSOLIDATE_BYTES or 2 * self._appended_rows >= total

    def close(self) -> None:
        """Fold the log, consolidate the store into one plain file when `_should_consolidate` (else it stays
        segmented: `consolidate_store` or `medembed merge <store> --out <store>` does it later), and release the lock."""
        if self._lock.fd < 0:
            return
        try:
            self._log.close()
            if not self._log_failed:  # after a failed append the log stays for the next run to fold
                consolidate = self._should_consolidate() and (bool(self._unfolded) or open_store(self.path).segmented)
                try:
                    self._fold(self._unfolded, consolidate=consolidate)
                except StoreError:
                    if not consolidate or self.consolidate is not None:
                        raise
                    # A consolidation it chose itself failed (no room for the copy): the run's rows may still
                    # fit as a segment, which needs only what they add (if not, that is the one-line error).
                    self._fold(self._unfolded)
                    warnings.warn(
                        f"{self.path}: left segmented, not consolidated into one file (no room for the copy under "
                        f"{self.path.parent}); `medembed merge {self.path} --out {self.path}` consolidates it later",
                        StoreWarning,
                        stacklevel=2,
                    )
                self._remove_orphans()
        finally:
            self._lock.release()

    def discard(self) -> bool:
        """Remove the store (file, log, temp file) and release the lock instead of closing, if this writer
        created it and no row was ever written to it (none appended, none folded from an earlier log); else
        `close()`. Whether it was removed."""
        if self._lock.fd < 0:
            return False
        if not self.created or self._appended_rows or self._committed:
            self.close()
            return False
        try:
            self._log.close()
            for path in (_log_path(self.path), _tmp_path(self.path), self.path):
                path.unlink(missing_ok=True)
        finally:
            self._lock.release()
        return True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self.discard_if_empty:
            self.discard()
        else:
            self.close()


def consolidate_store(path: Path | str) -> Path:
    """Join a segmented store's segments (and its unfolded log) into one plain file in its place; a plain
    store is left as it is. Crash-safe like every fold: a kill leaves the segmented store, which opens."""
    store = open_store(path)
    with StoreWriter(
        path, dim=store.dim, fingerprint=store.fingerprint, provenance=store.provenance, tokens=store.token_shapes, consolidate=True
    ):
        pass
    return Path(path)

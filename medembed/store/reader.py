"""Reading a store: `open_store` / `EmbeddingStore` (rows, token grids, failed images, including rows still in
the write-ahead log), `read_stores` over several, `verify`, and the summary `medembed info` prints."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medembed._files import is_locked
from medembed.data.images import PreprocessSpec
from medembed.errors import MedembedError
from medembed.store.schema import (
    COLUMNS,
    SCHEMA_VERSION,
    STRING_COLUMNS,
    StoreError,
    _extra_dataset,
    _name_of,
    _tokens_dataset,
    fingerprint_mismatch,
)
from medembed.store.segments import (
    _index_problems,
    _row_names,
    _segments_dir,
    _segments_in,
    _shape_problems,
    _Source,
    _verify_rows,
)
from medembed.store.wal import (
    _kept_pending,
    _log_path,
    _LogScan,
    _pending_updates,
    _scan_log,
)


@dataclass
class EmbeddingTable:
    """Embeddings with their aligned ids and manifest columns, as read from a store."""

    embeddings: np.ndarray  # [N, D] float16 | float32
    image_id: np.ndarray  # [N] str
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # label [N] int8, others [N] str

    def __len__(self) -> int:
        return len(self.image_id)

    @property
    def label(self) -> np.ndarray:
        """[N] int8: 0 normal, 1 abnormal, -1 unknown."""
        return self.columns["label"]

    def subset(self, rows: np.ndarray) -> EmbeddingTable:
        """The rows selected by a boolean mask or an index array, in that order."""
        return EmbeddingTable(
            self.embeddings[rows], self.image_id[rows], {k: v[rows] for k, v in self.columns.items()}
        )

    def to_numpy(self) -> dict[str, np.ndarray]:
        """The table as named arrays (the table's own, not copies): `embeddings` [N, D] float16 | float32,
        `image_id` [N] str, `label` [N] int8 (-1 unknown), `study_id`, `patient_id`, `body_part`, `split` and
        every extra manifest column [N] str."""
        return {"embeddings": self.embeddings, "image_id": self.image_id, **self.columns}

    def to_pandas(self) -> Any:
        """The table as a pandas DataFrame, one row per image: `image_id`, the manifest columns, and `embedding`
        holding each row's [D] array (`np.stack(frame["embedding"])` gives the [N, D] matrix back).
        pandas is optional: without it, a MedembedError says how to install it."""
        from medembed.tables import import_pandas

        frame = import_pandas("to_pandas").DataFrame({"image_id": self.image_id, **self.columns})
        frame["embedding"] = list(self.embeddings)
        return frame


def _one_line(error: BaseException) -> str:
    """An error's message on one line (HDF5's can hold a newline, e.g. inside the time it prints)."""
    return " ".join(str(error).split())


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    if path.is_dir():
        raise StoreError(f"{path}: is a directory, not a store (a store is one .h5 file)")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise StoreError(f"{path}: not a readable HDF5 file ({_one_line(error)})") from None


def _check_schema(path: Path, f: h5py.File) -> None:
    version_ = f.attrs.get("schema_version")
    if version_ is None or "embeddings" not in f:
        raise StoreError(f"{path}: an HDF5 file but not a medembed embedding store (no schema_version/embeddings)")
    if int(version_) > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {int(version_)} is newer than this medembed supports "
            f"({SCHEMA_VERSION}); upgrade medembed"
        )


def _read_dataset(path: Path, f: h5py.File, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
    """A dataset (or the rows `rows` of it; strings as a [N] object array of str); a damaged chunk is a
    one-line StoreError."""
    try:
        dataset = f[name]
        selection = slice(None) if rows is None else rows
        if dataset.dtype.kind == "O":
            return np.asarray(dataset.asstr()[selection], dtype=object).reshape(-1)
        return dataset[selection]
    except OSError as error:
        raise StoreError(
            f"{path}: cannot read {name!r}, the file is damaged ({error}); "
            "`medembed info --verify` lists the damaged rows"
        ) from None


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    """A UTF-8 string dataset as a [N] object array of str."""
    return np.asarray(dataset.asstr()[:], dtype=object).reshape(-1)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, modification time) of a file, which an atomic replace changes; None if it is gone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _attrs_of(f: h5py.File) -> dict[str, object]:
    return {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}


def _extras_in(f: h5py.File) -> list[str]:
    return sorted(_name_of(name) for name in f["extra"]) if "extra" in f else []


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _record_table(record: dict) -> EmbeddingTable:
    columns = record["columns"]
    return EmbeddingTable(
        record["embeddings"],
        np.asarray(record["ids"], dtype=object).reshape(-1),
        {
            "label": np.asarray(columns["label"], dtype=np.int8).reshape(-1),
            **{c: np.asarray(columns[c], dtype=object).reshape(-1) for c in STRING_COLUMNS},
            **{c: np.asarray(v, dtype=object).reshape(-1) for c, v in columns.items() if c not in COLUMNS},
        },
    )


def _concat(tables: Sequence[EmbeddingTable]) -> EmbeddingTable:
    """Tables one after another; an extra column some lack is "" in their rows."""
    names = list(COLUMNS) + sorted({k for t in tables for k in t.columns if k not in COLUMNS})
    return EmbeddingTable(
        np.concatenate([t.embeddings for t in tables]),
        np.concatenate([t.image_id for t in tables]),
        {k: np.concatenate([t.columns[k] if k in t.columns else np.full(len(t), "", dtype=object) for t in tables]) for k in names},
    )


def _empty(name: str, dim: int, dtype: str, token_shapes: Mapping[str, tuple[int, int]]) -> np.ndarray:
    if name == "embeddings":
        return np.zeros((0, dim), dtype)
    if name.startswith("tokens/"):
        return np.zeros((0, *token_shapes[_name_of(name.split("/", 1)[1])]), dtype)
    return np.zeros(0, np.int8) if name == "label" else np.zeros(0, dtype=object)


def _apply_updates(ids: np.ndarray, columns: dict[str, np.ndarray], updates: Mapping[str, Mapping[str, object]]) -> set[str]:
    """Set the updated column values of the rows whose id is in `updates`, in place (a column not there yet
    is added, "" for the other rows); the columns changed."""
    if not updates:
        return set()
    index = {image_id: row for row, image_id in enumerate(ids)}
    changed: set[str] = set()
    for image_id, values in updates.items():
        row = index.get(image_id)
        if row is None:
            continue
        for name, value in values.items():
            if name not in columns:
                columns[name] = np.full(len(ids), "", dtype=object)
            if columns[name][row] != value:
                columns[name][row] = value
                changed.add(name)
    return changed


class EmbeddingStore:
    """Read access to a store: its fingerprint, counts and rows (including rows still in the write-ahead log)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        with _open_h5(self.path) as f:
            self._identity = _file_identity(self.path)
            _check_schema(self.path, f)
            self.attrs: dict[str, object] = _attrs_of(f)
            self.segments = _segments_in(self.path, self.attrs)
            if self.segments is None:
                self.committed_rows = int(f["embeddings"].shape[0])
                self._plain_extras = _extras_in(f)
                self._plain_checksummed = bool(f["embeddings"].fletcher32)
            else:
                self.committed_rows = sum(s.rows for s in self.segments)
        self.fingerprint: dict[str, str] = json.loads(str(self.attrs["fingerprint"]))
        self.provenance: dict[str, str] = json.loads(str(self.attrs.get("provenance", "{}")))
        self.dim = int(self.attrs["dim"])
        self.dtype = str(self.attrs["dtype"])
        self.token_shapes: dict[str, tuple[int, int]] = {
            level: (int(t), int(c)) for level, (t, c) in json.loads(str(self.attrs.get("token_levels", "{}"))).items()
        }
        self._checked = False  # whether `_check_structure` passed (once per opened index)
        self._checked_ids: np.ndarray | None = None  # the ids it read, until the read that asked for it takes them

    # -- where the rows are

    def _retrying(self, read):
        """`read()`, once more after re-reading the index if it failed because a writer replaced the store file
        meanwhile (a fold that rewrote segments, or a consolidation, removes segments this object listed)."""
        try:
            return read()
        except StoreError:
            if _file_identity(self.path) in (None, self._identity):
                raise
            self.__init__(self.path)
            return read()

    @property
    def segmented(self) -> bool:
        """Whether the store is an index over segment files (a run in progress, or not yet consolidated)."""
        return self.segments is not None

    def _sources(self) -> list[_Source]:
        if self.segments is None:
            return [_Source(self.path, self.committed_rows, 0, self._plain_extras, "")]
        sources, first = [], 0
        for segment in self.segments:
            sources.append(_Source(self.path.parent / segment.file, segment.rows, first, segment.extra, f"segment {Path(segment.file).name} "))
            first += segment.rows
        return sources

    def _open_source(self, source: _Source) -> h5py.File:
        if source.path == self.path:
            return _open_h5(self.path)
        if not source.path.exists():
            raise StoreError(
                f"{self.path}: its segment {source.path.name} is missing from {source.path.parent}; a segmented store "
                f"is the file and its {_segments_dir(self.path).name}/ folder: copy or move them together"
            )
        if not source.path.is_file():
            raise StoreError(f"{self.path}: its segment {source.path.name} is not a file; the store is damaged")
        try:
            return h5py.File(source.path, "r")
        except OSError as error:
            raise StoreError(f"{source.path}: segment of {self.path} is not a readable HDF5 file ({_one_line(error)})") from None

    def _structure_problem(self, f: h5py.File) -> str | None:
        """The first thing wrong with how the store's files fit together, read from metadata and the ids only
        (not the rows' values: that is `verify`), or None: every row file exists and each of its row datasets
        has the rows the index lists; the index's virtual datasets are exactly the listed segments
        (`_index_problems`); no id is stored twice. `f` is the open index (or plain file)."""
        ids: list[np.ndarray] = []
        for source in self._sources():
            try:
                g = f if source.path == self.path else self._open_source(source)
            except StoreError as error:
                return str(error)
            try:
                names = _row_names(self.token_shapes) + tuple(_extra_dataset(c) for c in source.extra)
                problems = _shape_problems(g, source, names, self.dim, self.token_shapes)
                if problems:
                    return problems[0]
                ids.append(_read_dataset(source.path, g, "image_id"))
            except StoreError as error:
                return str(error)
            finally:
                if g is not f:
                    g.close()
        if self.segments is not None:
            problems = _index_problems(f, self.segments, self._index_names())
            if problems:
                return problems[0]
        ids = np.concatenate(ids) if ids else np.zeros(0, dtype=object)
        if len(set(ids)) != len(ids):
            unique, counts = np.unique(ids, return_counts=True)
            return f"image ids stored more than once: {unique[counts > 1][:5].tolist()} ({int((counts > 1).sum())} in all)"
        self._checked_ids = ids  # the first read of the ids, which asked for this check, takes them
        return None

    def _index_names(self) -> tuple[str, ...]:
        """The row datasets a segmented store's index holds as virtual datasets: the standard ones, each token
        level and each extra column some segment holds."""
        extras = sorted({c for s in self.segments or () for c in s.extra})
        return _row_names(self.token_shapes) + tuple(_extra_dataset(c) for c in extras)

    def _check_structure(self) -> None:
        """Refuse (one line) to read rows from a store whose files do not fit together (`_structure_problem`):
        run once per opened index, before its first rows are read. A writer that replaced the index since it
        was opened (a fold) is followed: the check is of the index now there."""
        if self._checked:
            return
        for _ in range(3):
            with _open_h5(self.path) as f:
                if _attrs_of(f).get("segments") != self.attrs.get("segments"):
                    self.__init__(self.path)  # replaced meanwhile: read and check the new one
                    continue
                problem = self._structure_problem(f)
            break
        else:
            return  # replaced at every try: a writer is busy; the reads that follow retry on their own
        if problem:
            raise StoreError(
                problem if problem.startswith(f"{self.path}") or problem.startswith(f"{_segments_dir(self.path)}")
                else f"{self.path}: {problem}; refusing to read it (`medembed info --verify` lists every problem)"
            )
        self._checked = True

    @property
    def checksummed(self) -> bool:
        """Whether every row file checksums its embeddings (stores written before checksums did not)."""
        if self.segments is None:
            return self._plain_checksummed
        result = True
        for source in self._sources():
            with self._open_source(source) as f:
                result = result and bool(f["embeddings"].fletcher32)
        return result

    def _read_committed(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """A row dataset over every row file, in row order (or the committed rows `rows`, sorted, unique); the
        first read of an opened store checks its structure first (`_check_structure`)."""
        self._check_structure()
        if name == "image_id" and rows is None and self._checked_ids is not None:
            ids, self._checked_ids = self._checked_ids, None
            return ids
        parts = []
        for source in self._sources():
            if rows is None:
                local = None
            else:
                picked = rows[(rows >= source.first) & (rows < source.first + source.rows)] - source.first
                if not len(picked):
                    continue
                local = picked
            if name.startswith("extra/") and _name_of(name.split("/", 1)[1]) not in source.extra:
                parts.append(np.full(source.rows if local is None else len(local), "", dtype=object))
                continue
            with self._open_source(source) as f:
                if name not in f:
                    raise StoreError(f"{source.path}: dataset {name!r} is missing; the store is damaged")
                if local is None:
                    parts.append(_read_dataset(source.path, f, name))
                else:  # one contiguous read per file, then pick (h5py point selections are slow)
                    block = _read_dataset(source.path, f, name, slice(int(local[0]), int(local[-1]) + 1))
                    parts.append(block[local - local[0]])
        if not parts:
            return _empty(name, self.dim, self.dtype, self.token_shapes)
        return np.concatenate(parts)

    def extra_columns(self) -> list[str]:
        """Names of the manifest columns stored beyond the standard ones (view, site, ...), sorted."""
        names = {name for source in self._sources() for name in source.extra}
        for record in self._pending():
            if record["kind"] in ("rows", "columns"):
                names.update(c for c in record["columns"] if c not in COLUMNS)
        return sorted(names)

    # -- the log

    def _log(self) -> _LogScan:
        return _scan_log(_log_path(self.path), self.dim, self.dtype)

    def _pending(self) -> list[dict]:
        return self._log().records

    @property
    def pending_rows(self) -> int:
        """Rows in the write-ahead log, not yet folded into the store (a running or killed extraction)."""
        return sum(int(mask.sum()) for _, mask in _kept_pending(set(self._committed_ids()), self._pending()))

    def _committed_ids(self) -> np.ndarray:
        return self._read_committed("image_id")

    def __len__(self) -> int:
        return self.committed_rows + self.pending_rows

    # -- rows

    def _table(self, with_embeddings: bool) -> EmbeddingTable:
        ids = self._committed_ids()
        columns = {"label": self._read_committed("label").astype(np.int8), **{c: self._read_committed(c) for c in STRING_COLUMNS}}
        records = self._pending()
        extras = self.extra_columns()
        for name in extras:
            columns[name] = self._read_committed(_extra_dataset(name))
        embeddings = self._read_committed("embeddings") if with_embeddings else np.zeros((len(ids), 0), self.dtype)
        table = EmbeddingTable(embeddings, ids, columns)
        pending = [(_record_table(rec), mask) for rec, mask in _kept_pending(set(ids), records) if mask.any()]
        if pending:
            tables = [t.subset(mask) for t, mask in pending]
            if not with_embeddings:
                for t in tables:
                    t.embeddings = np.zeros((len(t), 0), self.dtype)
            table = _concat([table] + tables)
        _apply_updates(table.image_id, table.columns, _pending_updates(records))
        for name in extras:  # a column only "columns" records name shows up once, '' elsewhere
            table.columns.setdefault(name, np.full(len(table), "", dtype=object))
        return table

    def read(self, split: str | None = None) -> EmbeddingTable:
        """All rows (or one split's), embeddings [N, D] in the stored dtype with aligned ids and columns
        (the standard ones and every extra column, "" where a row has no value)."""
        table = self._retrying(lambda: self._table(with_embeddings=True))
        if split is not None:
            table = table.subset(table.columns["split"] == split)
        return table

    def read_columns(self) -> EmbeddingTable:
        """Every row's id and manifest columns without reading the embeddings (`embeddings` is [N, 0])."""
        return self._retrying(lambda: self._table(with_embeddings=False))

    def read_tokens(self, level: str, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """The token grids [n, T, C] (store dtype) of `level` for the rows `rows` of `read()`'s row order (an
        index array or a boolean mask; None: every row), rows still in the write-ahead log included."""
        if level not in self.token_shapes:
            raise StoreError(
                f"{self.path}: no token level {level!r}; the store has "
                + (", ".join(repr(name) for name in self.token_shapes) if self.token_shapes else "no token grids")
            )
        return self._retrying(lambda: self._read_tokens(level, rows))

    def _read_tokens(self, level: str, rows: np.ndarray | Sequence[int] | None) -> np.ndarray:
        committed_ids = self._committed_ids()
        pending = [rec["tokens"][level][mask] for rec, mask in _kept_pending(set(committed_ids), self._pending()) if mask.any()]
        total = len(committed_ids) + sum(len(p) for p in pending)
        if rows is None:
            return np.concatenate([self._read_committed(_tokens_dataset(level))] + pending)
        picked = np.asarray(rows)
        picked = np.flatnonzero(picked) if picked.dtype == bool else picked.astype(np.intp).reshape(-1)
        if picked.dtype == bool or (len(picked) and (picked.min() < -total or picked.max() >= total)):
            raise StoreError(f"{self.path}: token rows out of range: the store has {total} rows")
        picked = np.where(picked < 0, picked + total, picked)
        out = np.empty((len(picked), *self.token_shapes[level]), self.dtype)
        in_store = picked < len(committed_ids)
        wanted = np.unique(picked[in_store])
        if len(wanted):
            block = self._read_committed(_tokens_dataset(level), wanted)
            out[in_store] = block[np.searchsorted(wanted, picked[in_store])]
        if (~in_store).any():
            out[~in_store] = np.concatenate(pending)[picked[~in_store] - len(committed_ids)]
        return out

    def image_ids(self) -> set[str]:
        """Ids of every embedded row, committed or pending."""
        ids = set(self._retrying(self._committed_ids))
        for rec in self._pending():
            if rec["kind"] == "rows":
                ids.update(rec["ids"])
        return ids

    def failed(self) -> dict[str, str]:
        """Image id -> reason, for images that could not be embedded (and have not succeeded since)."""
        with _open_h5(self.path) as f:
            failed = dict(zip(_read_dataset(self.path, f, "failed/image_id"), _read_dataset(self.path, f, "failed/reason")))
        for rec in self._pending():
            if rec["kind"] == "rows":
                for image_id in rec["ids"]:
                    failed.pop(image_id, None)
            failed.update(rec.get("failed", {}))
        return failed

    def being_written(self) -> bool:
        """Whether a writer (an extraction, a merge) holds this store's lock right now."""
        return is_locked(_lock_path(self.path))

    def partial_reason(self) -> str | None:
        """Why the store is not (yet) a finished extraction, in one line, or None: a writer holds it now, or
        its log holds records a killed writer did not fold (rerun the extraction to finish)."""
        if self.being_written():
            holder = _lock_path(self.path).read_text(errors="replace").strip() if _lock_path(self.path).exists() else ""
            return f"{self.path}: an extraction is still writing this store (pid {holder or 'unknown'}); wait for it to finish"
        pending = self.pending_rows
        if pending:
            return (
                f"{self.path}: {pending} rows are still in the write-ahead log of an extraction that was killed; "
                "rerun it to finish"
            )
        return None

    def is_partial(self) -> bool:
        """True while a writer holds the store or its log has unfolded records (see `partial_reason`)."""
        return self.partial_reason() is not None

    def verify(self) -> list[str]:
        """Check the store end to end; one line per problem found (empty: all is well).

        Reads every chunk of every row dataset of every row file (the plain file, or each segment: HDF5
        checks each fletcher32 chunk checksum as it reads; a store written before checksums were added is
        read without them), checks that segments exist and hold the rows their index says, that the
        columns are aligned, ids unique, labels in {-1, 0, 1} and embeddings and token grids finite, that
        the index's virtual datasets cover every row, and that the write-ahead log has no damaged records.
        """
        problems: list[str] = []
        with _open_h5(self.path) as f:
            for name in ("failed/image_id", "failed/reason"):
                if name not in f:
                    problems.append(f"dataset {name!r} is missing")
            if "failed/image_id" in f and "failed/reason" in f and len(f["failed/reason"]) != len(f["failed/image_id"]):
                problems.append(f"'failed/reason' has {len(f['failed/reason'])} rows, expected {len(f['failed/image_id'])}")
            if self.segments is not None:
                problems += _index_problems(f, self.segments, self._index_names())
        ids: list[np.ndarray] = []
        for source in self._sources():
            try:
                f = self._open_source(source)
            except StoreError as error:
                problems.append(str(error))
                continue
            with f:
                problems += _verify_rows(f, source, _row_names(self.token_shapes) + tuple(_extra_dataset(c) for c in source.extra))
                try:
                    ids.append(_strings(f["image_id"]).astype(str))
                except (OSError, KeyError):
                    pass
        if ids:
            unique, counts = np.unique(np.concatenate(ids), return_counts=True)
            if (counts > 1).any():
                problems.append(f"image ids stored more than once: {unique[counts > 1][:5].tolist()} ({int((counts > 1).sum())} in all)")
        log = self._log()
        if log.skipped_records:
            problems.append(
                f"write-ahead log {_log_path(self.path).name}: {log.skipped_records} damaged record(s) "
                f"({log.skipped_bytes} bytes) skipped; their rows are re-embedded by rerunning the extraction"
            )
        if log.dropped:
            problems.append(f"write-ahead log {_log_path(self.path).name}: entries HDF5 cannot store, skipped: {log.dropped[:5]}")
        return problems

    def summary(self) -> dict:
        """Rows, dim, dtype, fingerprint, provenance, failed count, token levels, extra columns, layout and
        label counts per split: what `medembed info` prints."""
        try:
            table = self.read_columns()
        except StoreError as error:  # a damaged column: say so and let `verify()` list the damage
            table, damaged = None, str(error)
        else:
            damaged = ""
        by_split: dict[str, dict[str, int]] = {}
        for split in sorted(set(table.columns["split"])) if table is not None else ():
            labels = table.label[table.columns["split"] == split]
            by_split[split or "(none)"] = {
                "rows": int(len(labels)),
                "normal": int((labels == 0).sum()),
                "abnormal": int((labels == 1).sum()),
                "unknown": int((labels < 0).sum()),
            }
        log = self._log()
        itemsize = np.dtype(self.dtype).itemsize
        try:
            checksum = "fletcher32" if self.checksummed else "none"
            pending = self.pending_rows
        except StoreError as error:  # a missing or unreadable segment
            checksum, pending, damaged = "unknown", 0, damaged or str(error)
        return {
            "path": str(self.path),
            "rows": len(table) if table is not None else self.committed_rows,
            "damaged": damaged,
            "pending_rows": pending,
            "being_written": self.being_written(),
            "dim": self.dim,
            "dtype": self.dtype,
            "failed": len(self.failed()),
            "fingerprint": self.fingerprint,
            "provenance": self.provenance,
            "checksum": checksum,
            "log_skipped_records": log.skipped_records,
            "token_levels": {
                level: {"shape": [t, c], "bytes_per_image": t * c * itemsize} for level, (t, c) in self.token_shapes.items()
            },
            "extra_columns": self.extra_columns(),
            "layout": "segments" if self.segmented else "plain",
            "segments": len(self.segments or ()),
            "segments_dir": str(_segments_dir(self.path)) if self.segmented else "",
            "attrs": {k: v for k, v in self.attrs.items() if k not in ("fingerprint", "provenance", "segments")},
            "splits": by_split,
        }


def open_store(path: Path | str) -> EmbeddingStore:
    """Open a store for reading; a clear StoreError if it is missing, not HDF5, not a store or too new."""
    return EmbeddingStore(path)


def read_stores(paths: Sequence[Path | str], split: str | None = None) -> tuple[EmbeddingTable, dict[str, str]]:
    """Rows of several stores with one fingerprint, concatenated; refuses to mix fingerprints."""
    stores = [open_store(p) for p in paths]
    for store in stores[1:]:
        diff = fingerprint_mismatch(stores[0].fingerprint, store.fingerprint)
        if diff:
            raise StoreError(f"refusing to mix {stores[0].path} and {store.path}: fingerprints differ ({'; '.join(diff)})")
    return _concat([s.read(split) for s in stores]), stores[0].fingerprint


def level_tokens(stores: Sequence[Path | str], level: str) -> np.ndarray:
    """The tokens `[N, T, C]` of `level` (or of levels joined by "+", concatenated along C) of every row of the
    stores, in `read_stores` order."""
    names = [name.strip() for name in level.split("+") if name.strip()]
    opened = [open_store(s) for s in stores]
    for store in opened:
        missing = [name for name in names if name not in store.token_shapes]
        if missing:
            have = ", ".join(store.token_shapes) or "none (extract with --levels or --tokens)"
            raise MedembedError(f"{store.path}: no token level {missing[0]!r}; its levels: {have}")
    counts = {name: opened[0].token_shapes[name][0] for name in names}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise MedembedError(f"levels {level!r} cannot be concatenated: their token counts differ ({shown}); pool them to one grid (@RxC)")
    return np.concatenate([np.concatenate([store.read_tokens(name) for store in opened]) for name in names], axis=2)


def describe_preprocess(spec_json: str) -> str:
    """A store's or run's preprocessing JSON in words (see PreprocessSpec.describe); the JSON itself if not a plain spec."""
    try:
        return PreprocessSpec.from_dict(json.loads(spec_json)).describe()
    except (ValueError, TypeError, KeyError, MedembedError):
        return "(not a plain spec: see the JSON)"


SPLIT_ORDER = ("train", "val", "test")  # `medembed info` lists these first, in the protocol's order, then any others
NO_SPLIT = "(none)"  # summary()'s name for the rows without a split, listed last


def format_summary(summary: Mapping) -> list[str]:
    """The lines `medembed info` prints for `EmbeddingStore.summary()`: counts, fingerprint, provenance, splits.

    Keys stand in a 13-character column (`medembed info --verify` adds `verify` to it); the fingerprint's keys,
    some longer, in their own column inside it."""
    pending = summary.get("pending_rows", 0)
    note = ""
    if summary.get("being_written"):
        note = f"  ({pending} not yet folded: an extraction is writing this store now)" if pending else "  (an extraction is writing this store now)"
    elif pending:
        note = f"  ({pending} not yet folded: an extraction is running or was killed; rerun it to finish)"
    lines = [
        f"store        {summary['path']}",
        f"rows         {summary['rows']}{note}",
        f"dim, dtype   {summary['dim']}, {summary['dtype']}",
        f"failed       {summary['failed']}",
    ]
    for k, (level, info) in enumerate(summary.get("token_levels", {}).items()):
        t, c = info["shape"]
        lines.append(f"{'tokens' if k == 0 else '':<12} {level} [{t}, {c}] ({info['bytes_per_image']:,} bytes per image)")
    if summary.get("extra_columns"):
        lines.append(f"{'extra':<12} {', '.join(summary['extra_columns'])}")
    if summary.get("layout") == "segments":
        lines.append(
            f"{'layout':<12} {summary['segments']} segment(s) in {summary['segments_dir']}/ "
            f"(`medembed merge {summary['path']} --out {summary['path']}` consolidates them into one file)"
        )
    fingerprint = summary["fingerprint"]
    width = max(map(len, fingerprint), default=0)
    for k, (key, value) in enumerate(fingerprint.items()):
        lines.append(f"{'fingerprint' if k == 0 else '':<12} {key:<{width}}  {value if value != '' else '-'}")
    attrs = summary.get("attrs", {})
    if "preprocess" in attrs:
        lines += [f"{'preprocess':<12} {attrs['preprocess']}", f"{'':<12} = {describe_preprocess(attrs['preprocess'])}"]
    if "created" in attrs or "medembed_version" in attrs:
        written = " ".join([str(attrs.get("created", "")), f"by medembed {attrs['medembed_version']}" if "medembed_version" in attrs else ""])
        lines.append(f"{'created':<12} {written.strip()}")
    if "checksum" in summary:
        lines.append(f"{'checksum':<12} {summary['checksum']}" + ("" if summary["checksum"] != "none" else " (written before checksums)"))
    if summary.get("damaged"):
        lines.append(f"{'damaged':<12} {summary['damaged']}")
    if summary.get("log_skipped_records"):
        lines.append(f"{'log':<12} {summary['log_skipped_records']} damaged write-ahead-log record(s) skipped")
    provenance = summary.get("provenance") or {}
    if provenance:
        lines.append(f"{'provenance':<12} " + ", ".join(f"{key} {value or '?'}" for key, value in provenance.items()))
    else:
        lines.append(f"{'provenance':<12} (not recorded: store written before medembed recorded it)")
    splits = summary["splits"]
    names = sorted(splits, key=lambda name: SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER) + (name == NO_SPLIT))
    column = max([len("split"), *map(len, names)]) + 2
    lines.append(f"{'split':<{column}}{'rows':>8}{'normal':>8}{'abnormal':>10}{'unknown':>9}")
    for split in names:
        counts = splits[split]
        lines.append(f"{split:<{column}}{counts['rows']:>8}{counts['normal']:>8}{counts['abnormal']:>10}{counts['unknown']:>9}")
    return lines

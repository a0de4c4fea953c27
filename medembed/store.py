"""The HDF5 embedding store: schema, crash-safe append, resume, read, merge.

On disk a store is one HDF5 file, readable with plain h5py:

    embeddings   [N, D] float16|float32, chunked by rows
    image_id     [N] UTF-8 strings, aligned with embeddings
    label        [N] int8 (0 normal, 1 abnormal, -1 unknown)
    study_id, patient_id, body_part, split   [N] UTF-8 strings ("" where unknown)
    failed/image_id, failed/reason           images that could not be embedded, and why
    attrs        schema_version, fingerprint (JSON) and its fields, dim, dtype, medembed_version, created, ...

Crash safety. HDF5 itself is not safe against a process killed mid-write (its metadata cache can be half
flushed), so the writer never modifies the HDF5 file in place. Each appended batch goes to a write-ahead
log beside it (``<store>.wal``): one framed, CRC-checked record per batch, written with a single
``write``. A kill at any instant leaves at most a torn last record, which readers ignore and the next
writer truncates. The log is folded into the HDF5 file by copy -> append -> ``os.replace``, so the
``.h5`` is always a complete store; rows already present are skipped on fold, so a kill between the
replace and the log's removal never duplicates a row. Readers see the HDF5 rows plus any rows still in
the log. A writer holds an exclusive ``flock`` on ``<store>.lock``; a second writer is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from medembed import __version__
from medembed.errors import MedembedError

SCHEMA_VERSION = 1
# The attributes that must match for two sets of embeddings to be comparable (mixing, merging, applying a head).
FINGERPRINT_KEYS = ("encoder", "model_id", "revision", "weights_sha256", "embedding_kind", "preprocess_hash", "dtype")
STRING_COLUMNS = ("study_id", "patient_id", "body_part", "split")
COLUMNS = ("label",) + STRING_COLUMNS
DTYPES = ("float16", "float32")

_STR = h5py.string_dtype("utf-8")
_RECORD_MAGIC = b"MEWAL1\x00\x00"
_RECORD_HEAD = struct.Struct("<8sIQI")  # magic, header length, body length, crc32 of header + body
_TARGET_CHUNK_BYTES = 1 << 20


class StoreError(MedembedError):
    """A store that cannot be opened, written or combined as asked."""


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


def make_fingerprint(**fields: str) -> dict[str, str]:
    """A fingerprint dict with every key of FINGERPRINT_KEYS ('' where a field does not apply)."""
    unknown = set(fields) - set(FINGERPRINT_KEYS)
    if unknown:
        raise ValueError(f"unknown fingerprint fields: {sorted(unknown)}")
    return {key: str(fields.get(key, "")) for key in FINGERPRINT_KEYS}


def fingerprint_mismatch(expected: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Human-readable differences between two fingerprints; empty when they match."""
    return [
        f"{key}: {expected.get(key, '')!r} vs {actual.get(key, '')!r}"
        for key in FINGERPRINT_KEYS
        if str(expected.get(key, "")) != str(actual.get(key, ""))
    ]


# --------------------------------------------------------------------------------------------- reading


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise StoreError(f"{path}: not a readable HDF5 file ({error})") from None


def _check_schema(path: Path, f: h5py.File) -> None:
    version = f.attrs.get("schema_version")
    if version is None or "embeddings" not in f:
        raise StoreError(f"{path}: an HDF5 file but not a medembed embedding store (no schema_version/embeddings)")
    if int(version) > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {int(version)} is newer than this medembed supports "
            f"({SCHEMA_VERSION}); upgrade medembed"
        )


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    """A UTF-8 string dataset as a [N] object array of str."""
    return dataset.asstr()[:].astype(object)


class EmbeddingStore:
    """Read access to a store: its fingerprint, counts and rows (including rows still in the write-ahead log)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        with _open_h5(self.path) as f:
            _check_schema(self.path, f)
            self.attrs: dict[str, object] = {
                k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v)
                for k, v in f.attrs.items()
            }
            self.committed_rows = int(f["embeddings"].shape[0])
        self.fingerprint: dict[str, str] = json.loads(str(self.attrs["fingerprint"]))
        self.dim = int(self.attrs["dim"])
        self.dtype = str(self.attrs["dtype"])

    def _pending(self) -> list[dict]:
        return [record for record, _ in _read_log(_log_path(self.path), self.dim, self.dtype)]

    @property
    def pending_rows(self) -> int:
        """Rows in the write-ahead log, not yet folded into the HDF5 file (a running or killed extraction)."""
        committed = set(self._committed_ids())
        return sum(
            sum(1 for i in rec["ids"] if i not in committed) for rec in self._pending() if rec["kind"] == "rows"
        )

    def _committed_ids(self) -> np.ndarray:
        with _open_h5(self.path) as f:
            return _strings(f["image_id"])

    def __len__(self) -> int:
        return self.committed_rows + self.pending_rows

    def read(self, split: str | None = None) -> EmbeddingTable:
        """All rows (or one split's), embeddings [N, D] in the stored dtype with aligned ids and columns."""
        with _open_h5(self.path) as f:
            table = EmbeddingTable(
                f["embeddings"][:],
                _strings(f["image_id"]),
                {"label": f["label"][:].astype(np.int8), **{c: _strings(f[c]) for c in STRING_COLUMNS}},
            )
        pending = [rec for rec in self._pending() if rec["kind"] == "rows"]
        if pending:
            table = _concat([table] + [_record_table(rec) for rec in pending])
            _, first = np.unique(table.image_id.astype(str), return_index=True)
            table = table.subset(np.sort(first))
        if split is not None:
            table = table.subset(table.columns["split"] == split)
        return table

    def image_ids(self) -> set[str]:
        """Ids of every embedded row, committed or pending."""
        ids = set(self._committed_ids())
        for rec in self._pending():
            if rec["kind"] == "rows":
                ids.update(rec["ids"])
        return ids

    def failed(self) -> dict[str, str]:
        """Image id -> reason, for images that could not be embedded (and have not succeeded since)."""
        with _open_h5(self.path) as f:
            failed = dict(zip(_strings(f["failed/image_id"]), _strings(f["failed/reason"])))
        for rec in self._pending():
            for image_id in rec.get("ids", ()):
                failed.pop(image_id, None)
            failed.update(rec["failed"])
        return failed

    def summary(self) -> dict:
        """Rows, dim, dtype, fingerprint, failed count and label counts per split: what `medembed info` prints."""
        table = self.read()
        by_split: dict[str, dict[str, int]] = {}
        for split in sorted(set(table.columns["split"])):
            labels = table.label[table.columns["split"] == split]
            by_split[split or "(none)"] = {
                "rows": int(len(labels)),
                "normal": int((labels == 0).sum()),
                "abnormal": int((labels == 1).sum()),
                "unknown": int((labels < 0).sum()),
            }
        return {
            "path": str(self.path),
            "rows": len(table),
            "pending_rows": self.pending_rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "failed": len(self.failed()),
            "fingerprint": self.fingerprint,
            "attrs": {k: v for k, v in self.attrs.items() if k != "fingerprint"},
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


def _concat(tables: Sequence[EmbeddingTable]) -> EmbeddingTable:
    return EmbeddingTable(
        np.concatenate([t.embeddings for t in tables]),
        np.concatenate([t.image_id for t in tables]),
        {k: np.concatenate([t.columns[k] for t in tables]) for k in COLUMNS},
    )


# ----------------------------------------------------------------------------------- write-ahead log


def _log_path(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _encode_record(header: dict, body: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    crc = zlib.crc32(body, zlib.crc32(head))
    return _RECORD_HEAD.pack(_RECORD_MAGIC, len(head), len(body), crc) + head + body


def _read_log(path: Path, dim: int, dtype: str) -> Iterator[tuple[dict, int]]:
    """Complete records of a log, each with the byte offset just past it; stops at a torn or corrupt tail."""
    if not path.exists():
        return
    data = path.read_bytes()
    offset = 0
    while offset + _RECORD_HEAD.size <= len(data):
        magic, head_len, body_len, crc = _RECORD_HEAD.unpack_from(data, offset)
        start = offset + _RECORD_HEAD.size
        end = start + head_len + body_len
        if magic != _RECORD_MAGIC or end > len(data):
            return
        head, body = data[start : start + head_len], data[start + head_len : end]
        if zlib.crc32(body, zlib.crc32(head)) != crc:
            return
        record = json.loads(head)
        if record["kind"] == "rows":
            record["embeddings"] = np.frombuffer(body, dtype=dtype).reshape(len(record["ids"]), dim)
        offset = end
        yield record, offset


def _record_table(record: dict) -> EmbeddingTable:
    columns = record["columns"]
    return EmbeddingTable(
        record["embeddings"],
        np.asarray(record["ids"], dtype=object),
        {"label": np.asarray(columns["label"], dtype=np.int8), **{c: np.asarray(columns[c], dtype=object) for c in STRING_COLUMNS}},
    )


# ------------------------------------------------------------------------------------------- writing


class _WriterLock:
    """An exclusive flock on <store>.lock, released by the kernel if the process dies."""

    def __init__(self, store_path: Path) -> None:
        self.path = store_path.with_name(store_path.name + ".lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise StoreError(
                    f"{store_path}: another process (pid {holder}) is writing this store; "
                    "wait for it to finish or stop it (two writers on one store are refused)"
                ) from None
            # The previous holder may have unlinked the file between our open and flock: retry on the new one.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1


def _create_h5(path: Path, dim: int, dtype: str, fingerprint: Mapping[str, str], metadata: Mapping[str, object]) -> None:
    chunk_rows = max(1, _TARGET_CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", (0, dim), dtype=dtype, maxshape=(None, dim), chunks=(chunk_rows, dim))
        f.create_dataset("image_id", (0,), dtype=_STR, maxshape=(None,), chunks=(4096,))
        f.create_dataset("label", (0,), dtype=np.int8, maxshape=(None,), chunks=(4096,))
        for name in STRING_COLUMNS + ("failed/image_id", "failed/reason"):
            f.create_dataset(name, (0,), dtype=_STR, maxshape=(None,), chunks=(4096,))
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["fingerprint"] = json.dumps(dict(fingerprint), sort_keys=True)
        for key in FINGERPRINT_KEYS:
            f.attrs[key] = str(fingerprint.get(key, ""))
        f.attrs["dim"] = dim
        f.attrs["medembed_version"] = __version__
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for key, value in metadata.items():
            f.attrs[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_rows(f: h5py.File, table: EmbeddingTable) -> None:
    n0, n = f["embeddings"].shape[0], len(table)
    for name in ("embeddings", "image_id") + COLUMNS:
        f[name].resize(n0 + n, axis=0)
    f["embeddings"][n0:] = table.embeddings
    f["image_id"][n0:] = table.image_id.tolist()
    f["label"][n0:] = table.label
    for name in STRING_COLUMNS:
        f[name][n0:] = table.columns[name].tolist()


def _rewrite_failed(f: h5py.File, failed: Mapping[str, str]) -> None:
    for name, values in (("failed/image_id", list(failed)), ("failed/reason", list(failed.values()))):
        f[name].resize(len(values), axis=0)
        f[name][:] = values


class StoreWriter:
    """Appends batches to a store crash-safely; use as a context manager. One writer per store."""

    def __init__(
        self,
        path: Path | str,
        *,
        dim: int,
        fingerprint: Mapping[str, str],
        metadata: Mapping[str, object] | None = None,
        fold_every_rows: int = 50_000,
    ) -> None:
        self.path = Path(path)
        dtype = str(fingerprint.get("dtype", ""))
        if dtype not in DTYPES:
            raise StoreError(f"{self.path}: fingerprint dtype must be one of {DTYPES}, got {dtype!r}")
        self.dim, self.dtype = dim, dtype
        self.fold_every_rows = fold_every_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _WriterLock(self.path)
        try:
            if not self.path.exists():
                _create_h5(self.path, dim, dtype, fingerprint, metadata or {})
            self._check_compatible(fingerprint)
            # Finish whatever a killed writer left in the log.
            self._fold([record for record, _ in _read_log(_log_path(self.path), dim, dtype)])
            store = open_store(self.path)
            self._done = store.image_ids()
            self._failed = store.failed()
            self._log = open(_log_path(self.path), "ab")
        except BaseException:
            self._lock.release()
            raise
        self.fingerprint = dict(fingerprint)
        self._unfolded: list[dict] = []  # records in the log since the last fold, kept to fold without rereading
        self._logged_rows = 0

    def _check_compatible(self, fingerprint: Mapping[str, str]) -> None:
        store = open_store(self.path)
        diff = fingerprint_mismatch(store.fingerprint, fingerprint)
        if diff:
            raise StoreError(
                f"{self.path} was written with another encoder or preprocessing ({'; '.join(diff)} — store vs this run); "
                "write to a new store instead"
            )
        if store.dim != self.dim:
            raise StoreError(f"{self.path}: store has dim {store.dim}, this run produces {self.dim}")

    def done_ids(self, include_failed: bool = True) -> set[str]:
        """Ids already embedded (and, by default, already recorded as failed): what a resumed run skips."""
        return self._done | set(self._failed) if include_failed else set(self._done)

    def append(
        self,
        image_ids: Sequence[str],
        embeddings: np.ndarray,
        columns: Mapping[str, Sequence] | None = None,
        failed: Mapping[str, str] | None = None,
    ) -> None:
        """Append one batch: ids [B], embeddings [B, D] (cast to the store dtype), optional aligned columns,
        and the batch's failed images (id -> reason) in the same atomic record.

        Durable against SIGKILL once this returns. Ids already in the store are refused.
        """
        ids = [str(i) for i in image_ids]
        embeddings = np.ascontiguousarray(embeddings, dtype=self.dtype)
        if embeddings.shape != (len(ids), self.dim):
            raise StoreError(f"{self.path}: batch of {len(ids)} ids has embeddings of shape {embeddings.shape}, expected ({len(ids)}, {self.dim})")
        duplicates = [i for i in ids if i in self._done]
        if len(set(ids)) != len(ids):
            duplicates += sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise StoreError(f"{self.path}: image ids already in the store: {duplicates[:5]} ({len(duplicates)} in all)")
        columns = dict(columns or {})
        record_columns = {
            "label": [int(v) if str(v) not in ("", "-1", "None", "nan") else -1 for v in columns.get("label", [-1] * len(ids))],
            **{c: [str(v) for v in columns.get(c, [""] * len(ids))] for c in STRING_COLUMNS},
        }
        for name, values in record_columns.items():
            if len(values) != len(ids):
                raise StoreError(f"{self.path}: column {name!r} has {len(values)} values for {len(ids)} ids")
        failed = {str(k): str(v) for k, v in (failed or {}).items()}
        header = {"kind": "rows", "ids": ids, "columns": record_columns, "failed": failed}
        body = embeddings.tobytes()
        self._write(header, body)
        # Kept as a read-only view of the bytes written, so a caller reusing its buffer cannot change it.
        self._unfolded.append(dict(header, embeddings=np.frombuffer(body, dtype=self.dtype).reshape(embeddings.shape)))
        self._done.update(ids)
        for image_id in ids:
            self._failed.pop(image_id, None)
        self._failed.update(failed)
        self._logged_rows += len(ids)
        if self._logged_rows >= self.fold_every_rows:
            self.flush()

    def add_failed(self, image_ids: Sequence[str], reasons: Sequence[str]) -> None:
        """Record images that could not be embedded, with a short reason each."""
        ids, reasons = [str(i) for i in image_ids], [str(r) for r in reasons]
        if len(ids) != len(reasons):
            raise StoreError(f"{self.path}: {len(ids)} failed ids but {len(reasons)} reasons")
        if ids:
            header = {"kind": "failed", "failed": dict(zip(ids, reasons))}
            self._write(header, b"")
            self._unfolded.append(header)
            self._failed.update(zip(ids, reasons))

    def _write(self, header: dict, body: bytes) -> None:
        # One write call per record; the kernel keeps it even if this process is killed right after.
        self._log.write(_encode_record(header, body))
        self._log.flush()

    def flush(self) -> None:
        """Fold the log into the HDF5 file now (plain h5py readers then see every row)."""
        self._log.close()
        self._fold(self._unfolded)
        self._log = open(_log_path(self.path), "ab")
        self._unfolded, self._logged_rows = [], 0

    def _fold(self, records: Sequence[dict]) -> None:
        """Apply log records to a copy of the HDF5 file, swap it in atomically, then drop the log."""
        log = _log_path(self.path)
        if not records:
            log.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        shutil.copyfile(self.path, tmp)
        with h5py.File(tmp, "r+") as f:
            present = set(_strings(f["image_id"]))
            failed = dict(zip(_strings(f["failed/image_id"]), _strings(f["failed/reason"])))
            new_rows = []
            for record in records:
                if record["kind"] == "rows":
                    table = _record_table(record)
                    new = np.asarray([i not in present for i in table.image_id], dtype=bool)
                    new_rows.append(table if new.all() else table.subset(new))
                    present.update(record["ids"])
                    for image_id in record["ids"]:
                        failed.pop(image_id, None)
                failed.update(record["failed"])
            if new_rows:
                _append_rows(f, _concat(new_rows))
            _rewrite_failed(f, failed)
        _fsync(tmp)
        os.replace(tmp, self.path)
        _fsync(self.path.parent)
        log.unlink()

    def close(self) -> None:
        """Fold the log and release the lock."""
        if self._lock.fd < 0:
            return
        try:
            self._log.close()
            self._fold(self._unfolded)
        finally:
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_stores(inputs: Sequence[Path | str], out: Path | str) -> Path:
    """Join shard stores (one fingerprint, disjoint ids) into the store `out`.

    `out` may already exist (a resumed distributed run): it must have the same fingerprint, and rows it
    already holds are skipped. Ids present in two inputs are refused.
    """
    if not inputs:
        raise StoreError("merge needs at least one input store")
    stores = [open_store(p) for p in inputs]
    table, fingerprint = read_stores([s.path for s in stores])
    ids, counts = np.unique(table.image_id.astype(str), return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"shard stores overlap: image ids in more than one shard: {ids[counts > 1][:5].tolist()} ({int((counts > 1).sum())} in all)")
    skip = {"fingerprint", "schema_version", "dim", "created", "medembed_version", *FINGERPRINT_KEYS}
    metadata = {k: v for k, v in stores[0].attrs.items() if k not in skip}
    metadata["merged_from"] = json.dumps([str(s.path) for s in stores])
    failed: dict[str, str] = {}
    for store in stores:
        failed.update(store.failed())
    with StoreWriter(out, dim=stores[0].dim, fingerprint=fingerprint, metadata=metadata) as writer:
        table = table.subset(np.asarray([i not in writer.done_ids(include_failed=False) for i in table.image_id], dtype=bool))
        for start in range(0, len(table), 8192):
            part = table.subset(slice(start, start + 8192))
            writer.append(part.image_id, part.embeddings, part.columns)
        failed = {k: v for k, v in failed.items() if k not in writer.done_ids(include_failed=False)}
        if failed:
            writer.add_failed(list(failed), list(failed.values()))
    return Path(out)

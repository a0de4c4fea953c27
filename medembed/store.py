"""The HDF5 embedding store: schema, crash-safe append, resume, read, merge, verify.

On disk a store is one HDF5 file, readable with plain h5py:

    embeddings   [N, D] float16|float32, chunked by rows, fletcher32 checksum per chunk
    image_id     [N] UTF-8 strings, aligned with embeddings
    label        [N] int8 (0 normal, 1 abnormal, -1 unknown), fletcher32
    study_id, patient_id, body_part, split   [N] UTF-8 strings ("" where unknown)
    failed/image_id, failed/reason           images that could not be embedded, and why
    attrs        schema_version, fingerprint (JSON) and its fields, provenance (JSON), dim, dtype,
                 medembed_version, created, ...

Identity and provenance. The fingerprint (FINGERPRINT_KEYS) says which embeddings are comparable: two
stores, a store and a head, a store and a resumed run must agree on every key. `precision` is the
autocast precision the vectors were computed in (bf16, fp16, fp32) and `config_sha256` the checksum of
the checkpoint's config.json. Fingerprints recorded before those two keys existed lack them; a key a
fingerprint does not record is not compared (resuming such a store warns that it cannot be checked).
`provenance` (torch, transformers, medembed, python versions, GPU) is not identity: a resume or merge in
another environment warns (ProvenanceWarning) and goes on.

Crash safety. HDF5 itself is not safe against a process killed mid-write (its metadata cache can be half
flushed), so the writer never modifies the HDF5 file in place. Each appended batch goes to a write-ahead
log beside it (``<store>.wal``): one framed, CRC-checked record per batch, written with a single
``write``. A kill at any instant leaves at most a torn last record, which readers ignore and the next
writer drops; a damaged record in the middle is skipped (the reader resynchronises on the next intact
frame) and counted. The log is folded into the HDF5 file by copy -> apply -> ``os.replace``, so the
``.h5`` is always a complete store; rows already present are skipped on fold, so a kill between the
replace and the log's removal never duplicates a row. Records are "rows" (a batch, with the batch's
failed images), "failed" and "columns" (manifest metadata of rows already stored, refreshed after the
manifest was edited). Readers see the HDF5 rows plus whatever is still in the log. A writer holds an
exclusive ``flock`` on ``<store>.lock``; a second writer is refused.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import struct
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import h5py
import numpy as np

from medembed import __version__
from medembed._files import ExclusiveLock, LockBusy, is_locked
from medembed.errors import MedembedError
from medembed.images import PreprocessSpec

SCHEMA_VERSION = 1  # additive changes since (fingerprint keys, provenance, checksums) stay readable by older medembed
# The attributes that must match for two sets of embeddings to be comparable (mixing, merging, applying a head).
FINGERPRINT_KEYS = (
    "encoder", "model_id", "revision", "weights_sha256", "embedding_kind", "preprocess_hash", "dtype",
    "precision", "config_sha256",
)
# Keys added after stores were first written: a recorded fingerprint without them predates them.
LATER_FINGERPRINT_KEYS = ("precision", "config_sha256")
PRECISIONS = ("bf16", "fp16", "fp32")
STRING_COLUMNS = ("study_id", "patient_id", "body_part", "split")
COLUMNS = ("label",) + STRING_COLUMNS
DTYPES = ("float16", "float32")
PROVENANCE_KEYS = ("python", "medembed", "torch", "transformers", "numpy", "h5py", "gpu")

_STR = h5py.string_dtype("utf-8")
_RECORD_MAGIC = b"MEWAL1\x00\x00"
_RECORD_HEAD = struct.Struct("<8sIQI")  # magic, header length, body length, crc32 of header + body
_RECORD_KINDS = ("rows", "failed", "columns")
_TARGET_CHUNK_BYTES = 1 << 20
_UPDATE_BATCH = 10_000  # ids per "columns" log record


class StoreError(MedembedError):
    """A store that cannot be opened, written or combined as asked."""


class StoreWarning(UserWarning):
    """Something the store recovered from: skipped damaged log records, rows HDF5 cannot hold, an unchecked key."""


class ProvenanceWarning(UserWarning):
    """A store is resumed or merged in another environment (package versions, GPU) than it was created in."""


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
    """Human-readable differences between two fingerprints; empty when they match.

    A key of LATER_FINGERPRINT_KEYS that one side does not record at all (a store or run made before the
    key existed) is not compared; present on both sides, it must be equal ('' included). Other keys read
    as '' where absent.
    """
    return [
        f"{key}: {expected.get(key, '')!r} vs {actual.get(key, '')!r}"
        for key in FINGERPRINT_KEYS
        if not (key in LATER_FINGERPRINT_KEYS and (key not in expected or key not in actual))
        and str(expected.get(key, "")) != str(actual.get(key, ""))
    ]


def unrecorded_keys(recorded: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Keys `actual` sets (non-empty) that the older fingerprint `recorded` lacks, so could not be checked."""
    return [key for key in LATER_FINGERPRINT_KEYS if key not in recorded and str(actual.get(key, ""))]


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def collect_provenance(gpu: str = "") -> dict[str, str]:
    """The environment that computes embeddings: python, medembed, torch, transformers, numpy, h5py versions
    ('' for a package not installed; read from package metadata, nothing is imported) and `gpu` (the
    device name, "cpu", or '' when unknown)."""
    return {
        "python": platform.python_version(),
        "medembed": __version__,
        "torch": _package_version("torch"),
        "transformers": _package_version("transformers"),
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "gpu": str(gpu),
    }


def provenance_differences(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """'torch 2.12.0 -> 2.13.0' for each key both record (non-empty) with different values."""
    return [
        f"{key} {old[key]} -> {new[key]}"
        for key in sorted(set(old) & set(new), key=lambda k: (PROVENANCE_KEYS + (k,)).index(k))
        if str(old[key]) and str(new[key]) and str(old[key]) != str(new[key])
    ]


def text_problem(value: str) -> str | None:
    """Why HDF5 cannot store `value` as a UTF-8 string (a NUL byte, a lone surrogate), or None."""
    if not isinstance(value, str):
        return f"not a string ({type(value).__name__})"
    if "\x00" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it holds a lone surrogate, e.g. from an undecodable file name)"
    return None


def _storable_text(value: str) -> str:
    """`value` with what HDF5 cannot store escaped (for free text such as failure reasons)."""
    return str(value).replace("\x00", "\\0").encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------------------------- reading


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise StoreError(f"{path}: not a readable HDF5 file ({error})") from None


def _check_schema(path: Path, f: h5py.File) -> None:
    version_ = f.attrs.get("schema_version")
    if version_ is None or "embeddings" not in f:
        raise StoreError(f"{path}: an HDF5 file but not a medembed embedding store (no schema_version/embeddings)")
    if int(version_) > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {int(version_)} is newer than this medembed supports "
            f"({SCHEMA_VERSION}); upgrade medembed"
        )


def _read_dataset(path: Path, f: h5py.File, name: str) -> np.ndarray:
    """A whole dataset (strings as a [N] object array of str); a damaged chunk is a one-line StoreError."""
    try:
        dataset = f[name]
        return dataset.asstr()[:].astype(object) if dataset.dtype.kind == "O" else dataset[:]
    except OSError as error:
        raise StoreError(
            f"{path}: cannot read {name!r}, the file is damaged ({error}); "
            "`medembed info --verify` lists the damaged rows"
        ) from None


def _strings(dataset: h5py.Dataset) -> np.ndarray:
    """A UTF-8 string dataset as a [N] object array of str."""
    return dataset.asstr()[:].astype(object)


def _apply_updates(ids: np.ndarray, columns: dict[str, np.ndarray], updates: Mapping[str, Mapping[str, object]]) -> set[str]:
    """Set the updated column values of the rows whose id is in `updates`, in place; the columns changed."""
    if not updates:
        return set()
    index = {image_id: row for row, image_id in enumerate(ids)}
    changed: set[str] = set()
    for image_id, values in updates.items():
        row = index.get(image_id)
        if row is None:
            continue
        for name, value in values.items():
            if columns[name][row] != value:
                columns[name][row] = value
                changed.add(name)
    return changed


def _pending_updates(records: Sequence[dict]) -> dict[str, dict[str, object]]:
    """id -> {column: value} of the log's "columns" records, later records winning."""
    updates: dict[str, dict[str, object]] = {}
    for record in records:
        if record["kind"] == "columns":
            for k, image_id in enumerate(record["ids"]):
                updates.setdefault(image_id, {}).update({c: values[k] for c, values in record["columns"].items()})
    return updates


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
            self.checksummed = bool(f["embeddings"].fletcher32)
        self.fingerprint: dict[str, str] = json.loads(str(self.attrs["fingerprint"]))
        self.provenance: dict[str, str] = json.loads(str(self.attrs.get("provenance", "{}")))
        self.dim = int(self.attrs["dim"])
        self.dtype = str(self.attrs["dtype"])

    def _log(self) -> _LogScan:
        return _scan_log(_log_path(self.path), self.dim, self.dtype)

    def _pending(self) -> list[dict]:
        return self._log().records

    @property
    def pending_rows(self) -> int:
        """Rows in the write-ahead log, not yet folded into the HDF5 file (a running or killed extraction)."""
        committed = set(self._committed_ids())
        return sum(
            sum(1 for i in rec["ids"] if i not in committed) for rec in self._pending() if rec["kind"] == "rows"
        )

    def _committed_ids(self) -> np.ndarray:
        with _open_h5(self.path) as f:
            return _read_dataset(self.path, f, "image_id")

    def __len__(self) -> int:
        return self.committed_rows + self.pending_rows

    def _table(self, with_embeddings: bool) -> EmbeddingTable:
        with _open_h5(self.path) as f:
            table = EmbeddingTable(
                _read_dataset(self.path, f, "embeddings") if with_embeddings else np.zeros((0, 0), self.dtype),
                _read_dataset(self.path, f, "image_id"),
                {"label": _read_dataset(self.path, f, "label").astype(np.int8), **{c: _read_dataset(self.path, f, c) for c in STRING_COLUMNS}},
            )
        if not with_embeddings:
            table.embeddings = np.zeros((len(table), 0), self.dtype)
        records = self._pending()
        pending = [rec for rec in records if rec["kind"] == "rows"]
        if pending:
            tables = [_record_table(rec) for rec in pending]
            if not with_embeddings:
                for t in tables:
                    t.embeddings = np.zeros((len(t), 0), self.dtype)
            table = _concat([table] + tables)
            _, first = np.unique(table.image_id.astype(str), return_index=True)
            table = table.subset(np.sort(first))
        _apply_updates(table.image_id, table.columns, _pending_updates(records))
        return table

    def read(self, split: str | None = None) -> EmbeddingTable:
        """All rows (or one split's), embeddings [N, D] in the stored dtype with aligned ids and columns."""
        table = self._table(with_embeddings=True)
        if split is not None:
            table = table.subset(table.columns["split"] == split)
        return table

    def read_columns(self) -> EmbeddingTable:
        """Every row's id and manifest columns without reading the embeddings (`embeddings` is [N, 0])."""
        return self._table(with_embeddings=False)

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

        Reads every chunk of every dataset (HDF5 checks each fletcher32 chunk checksum as it reads; a store
        written before checksums were added is read without them), checks that the columns are aligned,
        ids unique, labels in {-1, 0, 1} and embeddings finite, and that the write-ahead log has no
        damaged records.
        """
        problems: list[str] = []
        with _open_h5(self.path) as f:
            n = f["embeddings"].shape[0]
            for name in ("embeddings", "image_id") + COLUMNS + ("failed/image_id", "failed/reason"):
                if name not in f:
                    problems.append(f"dataset {name!r} is missing")
                    continue
                dataset = f[name]
                expected = len(f["failed/image_id"]) if name.startswith("failed/") and "failed/image_id" in f else n
                if dataset.shape[0] != expected:
                    problems.append(f"{name!r} has {dataset.shape[0]} rows, expected {expected}")
                step = dataset.chunks[0] if dataset.chunks else max(1, dataset.shape[0])
                for start in range(0, dataset.shape[0], step):
                    try:
                        block = dataset[start : start + step]
                    except OSError as error:
                        problems.append(f"{name!r} rows {start}-{min(start + step, dataset.shape[0]) - 1} are damaged ({error})")
                        continue
                    if name == "embeddings":
                        bad = ~np.isfinite(block.astype(np.float32)).all(axis=1)
                        if bad.any():
                            problems.append(f"embeddings rows {(np.flatnonzero(bad) + start)[:5].tolist()} are not finite ({int(bad.sum())} in rows {start}-{start + len(block) - 1})")
                    elif name == "label":
                        bad = ~np.isin(block, (-1, 0, 1))
                        if bad.any():
                            problems.append(f"label rows {(np.flatnonzero(bad) + start)[:5].tolist()} hold values outside -1/0/1")
            if "image_id" in f:
                try:
                    ids, counts = np.unique(_strings(f["image_id"]).astype(str), return_counts=True)
                except OSError:
                    ids, counts = np.array([]), np.array([], dtype=int)
                if (counts > 1).any():
                    problems.append(f"image ids stored more than once: {ids[counts > 1][:5].tolist()} ({int((counts > 1).sum())} in all)")
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
        """Rows, dim, dtype, fingerprint, provenance, failed count and label counts per split: what `medembed info` prints."""
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
        return {
            "path": str(self.path),
            "rows": len(table) if table is not None else self.committed_rows,
            "damaged": damaged,
            "pending_rows": self.pending_rows,
            "being_written": self.being_written(),
            "dim": self.dim,
            "dtype": self.dtype,
            "failed": len(self.failed()),
            "fingerprint": self.fingerprint,
            "provenance": self.provenance,
            "checksum": "fletcher32" if self.checksummed else "none",
            "log_skipped_records": log.skipped_records,
            "attrs": {k: v for k, v in self.attrs.items() if k not in ("fingerprint", "provenance")},
            "splits": by_split,
        }


def describe_preprocess(spec_json: str) -> str:
    """A store's or run's preprocessing JSON in words (see PreprocessSpec.describe); the JSON itself if not a plain spec."""
    try:
        return PreprocessSpec.from_dict(json.loads(spec_json)).describe()
    except (ValueError, TypeError, KeyError, MedembedError):
        return "(not a plain spec: see the JSON)"


def format_summary(summary: Mapping) -> list[str]:
    """The lines `medembed info` prints for `EmbeddingStore.summary()`: counts, fingerprint, provenance, splits."""
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
    lines += [f"{key:<12} {value}" for key, value in summary["fingerprint"].items()]
    attrs = summary.get("attrs", {})
    if "preprocess" in attrs:
        lines += [f"{'preprocess':<12} {attrs['preprocess']}", f"{'':<12} = {describe_preprocess(attrs['preprocess'])}"]
    lines += [f"{key:<12} {attrs[key]}" for key in ("medembed_version", "created") if key in attrs]
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
    lines.append(f"{'split':<8}{'rows':>8}{'normal':>8}{'abnormal':>10}{'unknown':>9}")
    for split, counts in summary["splits"].items():
        lines.append(f"{split:<8}{counts['rows']:>8}{counts['normal']:>8}{counts['abnormal']:>10}{counts['unknown']:>9}")
    return lines


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


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _encode_record(header: dict, body: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    crc = zlib.crc32(body, zlib.crc32(head))
    return _RECORD_HEAD.pack(_RECORD_MAGIC, len(head), len(body), crc) + head + body


@dataclass
class _LogScan:
    """The intact records of a log, and what was skipped to get them."""

    records: list[dict] = field(default_factory=list)
    skipped_records: int = 0  # damaged frames skipped before a later intact one
    skipped_bytes: int = 0
    torn_tail: int = 0  # bytes of an incomplete last record (a writer killed mid-write)
    dropped: list[str] = field(default_factory=list)  # entries of intact records that HDF5 cannot store


def _parse_frame(data: bytes, offset: int, dim: int, itemsize: int) -> tuple[dict, bytes, int] | None:
    """(header, body, end offset) of an intact record starting at `offset`, or None."""
    if offset + _RECORD_HEAD.size > len(data):
        return None
    magic, head_len, body_len, crc = _RECORD_HEAD.unpack_from(data, offset)
    start = offset + _RECORD_HEAD.size
    end = start + head_len + body_len
    if magic != _RECORD_MAGIC or end > len(data):
        return None
    head, body = data[start : start + head_len], data[start + head_len : end]
    if zlib.crc32(body, zlib.crc32(head)) != crc:
        return None
    try:
        record = json.loads(head)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("kind") not in _RECORD_KINDS:
        return None
    if record["kind"] == "rows" and len(body) != len(record.get("ids", ())) * dim * itemsize:
        return None
    return record, body, end


def _scan_log(path: Path, dim: int, dtype: str) -> _LogScan:
    """Every intact record of a log, in order. A damaged frame is skipped by resynchronising on the next
    intact one (counted in `skipped_records`); damage with no intact frame after it is a torn tail."""
    scan = _LogScan()
    if not path.exists():
        return scan
    data = path.read_bytes()
    itemsize = np.dtype(dtype).itemsize
    offset = 0
    while offset < len(data):
        parsed = _parse_frame(data, offset, dim, itemsize)
        if parsed is None:
            resume = data.find(_RECORD_MAGIC, offset + 1)
            while resume != -1 and _parse_frame(data, resume, dim, itemsize) is None:
                resume = data.find(_RECORD_MAGIC, resume + 1)
            if resume == -1:
                scan.torn_tail = len(data) - offset
                break
            damaged = data[offset:resume]
            scan.skipped_records += max(1, damaged.count(_RECORD_MAGIC))
            scan.skipped_bytes += len(damaged)
            offset = resume
            continue
        record, body, offset = parsed
        if record["kind"] == "rows":
            record["embeddings"] = np.frombuffer(body, dtype=dtype).reshape(len(record["ids"]), dim)
        scan.dropped += _clean_record(record)
        scan.records.append(record)
    return scan


def _clean_record(record: dict) -> list[str]:
    """Remove, in place, the entries of a record HDF5 cannot store (ids or columns with a NUL byte or a lone
    surrogate, written by an older medembed); returns them, described. Failure reasons are escaped instead."""
    dropped: list[str] = []
    if record["kind"] in ("rows", "columns"):
        columns = record.get("columns", {})
        keep = []
        for k, image_id in enumerate(record["ids"]):
            bad = text_problem(image_id) or next(
                (f"{c} {text_problem(values[k])}" for c, values in columns.items() if c != "label" and text_problem(values[k])), None
            )
            if bad:
                dropped.append(f"{image_id!r} ({bad})")
            else:
                keep.append(k)
        if len(keep) < len(record["ids"]):
            record["ids"] = [record["ids"][k] for k in keep]
            record["columns"] = {c: [values[k] for k in keep] for c, values in columns.items()}
            if record["kind"] == "rows":
                record["embeddings"] = record["embeddings"][keep]
    failed = record.get("failed", {})
    if failed:
        clean = {}
        for image_id, reason in failed.items():
            bad = text_problem(image_id)
            if bad:
                dropped.append(f"{image_id!r} ({bad})")
            else:
                clean[image_id] = _storable_text(reason)
        record["failed"] = clean
    return dropped


def _record_table(record: dict) -> EmbeddingTable:
    columns = record["columns"]
    return EmbeddingTable(
        record["embeddings"],
        np.asarray(record["ids"], dtype=object).reshape(-1),
        {"label": np.asarray(columns["label"], dtype=np.int8).reshape(-1), **{c: np.asarray(columns[c], dtype=object).reshape(-1) for c in STRING_COLUMNS}},
    )


# ------------------------------------------------------------------------------------------- writing


def _writer_lock(store_path: Path) -> ExclusiveLock:
    """The store's writer lock (<store>.lock): one writer at a time, released by the kernel if it dies."""
    try:
        return ExclusiveLock(_lock_path(store_path))
    except LockBusy as busy:
        raise StoreError(
            f"{store_path}: another process (pid {busy.holder}) is writing this store; "
            "wait for it to finish or stop it (two writers on one store are refused)"
        ) from None


def _create_h5(
    path: Path,
    dim: int,
    dtype: str,
    fingerprint: Mapping[str, str],
    metadata: Mapping[str, object],
    provenance: Mapping[str, str],
) -> None:
    chunk_rows = max(1, _TARGET_CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", (0, dim), dtype=dtype, maxshape=(None, dim), chunks=(chunk_rows, dim), fletcher32=True)
            f.create_dataset("image_id", (0,), dtype=_STR, maxshape=(None,), chunks=(4096,))
            f.create_dataset("label", (0,), dtype=np.int8, maxshape=(None,), chunks=(4096,), fletcher32=True)
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
            f.attrs["provenance"] = json.dumps(dict(provenance))
        _fsync(tmp)
    except (OSError, RuntimeError) as error:  # e.g. no space left: HDF5's message spans lines
        tmp.unlink(missing_ok=True)
        reason = os.strerror(error.errno) if getattr(error, "errno", None) else str(error).splitlines()[0]
        raise StoreError(f"{path}: cannot create the store ({reason} under {path.parent})") from None
    os.replace(tmp, path)
    _fsync(path.parent)


def _open_log(store_path: Path):
    """The store's write-ahead log, opened unbuffered for appending."""
    return open(_log_path(store_path), "ab", buffering=0)


def _fold_bound(path: Path, records: Sequence[dict], dim: int, dtype: str) -> int:
    """An upper bound of the bytes a fold of `records` adds to a copy of the store `path`: every chunk it
    may write anew (embeddings, labels, string columns rewritten by updates and the failed table) and the
    strings' heap, with a margin for HDF5's own metadata."""
    rows = sum(len(r["ids"]) for r in records if r["kind"] == "rows")
    strings = sum(
        len(str(v).encode("utf-8", "replace")) + 32
        for r in records
        for values in ([r.get("ids", [])] + [v for k, v in r.get("columns", {}).items() if k != "label"])
        for v in values
    )
    with h5py.File(path, "r") as f:
        n = int(f["embeddings"].shape[0])
        chunk_rows = (f["embeddings"].chunks or (max(1, n),))[0]
        failed = len(f["failed/image_id"])
    failed += sum(len(r.get("failed", {})) for r in records)
    strings += sum(len(str(k)) + len(str(v)) + 64 for r in records for k, v in r.get("failed", {}).items())
    chunk_bytes = chunk_rows * dim * np.dtype(dtype).itemsize + 4096
    embeddings = ((n + rows) // chunk_rows - n // chunk_rows + 2) * chunk_bytes
    total_rows = n + rows
    updated = any(r["kind"] == "columns" for r in records)
    # string columns (16-byte heap references, chunks of 4096) and labels; columns updates rewrite whole columns
    columns = 6 * ((rows if not updated else total_rows) // 4096 + 2) * (4096 * 16 + 4096)
    columns += (2 * failed // 4096 + 4) * (4096 * 16 + 4096) + (total_rows * 5 * 48 if updated else 0) + failed * 96
    return int(1.25 * (embeddings + columns + strings)) + (1 << 20)


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


def _apply_updates_h5(f: h5py.File, updates: Mapping[str, Mapping[str, object]]) -> None:
    """Rewrite the columns of stored rows that "columns" records changed (whole columns, only those changed)."""
    names = sorted({name for values in updates.values() for name in values})
    columns = {name: (f[name][:].astype(np.int8) if name == "label" else _strings(f[name])) for name in names}
    for name in _apply_updates(_strings(f["image_id"]), columns, updates):
        f[name][:] = columns[name] if name == "label" else columns[name].tolist()


def _rewrite_failed(f: h5py.File, failed: Mapping[str, str]) -> None:
    for name, values in (("failed/image_id", list(failed)), ("failed/reason", list(failed.values()))):
        f[name].resize(len(values), axis=0)
        f[name][:] = values


def _label_value(value: object) -> int:
    return int(value) if str(value) not in ("", "-1", "None", "nan") else -1


class StoreWriter:
    """Appends batches to a store crash-safely; use as a context manager. One writer per store.

    `provenance` (see `collect_provenance`, the default) is recorded when the store is created; resuming a
    store created in another environment warns (ProvenanceWarning), naming what differs.
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
    ) -> None:
        self.path = Path(path)
        dtype = str(fingerprint.get("dtype", ""))
        if dtype not in DTYPES:
            raise StoreError(f"{self.path}: fingerprint dtype must be one of {DTYPES}, got {dtype!r}")
        self.dim, self.dtype = dim, dtype
        self.fold_every_rows = fold_every_rows
        self.provenance = dict(provenance) if provenance is not None else collect_provenance()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _writer_lock(self.path)
        try:
            if not self.path.exists():
                _create_h5(self.path, dim, dtype, fingerprint, metadata or {}, self.provenance)
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
            self._fold(scan.records)
            store = open_store(self.path)
            self._done = store.image_ids()
            self._failed = store.failed()
            self._log = _open_log(self.path)
        except BaseException:
            self._lock.release()
            raise
        self.fingerprint = dict(fingerprint)
        self._unfolded: list[dict] = []  # records in the log since the last fold, kept to fold without rereading
        self._logged_rows = 0
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

    def _normalise_columns(self, ids: list[str], columns: Mapping[str, Sequence] | None) -> dict[str, list]:
        columns = dict(columns or {})
        record_columns = {
            "label": [_label_value(v) for v in columns.get("label", [-1] * len(ids))],
            **{c: [str(v) for v in columns.get(c, [""] * len(ids))] for c in STRING_COLUMNS},
        }
        for name, values in record_columns.items():
            if len(values) != len(ids):
                raise StoreError(f"{self.path}: column {name!r} has {len(values)} values for {len(ids)} ids")
        for name in STRING_COLUMNS:
            for image_id, value in zip(ids, record_columns[name]):
                self._check_text(image_id, value, name)
        return record_columns

    def append(
        self,
        image_ids: Sequence[str],
        embeddings: np.ndarray,
        columns: Mapping[str, Sequence] | None = None,
        failed: Mapping[str, str] | None = None,
    ) -> None:
        """Append one batch: ids [B], embeddings [B, D] (cast to the store dtype), optional aligned columns,
        and the batch's failed images (id -> reason) in the same atomic record.

        Durable against SIGKILL once this returns. Ids already in the store are refused, and so are ids or
        column values HDF5 cannot store (a NUL byte, a lone surrogate): nothing of the batch is logged then.
        """
        ids = [str(i) for i in image_ids]
        for image_id in ids:
            self._check_text(image_id, image_id, "image_id")
        embeddings = np.ascontiguousarray(embeddings, dtype=self.dtype)
        if embeddings.shape != (len(ids), self.dim):
            raise StoreError(f"{self.path}: batch of {len(ids)} ids has embeddings of shape {embeddings.shape}, expected ({len(ids)}, {self.dim})")
        duplicates = [i for i in ids if i in self._done]
        if len(set(ids)) != len(ids):
            duplicates += sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise StoreError(f"{self.path}: image ids already in the store: {duplicates[:5]} ({len(duplicates)} in all)")
        record_columns = self._normalise_columns(ids, columns)
        failed = self._failed_entries(failed or {})
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
        """Set the manifest columns (label, study_id, patient_id, body_part, split) of rows already stored, e.g.
        after the manifest was edited; ids not stored are ignored. Only the given columns are changed.

        Returns how many rows' values changed. Logged like a batch (durable once this returns, applied on fold).
        """
        ids = [str(i) for i in image_ids]
        unknown = set(columns) - set(COLUMNS)
        if unknown:
            raise StoreError(f"{self.path}: cannot update columns {sorted(unknown)}; only {', '.join(COLUMNS)}")
        given = {name: list(values) for name, values in columns.items()}
        for name, values in given.items():
            if len(values) != len(ids):
                raise StoreError(f"{self.path}: column {name!r} has {len(values)} values for {len(ids)} ids")
        new = {name: [_label_value(v) for v in values] if name == "label" else [str(v) for v in values] for name, values in given.items()}
        for name in STRING_COLUMNS:
            for image_id, value in zip(ids, new.get(name, ())):
                self._check_text(image_id, value, name)
        current = open_store(self.path).read_columns()
        index = {image_id: row for row, image_id in enumerate(current.image_id)}
        changed = [
            k for k, image_id in enumerate(ids)
            if image_id in index and any(current.columns[name][index[image_id]] != values[k] for name, values in new.items())
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
        """Fold the log into the HDF5 file now (plain h5py readers then see every row)."""
        self._log.close()
        self._fold(self._unfolded)
        self._log = _open_log(self.path)
        self._unfolded, self._logged_rows = [], 0

    def _fold(self, records: Sequence[dict]) -> None:
        """Apply log records to a copy of the HDF5 file, swap it in atomically, then drop the log."""
        log = _log_path(self.path)
        if not records:
            log.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        # HDF5 does not survive running out of space mid-write (h5py crashes the process, up to a segfault at
        # exit), so the space the fold can need is reserved first: a disk too full is a StoreError, with
        # the .h5 and the log untouched.
        try:
            shutil.copyfile(self.path, tmp)
            _reserve(tmp, _fold_bound(self.path, records, self.dim, self.dtype))
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise StoreError(
                f"{self.path}: cannot fold the write-ahead log into the store ({error.strerror or error} "
                f"under {self.path.parent}); nothing was lost: make room and rerun to finish"
            ) from None
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
                failed.update(record.get("failed", {}))
            if new_rows:
                _append_rows(f, _concat(new_rows))
            updates = _pending_updates(records)
            if updates:
                _apply_updates_h5(f, updates)
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
            if not self._log_failed:  # after a failed append the log stays for the next run to fold
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
    already holds are skipped. Ids present in two inputs are refused. Inputs created in different
    environments warn (ProvenanceWarning); `out` records the first input's provenance.
    """
    if not inputs:
        raise StoreError("merge needs at least one input store")
    stores = [open_store(p) for p in inputs]
    table, fingerprint = read_stores([s.path for s in stores])
    ids, counts = np.unique(table.image_id.astype(str), return_counts=True)
    if (counts > 1).any():
        raise StoreError(f"shard stores overlap: image ids in more than one shard: {ids[counts > 1][:5].tolist()} ({int((counts > 1).sum())} in all)")
    for store in stores[1:]:
        differences = provenance_differences(stores[0].provenance, store.provenance)
        if differences:
            warnings.warn(
                f"merging stores made in different environments: {stores[0].path} vs {store.path}: {'; '.join(differences)}",
                ProvenanceWarning,
                stacklevel=2,
            )
    skip = {"fingerprint", "schema_version", "dim", "created", "medembed_version", "provenance", *FINGERPRINT_KEYS}
    metadata = {k: v for k, v in stores[0].attrs.items() if k not in skip}
    metadata["merged_from"] = json.dumps([str(s.path) for s in stores])
    failed: dict[str, str] = {}
    for store in stores:
        failed.update(store.failed())
    with StoreWriter(out, dim=stores[0].dim, fingerprint=fingerprint, metadata=metadata, provenance=stores[0].provenance) as writer:
        table = table.subset(np.asarray([i not in writer.done_ids(include_failed=False) for i in table.image_id], dtype=bool))
        for start in range(0, len(table), 8192):
            part = table.subset(slice(start, start + 8192))
            writer.append(part.image_id, part.embeddings, part.columns)
        failed = {k: v for k, v in failed.items() if k not in writer.done_ids(include_failed=False)}
        if failed:
            writer.add_failed(list(failed), list(failed.values()))
    return Path(out)

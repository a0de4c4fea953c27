"""The HDF5 embedding store: schema, crash-safe linear append, resume, read, merge, consolidate, verify.

A finished store is one plain HDF5 file, readable with plain h5py:

    embeddings   [N, D] float16|float32, chunked by rows, fletcher32 checksum per chunk
    image_id     [N] UTF-8 strings, aligned with embeddings
    label        [N] int8 (0 normal, 1 abnormal, -1 unknown), fletcher32
    study_id, patient_id, body_part, split   [N] UTF-8 strings ("" where unknown)
    extra/<name> [N] UTF-8 strings: further manifest columns (view, site, ...), "" for rows written before
    tokens/<lv>  [N, T, C] token grids of each level (attrs token_levels: {level: [T, C]}), fletcher32
    failed/image_id, failed/reason           images that could not be embedded, and why
    attrs        schema_version, fingerprint (JSON) and its fields, provenance (JSON), dim, dtype,
                 medembed_version, created, ...

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

Identity and provenance. The fingerprint (FINGERPRINT_KEYS) says which embeddings are comparable: two
stores, a store and a head, a store and a resumed run must agree on every key. `precision` is the
autocast precision the vectors were computed in (bf16, fp16, fp32), `config_sha256` the checksum of
the checkpoint's config.json and `levels` the encoder's canonical string of the token levels it keeps.
Fingerprints recorded before those keys existed lack them; a key a fingerprint does not record is not
compared (resuming such a store warns that it cannot be checked). `provenance` (torch, transformers,
medembed, python versions, GPU) is not identity: a resume or merge in another environment warns
(ProvenanceWarning) and goes on.

Crash safety. HDF5 itself is not safe against a process killed mid-write (its metadata cache can be half
flushed), so the writer never modifies an HDF5 file in place. Each appended batch goes to a write-ahead
log beside it (``<store>.wal``): one framed, CRC-checked record per batch, written with a single
``write``. A kill at any instant leaves at most a torn last record, which readers ignore and the next
writer drops; a damaged record in the middle is skipped (the reader resynchronises on the next intact
frame) and counted. Every ``fold_every_rows`` rows the log is folded: its rows go to a new segment
(temp file, fsync, rename) and a new index listing it replaces the old one (temp, fsync, ``os.replace``),
so a fold costs what it adds, not what the store holds. Rows already stored are skipped on fold, so a
kill between the replace and the log's removal never duplicates a row; segments no index lists (a kill
before the replace) are removed by the next writer. At the end of a run the store is consolidated into
one plain file (temp, fsync, replace) when that is cheap relative to the run (see
`StoreWriter.close`), else by `medembed merge <store> --out <store>`. Records are "rows" (a batch, its
token grids and the batch's failed images), "failed" and "columns" (manifest metadata of rows already
stored, refreshed after the manifest was edited). Readers see the stored rows plus whatever is still in
the log. A writer holds an exclusive ``flock`` on ``<store>.lock``; a second writer is refused.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import struct
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import unquote

import h5py
import numpy as np

from medembed import __version__
from medembed._files import ExclusiveLock, LockBusy, is_locked
from medembed.errors import MedembedError
from medembed.data.images import PreprocessSpec
from medembed.options.extract import DTYPES

SCHEMA_VERSION = 2  # 2: the segmented layout (an index file); plain files are still written as 1
PLAIN_SCHEMA_VERSION = 1  # additive changes since (fingerprint keys, provenance, checksums, tokens, extra) stay readable
# The attributes that must match for two sets of embeddings to be comparable (mixing, merging, applying a head).
FINGERPRINT_KEYS = (
    "encoder", "model_id", "revision", "weights_sha256", "embedding_kind", "preprocess_hash", "dtype",
    "precision", "config_sha256", "levels",
)
# Keys added after stores were first written: a recorded fingerprint without them predates them.
LATER_FINGERPRINT_KEYS = ("precision", "config_sha256", "levels")
STRING_COLUMNS = ("study_id", "patient_id", "body_part", "split")
COLUMNS = ("label",) + STRING_COLUMNS
PROVENANCE_KEYS = ("python", "medembed", "torch", "transformers", "numpy", "h5py", "gpu")

_STR = h5py.string_dtype("utf-8")
_RECORD_MAGIC = b"MEWAL1\x00\x00"
_RECORD_HEAD = struct.Struct("<8sIQI")  # magic, header length, body length, crc32 of header + body
_RECORD_KINDS = ("rows", "failed", "columns")
_TARGET_CHUNK_BYTES = 1 << 20
_UPDATE_BATCH = 10_000  # ids per "columns" log record
_COPY_ROWS_BYTES = 64 << 20  # row data is written in blocks of about this size (bounded extra memory)
_FOLD_BYTES = 1 << 30  # a fold also happens once the log holds this much (token grids make rows large)
# A store whose rows take at most this is consolidated at the end of every run (the copy is cheap anyway).
_ALWAYS_CONSOLIDATE_BYTES = 256 << 20
_RESERVED_NAMES = ("image_id", "embeddings", "failed", "tokens", "extra")
_SEGMENT_NAME = re.compile(r"seg-[0-9]{6,}\.h5")  # what the writer names segments (seg-000001.h5)


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



# ----------------------------------------------------------------------------------------------- names


def _h5_name(name: str) -> str:
    """A level or column name as one HDF5 link name: '/' (a path separator there) and '%' are %-escaped,
    and so is a leading '.' ('.' alone names the group itself)."""
    encoded = name.replace("%", "%25").replace("/", "%2F")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def _name_of(h5_name: str) -> str:
    """The name `_h5_name` encoded."""
    return unquote(h5_name)


def _tokens_dataset(level: str) -> str:
    return f"tokens/{_h5_name(level)}"


def _extra_dataset(column: str) -> str:
    return f"extra/{_h5_name(column)}"


def _check_name(path: Path, name: object, what: str) -> str:
    """`name` if it can name a token level or an extra column, else a one-line StoreError."""
    problem = "is empty" if name == "" else text_problem(name)
    if problem:
        raise StoreError(f"{path}: {what} name {name!r} cannot be stored: it {problem}")
    return str(name)


def normalise_token_shapes(path: Path, tokens: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, int]]:
    """{level: (T, C)} with positive ints, in sorted level order; a one-line StoreError on a bad entry."""
    shapes: dict[str, tuple[int, int]] = {}
    for level in sorted(tokens or {}, key=str):
        shape = tuple(tokens[level]) if isinstance(tokens[level], (tuple, list)) else ()
        if len(shape) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in shape):
            raise StoreError(f"{path}: token level {level!r} needs a shape (T, C) of two positive ints, got {tokens[level]!r}")
        shapes[_check_name(path, level, "token level")] = (int(shape[0]), int(shape[1]))
    return shapes


def _describe_levels(shapes: Mapping[str, tuple[int, int]]) -> str:
    return ", ".join(f"{level} {t}x{c}" for level, (t, c) in shapes.items()) or "none"


# --------------------------------------------------------------------------------------------- reading


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


def _extras_in(f: h5py.File) -> list[str]:
    return sorted(_name_of(name) for name in f["extra"]) if "extra" in f else []


@dataclass
class _Source:
    """A file holding rows of a store: the plain file itself or one segment; `first` is its first row."""

    path: Path
    rows: int
    first: int
    extra: list[str]
    label: str  # how problems name it: '' for a plain file, 'segment seg-000001.h5 ' otherwise


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


def _pending_updates(records: Sequence[dict]) -> dict[str, dict[str, object]]:
    """id -> {column: value} of the log's "columns" records, later records winning."""
    updates: dict[str, dict[str, object]] = {}
    for record in records:
        if record["kind"] == "columns":
            for k, image_id in enumerate(record["ids"]):
                updates.setdefault(image_id, {}).update({c: values[k] for c, values in record["columns"].items()})
    return updates


def _kept_pending(committed: set[str], records: Sequence[dict]) -> list[tuple[dict, np.ndarray]]:
    """The log's "rows" records with a mask of the rows readers keep: not stored already, first occurrence.
    (`committed` is not copied: a fold's cost must not grow with the store.)"""
    seen: set[str] = set()
    kept = []
    for record in records:
        if record["kind"] == "rows":
            mask = np.zeros(len(record["ids"]), dtype=bool)
            for k, image_id in enumerate(record["ids"]):
                mask[k] = image_id not in committed and image_id not in seen
                seen.add(image_id)
            kept.append((record, mask))
    return kept


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
    """Tables one after another; an extra column some lack is "" in their rows."""
    names = list(COLUMNS) + sorted({k for t in tables for k in t.columns if k not in COLUMNS})
    return EmbeddingTable(
        np.concatenate([t.embeddings for t in tables]),
        np.concatenate([t.image_id for t in tables]),
        {k: np.concatenate([t.columns[k] if k in t.columns else np.full(len(t), "", dtype=object) for t in tables]) for k in names},
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


def _record_levels(record: dict) -> list[tuple[str, int, int]] | None:
    """The token levels a "rows" record carries after its embeddings, [(level, T, C)], or None if malformed."""
    levels = record.get("tokens", [])
    if not isinstance(levels, list):
        return None
    out = []
    for entry in levels:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and all(isinstance(v, int) and v > 0 for v in entry[1:])):
            return None
        out.append((entry[0], entry[1], entry[2]))
    return out


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
    if record["kind"] == "rows":
        levels = _record_levels(record)
        if levels is None or len(body) != len(record.get("ids", ())) * (dim + sum(t * c for _, t, c in levels)) * itemsize:
            return None
    return record, body, end


def _split_body(record: dict, body: bytes, dim: int, dtype: str) -> None:
    """Set a "rows" record's embeddings [n, D] and tokens {level: [n, T, C]} from its body (read-only views)."""
    n, itemsize = len(record["ids"]), np.dtype(dtype).itemsize
    record["embeddings"] = np.frombuffer(body, dtype=dtype, count=n * dim).reshape(n, dim)
    offset, tokens = n * dim * itemsize, {}
    for level, t, c in _record_levels(record) or []:
        tokens[level] = np.frombuffer(body, dtype=dtype, count=n * t * c, offset=offset).reshape(n, t, c)
        offset += n * t * c * itemsize
    record["tokens"] = tokens


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
            _split_body(record, body, dim, dtype)
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
                record["tokens"] = {level: grid[keep] for level, grid in record.get("tokens", {}).items()}
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
        {
            "label": np.asarray(columns["label"], dtype=np.int8).reshape(-1),
            **{c: np.asarray(columns[c], dtype=object).reshape(-1) for c in STRING_COLUMNS},
            **{c: np.asarray(v, dtype=object).reshape(-1) for c, v in columns.items() if c not in COLUMNS},
        },
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


def _open_log(store_path: Path):
    """The store's write-ahead log, opened unbuffered for appending."""
    return open(_log_path(store_path), "ab", buffering=0)


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


def merge_stores(inputs: Sequence[Path | str], out: Path | str) -> Path:
    """Join shard stores (one fingerprint, one set of token levels, disjoint ids) into the store `out`, one
    plain file; `merge_stores([s], s)` consolidates the store `s` in place (see `consolidate_store`).

    `out` may already exist (a resumed distributed run): it must have the same fingerprint, and rows it
    already holds are skipped. Ids present in two inputs are refused. Inputs created in different
    environments warn (ProvenanceWarning); `out` records the first input's provenance.
    """
    if not inputs:
        raise StoreError("merge needs at least one input store")
    if len(inputs) == 1 and Path(out).exists() and Path(inputs[0]).resolve() == Path(out).resolve():
        return consolidate_store(out)
    stores = [open_store(p) for p in inputs]
    for store in stores[1:]:
        diff = fingerprint_mismatch(stores[0].fingerprint, store.fingerprint)
        if diff:
            raise StoreError(f"refusing to mix {stores[0].path} and {store.path}: fingerprints differ ({'; '.join(diff)})")
        if store.token_shapes != stores[0].token_shapes:
            raise StoreError(
                f"refusing to merge {stores[0].path} and {store.path}: token levels differ "
                f"({_describe_levels(stores[0].token_shapes)} vs {_describe_levels(store.token_shapes)})"
            )
    ids, counts = np.unique(np.concatenate([s.read_columns().image_id.astype(str) for s in stores]), return_counts=True)
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
    skip = {"fingerprint", "schema_version", "dim", "created", "medembed_version", "provenance", "token_levels",
            "layout", "segments", "next_segment", *FINGERPRINT_KEYS}
    metadata = {k: v for k, v in stores[0].attrs.items() if k not in skip}
    metadata["merged_from"] = json.dumps([str(s.path) for s in stores])
    failed: dict[str, str] = {}
    for store in stores:
        failed.update(store.failed())
    with StoreWriter(
        out, dim=stores[0].dim, fingerprint=stores[0].fingerprint, metadata=metadata, provenance=stores[0].provenance,
        tokens=stores[0].token_shapes, consolidate=True,
    ) as writer:
        for store in stores:
            table = store.read()
            todo = np.flatnonzero([i not in writer.done_ids(include_failed=False) for i in table.image_id])
            grids = {level: store.read_tokens(level, todo) for level in store.token_shapes}
            table = table.subset(todo)
            for start in range(0, len(table), 8192):
                part = slice(start, start + 8192)
                chunk = table.subset(part)
                writer.append(chunk.image_id, chunk.embeddings, chunk.columns, tokens={level: g[part] for level, g in grids.items()})
        failed = {k: v for k, v in failed.items() if k not in writer.done_ids(include_failed=False)}
        if failed:
            writer.add_failed(list(failed), list(failed.values()))
    return Path(out)

"""The write-ahead log beside a store (``<store>.wal``): framed, CRC-checked records, and how readers and the
next writer recover them.

Each appended batch is one record, written with a single ``write``. A kill at any instant leaves at most a
torn last record, which readers ignore and the next writer drops; a damaged record in the middle is skipped
(the reader resynchronises on the next intact frame) and counted. Records are "rows" (a batch, its token
grids and the batch's failed images), "failed" and "columns" (manifest metadata of rows already stored,
refreshed after the manifest was edited). Readers see the stored rows plus whatever is still in the log.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medembed.store.schema import _storable_text, text_problem

_RECORD_MAGIC = b"MEWAL1\x00\x00"
_RECORD_HEAD = struct.Struct("<8sIQI")  # magic, header length, body length, crc32 of header + body
_RECORD_KINDS = ("rows", "failed", "columns")


def _log_path(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def _open_log(store_path: Path):
    """The store's write-ahead log, opened unbuffered for appending."""
    return open(_log_path(store_path), "ab", buffering=0)


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

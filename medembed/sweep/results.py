"""A sweep's results table (results.csv) and the record of what its rows were computed under (sweep.json).

results.csv has one row per finished cell (encoder, head, budget, seed). Each row is appended with a single
``write`` and fsynced, so a sweep killed at any instant leaves whole rows (a torn last line, possible only if
the machine itself fails mid-write, is dropped on reopening). A rerun skips the cells already there. One
sweep at a time may write a table: an exclusive ``flock`` on results.csv refuses a second.

sweep.json records the protocol (manifest checksum, threshold rule, calibration, aggregation, bootstrap), each
head's parameters and each embedding source's fingerprint. A rerun whose config changes any of them for a
head or source that already has rows is refused: its new rows would not be comparable with the old ones.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medembed._csv import csv_lines, read_text_cell, text_cell
from medembed.errors import MedembedError

LEVELS = ("image", "study")
RESULT_METRICS = ("auroc", "auprc", "kappa", "sensitivity", "specificity", "f1")
KEY_COLUMNS = ("encoder", "head", "budget", "seed")
INFO_COLUMNS = ("train_images", "train_abnormal", "test_images", "fit_seconds", "image_threshold", "study_threshold")
METRIC_COLUMNS = tuple(
    f"{level}_{metric}{suffix}" for level in LEVELS for metric in RESULT_METRICS for suffix in ("", "_low", "_high")
)
COLUMNS = KEY_COLUMNS + INFO_COLUMNS + METRIC_COLUMNS + ("note",)
TEXT_COLUMNS = ("encoder", "head", "note")  # written through text_cell (see medembed._csv), read back with read_text_cell
_SECTION_FIELDS = {"heads": "head", "sources": "encoder"}  # sweep.json section -> the CellKey field naming its rows


@dataclass(frozen=True, order=True)
class CellKey:
    """One cell of the grid: a head fitted on an encoder's embeddings with a label budget and a seed."""

    encoder: str
    head: str
    budget: float
    seed: int

    def __str__(self) -> str:
        return f"{self.encoder}/{self.head} budget {self.budget:g} seed {self.seed}"


def cell_row(key: CellKey, metrics: dict | None, note: str = "", **info: float) -> dict[str, Any]:
    """A results row: the key, INFO_COLUMNS from `info`, and each level's metrics with their interval.

    metrics: an `evaluate_predictions` result, or None for a cell that could not run (`note` says why).
    """
    unknown = set(info) - set(INFO_COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns: {sorted(unknown)}")
    row: dict[str, Any] = {"encoder": key.encoder, "head": key.head, "budget": key.budget, "seed": key.seed, **info, "note": note}
    for level in LEVELS if metrics else ():
        for metric in RESULT_METRICS:
            leaf = metrics[level]["overall"][metric]
            low, high = leaf["ci"] or (None, None)
            row.update({f"{level}_{metric}": leaf["value"], f"{level}_{metric}_low": low, f"{level}_{metric}_high": high})
    return row


def read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results.csv, typed: budget float, seed int, other numbers float (NaN where empty)."""
    path = Path(path)
    if not path.is_file():
        raise MedembedError(f"{path}: no such results table")
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]  # a torn last line is not a result
    reader = csv.DictReader(io.StringIO(complete))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise MedembedError(f"{path}: not a results table of this medembed (columns {reader.fieldnames}); write the sweep to a new `out`")
    return [_typed(row, path, number) for number, row in enumerate(reader, start=2)]


def _typed(row: dict[str, str], path: Path, line: int) -> dict[str, Any]:
    try:
        budget, seed = float(row["budget"]), int(row["seed"])  # a short row fails here
        text = {name: read_text_cell(row[name] or "") for name in TEXT_COLUMNS}
        typed: dict[str, Any] = {"encoder": text["encoder"], "head": text["head"], "budget": budget, "seed": seed, "note": text["note"]}
        for name in INFO_COLUMNS + METRIC_COLUMNS:
            typed[name] = float(row[name]) if row[name] else math.nan
    except (TypeError, ValueError) as error:
        raise MedembedError(f"{path}: line {line} is malformed ({error}); delete that line to rerun its cell") from None
    return typed


def row_key(row: Mapping[str, Any]) -> CellKey:
    """The cell a typed results row belongs to."""
    return CellKey(row["encoder"], row["head"], float(row["budget"]), int(row["seed"]))


class ResultsLog:
    """results.csv and sweep.json of a sweep directory, open for appending; use as a context manager."""

    def __init__(self, out: Path, protocol: dict[str, Any]) -> None:
        """Open (or create) the table in `out`, refusing a second writer and a changed `protocol`."""
        self.path = Path(out) / "results.csv"
        self.record_path = Path(out) / "sweep.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            _write_atomically(self.path, _csv_line(COLUMNS))
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise MedembedError(f"{self.path}: another sweep is writing this table; wait for it or give this one another `out`") from None
        try:
            self._drop_torn_tail()
            self._done = {row_key(row) for row in read_results(self.path)}
            self.record = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
            recorded = self.record.get("protocol")
            if self._done and recorded is not None and recorded != protocol:
                changed = sorted(k for k in set(recorded) | set(protocol) if recorded.get(k) != protocol.get(k))
                raise MedembedError(
                    f"{self.path} holds results computed under another protocol ({', '.join(f'{k}: {recorded.get(k)!r} then, {protocol.get(k)!r} now' for k in changed)}); "
                    "give the sweep another `out`, or delete results.csv to start over"
                )
            self.record["protocol"] = protocol
            self._save_record()
        except BaseException:
            self.close()
            raise

    def check_source(self, section: str, name: str, description: Any) -> None:
        """Refuse a head's parameters or a source's fingerprint (`section` "heads" or "sources") that differ from
        those its earlier rows were computed with; record it otherwise."""
        description = json.loads(json.dumps(description))  # as sweep.json holds it: tuples become lists
        recorded = self.record.setdefault(section, {})
        has_rows = any(getattr(key, _SECTION_FIELDS[section]) == name for key in self._done)
        if has_rows and name in recorded and recorded[name] != description:
            raise MedembedError(
                f"{self.path}: {name}'s rows were computed with {recorded[name]!r}, the sweep now has {description!r}; "
                f"give the sweep another `out`, or delete {name}'s rows from results.csv to recompute them"
            )
        recorded[name] = description
        self._save_record()

    def has(self, key: CellKey) -> bool:
        """Whether the cell already has a row (it is then skipped)."""
        return key in self._done

    def append(self, row: dict[str, Any]) -> None:
        """Append one row durably (one write, fsynced)."""
        fields = [
            repr(float(row["budget"])) if column == "budget" else text_cell(_field(row.get(column))) if column in TEXT_COLUMNS
            else _field(row.get(column))
            for column in COLUMNS
        ]
        os.write(self._fd, _csv_line(fields).encode("utf-8"))
        os.fsync(self._fd)
        self._done.add(row_key(row))

    def close(self) -> None:
        """Release the table (and its lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drop_torn_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(self.path, data.rfind(b"\n") + 1)

    def _save_record(self) -> None:
        _write_atomically(self.record_path, json.dumps(self.record, indent=2, sort_keys=True) + "\n")


def _field(value: Any) -> str:
    """A CSV field: numbers to 6 significant digits (the budget is written exactly, as the resume key)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _csv_line(fields: Any) -> str:
    (line,) = csv_lines([fields])
    return line


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

"""The manifest table: one row per image, its schema, and reading/writing it as CSV.

Every column is a 1-D object array of ``str`` ("" = missing), all of the same length. Only
``image_id`` and ``path`` are required; the other standard columns are optional and read as empty
where absent; any further column is carried along in its original order.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medembed._csv import csv_lines, read_text_cell, text_cell
from medembed.errors import MedembedError

MANIFEST_COLUMNS = ("image_id", "path", "label", "study_id", "patient_id", "body_part", "split")
REQUIRED_COLUMNS = ("image_id", "path")
SPLITS = ("train", "val", "test")
LABEL_VALUES = ("0", "1", "")  # normal, abnormal, unknown
EXAMPLES = 5  # how many offending items an error message quotes; the total count is always given
# Columns whose values come from a fixed vocabulary: read_manifest strips spaces around them. Every other
# value (ids, paths, extras) is kept exactly as written: " x.png" is a real file name.
STRIPPED_COLUMNS = ("label", "split", "body_part")
_SURROGATE = re.compile("[\ud800-\udfff]")  # str that cannot be encoded as UTF-8 (e.g. a non-UTF-8 file name)


class ManifestError(MedembedError):
    """A manifest, or a data set a builder reads, is malformed; the message names the file, row and value."""


def text_column(name: str, values: Iterable) -> np.ndarray:
    """``values`` as a 1-D object array of ``str`` ([N]); ``None`` becomes "" and other values ``str(v)``."""
    array = np.asarray(values if isinstance(values, np.ndarray) else list(values), dtype=object)
    if array.ndim != 1:
        raise ManifestError(f"manifest column {name!r} must be 1-D, got shape {array.shape}")
    if not all(type(value) is str for value in array):
        array = np.array(["" if value is None else str(value) for value in array], dtype=object)
    return array


def listing(items: Sequence, total: int | None = None, quote: bool = False) -> str:
    """'a, b, c, d, e and 7 more': the first EXAMPLES items (``repr`` if ``quote``) and how many others.

    ``total`` is the number of items in all, where ``items`` holds only the first few.
    """
    total = len(items) if total is None else total
    shown = ", ".join(repr(str(item)) if quote else str(item) for item in items[:EXAMPLES])
    return shown + (f" and {total - EXAMPLES} more" if total > EXAMPLES else "")


def format_rows(row_numbers: Sequence[int]) -> str:
    """'rows 3, 8, 12, 20, 31 and 4 more' for 1-based data-row numbers."""
    return f"row{'s' if len(row_numbers) > 1 else ''} {listing(row_numbers)}"


@dataclass(eq=False)
class Manifest:
    """One row per image, column-oriented. ``columns`` maps a column name to its [N] object array of str.

    Columns are kept in a fixed order: the standard ones (MANIFEST_COLUMNS order) first, extras after.
    """

    columns: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        ordered = [c for c in MANIFEST_COLUMNS if c in self.columns]
        ordered += [c for c in self.columns if c not in MANIFEST_COLUMNS]
        columns = {name: text_column(name, self.columns[name]) for name in ordered}
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise ManifestError(f"manifest lacks required column(s) {', '.join(missing)}; it has {', '.join(columns)}")
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ManifestError(f"manifest columns differ in length: {lengths}")
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["image_id"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return list(self.columns) == list(other.columns) and all(
            np.array_equal(values, other.columns[name]) for name, values in self.columns.items()
        )

    __hash__ = None  # mutable arrays inside

    def __repr__(self) -> str:
        return f"Manifest({len(self)} rows; columns {', '.join(self.columns)})"

    def column(self, name: str) -> np.ndarray:
        """The [N] str array of column ``name``; raises ManifestError listing the columns there are."""
        if name not in self.columns:
            raise ManifestError(f"manifest has no column {name!r}; it has {', '.join(self.columns)}")
        return self.columns[name]

    def column_or_empty(self, name: str) -> np.ndarray:
        """The [N] str array of column ``name``, or all "" where the manifest has no such column."""
        if name in self.columns:
            return self.columns[name]
        return np.full(len(self), "", dtype=object)

    @property
    def image_id(self) -> np.ndarray:
        """[N] str image ids."""
        return self.columns["image_id"]

    @property
    def path(self) -> np.ndarray:
        """[N] str image paths, relative to the root given at run time (or absolute)."""
        return self.columns["path"]

    @property
    def split(self) -> np.ndarray:
        """[N] str split names (train/val/test), "" where absent."""
        return self.column_or_empty("split")

    @property
    def body_part(self) -> np.ndarray:
        """[N] str body parts, "" where absent."""
        return self.column_or_empty("body_part")

    @property
    def study_id(self) -> np.ndarray:
        """[N] str study ids as written, "" where absent (see ``study_ids`` for the fallback)."""
        return self.column_or_empty("study_id")

    @property
    def patient_id(self) -> np.ndarray:
        """[N] str patient ids, "" where absent."""
        return self.column_or_empty("patient_id")

    @property
    def label(self) -> np.ndarray:
        """[N] int8 labels: 0 normal, 1 abnormal, -1 unknown. Raises ManifestError on any other value."""
        raw = self.column_or_empty("label")
        invalid = (raw != "0") & (raw != "1") & (raw != "")
        if invalid.any():
            rows = np.flatnonzero(invalid)
            raise ManifestError(
                f"label must be 0, 1 or empty; {format_rows(rows + 1)} hold {listing(raw[rows], quote=True)}"
            )
        labels = np.full(len(self), -1, dtype=np.int8)
        labels[raw == "0"] = 0
        labels[raw == "1"] = 1
        return labels

    def subset(self, mask_or_indices: np.ndarray | Iterable) -> Manifest:
        """The rows selected by a [N] boolean mask or by integer indices (in that order), as a new manifest."""
        selector = np.asarray(mask_or_indices)
        if selector.dtype == bool and selector.shape != (len(self),):
            raise ManifestError(f"boolean mask has shape {selector.shape}, manifest has {len(self)} rows")
        if selector.dtype != bool:
            selector = selector.astype(np.intp, copy=False)
        return Manifest({name: values[selector] for name, values in self.columns.items()})

    def study_ids(self) -> np.ndarray:
        """[N] str study of each image: ``study_id``, or the image's own id where empty (each image its own study)."""
        study = self.study_id
        return np.where(study != "", study, self.image_id)

    def group_ids(self) -> np.ndarray:
        """[N] str unit for grouped splits and bootstrap: ``patient_id``, else the study (``study_ids``)."""
        patient = self.patient_id
        return np.where(patient != "", patient, self.study_ids())

    def resolve(self, root: Path, *, allow_outside_root: bool = False, allow_absolute: bool = False) -> list[Path]:
        """Absolute path of every image: ``root / path``.

        Refused (ManifestError naming the rows) unless explicitly allowed: absolute paths (kept as they are
        with ``allow_absolute``), and relative paths whose ``..`` lead outside ``root`` (``allow_outside_root``).
        The check is lexical (``os.path.normpath``): symbolic links are not followed for it, so a root whose
        sub-folders are symlinks to other disks still works, while ``../../etc/passwd`` is refused whatever
        the file system holds. The paths returned are ``root / path`` as written (not normalised).
        """
        root = Path(root).absolute()
        problems = []
        if not allow_absolute:
            problems += _refused_rows(self.path, absolute_paths(self.path), "absolute paths (pass allow_absolute=True)")
        if not allow_outside_root:
            what = f"paths outside the root {root} (pass allow_outside_root=True)"
            problems += _refused_rows(self.path, paths_outside_root(self.path), what)
        if problems:
            raise ManifestError("refused manifest paths: " + "; ".join(problems))
        return [root / p for p in self.path]


def absolute_paths(paths: Sequence[str]) -> np.ndarray:
    """[N] bool: paths that are absolute (``/x.png``), which ignore the root they are joined to."""
    return np.fromiter((os.path.isabs(p) for p in paths), dtype=bool, count=len(paths))


def paths_outside_root(paths: Sequence[str]) -> np.ndarray:
    """[N] bool: relative paths whose ``..`` components lead outside the root, judged lexically.

    ``a/../b.png`` stays inside; ``../x.png`` and ``a/../../etc/passwd`` do not. Absolute paths are False
    here (see ``absolute_paths``); symbolic links are not followed.
    """

    def escapes(path: str) -> bool:
        if not path or os.path.isabs(path):
            return False
        normal = posixpath.normpath(path.replace(os.sep, "/"))
        return normal == ".." or normal.startswith("../")

    return np.fromiter((escapes(p) for p in paths), dtype=bool, count=len(paths))


def _refused_rows(paths: np.ndarray, mask: np.ndarray, what: str) -> list[str]:
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        return []
    return [f"{len(rows)} {what}: {format_rows(rows + 1)} ({listing(paths[rows], quote=True)})"]


def not_text(values: Sequence[str]) -> np.ndarray:
    """[N] bool: values holding lone surrogates, i.e. not valid Unicode text (cannot be written as UTF-8)."""
    return np.fromiter((_SURROGATE.search(v) is not None for v in values), dtype=bool, count=len(values))


def read_csv_table(path: Path, strip_columns: Collection[str] = ()) -> tuple[list[str], dict[str, np.ndarray]]:
    """Read a headed CSV into (header, column name -> [N] object array of str).

    Header names are stripped of spaces; values are kept exactly as written except in ``strip_columns``, and
    except that the single quote write_manifest puts before a leading ``= + - @``, tab or CR is removed
    (``medembed._csv.read_text_cell``), so a manifest read back holds the values written.
    Raises ManifestError for a missing or empty file, text that is not UTF-8 (naming the line), unnamed or
    repeated columns, and ragged rows (naming the 1-based data row and its line). Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ManifestError(
            f"{path}: line {line} is not UTF-8 text (byte 0x{raw[error.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from error
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            raise ManifestError(f"{path}: the file is empty (expected a header row)")
        header = [read_text_cell(name.strip()) for name in header]
        unnamed = [i + 1 for i, name in enumerate(header) if not name]
        if unnamed:
            raise ManifestError(f"{path}: header column(s) {unnamed} have no name")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise ManifestError(f"{path}: header repeats column(s) {', '.join(repeated)}")
        stripped = [i for i, name in enumerate(header) if name in strip_columns]
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ManifestError(
                    f"{path}: row {len(rows) + 1} (line {reader.line_num}) has {len(row)} fields, "
                    f"the header has {len(header)}"
                )
            row = [read_text_cell(value) for value in row]  # the quote write_manifest puts before "=+-@" (medembed._csv)
            for i in stripped:
                row[i] = row[i].strip()
            rows.append(row)
    except csv.Error as error:
        raise ManifestError(f"{path}: not a readable CSV ({error})") from error
    fields = list(zip(*rows)) if rows else [()] * len(header)
    return header, {name: np.array(values, dtype=object) for name, values in zip(header, fields)}


def read_manifest(path: Path) -> Manifest:
    """Read a manifest CSV. Raises ManifestError naming the file and the problem (see ``read_csv_table``).

    Values are kept exactly as written (ids and paths with leading or trailing spaces included; validation
    warns about such ids), except that spaces around label, split and body_part values are stripped.
    """
    header, columns = read_csv_table(path, strip_columns=STRIPPED_COLUMNS)
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {', '.join(missing)}; it has {', '.join(header)}")
    if len(columns["image_id"]) == 0:
        raise ManifestError(f"{path}: has a header but no rows")
    return Manifest(columns)


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write ``manifest`` as CSV atomically (temp file + rename), columns in the manifest's order.

    A value a spreadsheet would run as a formula (starting with ``= + - @``, tab or CR, not a plain number) is
    written with a single quote before it (``medembed._csv.text_cell``); read_manifest removes it again.

    Raises ManifestError naming the rows where a value is not valid Unicode text (lone surrogates, as a file
    name in another encoding decodes to), which UTF-8 cannot hold.
    """
    path = Path(path)
    for name, values in manifest.columns.items():
        bad = np.flatnonzero(not_text(values))
        if len(bad):
            raise ManifestError(
                f"cannot write {path}: column {name!r} {format_rows(bad + 1)} hold(s) text that is not valid "
                f"Unicode ({listing(values[bad], quote=True)}; a file name in another encoding?)"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    # a plain open (not tempfile) so the file gets the usual umask permissions, not 0600
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            # Every cell is user text (ids, paths, extra columns): quoted where a spreadsheet would run it (medembed._csv).
            header = [text_cell(name) for name in manifest.columns]
            handle.writelines(csv_lines([header, *([text_cell(value) for value in row] for row in zip(*manifest.columns.values()))]))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

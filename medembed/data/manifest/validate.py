"""Manifest validation: every problem named with its offending rows, plus a label-balance summary.

Checks are vectorised (numpy) so a 40k-row manifest validates in well under a second; file checks
only stat each file, and the optional decodability check decodes every image fully, as ``extract`` does
(``medembed.data.images.decode_compact``, strict: a truncated JPEG is an error; DICOM recognised by content, the
same size limits), after ``probe_image``'s header check (PNG chunk checksums included).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medembed.data.images import (
    DECODE_ERROR_KINDS,
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    REFUSED_KINDS,
    ImageDecodeError,
    check_regular_file,
    decode_compact,
    probe_image,
)
from medembed.data.manifest.table import (
    EXAMPLES,
    LABEL_VALUES,
    SPLITS,
    Manifest,
    ManifestError,
    absolute_paths,
    format_rows,
    listing,
    not_text,
    paths_outside_root,
)

NONE = "(none)"  # how an empty split or body part is shown in the summary
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0 and C1 control characters (NUL, tab, newline, DEL, ...)


@dataclass
class Problem:
    """One finding. ``rows`` are the offending 1-based data-row numbers (CSV line = row + 1)."""

    severity: Literal["error", "warning"]
    code: str
    message: str
    rows: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.severity}: [{self.code}] {self.message}"


@dataclass
class ValidationReport:
    """All problems found and a summary: rows, studies, patients, label counts by split and body part."""

    problems: list[Problem]
    summary: dict

    @property
    def errors(self) -> list[Problem]:
        """The problems of severity "error"."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """The problems of severity "warning"."""
        return [p for p in self.problems if p.severity == "warning"]

    def raise_for_errors(self) -> None:
        """Raise ManifestError listing the errors, if there are any."""
        if self.errors:
            raise ManifestError("manifest is invalid:\n" + "\n".join(f"  {p}" for p in self.errors))

    def format(self) -> str:
        """The summary as readable tables, then the errors and warnings, one per line."""
        s = self.summary
        lines = [
            f"{s['rows']} rows, {s['studies']} studies, {s['patients']} patients"
            + ("" if s["files_checked"] else " (files not checked)")
        ]
        for title, key in (("split", "by_split"), ("body part", "by_body_part")):
            lines += ["", _balance_table(title, s[key])]
        for title, problems in (("errors", self.errors), ("warnings", self.warnings)):
            if problems:
                lines += ["", f"{len(problems)} {title}:"] + [f"  [{p.code}] {p.message}" for p in problems]
        lines += ["", "OK" if not self.errors else f"INVALID: {len(self.errors)} error(s)"]
        return "\n".join(lines)


def _balance_table(title: str, counts: dict[str, dict[str, int]]) -> str:
    header = f"{title:<12}{'rows':>8}{'normal':>8}{'abnormal':>9}{'unknown':>9}{'% abn':>7}"
    lines = [header, "-" * len(header)]
    for name, c in counts.items():
        labelled = c["normal"] + c["abnormal"]
        share = f"{100 * c['abnormal'] / labelled:.1f}" if labelled else "-"
        lines.append(f"{name:<12}{c['rows']:>8}{c['normal']:>8}{c['abnormal']:>9}{c['unknown']:>9}{share:>7}")
    return "\n".join(lines)


def _rows_problem(
    severity: str, code: str, what: str, mask: np.ndarray, values: np.ndarray | None = None
) -> list[Problem]:
    """A problem for the rows in ``mask`` (none if empty): 'what: rows 3, 9 (values 'x', 'y'); 2 rows'."""
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        return []
    detail = f" (values {listing(values[rows], quote=True)})" if values is not None else ""
    message = f"{what}: {format_rows(rows + 1)}{detail}; {len(rows)} row(s)"
    return [Problem(severity, code, message, (rows + 1).tolist())]


def _rows_of(keys: np.ndarray, wanted: Collection[str]) -> np.ndarray:
    """[N] bool: rows whose key is in ``wanted`` (a set or dict: hashing beats np.isin on str objects)."""
    return np.fromiter((key in wanted for key in keys), dtype=bool, count=len(keys))


def _groups_with_several(keys: np.ndarray, values: np.ndarray, mask: np.ndarray) -> dict[str, list[str]]:
    """Key -> its distinct values (sorted), for each key whose rows within ``mask`` hold more than one value;
    keys in the order of their first row."""
    keys, values = keys[mask], values[mask]
    if len(keys) == 0:
        return {}
    key_names, first, key_index = np.unique(keys, return_index=True, return_inverse=True)
    value_names, value_index = np.unique(values, return_inverse=True)
    n_values = len(value_names)
    pairs = np.unique(key_index.ravel().astype(np.int64) * n_values + value_index.ravel())  # sorted by key, value
    pair_key = pairs // n_values
    several = np.flatnonzero(np.bincount(pair_key, minlength=len(key_names)) > 1)
    found: dict[int, list[str]] = {int(k): [] for k in several[np.argsort(first[several], kind="stable")]}
    for pair in pairs[np.isin(pair_key, several)].tolist():
        found[pair // n_values].append(value_names[pair % n_values])
    return {key_names[k]: found_values for k, found_values in found.items()}


def _conflict_problem(code: str, what: str, keys: np.ndarray, values: np.ndarray, mask: np.ndarray) -> list[Problem]:
    """An error for groups (patients, studies) whose rows disagree on ``values`` (splits, labels)."""
    conflicts = _groups_with_several(keys, values, mask)
    if not conflicts:
        return []
    rows = np.flatnonzero(mask & _rows_of(keys, conflicts))
    examples = listing([f"{key!r} ({', '.join(found)})" for key, found in conflicts.items()])
    message = f"{len(conflicts)} {what}: {examples}; {format_rows(rows + 1)}"
    return [Problem("error", code, message, (rows + 1).tolist())]


def _matches(values: np.ndarray, pattern: re.Pattern) -> np.ndarray:
    return np.fromiter((pattern.search(v) is not None for v in values), dtype=bool, count=len(values))


def _check_ids(manifest: Manifest) -> list[Problem]:
    ids = manifest.image_id
    blank = np.fromiter((not v.strip() for v in ids), dtype=bool, count=len(ids))
    problems = _rows_problem("error", "empty_image_id", "rows without an image_id", blank)
    problems += _rows_problem("error", "empty_path", "rows without a path", manifest.path == "")
    invalid = not_text(ids)
    problems += _rows_problem(
        "error", "image_id_not_text", "image_ids that are not valid Unicode text (cannot be stored as UTF-8)", invalid, ids
    )
    control = _matches(ids, _CONTROL) & ~invalid
    what = "image_ids with control characters (NUL, tab, newline, ...)"
    problems += _rows_problem("error", "image_id_control_character", what, control, ids)
    padded = np.fromiter((v != v.strip() for v in ids), dtype=bool, count=len(ids)) & ~blank & ~control
    what = "image_ids with leading or trailing whitespace (kept as written: ' a' and 'a' are different ids)"
    problems += _rows_problem("warning", "image_id_whitespace", what, padded, ids)
    repeated = [name for name, count in Counter(ids).items() if count > 1 and name.strip() != ""]
    if repeated:
        shown = [f"{name!r} ({format_rows(np.flatnonzero(ids == name) + 1)})" for name in repeated[:EXAMPLES]]
        rows = np.flatnonzero(_rows_of(ids, set(repeated))) + 1
        examples = listing(shown, total=len(repeated))
        message = f"{len(repeated)} image_id(s) used more than once: {examples}; {len(rows)} rows"
        problems.append(Problem("error", "duplicate_image_id", message, rows.tolist()))
    return problems


def _refused_paths(manifest: Manifest, allow_outside_root: bool, allow_absolute: bool) -> np.ndarray:
    """[N] bool: rows whose path is an error on its own (no file is looked up for them)."""
    path = manifest.path
    refused = not_text(path) | _matches(path, re.compile("\x00"))
    if not allow_absolute:
        refused |= absolute_paths(path)
    if not allow_outside_root:
        refused |= paths_outside_root(path)
    return refused


def _check_paths(manifest: Manifest, allow_outside_root: bool, allow_absolute: bool) -> list[Problem]:
    path = manifest.path
    invalid = not_text(path)
    what = "paths that are not valid Unicode text (a file name in another encoding?)"
    problems = _rows_problem("error", "path_not_text", what, invalid, path)
    nul = _matches(path, re.compile("\x00")) & ~invalid
    problems += _rows_problem("error", "path_nul_character", "paths with a NUL character (no file can have one)", nul, path)
    control = _matches(path, _CONTROL) & ~nul & ~invalid
    what = "paths with control characters (tab, newline, ...); legal in file names but usually a broken CSV"
    problems += _rows_problem("warning", "path_control_character", what, control, path)
    if not allow_absolute:
        what = "absolute paths (paths are relative to the root; allow them with allow_absolute)"
        problems += _rows_problem("error", "absolute_path", what, absolute_paths(path), path)
    if not allow_outside_root:
        what = "paths whose '..' lead outside the root (allow them with allow_outside_root)"
        problems += _rows_problem("error", "path_outside_root", what, paths_outside_root(path), path)
    return problems


def _check_values(manifest: Manifest) -> list[Problem]:
    problems = []
    if "label" in manifest.columns:
        label = manifest.columns["label"]
        invalid = ~np.isin(label, LABEL_VALUES)
        problems += _rows_problem("error", "invalid_label", "labels must be 0, 1 or empty", invalid, label)
        problems += _rows_problem("warning", "unlabeled_rows", "rows without a label", label == "")
    else:
        problems.append(Problem("warning", "no_label_column", "no label column: every image is unlabeled"))
    if "split" in manifest.columns:
        split = manifest.columns["split"]
        invalid = ~np.isin(split, (*SPLITS, ""))
        what = f"split must be {', '.join(SPLITS)} or empty"
        problems += _rows_problem("error", "invalid_split", what, invalid, split)
        problems += _rows_problem("warning", "unsplit_rows", "rows without a split (medembed manifest split assigns them)", split == "")
    else:
        problems.append(Problem("warning", "no_split_column", "no split column: assign splits to fit (medembed manifest split, or --ratios when building)"))
    return problems


def leakage_problems(manifest: Manifest) -> list[Problem]:
    """The validation's leakage errors: patients in more than one split, studies spanning splits."""
    split, patient, study = manifest.split, manifest.patient_id, manifest.study_ids()
    in_split = np.isin(split, SPLITS)  # invalid split values are reported on their own
    leakage = "patient(s) in more than one split (leakage)"
    problems = _conflict_problem("patient_in_several_splits", leakage, patient, split, in_split & (patient != ""))
    problems += _conflict_problem("study_in_several_splits", "study(ies) spanning splits", study, split, in_split)
    return problems


def _check_groups(manifest: Manifest) -> list[Problem]:
    label, study = manifest.column_or_empty("label"), manifest.study_ids()
    labelled = np.isin(label, ("0", "1"))
    problems = leakage_problems(manifest)
    disagreeing = "study(ies) whose images disagree on the label"
    problems += _conflict_problem("study_label_conflict", disagreeing, study, label, labelled)
    return problems


_FILE_CODES = {"not_found": "missing_file", "not_a_file": "not_a_file"}  # other kinds: unreadable/unusable


def _file_code(kind: str) -> str:
    if kind in _FILE_CODES:
        return _FILE_CODES[kind]
    return "unusable_image" if kind in REFUSED_KINDS else "unreadable_file"


def _check_files(
    manifest: Manifest,
    root: Path,
    check_decodable: bool,
    refused: np.ndarray,
    limits: dict,
) -> list[Problem]:
    """Missing files, non-files, and (``check_decodable``) unreadable or refused images, one problem per kind."""
    paths = manifest.resolve(root, allow_outside_root=True, allow_absolute=True)  # refused rows are skipped
    checked = (manifest.path != "") & ~refused  # empty and refused paths are reported on their own
    failures: dict[int, ImageDecodeError] = {}
    for i in np.flatnonzero(checked):
        try:
            check_regular_file(paths[i])
            if check_decodable:
                probe_image(paths[i], **limits)
                decode_compact(paths[i], **limits)  # extract's decoder: truncated pixel data shows only here
        except ImageDecodeError as error:
            failures[i] = error
        except Exception as error:  # noqa: BLE001 - a decoder bug on one file is that file's finding, as in extract
            failures[i] = ImageDecodeError(paths[i], f"unexpected decoding error: {type(error).__name__}: {error}", "corrupt")
    missing = np.zeros(len(paths), dtype=bool)
    missing[[i for i, error in failures.items() if error.kind == "not_found"]] = True
    problems = _rows_problem("error", "missing_file", f"files not found under {root}", missing, manifest.path)
    by_kind: dict[str, list[int]] = {}
    for i, error in failures.items():
        if error.kind != "not_found":
            by_kind.setdefault(error.kind, []).append(i)
    for kind, rows in by_kind.items():
        code = _file_code(kind)
        what = {
            "not_a_file": "path(s) are not image files",
            "unreadable_file": "file(s) are not readable images",
            "unusable_image": "image(s) would be refused by the decoder",
        }[code]
        examples = listing([f"row {r + 1} {manifest.path[r]!r} ({failures[r].reason})" for r in rows[:EXAMPLES]], len(rows))
        message = f"{len(rows)} {what} ({DECODE_ERROR_KINDS[kind]}): {examples}"
        problems.append(Problem("error", code, message, [int(r) + 1 for r in rows]))
    return problems


def _label_balance(keys: np.ndarray, label: np.ndarray, first: tuple[str, ...] = ()) -> dict[str, dict]:
    """Rows and 0/1/unknown label counts per key (``first`` keys first, then sorted), plus an "all" row."""
    code_of: dict[str, int] = {}
    codes = np.fromiter((code_of.setdefault(key or NONE, len(code_of)) for key in keys), dtype=np.intp, count=len(keys))
    rows = np.bincount(codes, minlength=len(code_of))
    normal = np.bincount(codes, weights=label == "0", minlength=len(code_of)).astype(int)
    abnormal = np.bincount(codes, weights=label == "1", minlength=len(code_of)).astype(int)
    rank = {name: i for i, name in enumerate(first)}
    table = {}
    for name in sorted(code_of, key=lambda name: (rank.get(name, len(first)), name)):
        k = code_of[name]
        table[name] = {"rows": int(rows[k]), "normal": int(normal[k]), "abnormal": int(abnormal[k])}
    table["all"] = {"rows": len(label), "normal": int(normal.sum()), "abnormal": int(abnormal.sum())}
    for counts in table.values():
        counts["unknown"] = counts["rows"] - counts["normal"] - counts["abnormal"]
    return table


def summarize(manifest: Manifest, files_checked: bool = False) -> dict:
    """Rows, studies, patients, and label counts per split and per body part (label column read as text)."""
    label = manifest.column_or_empty("label")
    return {
        "rows": len(manifest),
        "studies": len(set(manifest.study_ids())),
        "patients": len(set(manifest.patient_id) - {""}),
        "by_split": _label_balance(manifest.split, label, first=SPLITS),
        "by_body_part": _label_balance(manifest.body_part, label),
        "files_checked": files_checked,
    }


def validate_manifest(
    manifest: Manifest,
    root: Path | None,
    check_files: bool = True,
    check_decodable: bool = False,
    *,
    allow_outside_root: bool = False,
    allow_absolute: bool = False,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
) -> ValidationReport:
    """Check ``manifest`` and summarise it; never raises for bad content, every finding is a Problem.

    Errors: empty (or blank) or duplicate image_ids, image_ids with control characters (NUL, tab, newline,
    ...) or that are not valid Unicode text, empty paths, paths with a NUL or not valid text, absolute paths
    (unless ``allow_absolute``) and paths whose ``..`` lead outside the root (unless ``allow_outside_root``;
    judged lexically, symlinks not followed, as ``Manifest.resolve`` does), labels outside {0, 1, ""},
    splits outside train/val/test, a patient in several splits, a study spanning splits or disagreeing on its
    label, and (when ``root`` is given) missing files or paths that are not regular files (directories,
    symlink loops) and, with ``check_decodable``, files that do not decode in full the way ``extract`` decodes
    them (strict ``decode_compact``: unreadable headers, truncated or corrupt pixel data, and sizes the decoder
    refuses by ``min_side``, ``max_pixels``, ``max_aspect_ratio``); this reads every pixel, so it is slower.
    Warnings: no label or split column, rows without a label or split, image_ids with leading or trailing
    whitespace, paths with control characters other than NUL.
    """
    problems = _check_ids(manifest) + _check_paths(manifest, allow_outside_root, allow_absolute)
    problems += _check_values(manifest) + _check_groups(manifest)
    files_checked = root is not None and (check_files or check_decodable)
    if files_checked:
        refused = _refused_paths(manifest, allow_outside_root, allow_absolute)
        limits = {"min_side": min_side, "max_pixels": max_pixels, "max_aspect_ratio": max_aspect_ratio}
        problems += _check_files(manifest, Path(root), check_decodable, refused, limits)
    return ValidationReport(problems, summarize(manifest, files_checked))

"""Manifest validation: every problem named with its offending rows, plus a label-balance summary.

Checks are vectorised (numpy) so a 40k-row manifest validates in well under a second; file checks
only stat each file, and the optional decodability check reads image headers, never pixels.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from medembed.manifest.table import EXAMPLES, LABEL_VALUES, SPLITS, Manifest, ManifestError, format_rows, listing

DICOM_SUFFIXES = (".dcm", ".dicom")
NONE = "(none)"  # how an empty split or body part is shown in the summary


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
    """Key -> its distinct values, for each key whose rows within ``mask`` hold more than one value."""
    seen: dict[str, set[str]] = {}
    for key, value in zip(keys[mask], values[mask]):
        seen.setdefault(key, set()).add(value)
    return {key: sorted(found) for key, found in seen.items() if len(found) > 1}


def _conflict_problem(code: str, what: str, keys: np.ndarray, values: np.ndarray, mask: np.ndarray) -> list[Problem]:
    """An error for groups (patients, studies) whose rows disagree on ``values`` (splits, labels)."""
    conflicts = _groups_with_several(keys, values, mask)
    if not conflicts:
        return []
    rows = np.flatnonzero(mask & _rows_of(keys, conflicts))
    examples = listing([f"{key!r} ({', '.join(found)})" for key, found in conflicts.items()])
    message = f"{len(conflicts)} {what}: {examples}; {format_rows(rows + 1)}"
    return [Problem("error", code, message, (rows + 1).tolist())]


def _check_ids(manifest: Manifest) -> list[Problem]:
    ids = manifest.image_id
    problems = _rows_problem("error", "empty_image_id", "rows without an image_id", ids == "")
    problems += _rows_problem("error", "empty_path", "rows without a path", manifest.path == "")
    repeated = [name for name, count in Counter(ids).items() if count > 1 and name != ""]
    if repeated:
        shown = [f"{name!r} ({format_rows(np.flatnonzero(ids == name) + 1)})" for name in repeated[:EXAMPLES]]
        rows = np.flatnonzero(_rows_of(ids, set(repeated))) + 1
        examples = listing(shown, total=len(repeated))
        message = f"{len(repeated)} image_id(s) used more than once: {examples}; {len(rows)} rows"
        problems.append(Problem("error", "duplicate_image_id", message, rows.tolist()))
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
        problems += _rows_problem("warning", "unsplit_rows", "rows without a split", split == "")
    else:
        problems.append(Problem("warning", "no_split_column", "no split column: splits must be assigned to fit"))
    return problems


def _check_groups(manifest: Manifest) -> list[Problem]:
    split, label = manifest.split, manifest.column_or_empty("label")
    patient, study = manifest.patient_id, manifest.study_ids()
    in_split = np.isin(split, SPLITS)  # invalid split values are reported on their own
    labelled = np.isin(label, ("0", "1"))
    leakage = "patient(s) in more than one split (leakage)"
    problems = _conflict_problem("patient_in_several_splits", leakage, patient, split, in_split & (patient != ""))
    problems += _conflict_problem("study_in_several_splits", "study(ies) spanning splits", study, split, in_split)
    disagreeing = "study(ies) whose images disagree on the label"
    problems += _conflict_problem("study_label_conflict", disagreeing, study, label, labelled)
    return problems


def _header_error(path: Path) -> str | None:
    """Why the image file cannot be opened as an image (header only, pixels not decoded), or None."""
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            import pydicom  # imported here: slow to import and only DICOM manifests need it

            pydicom.dcmread(path, stop_before_pixels=True)
        else:
            with Image.open(path) as image:
                image.verify()
    except Exception as error:  # any failure to parse means "unreadable"; the reason is reported
        return f"{type(error).__name__}: {error}"
    return None


def _check_files(manifest: Manifest, root: Path, check_decodable: bool) -> list[Problem]:
    paths = manifest.resolve(root)
    has_path = manifest.path != ""  # empty paths are reported by _check_ids
    exists = np.fromiter((os.path.isfile(p) for p in paths), dtype=bool, count=len(paths))
    missing = has_path & ~exists
    problems = _rows_problem("error", "missing_file", f"files not found under {root}", missing, manifest.path)
    if check_decodable:
        reasons = np.full(len(paths), "", dtype=object)
        for i in np.flatnonzero(exists):
            reasons[i] = _header_error(paths[i]) or ""
        unreadable = reasons != ""
        if unreadable.any():
            rows = np.flatnonzero(unreadable)
            examples = listing([f"row {r + 1} {manifest.path[r]!r} ({reasons[r]})" for r in rows[:EXAMPLES]], len(rows))
            message = f"{len(rows)} file(s) are not readable images: {examples}"
            problems.append(Problem("error", "unreadable_file", message, (rows + 1).tolist()))
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
    manifest: Manifest, root: Path | None, check_files: bool = True, check_decodable: bool = False
) -> ValidationReport:
    """Check ``manifest`` and summarise it; never raises for bad content, every finding is a Problem.

    Errors: empty or duplicate image_ids, empty paths, labels outside {0, 1, ""}, splits outside
    train/val/test, a patient in several splits, a study spanning splits or disagreeing on its label,
    and (when ``root`` is given) missing files and, with ``check_decodable``, files whose image header
    cannot be read (DICOM via pydicom, others via PIL ``verify``; truncated pixel data is not caught
    here). Warnings: no label or split column, rows without a label or split.
    """
    problems = _check_ids(manifest) + _check_values(manifest) + _check_groups(manifest)
    files_checked = root is not None and (check_files or check_decodable)
    if files_checked:
        problems += _check_files(manifest, Path(root), check_decodable)
    return ValidationReport(problems, summarize(manifest, files_checked))

"""Manifest builder for FracAtlas (Abedeen et al., Scientific Data 10, 521 (2023); CC BY 4.0).

``root/dataset.csv`` holds one row per image (one-hot body region, fractured, hardware, view flags);
images lie in ``root/images/{Fractured,Non_fractured}/``. The label is MURA-style abnormality,
``fractured OR hardware``. The release has no patient or study ids, so each image is its own study.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medembed.data.manifest.split import assign_grouped_split
from medembed.data.manifest.table import Manifest, ManifestError, format_rows, listing, read_csv_table

FRACATLAS_SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
IMAGE_FOLDERS = ("Fractured", "Non_fractured")
BODY_PARTS = ("hand", "leg", "hip", "shoulder")  # a row with mixed=1 has several of these set
EXTRA_COLUMNS = ("fractured", "hardware", "fracture_count", "frontal", "lateral", "oblique", "multiscan")
_FLAG_COLUMNS = (*BODY_PARTS, "mixed", "fractured", "hardware", "frontal", "lateral", "oblique", "multiscan")


def _locate_images(images_dir: Path) -> dict[str, str]:
    """File name -> the folder (of IMAGE_FOLDERS) it lies in; a name in both folders is an error."""
    folder_of: dict[str, str] = {}
    for folder in IMAGE_FOLDERS:
        if not (images_dir / folder).is_dir():
            raise ManifestError(f"FracAtlas folder {images_dir / folder} not found")
        for name in os.listdir(images_dir / folder):
            if name in folder_of:
                raise ManifestError(f"FracAtlas image {name} lies in both {folder_of[name]}/ and {folder}/")
            folder_of[name] = folder
    return folder_of


def _check_flags(table: dict[str, np.ndarray], csv_path: Path) -> None:
    for name in _FLAG_COLUMNS:
        rows = np.flatnonzero(~np.isin(table[name], ("0", "1")))
        if len(rows):
            values = listing(table[name][rows], quote=True)
            raise ManifestError(f"{csv_path}: column {name} must be 0 or 1; {format_rows(rows + 1)} hold {values}")
    rows = np.flatnonzero(~np.char.isdigit(table["fracture_count"].astype(str)))
    if len(rows):
        raise ManifestError(f"{csv_path}: fracture_count must be a whole number; {format_rows(rows + 1)}")


def _body_parts(table: dict[str, np.ndarray], csv_path: Path) -> np.ndarray:
    """[N] body part: 'mixed' where mixed=1, else the one region flagged; anything else is an error."""
    flags = np.stack([table[name] == "1" for name in BODY_PARTS], axis=1)
    mixed = table["mixed"] == "1"
    unclear = ~mixed & (flags.sum(axis=1) != 1)
    if unclear.any():
        raise ManifestError(
            f"{csv_path}: {format_rows(np.flatnonzero(unclear) + 1)} flag no single body region "
            f"({', '.join(BODY_PARTS)}) and are not mixed"
        )
    return np.where(mixed, "mixed", np.array(BODY_PARTS, dtype=object)[flags.argmax(axis=1)])


def _folder_disagreements(table: dict[str, np.ndarray], folder_of: dict[str, str], label: np.ndarray) -> list[str]:
    """A note for each image whose folder (Fractured/Non_fractured) contradicts its ``fractured`` flag."""
    in_fractured = np.array([folder_of[name] == "Fractured" for name in table["image_id"]])
    notes = []
    for row in np.flatnonzero(in_fractured != (table["fractured"] == "1")):
        name = table["image_id"][row]
        notes.append(
            f"{name} lies in images/{folder_of[name]}/ but dataset.csv says fractured={table['fractured'][row]} "
            f"(fracture_count={table['fracture_count'][row]}, hardware={table['hardware'][row]}); "
            f"label taken from dataset.csv: {label[row]}"
        )
    return notes


def build_fracatlas(root: Path, seed: int = 0) -> tuple[Manifest, list[str]]:
    """Manifest of FracAtlas under ``root``, and human-readable notes on anything odd in the release.

    Each file is looked up in both image folders, never placed by its label; a file listed in
    ``dataset.csv`` but absent is an error, and a folder contradicting ``fractured`` is a note (the
    label comes from ``dataset.csv``). Paths are relative to ``root``; image_id and study_id are the file
    stem; patient_id is empty. Splits: FRACATLAS_SPLIT_FRACTIONS, seeded, stratified by label and
    body part. Extra columns: EXTRA_COLUMNS, as in ``dataset.csv``.
    """
    root = Path(root)
    csv_path = root / "dataset.csv"
    # file names (image_id) are kept exactly; the 0/1 flags may carry stray spaces
    header, table = read_csv_table(csv_path, strip_columns=(*_FLAG_COLUMNS, "fracture_count"))
    missing = [name for name in ("image_id", *_FLAG_COLUMNS, "fracture_count") if name not in table]
    if missing:
        raise ManifestError(f"{csv_path}: missing column(s) {', '.join(missing)}; it has {', '.join(header)}")
    _check_flags(table, csv_path)
    folder_of = _locate_images(root / "images")
    names = table["image_id"]

    absent = [name for name in names if name not in folder_of]
    if absent:
        raise ManifestError(f"{len(absent)} image(s) of {csv_path} not found in {root / 'images'}: {listing(absent)}")
    listed = set(names)
    if len(listed) != len(names):
        raise ManifestError(f"{csv_path}: {len(names) - len(listed)} image_id(s) listed more than once")

    label = np.where((table["fractured"] == "1") | (table["hardware"] == "1"), "1", "0").astype(object)
    notes = _folder_disagreements(table, folder_of, label)
    unlisted = sorted(set(folder_of) - listed)
    if unlisted:
        notes.append(f"{len(unlisted)} file(s) in images/ not listed in dataset.csv, left out: {listing(unlisted)}")

    stems = np.array([Path(name).stem for name in names], dtype=object)
    body_part = _body_parts(table, csv_path)
    columns = {
        "image_id": stems,
        "path": [f"images/{folder_of[name]}/{name}" for name in names],
        "label": label,
        "study_id": stems,
        "patient_id": np.full(len(names), "", dtype=object),
        "body_part": body_part,
        "split": assign_grouped_split(stems, label + "/" + body_part, FRACATLAS_SPLIT_FRACTIONS, seed),
        **{name: table[name] for name in EXTRA_COLUMNS},
    }
    return Manifest(columns), notes

"""Manifest builders for a user's own data: a folder-per-class tree, or a CSV with other column names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import numpy as np

from medembed.data.manifest.table import (
    EXAMPLES,
    MANIFEST_COLUMNS,
    STRIPPED_COLUMNS,
    Manifest,
    ManifestError,
    listing,
    read_csv_table,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".tif", ".tiff")
DEFAULT_CLASS_LABELS = {
    **dict.fromkeys(("normal", "negative", "0", "non_fractured"), 0),
    **dict.fromkeys(("abnormal", "positive", "1", "fractured"), 1),
}
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _stray_images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_labels(class_names: list[str], class_to_label: Mapping[str, int] | None, root: Path) -> dict[str, int]:
    """Class folder name -> 0/1, matched case-insensitively; unmapped folders are an error."""
    mapping = {str(name).lower(): label for name, label in (class_to_label or DEFAULT_CLASS_LABELS).items()}
    bad_labels = {name: label for name, label in mapping.items() if label not in (0, 1)}
    if bad_labels:
        raise ManifestError(f"class labels must be 0 or 1, got {bad_labels}")
    unmapped = sorted({name for name in class_names if name.lower() not in mapping})
    if unmapped:
        known = ", ".join(f"{name}->{label}" for name, label in mapping.items())
        hint = f"class_to_label knows {known}; pass one that maps every class folder to 0 or 1"
        raise ManifestError(f"class folder(s) {', '.join(unmapped)} under {root} have no label: {hint}")
    return {name: mapping[name.lower()] for name in class_names}


def build_from_folders(root: Path, class_to_label: Mapping[str, int] | None = None) -> Manifest:
    """Manifest of a folder-per-class tree: ``root/<class>/**/<image>`` or ``root/<split>/<class>/**/<image>``.

    Images are files with a suffix in IMAGE_SUFFIXES (hidden files and folders skipped). The split
    layout applies when every top folder is train/val/valid/validation/test (valid, validation -> val).
    ``class_to_label`` maps class folder names (case-insensitive) to 0/1, default DEFAULT_CLASS_LABELS.
    image_id is the path relative to ``root`` without its suffix. Columns: image_id, path, label,
    split (split layout only), and the extra ``class`` (the folder name).
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder")
    top = _subfolders(root)
    is_split = [folder.name.lower() in SPLIT_ALIASES for folder in top]
    if any(is_split) and not all(is_split):
        raise ManifestError(
            f"{root} mixes split folders ({', '.join(f.name for f, s in zip(top, is_split) if s)}) with "
            f"other folders ({', '.join(f.name for f, s in zip(top, is_split) if not s)}); use one layout"
        )
    split_folders = [(SPLIT_ALIASES[f.name.lower()], f) for f in top] if top and all(is_split) else [("", root)]

    rows: list[tuple[str, str, Path]] = []  # (split, class, file)
    for split, folder in split_folders:
        stray = _stray_images(folder)
        if stray:
            raise ManifestError(f"images directly in {folder} (not in a class folder): {listing(stray)}")
        for class_folder in _subfolders(folder):
            files = sorted(p for p in class_folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            rows += [(split, class_folder.name, p) for p in files if not _is_hidden(p, root)]
    if not rows:
        raise ManifestError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class folders under {root}")
    labels = _class_labels([class_name for _, class_name, _ in rows], class_to_label, root)

    relative = [file.relative_to(root) for _, _, file in rows]
    image_ids = [p.with_suffix("").as_posix() for p in relative]
    first_file: dict[str, Path] = {}
    for image_id, path in zip(image_ids, relative):
        if image_id in first_file:
            raise ManifestError(f"{first_file[image_id]} and {path} would share image_id {image_id!r}; rename one")
        first_file[image_id] = path
    columns = {
        "image_id": image_ids,
        "path": [p.as_posix() for p in relative],
        "label": [str(labels[class_name]) for _, class_name, _ in rows],
    }
    if split_folders[0][0]:
        columns["split"] = [split for split, _, _ in rows]
    columns["class"] = [class_name for _, class_name, _ in rows]
    return Manifest(columns)


def _translate(values: np.ndarray, mapping: Mapping[str, str], where: str, hint: str) -> np.ndarray:
    """[N] values looked up case-insensitively in ``mapping`` (empty stays empty); misses name their rows."""
    unknown = [row for row, value in enumerate(values) if value and value.lower() not in mapping]
    if unknown:
        examples = listing([f"row {row + 1} {values[row]!r}" for row in unknown[:EXAMPLES]], len(unknown))
        raise ManifestError(f"{where}: {len(unknown)} value(s) cannot be mapped ({examples}); {hint}")
    return np.array([mapping[value.lower()] if value else "" for value in values], dtype=object)


def _map_labels(values: np.ndarray, label_map: Mapping[str, int] | None, where: str) -> np.ndarray:
    """[N] user label values -> "0"/"1"/"" through ``label_map`` (default: 0 and 1 as they are)."""
    if label_map is None:
        return _translate(values, {"0": "0", "1": "1"}, where, "labels must be 0, 1 or empty, or pass label_map")
    mapping = {str(key).strip().lower(): str(label) for key, label in label_map.items()}
    if not set(mapping.values()) <= {"0", "1"}:
        raise ManifestError(f"label_map values must be 0 or 1, got {dict(label_map)}")
    return _translate(values, mapping, where, f"label_map knows {', '.join(mapping)}")


def build_from_csv(csv_path: Path, mapping: Mapping[str, str], label_map: Mapping[str, int] | None = None) -> Manifest:
    """Manifest from a user's CSV whose columns have other names.

    ``mapping``: manifest column -> user column, e.g. ``{"path": "file", "label": "diagnosis"}``; a user
    column already named like a manifest column maps to it unless mapped otherwise. ``path`` is needed;
    without ``image_id`` it is the path without its suffix. ``label_map`` maps label values (matched
    case-insensitively) to 0/1, e.g. ``{"abnormal": 1, "normal": 0}``; without it labels must be 0/1/empty.
    Split values valid/validation become val. Unmapped user columns are carried as extras, in order. Values
    are kept exactly as written (paths with leading/trailing spaces included) except label, split and body
    part, whose surrounding spaces are stripped.
    """
    csv_path = Path(csv_path)
    header, table = read_csv_table(csv_path)
    if len(table[header[0]]) == 0:
        raise ManifestError(f"{csv_path}: has a header but no rows")
    not_manifest = [name for name in mapping if name not in MANIFEST_COLUMNS]
    if not_manifest:
        raise ManifestError(f"mapping keys must be among {', '.join(MANIFEST_COLUMNS)}; got {', '.join(not_manifest)}")
    absent = [name for name in mapping.values() if name not in table]
    if absent:
        raise ManifestError(f"{csv_path}: no column(s) {', '.join(absent)}; it has {', '.join(header)}")
    sources = dict(mapping)
    for name in MANIFEST_COLUMNS:
        if name not in sources and name in table and name not in mapping.values():
            sources[name] = name
    clashes = [name for name in header if name in MANIFEST_COLUMNS and name not in sources.values()]
    if clashes:
        raise ManifestError(f"{csv_path}: column(s) {', '.join(clashes)} clash with manifest columns mapped elsewhere")
    if "path" not in sources:
        raise ManifestError(f"{csv_path}: map a column to 'path' (it has {', '.join(header)})")

    columns = {name: table[sources[name]] for name in MANIFEST_COLUMNS if name in sources}
    # ids and paths are kept exactly as written (" x.png" is a real file name); vocabulary values are stripped
    for name in STRIPPED_COLUMNS:
        if name in columns:
            columns[name] = np.array([value.strip() for value in columns[name]], dtype=object)
    if "image_id" not in columns:
        columns["image_id"] = [PurePosixPath(p).with_suffix("").as_posix() if p else "" for p in columns["path"]]
    if "label" in columns:
        columns["label"] = _map_labels(columns["label"], label_map, f"{csv_path} column {sources['label']!r}")
    if "split" in columns:
        where = f"{csv_path} column {sources['split']!r}"
        columns["split"] = _translate(columns["split"], SPLIT_ALIASES, where, "splits must be train, val or test")
    columns.update({name: table[name] for name in header if name not in sources.values()})
    return Manifest(columns)

"""Manifest builder for MURA v1.1 (Rajpurkar et al., 2018): musculoskeletal radiographs of 7 body parts.

Layout: ``{train,valid}/XR_<PART>/patient<ID>/study<N>_{positive,negative}/image<K>.png``. A study is
(body part, patient, study number) and its label is the folder suffix. MURA's ``valid`` is the usual
held-out test; a ``val`` split is carved from ``train`` grouped by patient.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from medembed.data.manifest.split import assign_grouped_split
from medembed.data.manifest.table import Manifest, ManifestError, listing

MURA_FOLDER = "MURA-v1.1"
MURA_SPLITS = {"train": "train", "valid": "test"}  # MURA folder -> manifest split (val is carved from train)
LAYOUT = "{train,valid}/XR_<PART>/patient<ID>/study<N>_{positive,negative}/image<K>.png"
_IMAGE = re.compile(r"(train|valid)/XR_([A-Z]+)/(patient\d+)/study(\d+)_(positive|negative)/image(\d+)\.png")
_STUDY = re.compile(r"(train|valid)/XR_([A-Z]+)/(patient\d+)/study(\d+)(?:_(?:positive|negative))?/?")


class MuraImage(NamedTuple):
    """One image parsed from its path relative to the MURA folder."""

    mura_split: str  # train | valid
    part: str  # e.g. WRIST
    patient: str  # e.g. patient00001
    study: int
    label: str  # "1" positive, "0" negative
    image: int
    relative: str  # e.g. train/XR_WRIST/patient00001/study1_positive/image1.png

    @property
    def study_id(self) -> str:
        return f"XR_{self.part}/{self.patient}/study{self.study}"


def _from_mura_split(path: str) -> str:
    """The part of a listed path from its train/valid folder on (listings start with 'MURA-v1.1/')."""
    parts = path.replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        if part in MURA_SPLITS:
            return "/".join(parts[i:])
    return path


def _parse_image(relative: str, source: str) -> MuraImage:
    match = _IMAGE.fullmatch(relative)
    if match is None:
        raise ManifestError(f"{source}: {relative!r} does not follow MURA's layout {LAYOUT}")
    mura_split, part, patient, study, outcome, image = match.groups()
    return MuraImage(mura_split, part, patient, int(study), "1" if outcome == "positive" else "0", int(image), relative)


def _listed_images(image_paths_csv: Path, mura_split: str) -> list[MuraImage]:
    """Images named in ``<split>_image_paths.csv`` (one path a line, no header)."""
    images = []
    for line_number, line in enumerate(image_paths_csv.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if line.strip():
            source = f"{image_paths_csv} line {line_number}"
            image = _parse_image(_from_mura_split(line.strip()), source)
            if image.mura_split != mura_split:
                raise ManifestError(f"{source}: {line.strip()!r} is not in {mura_split}/")
            images.append(image)
    return images


def _walked_images(base: Path, mura_split: str) -> list[MuraImage]:
    """Images found on disk under ``base/<split>/`` (hidden files such as macOS '._' copies skipped)."""
    files = (base / mura_split).glob("XR_*/patient*/study*/*.png")
    return [_parse_image(p.relative_to(base).as_posix(), str(base)) for p in files if not p.name.startswith(".")]


def _check_study_labels(images: list[MuraImage], labeled_studies: Path) -> None:
    """Raise ManifestError where ``<split>_labeled_studies.csv`` (rows 'study path,label') contradicts a folder."""
    listed = {}
    for line_number, line in enumerate(labeled_studies.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(",", 1)
        match = _STUDY.fullmatch(_from_mura_split(fields[0].strip()))
        if len(fields) != 2 or match is None or fields[1].strip() not in ("0", "1"):
            raise ManifestError(f"{labeled_studies} line {line_number}: expected 'study folder path,0|1'")
        mura_split, part, patient, study = match.groups()
        listed[(mura_split, f"XR_{part}/{patient}/study{int(study)}")] = fields[1].strip()
    for image in images:
        expected = listed.get((image.mura_split, image.study_id))
        if expected is not None and expected != image.label:
            raise ManifestError(
                f"MURA study {image.mura_split}/{image.study_id}: its folder says label {image.label} "
                f"but {labeled_studies.name} says {expected}"
            )


def build_mura(root: Path, seed: int = 0, val_fraction: float = 0.1) -> Manifest:
    """Manifest of MURA v1.1 under ``root`` (the folder holding ``MURA-v1.1/``, or that folder itself).

    Images come from ``{train,valid}_image_paths.csv`` where present, else from walking the tree;
    study labels are checked against ``*_labeled_studies.csv`` where present. Paths are relative to
    ``root``; image_id is the path from ``train/``/``valid/`` on without extension. MURA ``valid``
    becomes ``test``; ``val`` takes ``val_fraction`` of train's images, whole patients, seeded, and
    stratified by body part and label. Columns: the seven standard ones.
    """
    root = Path(root)
    if not 0 <= val_fraction < 1:
        raise ManifestError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not root.is_dir():
        raise ManifestError(f"MURA root {root} is not a folder")
    base = root / MURA_FOLDER if (root / MURA_FOLDER).is_dir() else root
    images: list[MuraImage] = []
    for mura_split in MURA_SPLITS:
        image_paths_csv = base / f"{mura_split}_image_paths.csv"
        if image_paths_csv.is_file():
            split_images = _listed_images(image_paths_csv, mura_split)
        else:
            split_images = _walked_images(base, mura_split)
        labeled_studies = base / f"{mura_split}_labeled_studies.csv"
        if labeled_studies.is_file():
            _check_study_labels(split_images, labeled_studies)
        images += split_images
    if not images:
        raise ManifestError(
            f"no MURA images under {root}: expected {MURA_FOLDER}/{LAYOUT} there (or {LAYOUT} directly)"
        )
    images.sort(key=lambda im: (im.mura_split, im.part, im.patient, im.study, im.image))
    twice = sorted(relative for relative, n in Counter(im.relative for im in images).items() if n > 1)
    if twice:
        raise ManifestError(f"MURA image(s) listed more than once: {listing(twice)}")

    prefix = "" if base == root else f"{base.name}/"
    columns = {
        "image_id": [im.relative.removesuffix(".png") for im in images],
        "path": [prefix + im.relative for im in images],
        "label": [im.label for im in images],
        "study_id": [im.study_id for im in images],
        "patient_id": [im.patient for im in images],
        "body_part": [im.part.lower() for im in images],
        "split": [MURA_SPLITS[im.mura_split] for im in images],
    }
    manifest = Manifest(columns)
    split = manifest.split.copy()
    train = split == "train"
    if val_fraction > 0 and train.any():
        strata = manifest.body_part[train] + "/" + manifest.column("label")[train]
        fractions = {"train": 1 - val_fraction, "val": val_fraction}
        split[train] = assign_grouped_split(manifest.patient_id[train], strata, fractions, seed)
    return Manifest({**manifest.columns, "split": split})

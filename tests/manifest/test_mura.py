"""MURA v1.1 builder on small generated trees (real PNG files), walked and listed by CSV."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medembed.data.manifest import ManifestError, build_mura, validate_manifest

# (MURA split, part, patient, study, positive?, images). patient00003 has two studies of the wrist and one
# of the elbow; patient00004 has a positive and a negative study.
STUDIES = [
    ("train", "WRIST", "patient00001", 1, True, 3),
    ("train", "WRIST", "patient00002", 1, False, 2),
    ("train", "WRIST", "patient00003", 1, True, 1),
    ("train", "WRIST", "patient00003", 2, False, 2),
    ("train", "ELBOW", "patient00003", 1, False, 2),
    ("train", "ELBOW", "patient00004", 1, True, 2),
    ("train", "ELBOW", "patient00004", 2, False, 1),
    ("train", "SHOULDER", "patient00005", 1, True, 4),
    ("train", "SHOULDER", "patient00006", 1, False, 3),
] + [("train", part, f"patient{10 + i:05d}", 1, i % 2 == 0, 1 + i % 3) for i, part in enumerate(["HAND", "WRIST"] * 12)]
VALID = [
    ("valid", "WRIST", "patient11185", 1, True, 2),
    ("valid", "HAND", "patient11186", 1, False, 1),
    ("valid", "HAND", "patient11186", 2, True, 2),
]


def _study_folder(mura_split: str, part: str, patient: str, study: int, positive: bool) -> str:
    return f"{mura_split}/XR_{part}/{patient}/study{study}_{'positive' if positive else 'negative'}"


def make_mura(root: Path) -> Path:
    """Write a tiny MURA-v1.1 tree under ``root`` (4x4 grey PNGs) and its two official CSV listings."""
    base = root / "MURA-v1.1"
    listings: dict[str, list[str]] = {"train": [], "valid": []}
    labels: dict[str, list[str]] = {"train": [], "valid": []}
    for mura_split, part, patient, study, positive, n_images in STUDIES + VALID:
        folder = _study_folder(mura_split, part, patient, study, positive)
        (base / folder).mkdir(parents=True)
        labels[mura_split].append(f"MURA-v1.1/{folder}/,{int(positive)}")
        for k in range(1, n_images + 1):
            Image.new("L", (32, 32), color=k).save(base / folder / f"image{k}.png")
            listings[mura_split].append(f"MURA-v1.1/{folder}/image{k}.png")
    for mura_split in listings:
        (base / f"{mura_split}_image_paths.csv.unused").write_text("\n".join(listings[mura_split]) + "\n")
        (base / f"{mura_split}_labeled_studies.csv.unused").write_text("\n".join(labels[mura_split]) + "\n")
    return base


def _use_listings(base: Path) -> None:
    for path in base.glob("*.csv.unused"):
        path.rename(path.with_suffix(""))


N_IMAGES = sum(study[-1] for study in STUDIES + VALID)


@pytest.fixture
def mura_root(tmp_path: Path) -> Path:
    make_mura(tmp_path)
    return tmp_path


def test_walked_tree_gives_ids_studies_labels_and_splits(mura_root: Path) -> None:
    manifest = build_mura(mura_root, seed=0, val_fraction=0.3)
    assert len(manifest) == N_IMAGES
    row = manifest.image_id.tolist().index("train/XR_WRIST/patient00003/study2_negative/image2")
    assert manifest.path[row] == "MURA-v1.1/train/XR_WRIST/patient00003/study2_negative/image2.png"
    assert manifest.study_id[row] == "XR_WRIST/patient00003/study2"
    assert manifest.patient_id[row] == "patient00003"
    assert manifest.body_part[row] == "wrist"
    assert manifest.label[row] == 0
    assert list(manifest.columns) == ["image_id", "path", "label", "study_id", "patient_id", "body_part", "split"]
    assert manifest.label.tolist() == [int("_positive/" in image_id) for image_id in manifest.image_id]
    assert set(manifest.body_part) == {"wrist", "elbow", "shoulder", "hand"}
    assert len(np.unique(manifest.study_id)) == len(STUDIES) + len(VALID)

    is_valid = np.char.startswith(manifest.image_id.astype(str), "valid/")
    assert set(manifest.split[is_valid]) == {"test"}
    assert set(manifest.split[~is_valid]) == {"train", "val"}
    report = validate_manifest(manifest, mura_root, check_decodable=True)
    assert report.errors == [] and report.warnings == []  # in particular no patient in two splits


def test_val_is_carved_by_patient_with_the_fraction_and_seed(mura_root: Path) -> None:
    manifest = build_mura(mura_root, seed=0, val_fraction=0.3)
    train_or_val = manifest.split != "test"
    share = np.mean(manifest.split[train_or_val] == "val")
    assert 0.2 < share < 0.4
    for patient in np.unique(manifest.patient_id):
        assert len(set(manifest.split[manifest.patient_id == patient])) == 1
    assert build_mura(mura_root, seed=0, val_fraction=0.3) == manifest
    val_sets = {tuple(build_mura(mura_root, seed=s, val_fraction=0.3).split) for s in range(5)}
    assert len(val_sets) > 1
    assert set(build_mura(mura_root, val_fraction=0.0).split) == {"train", "test"}


def test_root_may_be_the_mura_folder_itself(mura_root: Path) -> None:
    outer = build_mura(mura_root, seed=0)
    inner = build_mura(mura_root / "MURA-v1.1", seed=0)
    assert inner.image_id.tolist() == outer.image_id.tolist()
    assert inner.path.tolist() == [p.removeprefix("MURA-v1.1/") for p in outer.path]
    assert inner.split.tolist() == outer.split.tolist()


def test_csv_listings_give_the_same_manifest_as_the_walk(mura_root: Path) -> None:
    walked = build_mura(mura_root, seed=2)
    _use_listings(mura_root / "MURA-v1.1")
    assert build_mura(mura_root, seed=2) == walked
    listed_inside = build_mura(mura_root / "MURA-v1.1", seed=2)  # listings say MURA-v1.1/..., root is inside it
    assert listed_inside.path.tolist() == [p.removeprefix("MURA-v1.1/") for p in walked.path]


def test_csv_listing_is_used_instead_of_the_tree(mura_root: Path) -> None:
    base = mura_root / "MURA-v1.1"
    _use_listings(base)
    listing = base / "valid_image_paths.csv"
    listing.write_text("\n".join(listing.read_text().splitlines()[:2]) + "\n")
    manifest = build_mura(mura_root)
    assert (manifest.split == "test").sum() == 2


def test_labeled_studies_disagreeing_with_a_folder_is_an_error(mura_root: Path) -> None:
    base = mura_root / "MURA-v1.1"
    _use_listings(base)
    labeled = base / "train_labeled_studies.csv"
    study = "patient00002/study1_negative/"
    labeled.write_text(labeled.read_text().replace(f"{study},0", f"{study},1"))
    with pytest.raises(ManifestError, match="train/XR_WRIST/patient00002/study1: its folder says label 0"):
        build_mura(mura_root)


def test_malformed_listing_line_is_named(mura_root: Path) -> None:
    base = mura_root / "MURA-v1.1"
    good = "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/image1.png"
    (base / "train_image_paths.csv").write_text(f"{good}\nnot/a/path.png\n")
    with pytest.raises(ManifestError, match="train_image_paths.csv line 2: 'not/a/path.png' does not follow"):
        build_mura(mura_root)


def test_image_listed_twice_is_an_error(mura_root: Path) -> None:
    base = mura_root / "MURA-v1.1"
    _use_listings(base)
    listing = base / "valid_image_paths.csv"
    first = listing.read_text().splitlines()[0]
    listing.write_text(listing.read_text() + first + "\n")
    with pytest.raises(ManifestError, match="listed more than once: valid/XR_WRIST/patient11185/study1_positive/image1.png"):
        build_mura(mura_root)


def test_empty_tree_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "MURA-v1.1" / "train").mkdir(parents=True)
    with pytest.raises(ManifestError, match="no MURA images under"):
        build_mura(tmp_path)
    with pytest.raises(ManifestError, match="val_fraction"):
        build_mura(tmp_path, val_fraction=1.0)

"""FracAtlas builder: the real release (fixture), the committed canonical manifest, and small fakes for errors."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medembed.data.manifest import (
    FRACATLAS_SPLIT_FRACTIONS,
    ManifestError,
    build_fracatlas,
    read_manifest,
    validate_manifest,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "data_manifests" / "fracatlas.csv"


@pytest.fixture(scope="module")
def fracatlas(fracatlas_root: Path) -> tuple:
    return build_fracatlas(fracatlas_root, seed=0)


def test_real_release_rows_labels_and_notes(fracatlas: tuple, fracatlas_root: Path) -> None:
    manifest, notes = fracatlas
    assert len(manifest) == 4083
    assert (manifest.label == 1).sum() == 718  # fractured OR hardware
    assert set(manifest.body_part) == {"hand", "leg", "hip", "shoulder", "mixed"}
    assert (manifest.patient_id == "").all() and (manifest.study_id == manifest.image_id).all()
    row = manifest.image_id.tolist().index("IMG0003298")
    assert manifest.path[row] == "images/Fractured/IMG0003298.jpg"  # looked up, not derived from the label
    assert manifest.label[row] == 0
    assert len(notes) == 1 and notes[0].startswith("IMG0003298.jpg lies in images/Fractured/")
    extras = ["fractured", "hardware", "fracture_count", "frontal", "lateral", "oblique", "multiscan"]
    assert list(manifest.columns)[7:] == extras
    report = validate_manifest(manifest, fracatlas_root)
    assert report.problems == []


def test_real_release_splits_follow_fractions_within_each_stratum(fracatlas: tuple) -> None:
    manifest, _ = fracatlas
    for name, share in FRACATLAS_SPLIT_FRACTIONS.items():
        assert abs((manifest.split == name).sum() - share * len(manifest)) <= 1
        for label in (0, 1):
            for part in np.unique(manifest.body_part):
                cell = (manifest.label == label) & (manifest.body_part == part)
                assert abs((manifest.split[cell] == name).sum() - share * cell.sum()) <= 2, (name, label, part)


def test_committed_manifest_equals_a_fresh_build(fracatlas: tuple, tmp_path: Path) -> None:
    fresh = tmp_path / "fracatlas.csv"
    write_manifest(fracatlas[0], fresh)
    assert COMMITTED.read_bytes() == fresh.read_bytes(), "rebuild data_manifests/fracatlas.csv (see its README)"


def test_readme_counts_match_the_committed_manifest() -> None:
    readme = (REPO / "data_manifests" / "README.md").read_text()
    tables = validate_manifest(read_manifest(COMMITTED), None).format().split("\n\n")[1:3]
    for line in "\n".join(tables).splitlines():
        assert line in readme


DATASET_HEADER = (
    "image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique\n"
)


def _fake_release(root: Path, rows: list[str], files: list[str]) -> Path:
    (root / "dataset.csv").write_text(DATASET_HEADER + "".join(f"{row}\n" for row in rows))
    for folder in ("Fractured", "Non_fractured"):
        (root / "images" / folder).mkdir(parents=True)
    for file in files:
        Image.new("L", (4, 4)).save(root / "images" / file, format="JPEG")
    return root


def test_fake_release_labels_body_parts_and_folder_disagreements(tmp_path: Path) -> None:
    rows = [
        "A.jpg,1,0,0,0,0,0,0,1,1,1,0,0",  # fractured
        "B.jpg,0,1,1,0,1,1,0,0,0,1,0,0",  # hardware only, mixed regions
        "C.jpg,0,0,0,1,0,0,0,0,0,1,0,0",  # normal
        "D.jpg,0,0,1,0,0,0,0,1,2,1,0,0",  # fractured, but filed under Non_fractured/
    ]
    files = ["Fractured/A.jpg", "Non_fractured/B.jpg", "Non_fractured/C.jpg", "Non_fractured/D.jpg", "Fractured/E.jpg"]
    manifest, notes = build_fracatlas(_fake_release(tmp_path, rows, files))
    assert manifest.label.tolist() == [1, 1, 0, 1]
    assert manifest.body_part.tolist() == ["hand", "mixed", "shoulder", "hip"]
    assert manifest.path.tolist()[3] == "images/Non_fractured/D.jpg"
    assert notes == [
        "D.jpg lies in images/Non_fractured/ but dataset.csv says fractured=1 (fracture_count=2, hardware=0); "
        "label taken from dataset.csv: 1",
        "1 file(s) in images/ not listed in dataset.csv, left out: E.jpg",
    ]


@pytest.mark.parametrize(
    ("rows", "files", "message"),
    [
        (["A.jpg,1,0,0,0,0,0,0,1,1,1,0,0"], [], r"1 image\(s\) of .*dataset.csv not found in .*: A.jpg"),
        (["A.jpg,1,0,0,0,0,0,0,yes,1,1,0,0"], ["Fractured/A.jpg"], "column fractured must be 0 or 1; row 1 hold 'yes'"),
        (["A.jpg,1,1,0,0,0,0,0,1,1,1,0,0"], ["Fractured/A.jpg"], "row 1 flag no single body region"),
    ],
)
def test_fake_release_errors(tmp_path: Path, rows: list[str], files: list[str], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        build_fracatlas(_fake_release(tmp_path, rows, files))


def test_missing_dataset_csv(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="dataset.csv: no such file"):
        build_fracatlas(tmp_path)

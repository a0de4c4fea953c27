"""Manifest table: construction, accessors, CSV read/write."""

import os
from pathlib import Path

import numpy as np
import pytest

from medembed.manifest import Manifest, ManifestError, read_manifest, write_manifest


def _manifest() -> Manifest:
    return Manifest(
        {
            "site": ["a", "b, with comma", 'c "quoted"'],  # an extra given first: kept after the standard columns
            "path": ["x/1.png", "x/2.png", "y/3.png"],
            "image_id": ["i1", "i2", "i3"],
            "label": ["1", "", "0"],
            "study_id": ["s1", "s1", ""],
            "patient_id": ["p1", "", ""],
            "scanner": ["", "ge", "siemens"],
        }
    )


def test_round_trip_puts_standard_columns_first_and_keeps_extras(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "manifest.csv"
    write_manifest(_manifest(), path)
    assert path.read_text().splitlines()[0] == "image_id,path,label,study_id,patient_id,site,scanner"
    back = read_manifest(path)
    assert list(back.columns) == ["image_id", "path", "label", "study_id", "patient_id", "site", "scanner"]
    for name, values in _manifest().columns.items():
        assert back.column(name).tolist() == values.tolist()
    assert back == _manifest()
    assert os.listdir(path.parent) == ["manifest.csv"]  # no temporary file left


def test_write_is_atomic_when_the_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "manifest.csv"
    path.write_text("old content\n")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_manifest(_manifest(), path)
    assert path.read_text() == "old content\n"
    assert os.listdir(tmp_path) == ["manifest.csv"]


def test_accessors_fill_absent_columns_and_fall_back_for_groups() -> None:
    manifest = _manifest()
    assert manifest.label.dtype == np.int8
    assert manifest.label.tolist() == [1, -1, 0]
    assert manifest.split.tolist() == ["", "", ""]
    assert manifest.body_part.tolist() == ["", "", ""]
    assert manifest.study_ids().tolist() == ["s1", "s1", "i3"]
    assert manifest.group_ids().tolist() == ["p1", "s1", "i3"]
    assert len(manifest) == 3


def test_label_property_refuses_values_outside_0_1_empty() -> None:
    manifest = Manifest({"image_id": ["a", "b"], "path": ["a", "b"], "label": ["1", "abnormal"]})
    with pytest.raises(ManifestError, match=r"row 2 hold 'abnormal'"):
        manifest.label


def test_column_error_lists_available_columns() -> None:
    with pytest.raises(ManifestError, match="no column 'split'; it has image_id, path, label, study_id, patient_id"):
        _manifest().column("split")


def test_subset_by_mask_and_indices() -> None:
    manifest = _manifest()
    assert manifest.subset(np.array([True, False, True])).image_id.tolist() == ["i1", "i3"]
    assert manifest.subset([2, 0]).image_id.tolist() == ["i3", "i1"]
    assert list(manifest.subset([1]).columns) == list(manifest.columns)
    with pytest.raises(ManifestError, match="mask has shape"):
        manifest.subset(np.array([True, False]))


def test_resolve_gives_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    paths = _manifest().resolve(Path("data"))
    assert paths[0] == tmp_path / "data" / "x" / "1.png"
    assert all(p.is_absolute() for p in paths)


def test_construction_checks_required_columns_and_lengths() -> None:
    with pytest.raises(ManifestError, match="required column.*path"):
        Manifest({"image_id": ["a"]})
    with pytest.raises(ManifestError, match="differ in length"):
        Manifest({"image_id": ["a", "b"], "path": ["a"]})
    converted = Manifest({"image_id": np.array(["a"]), "path": ["p"], "label": np.array([1]), "note": [None]})
    assert converted.columns["label"].tolist() == ["1"] and converted.columns["note"].tolist() == [""]
    assert converted.columns["image_id"].dtype == object


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ("image_id,label\na,1\n", "missing required column.*path; it has image_id, label"),
        ("image_id,path\n", "header but no rows"),
        ("image_id,path,label\na,a.png,1\nb,b.png\n", r"row 2 \(line 3\) has 2 fields, the header has 3"),
        ("image_id,path,path\na,b,c\n", "repeats column.*path"),
    ],
)
def test_read_errors_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "absent.csv")


def test_read_strips_spaces_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("\ufeffimage_id , path, label\n a , a.png , 1\n\nb,b.png,\n")
    manifest = read_manifest(path)
    assert manifest.image_id.tolist() == ["a", "b"]
    assert manifest.label.tolist() == [1, -1]

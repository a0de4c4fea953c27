"""Builders for a user's own data: folder-per-class trees and CSVs with other column names."""

from pathlib import Path

import pytest
from PIL import Image

from medembed.data.manifest import ManifestError, build_from_csv, build_from_folders, validate_manifest


def _images(root: Path, *relative: str) -> None:
    for name in relative:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (32, 32)).save(path, format="PNG" if path.suffix == ".png" else "JPEG")


def test_class_folders_with_default_mapping(tmp_path: Path) -> None:
    _images(tmp_path, "Normal/a.png", "Normal/sub/b.jpg", "ABNORMAL/c.png")
    _images(tmp_path, "ABNORMAL/.hidden.png", "Normal/.cache/d.png")  # hidden: skipped
    (tmp_path / "notes.txt").write_text("not an image")
    manifest = build_from_folders(tmp_path)
    assert manifest.image_id.tolist() == ["ABNORMAL/c", "Normal/a", "Normal/sub/b"]
    assert manifest.path.tolist() == ["ABNORMAL/c.png", "Normal/a.png", "Normal/sub/b.jpg"]
    assert manifest.label.tolist() == [1, 0, 0]
    assert manifest.column("class").tolist() == ["ABNORMAL", "Normal", "Normal"]
    assert "split" not in manifest.columns
    assert validate_manifest(manifest, tmp_path, check_decodable=True).errors == []


def test_split_folders_with_valid_as_val(tmp_path: Path) -> None:
    _images(tmp_path, "train/negative/a.png", "train/positive/b.png", "valid/negative/c.png", "test/1/d.png")
    manifest = build_from_folders(tmp_path)
    assert manifest.split.tolist() == ["test", "train", "train", "val"]
    assert manifest.label.tolist() == [1, 0, 1, 0]
    assert manifest.image_id.tolist() == ["test/1/d", "train/negative/a", "train/positive/b", "valid/negative/c"]


def test_unknown_class_needs_an_explicit_mapping(tmp_path: Path) -> None:
    _images(tmp_path, "healthy/a.png", "fracture/b.png")
    with pytest.raises(ManifestError, match="class folder.*fracture, healthy.*have no label.*class_to_label"):
        build_from_folders(tmp_path)
    manifest = build_from_folders(tmp_path, {"Healthy": 0, "FRACTURE": 1})
    assert manifest.label.tolist() == [1, 0]
    with pytest.raises(ManifestError, match="must be 0 or 1"):
        build_from_folders(tmp_path, {"healthy": 0, "fracture": 2})


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["normal/a.png", "normal/a.jpg"], "would share image_id 'normal/a'"),
        (["train/normal/a.png", "normal/b.png"], "mixes split folders"),
        (["stray.png", "normal/a.png"], "not in a class folder"),
        ([], "no images"),
    ],
)
def test_folder_layout_errors(tmp_path: Path, files: list[str], message: str) -> None:
    _images(tmp_path, *files)
    with pytest.raises(ManifestError, match=message):
        build_from_folders(tmp_path)


def _user_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "user.csv"
    path.write_text(text)
    return path


def test_csv_with_other_names_label_map_and_extras(tmp_path: Path) -> None:
    path = _user_csv(
        tmp_path,
        "file,diagnosis,site,exam,subject,split\n"
        "x/1.png,Abnormal,A,e1,s1,train\n"
        "x/2.png,normal,B,e1,s1,Valid\n"
        "x/3.png,,A,e2,s2,TEST\n",
    )
    mapping = {"path": "file", "label": "diagnosis", "study_id": "exam", "patient_id": "subject"}
    manifest = build_from_csv(path, mapping, {"abnormal": 1, "normal": 0})
    assert list(manifest.columns) == ["image_id", "path", "label", "study_id", "patient_id", "split", "site"]
    assert manifest.image_id.tolist() == ["x/1", "x/2", "x/3"]
    assert manifest.label.tolist() == [1, 0, -1]
    assert manifest.split.tolist() == ["train", "val", "test"]
    assert manifest.column("site").tolist() == ["A", "B", "A"]
    assert manifest.study_id.tolist() == ["e1", "e1", "e2"]


def test_csv_errors_name_the_row_and_value(tmp_path: Path) -> None:
    path = _user_csv(
        tmp_path, "id,file,diagnosis,split\na,a.png,abnormal,train\nb,b.png,borderline,train\nc,c.png,normal,dev\n"
    )
    mapping = {"image_id": "id", "path": "file", "label": "diagnosis"}
    with pytest.raises(ManifestError, match=r"'diagnosis'.*row 2 'borderline'.*label_map knows abnormal, normal"):
        build_from_csv(path, mapping, {"abnormal": 1, "normal": 0})
    with pytest.raises(ManifestError, match=r"row 1 'abnormal'.*pass label_map"):
        build_from_csv(path, mapping)
    with pytest.raises(ManifestError, match=r"column 'split'.*row 3 'dev'"):
        build_from_csv(path, mapping, {"abnormal": 1, "normal": 0, "borderline": 1})
    with pytest.raises(ManifestError, match="no column.*filename; it has id, file, diagnosis, split"):
        build_from_csv(path, {"path": "filename"})
    with pytest.raises(ManifestError, match="mapping keys must be among image_id, path.*got diagnosis"):
        build_from_csv(path, {"path": "file", "diagnosis": "diagnosis"})
    with pytest.raises(ManifestError, match="map a column to 'path'"):
        build_from_csv(path, {"image_id": "id"})


def test_csv_column_clashing_with_a_remapped_manifest_column(tmp_path: Path) -> None:
    path = _user_csv(tmp_path, "path,label,label_text\na.png,x,abnormal\n")
    with pytest.raises(ManifestError, match="label clash"):
        build_from_csv(path, {"label": "label_text"}, {"abnormal": 1})

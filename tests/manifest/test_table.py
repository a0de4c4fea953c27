"""Manifest table: construction, accessors, CSV read/write."""

import os
from pathlib import Path

import numpy as np
import pytest

from medembed.data.manifest import Manifest, ManifestError, read_manifest, write_manifest


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


def test_read_keeps_ids_and_paths_exactly_strips_vocabulary_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("\ufeffimage_id , path, label, split, body_part\n a , a.png , 1 , train , wrist \n\nb,b.png,,,\n")
    manifest = read_manifest(path)
    assert list(manifest.columns) == ["image_id", "path", "label", "body_part", "split"]  # header names stripped
    assert manifest.image_id.tolist() == [" a ", "b"]  # kept as written; validation warns
    assert manifest.path.tolist() == [" a.png ", "b.png"]  # " a.png " is a real file name
    assert manifest.label.tolist() == [1, -1]
    assert manifest.split.tolist() == ["train", ""] and manifest.body_part.tolist() == ["wrist", ""]


def test_paths_with_spaces_round_trip_exactly(tmp_path: Path) -> None:
    manifest = Manifest({"image_id": ["x", "y"], "path": [" x.png", "y.png  "]})
    write_manifest(manifest, tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv") == manifest


def test_read_names_the_line_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b"image_id,path\na,a.png\nb\xe9,b.png\n")
    with pytest.raises(ManifestError, match=r"line 3 is not UTF-8 text \(byte 0xe9 at column 2\)"):
        read_manifest(path)


def test_write_refuses_text_utf8_cannot_hold_naming_the_rows(tmp_path: Path) -> None:
    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # a Latin-1 file name as os.listdir gives it
    manifest = Manifest({"image_id": ["a", "b"], "path": ["a.png", name]})
    with pytest.raises(ManifestError, match="column 'path' row 2 hold.*not valid Unicode"):
        write_manifest(manifest, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


def test_resolve_refuses_paths_escaping_the_root_unless_allowed(tmp_path: Path) -> None:
    manifest = Manifest(
        {
            "image_id": ["ok", "inside", "up", "deep", "abs"],
            "path": ["a/b.png", "a/../b.png", "../x.png", "a/../../../etc/passwd", "/etc/passwd"],
        }
    )
    with pytest.raises(ManifestError) as raised:
        manifest.resolve(tmp_path)
    message = str(raised.value)
    assert "1 absolute paths (pass allow_absolute=True): row 5 ('/etc/passwd')" in message
    assert "2 paths outside the root" in message and "rows 3, 4" in message and "'../x.png'" in message
    with pytest.raises(ManifestError, match="absolute"):
        manifest.resolve(tmp_path, allow_outside_root=True)
    with pytest.raises(ManifestError, match="outside the root"):
        manifest.resolve(tmp_path, allow_absolute=True)
    paths = manifest.resolve(tmp_path, allow_outside_root=True, allow_absolute=True)
    assert paths[0] == tmp_path / "a" / "b.png" and paths[4] == Path("/etc/passwd")
    assert manifest.subset([0, 1]).resolve(tmp_path)[1] == tmp_path / "a/../b.png"  # inside: kept as written


def test_resolve_is_lexical_so_symlinked_subfolders_still_work(tmp_path: Path) -> None:
    elsewhere = tmp_path / "other_disk"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_bytes(b"")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (path,) = Manifest({"image_id": ["x"], "path": ["linked/x.png"]}).resolve(root)
    assert path.is_file() and path.resolve() == elsewhere / "x.png"  # outside the root on disk, allowed

"""Manifest validation: each problem named with its rows, errors vs warnings, the summary."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medembed.data.manifest import Manifest, ManifestError, validate_manifest

# One row a line: image_id, path, label, study_id, patient_id, split; row numbers are 1-based.
ROWS = [
    ("a", "ok.png", "1", "s1", "p1", "train"),  # 1 \ duplicate image_id
    ("a", "ok.png", "1", "s1", "p1", "train"),  # 2 /
    ("c", "missing.png", "0", "s3", "p2", "train"),  # 3 missing file
    ("d", "garbage.png", "1", "s4", "p3", "train"),  # 4 not an image
    ("e", "ok.png", "2", "s5", "p4", "test"),  # 5 label outside {0, 1, ""}
    ("f", "ok.png", "0", "s6", "p4", "holdout"),  # 6 split outside train/val/test
    ("g", "ok.png", "0", "s7", "p5", "train"),  # 7 \ patient p5 in two splits
    ("h", "ok.png", "0", "s8", "p5", "test"),  # 8 /
    ("i", "ok.png", "0", "s9", "p6", "val"),  # 9 \ study s9 disagrees on its label
    ("j", "ok.png", "1", "s9", "p6", "val"),  # 10 /
    ("k", "ok.png", "0", "s11", "", "train"),  # 11 \ study s11 spans splits
    ("l", "ok.png", "0", "s11", "", "val"),  # 12 /
    ("m", "ok.png", "", "s13", "p7", "train"),  # 13 unlabeled (warning)
    ("n", "ok.png", "1", "s14", "p8", ""),  # 14 no split (warning)
    ("", "", "0", "s15", "p9", "test"),  # 15 no image_id, no path
]
EXPECTED = {
    "duplicate_image_id": ("error", [1, 2]),
    "missing_file": ("error", [3]),
    "unreadable_file": ("error", [4]),
    "invalid_label": ("error", [5]),
    "invalid_split": ("error", [6]),
    "patient_in_several_splits": ("error", [7, 8]),
    "study_label_conflict": ("error", [9, 10]),
    "study_in_several_splits": ("error", [11, 12]),
    "empty_image_id": ("error", [15]),
    "empty_path": ("error", [15]),
    "unlabeled_rows": ("warning", [13]),
    "unsplit_rows": ("warning", [14]),
}


def _manifest(rows: list[tuple]) -> Manifest:
    names = ("image_id", "path", "label", "study_id", "patient_id", "split")
    return Manifest({name: [row[i] for row in rows] for i, name in enumerate(names)})


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    Image.new("L", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    return tmp_path


def test_each_problem_is_named_with_its_rows(image_root: Path) -> None:
    report = validate_manifest(_manifest(ROWS), image_root, check_decodable=True)
    found = {p.code: (p.severity, p.rows) for p in report.problems}
    assert found == EXPECTED
    messages = {p.code: p.message for p in report.problems}
    assert "'a' (rows 1, 2)" in messages["duplicate_image_id"]
    assert "'missing.png'" in messages["missing_file"]
    assert "row 4 'garbage.png'" in messages["unreadable_file"]
    assert "'2'" in messages["invalid_label"] and "'holdout'" in messages["invalid_split"]
    assert "'p5' (test, train)" in messages["patient_in_several_splits"]
    assert "'s9' (0, 1)" in messages["study_label_conflict"]
    assert "'s11' (train, val)" in messages["study_in_several_splits"]
    assert {p.code for p in report.errors} == {c for c, (sev, _) in EXPECTED.items() if sev == "error"}
    assert {p.code for p in report.warnings} == {"unlabeled_rows", "unsplit_rows"}
    with pytest.raises(ManifestError, match="duplicate_image_id"):
        report.raise_for_errors()


def test_messages_show_five_examples_and_the_total() -> None:
    rows = [(f"id{i}", f"{i}.png", "7", "", "", "train") for i in range(12)]
    (problem,) = validate_manifest(_manifest(rows), None).errors
    assert problem.code == "invalid_label"
    assert "rows 1, 2, 3, 4, 5 and 7 more" in problem.message and "12 row(s)" in problem.message
    assert problem.rows == list(range(1, 13))


def test_missing_label_and_split_columns_are_warnings_and_files_need_a_root() -> None:
    manifest = Manifest({"image_id": ["a", "b"], "path": ["nowhere/a.png", "nowhere/b.png"]})
    report = validate_manifest(manifest, root=None)
    assert report.errors == []
    assert [p.code for p in report.warnings] == ["no_label_column", "no_split_column"]
    assert "files not checked" in report.format()


def test_clean_manifest_summary_and_table(image_root: Path) -> None:
    rows = [
        ("a", "ok.png", "1", "s1", "p1", "train"),
        ("b", "ok.png", "1", "s1", "p1", "train"),
        ("c", "ok.png", "0", "", "p2", "val"),
        ("d", "ok.png", "0", "", "", "test"),
    ]
    manifest = _manifest(rows)
    manifest.columns["body_part"] = np.array(["wrist", "wrist", "hand", ""], dtype=object)
    report = validate_manifest(manifest, image_root, check_decodable=True)
    assert report.problems == []
    summary = report.summary
    assert (summary["rows"], summary["studies"], summary["patients"]) == (4, 3, 2)
    assert summary["by_split"]["train"] == {"rows": 2, "normal": 0, "abnormal": 2, "unknown": 0}
    assert list(summary["by_split"]) == ["train", "val", "test", "all"]
    assert summary["by_body_part"]["(none)"]["rows"] == 1
    assert summary["by_body_part"]["all"] == {"rows": 4, "normal": 2, "abnormal": 2, "unknown": 0}
    text = report.format()
    assert "4 rows, 3 studies, 2 patients" in text and text.endswith("OK")
    assert "wrist" in text and "100.0" in text


def test_the_decode_check_decodes_in_full_and_finds_truncated_jpegs(fracatlas_root: Path) -> None:
    # IMG0004028 is one of the release's truncated JPEGs: its header is fine, its pixel data ends early
    names = ["Fractured/IMG0000019.jpg", "Non_fractured/IMG0000000.jpg", "Non_fractured/IMG0004028.jpg"]
    manifest = Manifest({"image_id": names, "path": [f"images/{n}" for n in names]})
    assert validate_manifest(manifest, fracatlas_root).errors == []  # files exist: no decoding without the flag
    (error,) = validate_manifest(manifest, fracatlas_root, check_decodable=True).errors
    assert error.rows == [3] and "truncated" in error.message


def test_large_manifest_validates_and_counts() -> None:
    n = 40_000
    rng = np.random.default_rng(0)
    patient = np.array([f"p{i // 4}" for i in range(n)], dtype=object)
    manifest = Manifest(
        {
            "image_id": [f"img{i}" for i in range(n)],
            "path": [f"{i}.png" for i in range(n)],
            "label": rng.integers(0, 2, n // 4).repeat(4),
            "patient_id": patient,
            "split": rng.choice(["train", "val", "test"], n // 4).repeat(4),
        }
    )
    report = validate_manifest(manifest, None)
    assert report.problems == []
    assert report.summary["patients"] == n // 4 and report.summary["studies"] == n


# --- integrity under bad input: ids, paths, files ---------------------------------------------------


def test_bad_image_ids_are_errors_naming_the_rows() -> None:
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # how os.listdir decodes a non-UTF-8 name
    ids = ["ok", "nul\x00id", "tab\tid", "new\nline", "   ", latin1, " padded", "ok2 ", "del\x7f"]
    manifest = Manifest({"image_id": ids, "path": [f"{i}.png" for i in range(len(ids))]})
    report = validate_manifest(manifest, None)
    found = {p.code: (p.severity, p.rows) for p in report.problems if p.code.startswith(("image_id", "empty"))}
    assert found == {
        "empty_image_id": ("error", [5]),
        "image_id_not_text": ("error", [6]),
        "image_id_control_character": ("error", [2, 3, 4, 9]),
        "image_id_whitespace": ("warning", [7, 8]),
    }
    messages = {p.code: p.message for p in report.problems}
    assert "'nul\\x00id'" in messages["image_id_control_character"]  # shown escaped, on one line
    assert "\n" not in "".join(messages.values())


def test_paths_escaping_the_root_or_absolute_are_errors_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    Image.new("L", (32, 32)).save(tmp_path / "b.png")
    paths = ["a/../b.png", "../../etc/passwd", "/etc/passwd", "x\x00.png", "tab\t.png"]
    manifest = Manifest({"image_id": list("abcde"), "path": paths})
    report = validate_manifest(manifest, tmp_path)
    found = {p.code: (p.severity, p.rows) for p in report.problems if "path" in p.code or "file" in p.code}
    assert found == {
        "path_outside_root": ("error", [2]),
        "absolute_path": ("error", [3]),
        "path_nul_character": ("error", [4]),
        "path_control_character": ("warning", [5]),
        "missing_file": ("error", [5]),  # refused paths are not looked up; the others are
    }
    assert "'../../etc/passwd'" in next(p.message for p in report.problems if p.code == "path_outside_root")
    allowed = validate_manifest(manifest, tmp_path, allow_outside_root=True, allow_absolute=True)
    codes = {p.code for p in allowed.errors}
    assert "path_outside_root" not in codes and "absolute_path" not in codes
    assert [p.rows for p in allowed.errors if p.code == "missing_file"] == [[2, 5]]  # /etc/passwd exists: a file


def test_names_with_leading_or_trailing_spaces_are_found(tmp_path: Path) -> None:
    Image.new("L", (32, 32)).save(tmp_path / " spaced.png ", format="PNG")
    (tmp_path / "m.csv").write_text('image_id,path\nspaced," spaced.png "\n')
    from medembed.data.manifest import read_manifest

    report = validate_manifest(read_manifest(tmp_path / "m.csv"), tmp_path, check_decodable=True)
    assert report.errors == []


def test_files_that_are_not_images_are_named_with_their_reason(tmp_path: Path) -> None:
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    Image.new("L", (1, 50_000)).save(tmp_path / "sliver.png")
    Image.new("L", (40, 800)).save(tmp_path / "strip.png")
    (tmp_path / "junk.dcm").write_bytes(b"this is not a DICOM file")
    names = ["folder.png", "loop.png", "dangling.png", "sliver.png", "strip.png", "junk.dcm"]
    manifest = Manifest({"image_id": names, "path": names})
    stat_only = validate_manifest(manifest, tmp_path)
    assert {p.code: p.rows for p in stat_only.errors} == {"missing_file": [3], "not_a_file": [1, 2]}
    report = validate_manifest(manifest, tmp_path, check_decodable=True)
    messages = [p.message for p in report.errors]
    assert any("row 1 'folder.png' (a directory, not a file)" in m for m in messages)
    assert any("row 2 'loop.png' (symbolic-link loop)" in m for m in messages)
    assert any("'dangling.png'" in m for m in messages if "not found" in m)
    assert any("row 4 'sliver.png' (image is 1x50000 px; below the minimum side of 32 px)" in m for m in messages)
    assert any("row 5 'strip.png' (image is 40x800 px; aspect ratio 20.0:1 exceeds the maximum of 10:1)" in m for m in messages)
    assert any("row 6 'junk.dcm' (not a readable DICOM file (no 'DICM' marker" in m for m in messages)
    assert {p.code for p in report.errors} == {"missing_file", "not_a_file", "unusable_image", "unreadable_file"}
    relaxed = validate_manifest(manifest.subset([3, 4]), tmp_path, check_decodable=True, min_side=1, max_aspect_ratio=None)
    assert relaxed.errors == []

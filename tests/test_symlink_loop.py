"""A symbolic-link loop in a manifest (issue 18, README Encoders vs Reliability): extract counts it as missing (not
recorded as failed, tried again next run) while a directory is recorded as failed; `manifest check` calls both errors."""

import shutil

from medembed.store import open_store
from tests.cli.test_entry_point import run_cli


def test_extract_counts_a_symlink_loop_as_missing_and_a_directory_as_failed(tmp_path, fracatlas_root):
    shutil.copy(fracatlas_root / "images" / "Fractured" / "IMG0000019.jpg", tmp_path / "a.jpg")
    (tmp_path / "loop1.jpg").symlink_to("loop2.jpg")
    (tmp_path / "loop2.jpg").symlink_to("loop1.jpg")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "m.csv").write_text("image_id,path,label,split\na,a.jpg,1,train\nloop,loop1.jpg,0,train\ndir,dir.jpg,0,train\n")
    check = run_cli("manifest", "check", tmp_path / "m.csv", "--root", tmp_path)
    assert check.returncode == 1 and "row 2 'loop1.jpg' (symbolic-link loop)" in check.stdout
    done = run_cli("extract", tmp_path / "m.csv", "--root", tmp_path, "--encoder", "efficientnet-lite0", "--out", tmp_path / "s.h5", "-j", "0")
    assert done.returncode == 0, done.stderr
    assert "1 failed, 1 missing" in done.stderr + done.stdout
    store = open_store(tmp_path / "s.h5")
    assert store.image_ids() == {"a"} and set(store.failed()) == {"dir"}

"""The thin CLI: commands are listed, library errors become one clear line, and the common paths work."""

import re
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from cli.main import app
from medembed.store import StoreWriter, make_fingerprint
from tests.conftest import REPO

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("manifest", "extract", "info", "merge", "fit", "evaluate", "predict", "compare", "zeroshot", "baseline", "sweep"):
        assert command in result.output, command


def test_manifest_check_names_bad_rows_and_exits_non_zero(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,path,label,split\na,a.png,0,train\na,b.png,2,val\n")
    result = runner.invoke(app, ["manifest", "check", str(manifest), "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert "duplicate" in result.output.lower() and "row" in result.output


def test_manifest_check_passes_on_the_canonical_fracatlas_manifest(fracatlas_root):
    result = runner.invoke(app, ["manifest", "check", str(REPO / "data_manifests" / "fracatlas.csv"), "--root", str(fracatlas_root)])
    assert result.exit_code == 0, result.output
    assert "4083 rows" in result.output


def test_info_prints_the_store_summary(tmp_path):
    fingerprint = make_fingerprint(encoder="test", model_id="m", dtype="float16")
    with StoreWriter(tmp_path / "s.h5", dim=4, fingerprint=fingerprint) as writer:
        writer.append(["a", "b"], np.ones((2, 4)), {"label": [0, 1], "split": ["train", "test"]}, failed={"c": "empty file"})
    result = runner.invoke(app, ["info", str(tmp_path / "s.h5")])
    assert result.exit_code == 0
    assert "rows         2" in result.output and "failed       1" in result.output and re.search(r"^ +encoder +test$", result.output, re.MULTILINE)


def test_library_errors_are_one_line_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cli.main", "info", str(tmp_path / "missing.h5")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path / 'missing.h5'}: no such store"

"""Every transfer command through the installed `medembed` entry point, as a user runs it."""

import csv
import shutil

from medembed.data.manifest import read_manifest
from tests.cli.test_entry_point import run_cli


def test_evaluate_on_a_target_with_subgroups(head_run, target_store):
    done = run_cli("evaluate", head_run, "--on", target_store, "--by", "site", "--bootstrap", "20", "--ood-rate", "0.1")
    assert done.returncode == 0, done.stderr
    assert "shift  MMD²" in done.stdout and "OOD flagged" in done.stdout and "report:" in done.stdout
    report = (head_run / "external" / "target" / "report.md").read_text()
    assert "### By site" in report and "at a 10% false-alarm rate" in report
    assert (head_run / "external" / "target" / "figures" / "subgroups.png").is_file()


def test_recalibrate_with_a_learning_curve(head_run, target_store, tmp_path):
    out = tmp_path / "run2"
    done = run_cli("recalibrate", head_run, target_store, "--labelled", "30", "--curve", "10,30", "--curve-seeds", "2", "--bootstrap", "0", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "source thresholds" in done.stdout and "recalibrated" in done.stdout
    assert (out / "curve.md").is_file() and (out / "run.json").is_file()


def test_bad_transfer_options_are_one_line(head_run, tmp_path):
    done = run_cli("evaluate", head_run, "--by", "scanner")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "--by scanner: no such column" in done.stderr and "Traceback" not in done.stderr


def test_predict_writes_the_prediction_set_of_a_cnn_run_and_says_why_it_has_no_ood_score(cnn_run, fracatlas_subset, fracatlas_root, tmp_path):
    manifest = read_manifest(fracatlas_subset)
    images = tmp_path / "new"
    images.mkdir()
    for path in manifest.subset(manifest.split == "test").resolve(fracatlas_root)[:3]:
        shutil.copy(path, images / path.name)
    done = run_cli("predict", cnn_run, images, "--out", tmp_path / "out.csv", "--alpha", "0.2", "--class-conditional")
    assert done.returncode == 0, done.stderr
    assert "referred (conformal set not one class)" in done.stdout and "note: no OOD scores" in done.stderr
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["prediction_set"] in ("normal", "abnormal", "both", "empty") and r["ood"] == "" for r in rows)

"""What fit says about its inputs: a val split too small for what it chooses (console and report), and ensemble
members that hold the same pooled embeddings (refused in one line naming both stores)."""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from medembed.fit import fit_run
from medembed.options.protocol import ProtocolOptions
from medembed.protocol.steps import MIN_THRESHOLD_PER_CLASS, val_shortfalls
from medembed.scorers.options import FitOptions
from medembed.store import make_fingerprint
from medembed.transfer.conformal import conformal_shortfalls, fit_conformal, min_calibration_size
from tests.conftest import REPO
from tests.test_fit import write_store


def run_checkout_cli(*args):
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_small_val_split_is_warned_about_on_the_console_and_in_the_report(tmp_path):
    store = write_store(tmp_path / "s.h5", n_patients=45)  # val: 15 patients, 30 images, 10 abnormal
    done = run_checkout_cli("fit", store, "--head", "logreg", "--bootstrap", "0", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning: the val split is small")]
    assert len(warned) == 1, done.stderr
    line = warned[0]
    assert "30 images (10 abnormal, 20 normal)" in line
    assert f"the f1 threshold (needs >= {MIN_THRESHOLD_PER_CLASS} of each class" in line
    assert "class-conditional conformal sets (a finite quantile needs >= 19 at alpha 0.05 of each class" in line
    assert "marginal conformal" not in line  # 30 val images give a finite marginal quantile at 0.1 and 0.05
    note = line.removeprefix("warning: ")
    assert note in json.loads((tmp_path / "run" / "run.json").read_text())["notes"]
    assert note in (tmp_path / "run" / "report.md").read_text()


def test_a_large_val_split_gets_no_warning(tmp_path):
    store = write_store(tmp_path / "s.h5", n_patients=240)  # val: 80 patients, 160 images, 54 abnormal
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_run([store], tmp_path / "run", FitOptions(head="logreg", n_resamples=0))
    assert not [w for w in caught if "val split is small" in str(w.message)]
    assert not any("val split is small" in note for note in json.loads((tmp_path / "run" / "run.json").read_text())["notes"])


def test_the_minimums_follow_from_what_is_chosen():
    y = np.array([1] * 8 + [0] * 22)
    assert val_shortfalls(y, ProtocolOptions(threshold="fixed:0.5")) == []  # a fixed threshold chooses nothing
    assert len(val_shortfalls(y, ProtocolOptions(threshold="youden", calibration="platt"))) == 2  # 8 < 10 for Platt too
    big = np.array([1] * 40 + [0] * 60)
    assert val_shortfalls(big, ProtocolOptions(calibration="platt")) == []
    assert val_shortfalls(big, ProtocolOptions(calibration="isotonic")) == ["isotonic calibration (needs >= 50 of each class)"]
    # the conformal minimum is where the quantile turns finite
    for alpha in (0.1, 0.05, 0.2):
        n = min_calibration_size(alpha)
        scores = np.linspace(0.1, 0.9, n)
        assert math.isfinite(fit_conformal(scores, np.zeros(n), alpha).normal)
        assert math.isinf(fit_conformal(scores[:-1], np.zeros(n - 1), alpha).normal)
    assert (min_calibration_size(0.1), min_calibration_size(0.05)) == (9, 19)
    assert conformal_shortfalls(big, (0.1, 0.05)) == []


@pytest.mark.parametrize("ensemble", ["concat"])
def test_ensemble_of_stores_differing_only_in_levels_is_refused_naming_both(tmp_path, ensemble):
    base = dict(encoder="synthetic", model_id="test", embedding_kind="pooled", preprocess_hash="p", dtype="float32")
    a = write_store(tmp_path / "a.h5", fingerprint=make_fingerprint(**base, levels=""))
    b = write_store(tmp_path / "b.h5", fingerprint=make_fingerprint(**base, levels="final@2x2"))
    done = run_checkout_cli("fit", a, b, "--ensemble", ensemble, "--head", "logreg", "--bootstrap", "0", "--out", tmp_path / "run")
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {b} and {a} hold the same pooled embeddings"), done.stderr
    assert "differ only in token levels" in lines[0] and "final@2x2" in lines[0]
    other = write_store(tmp_path / "c.h5", seed=1, fingerprint=make_fingerprint(**{**base, "encoder": "other"}))
    done = run_checkout_cli("fit", a, other, "--ensemble", ensemble, "--head", "logreg", "--bootstrap", "0", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_sweep_notes_a_small_val_split_once_per_source(tmp_path):
    from medembed.sweep import load_config, run_sweep
    from tests.sweep.conftest import sweep_toml, write_study

    manifest, store = write_study(tmp_path / "study")  # val: 18 patients, 36 images, 12 abnormal
    config = tmp_path / "sweep.toml"
    config.write_text(sweep_toml(manifest, store, tmp_path / "out", heads='["logreg"]', budgets="[0.5, 1.0]", seeds="[0]"))
    summary = run_sweep(load_config(config))
    small = [note for note in summary.notes if "the val split is small" in note]
    assert small == ["synthetic: the val split is small: 36 images (12 abnormal, 24 normal), too few for the f1 threshold "
                     f"(needs >= {MIN_THRESHOLD_PER_CLASS} of each class to be stable); what it chooses may not carry over to test"]

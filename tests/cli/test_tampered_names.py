"""Issue 18's critical hole, through the installed entry point: a saved run whose head.json names a module as its
estimator (venv.__main__.X made a virtualenv in the working directory; this.X printed to standard output) is
refused by `evaluate`, `predict` and an ensemble holding it, in one line, exit 2, with nothing run or written."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from tests.cli.test_entry_point import run_cli
from tests.test_fit import write_store

SKLEARN = "sklearn:sklearn.linear_model.LogisticRegression"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A saved sklearn-head run, an ensemble whose member 1 is an sklearn head, and an image to predict on."""
    base = tmp_path_factory.mktemp("tampered-names")
    store = write_store(base / "s.h5", n_patients=24, dim=6)
    fit_run([store], base / "sklearn", FitOptions(head=SKLEARN, n_resamples=0))
    fit_run([store], base / "ensemble", FitOptions(head=f"logreg,{SKLEARN}", ensemble="mean", n_resamples=0))
    (base / "images").mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(base / "images" / "a.png")
    return base


def tampered(runs, tmp_path, kind, estimator):
    run = tmp_path / "run"
    shutil.copytree(runs / kind, run)
    head = run / "scorer" / ("member-1/head.json" if kind == "ensemble" else "head.json")
    document = json.loads(head.read_text())
    document["params"]["estimator"] = estimator
    head.write_text(json.dumps(document))
    return run, head


def assert_refused(done, cwd, head):
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and str(head) in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr
    assert list(cwd.iterdir()) == [], "the refused command left files in its working directory"


@pytest.mark.parametrize("estimator", ["venv.__main__.X", "this.X", "os.system", "builtins.eval", "sklearn.linear_model.Ridge", "sklearn.X"])
def test_evaluate_refuses_a_head_naming_another_module(runs, tmp_path, estimator):
    run, head = tampered(runs, tmp_path, "sklearn", estimator)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert_refused(run_cli("evaluate", run, cwd=cwd), cwd, head)


@pytest.mark.parametrize("estimator", ["venv.__main__.X", "this.X"])
def test_predict_refuses_a_head_naming_another_module(runs, tmp_path, estimator):
    run, head = tampered(runs, tmp_path, "sklearn", estimator)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert_refused(run_cli("predict", run, runs / "images", cwd=cwd), cwd, head)


@pytest.mark.parametrize("estimator", ["venv.__main__.X", "this.X"])
def test_an_ensemble_with_a_tampered_member_is_refused(runs, tmp_path, estimator):
    run, head = tampered(runs, tmp_path, "ensemble", estimator)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert_refused(run_cli("evaluate", run, cwd=cwd), cwd, head)

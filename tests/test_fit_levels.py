"""Token levels end to end through the installed `medembed`: extract --levels survives SIGKILL and resumes to the
same tokens, fit --level (one level, auto) and evaluate work on them, and predict re-extracts the run's level
and reproduces the stored probabilities for the same images."""

import csv
import json
import os
import subprocess

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.options.extract import ExtractOptions
from medembed.encoders.runtime import build_encoder
from medembed.extract.runner import extract
from medembed.scorers.options import FitOptions
from medembed.evaluate import evaluate_run
from medembed.fit import fit_run
from medembed.runs.inputs import run_inputs
from medembed.data.manifest import read_manifest
from medembed.runs.record import load_run
from medembed.store import open_store
from tests.cli.test_entry_point import MEDEMBED, run_cli
from tests.conftest import kill_after_batches

ENCODER = ["--encoder", "efficientnet-lite0", "--option", "size=64", "--levels", "block14,block10@2x2", "--tokens", "1x1"]
LEVELS = {"block14": (5, 192), "block10@2x2": (5, 112), "final@1x1": (2, 1280)}
ATTENTION = ["-p", "hidden=16", "-p", "attention=8", "-p", "max_epochs=3", "-p", "n_jobs=1"]


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, small_manifest, fracatlas_root):
    """A level store whose extraction was SIGKILLed after a few batches, then resumed by the same command."""
    out = tmp_path_factory.mktemp("levels") / "levels.h5"
    args = [MEDEMBED, "extract", str(small_manifest), "--root", str(fracatlas_root), *ENCODER, "--out", str(out), "--batch-size", "2", "--workers", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    kill_after_batches(proc, out)
    partial = len(open_store(out))
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, partial


def test_level_store_survives_sigkill_and_resumes_to_the_uninterrupted_tokens(killed_then_resumed, tmp_path, small_manifest, fracatlas_root):
    out, partial = killed_then_resumed
    assert 0 < partial < 24, "the kill did not land mid-run"
    store = open_store(out)
    assert store.token_shapes == LEVELS and store.fingerprint["levels"] == "block14,block10@2x2,final@1x1"
    table = store.read()
    assert len(table) == 24 and len(set(table.image_id)) == 24
    options = {"size": 64, "levels": "block14,block10@2x2", "tokens": "1x1"}
    reference = tmp_path / "reference.h5"
    extract(read_manifest(small_manifest), fracatlas_root, build_encoder("efficientnet-lite0", options), reference,
            ExtractOptions(batch_size=8, num_workers=0), encoder_options=options)
    expected = open_store(reference)
    order = {image_id: i for i, image_id in enumerate(expected.read().image_id)}
    rows = [order[image_id] for image_id in table.image_id]
    for level in LEVELS:
        np.testing.assert_allclose(store.read_tokens(level).astype(np.float32), expected.read_tokens(level, rows).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_fit_level_evaluate_and_predict_reproduce_the_store(killed_then_resumed, tmp_path, small_manifest, fracatlas_root):
    out, _ = killed_then_resumed
    run = tmp_path / "attention"
    fitted = run_cli("fit", out, "--head", "attention", "--level", "block14", *ATTENTION, "--bootstrap", "0", "--out", run)
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["options"]["level"] == "block14"
    # predict: the same test images, re-extracted by the run's own encoder (with its levels)
    manifest = read_manifest(small_manifest)
    test = manifest.subset(np.flatnonzero((manifest.split == "test") & ~np.isin(manifest.image_id, ["IMG0004028", "IMG0004029"])))
    files = [str(fracatlas_root / path) for path in test.path]
    predicted = run_cli("predict", run, *files, "--out", tmp_path / "p.csv", "--workers", "0", "--cache-dir", tmp_path / "cache")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    with open(tmp_path / "p.csv", newline="") as handle:
        by_file = {row["image_id"].split("/")[-1]: float(row["probability"]) for row in csv.DictReader(handle)}
    loaded = load_run(run)
    rows = run_inputs(loaded).rows("test")
    stored = dict(zip(rows.image_id, loaded.probabilities(rows)))
    for image_id, path in zip(test.image_id, test.path):
        assert by_file[path.split("/")[-1]] == pytest.approx(stored[image_id], abs=2e-3)
    cache = next((tmp_path / "cache").glob("*/*.embeddings.h5"))  # predict's cache, re-extracted with the run's levels
    assert open_store(cache).token_shapes == LEVELS


def test_fit_level_auto_chooses_on_val_and_mismatches_are_refused(killed_then_resumed, tmp_path):
    out, _ = killed_then_resumed
    run = tmp_path / "auto"
    options = FitOptions(head="concat", level="auto", n_resamples=0)
    fit_run([out], run, options)
    assert options.level == "auto"  # the run records the chosen level; the caller's options stay as given
    record = json.loads((run / "run.json").read_text())
    assert set(record["details"]["level_selection"]["val_auroc"]) == set(LEVELS)
    assert record["options"]["level"] == record["details"]["level_selection"]["chosen"]
    assert evaluate_run(run, n_resamples=0)["study"]["overall"]["auroc"]["value"] >= 0
    for head, level, message in [
        ("attention", "", "name one with --level"),
        ("logreg", "block14", "reads the pooled embeddings"),
    ]:
        with pytest.raises(MedembedError, match=message):
            FitOptions(head=head, level=level)
    for level, message in [("block99", "no token level 'block99'"), ("block14+final@1x1", "token counts differ")]:
        with pytest.raises(MedembedError, match=message):
            fit_run([out], tmp_path / "x", FitOptions(head="attention", level=level, n_resamples=0))
    refused = run_cli("fit", out, "--head", "attention", "--level", "block99", "--bootstrap", "0", "--out", tmp_path / "x")
    assert refused.returncode == 2 and "no token level 'block99'" in refused.stderr and "Traceback" not in refused.stderr

"""`medembed compare` through the installed entry point: the side-by-side table with each run's kind, encoder and
resamples, paired differences against a baseline, the output formats, and one-line refusals."""

import csv
import io
import json
import shutil

import numpy as np
import pytest

from medembed.fit import fit_run
from medembed.scorers.options import FitOptions
from tests.cli.test_entry_point import run_cli
from tests.test_fit import write_store


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("compare")
    store = write_store(work / "s.h5", n_patients=90, corrupt=_weak)
    fit_run([store], work / "logreg", FitOptions(head="logreg", n_resamples=20))
    fit_run([store], work / "mlp", FitOptions(head="mlp", head_params={"max_epochs": 10}, n_resamples=30))
    other = write_store(work / "other.h5", n_patients=60, seed=1, corrupt=_weak)  # 40 of the 60 test images, other embeddings
    fit_run([other], work / "elsewhere", FitOptions(head="logreg", n_resamples=20))
    return work


def _weak(ids, emb, cols):
    emb[:] = np.random.default_rng(3).standard_normal(emb.shape) + 0.7 * np.asarray(cols["label"])[:, None]


def test_compare_shows_each_runs_scorer_encoder_and_resamples_and_pairs_them(runs):
    done = run_cli("compare", runs / "logreg", runs / "mlp", "--bootstrap", "200")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "| Run | Kind | Scorer | Encoder | Seeds | AUROC |" in out
    assert "| logreg | head | logreg | synthetic | 1 |" in out and "| mlp | head | mlp | synthetic | 1 |" in out
    assert "| 95%, 20 × patients |" in out and "| 95%, 30 × patients |" in out  # each run's own, not the first's
    assert "## Paired differences against logreg" in out and "200 paired resamples of patients" in out
    assert out.count("| mlp | image |") == 1 and out.count("| mlp | study |") == 1
    row = next(line for line in out.splitlines() if line.startswith("| mlp | image |")).split(" | ")
    assert "[" in row[4] and ", " in row[4] and float(row[5]) <= 1 and (row[6] == "< 0.001" or 0 <= float(row[6]) <= 1)


def test_compare_writes_csv_json_and_parquet_with_plain_numbers(runs, tmp_path):
    done = run_cli("compare", runs / "logreg", runs / "mlp", "--bootstrap", "50", "--format", "csv")
    assert done.returncode == 0, done.stderr
    records = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["run"], r["level"]) for r in records] == [("logreg", "image"), ("logreg", "study"), ("mlp", "image"), ("mlp", "study")]
    mlp = records[2]
    assert mlp["baseline"] == "logreg" and mlp["paired_unit"] == "patient" and mlp["n_resamples"] == "30"
    low, point, high = (float(mlp[k]) for k in ("auroc_difference_low", "auroc_difference", "auroc_difference_high"))
    assert low <= high and 0 <= float(mlp["auroc_p_delong"]) <= 1 and records[0]["auroc_difference"] == ""
    assert "−" not in done.stdout and "[" not in done.stdout  # CSV keeps plain numbers
    done = run_cli("compare", runs / "logreg", runs / "mlp", "--bootstrap", "50", "--format", "json", "--out", tmp_path / "c.json")
    assert done.returncode == 0, done.stderr
    document = json.loads((tmp_path / "c.json").read_text())
    assert document["baseline"] == "logreg" and document["runs"][2]["auroc_difference"] == pytest.approx(point, abs=1e-6)
    pyarrow = pytest.importorskip("pyarrow.parquet")
    done = run_cli("compare", runs / "logreg", runs / "mlp", "--bootstrap", "50", "--format", "parquet", "--out", tmp_path / "c.parquet")
    assert done.returncode == 0, done.stderr
    table = pyarrow.read_table(tmp_path / "c.parquet").to_pylist()
    assert table[2]["auroc_difference"] == pytest.approx(point, abs=1e-6) and table[2]["seeds"] == 1
    done = run_cli("compare", runs / "logreg", runs / "mlp", "--format", "parquet")
    assert done.returncode == 2 and "needs --out FILE.parquet" in done.stderr and done.stderr.count("\n") == 1


def test_runs_on_other_test_images_are_refused_in_one_line_or_paired_on_the_shared_ones(runs):
    done = run_cli("compare", runs / "logreg", runs / "elsewhere")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "were scored on different test images" in done.stderr and "--intersect" in done.stderr
    assert run_cli("compare", runs / "logreg", runs / "elsewhere", "--no-paired").returncode == 0
    # write_store's labels follow the patient number, so the shared ids carry the same labels in both stores
    done = run_cli("compare", runs / "logreg", runs / "elsewhere", "--intersect", "--bootstrap", "50")
    assert done.returncode == 0, done.stderr
    assert "warning: elsewhere vs logreg: compared on the 40 images both scored (0 images only in elsewhere, 20 only in logreg)" in done.stderr
    assert "## Paired differences against logreg" in done.stdout


def test_a_tampered_predictions_file_is_one_line_naming_file_and_row(runs, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(runs / "mlp", copy)
    lines = (copy / "predictions.csv").read_text().splitlines()
    cells = lines[5].split(",")
    cells[3] = "1.7"
    lines[5] = ",".join(cells)
    (copy / "predictions.csv").write_text("\n".join(lines) + "\n")
    done = run_cli("compare", runs / "logreg", copy)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"{copy / 'predictions.csv'}: row 6: probability '1.7' is not a number in [0, 1]" in done.stderr


def test_compare_reads_the_fits_own_results_not_its_evaluations(runs, tmp_path):
    copy = tmp_path / "evaluated"
    shutil.copytree(runs / "logreg", copy)
    assert run_cli("evaluate", copy, "--bootstrap", "7").returncode == 0
    (copy / "evaluations" / "test-bootstrap7" / "metrics.json").write_text("{not json")  # never read by compare
    done = run_cli("compare", copy, runs / "mlp", "--baseline", runs / "mlp", "--bootstrap", "20")
    assert done.returncode == 0, done.stderr
    assert "| 95%, 20 × patients |" in done.stdout and "7 × patients" not in done.stdout
    assert "## Paired differences against mlp" in done.stdout and "| evaluated | image |" in done.stdout

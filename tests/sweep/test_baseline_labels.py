"""Several CNN baselines under their own labels: distinct cells, results rows, run directories, report columns and
figure series; a config without labels keeps the rows a sweep already has under "cnn"."""

import json
from pathlib import Path

import numpy as np

from medembed.protocol.metrics import evaluate_predictions
from medembed.sweep import load_config, read_results, run_sweep
from medembed.sweep.report import learning_curve_figure, summarize_cells
from medembed.sweep.results import CellKey, ResultsLog, cell_row
from medembed.sweep.runner import CNN_HEAD, cnn_run_name, grid_cells
from tests.sweep.conftest import sweep_toml

TWO_CNNS = """
[[baselines]]
kind = "cnn"
label = "cnn-128"
seeds = [0]

[[baselines]]
kind = "cnn"
label = "cnn-224"
options = { size = 224, epochs = 10 }
seeds = [0]
"""


def config_file(tmp_path: Path, manifest: Path, store: Path, baselines: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(sweep_toml(manifest, store, tmp_path / "out", heads='["logreg"]', budgets="[1.0]", seeds="[0]") + baselines)
    return path


def fine_tuned_rows(config, labels: list[str]) -> None:
    """Rows of CNN cells appended to a sweep's results.csv as the sweep appends them, as if each CNN had been
    fine-tuned (scored by the real evaluate_predictions on synthetic test predictions), so the sweep resumes past
    them without training."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    protocol = json.loads((config.out / "sweep.json").read_text())["protocol"]
    with ResultsLog(config.out, protocol) as results:
        for label in labels:
            p = np.clip(0.5 * y + rng.uniform(0, 0.6, len(y)), 0, 1)
            metrics = evaluate_predictions(y, p, 0.5, study_ids=np.arange(len(y)).astype(str), n_resamples=20)
            results.append(cell_row(CellKey(label, CNN_HEAD, 1.0, 0), metrics, train_images=108, train_abnormal=36, test_images=40, fit_seconds=1.0))


def test_two_labelled_cnns_are_two_cells_rows_columns_and_series(tmp_path, study):
    manifest, store = study
    config = load_config(config_file(tmp_path, manifest, store, TWO_CNNS))
    cnn_cells = [cell for cell in grid_cells(config) if cell.head == CNN_HEAD]
    assert cnn_cells == [CellKey("cnn-128", CNN_HEAD, 1.0, 0), CellKey("cnn-224", CNN_HEAD, 1.0, 0)]
    assert [cnn_run_name(cell) for cell in cnn_cells] == ["cnn-128-budget1-seed0", "cnn-224-budget1-seed0"]

    # Leaving the baselines out leaves both CNNs out, by their labels.
    assert (run_sweep(config, baselines=False).cells_run, read_results(config.out / "results.csv")[0]["encoder"]) == (1, "synthetic")
    fine_tuned_rows(config, ["cnn-128", "cnn-224"])
    summary = run_sweep(config)  # both CNNs' rows are there: nothing to fine-tune
    assert (summary.cells_run, summary.cells_already_done) == (0, 3)
    rows = read_results(summary.results_csv)
    assert sorted((r["encoder"], r["head"]) for r in rows) == [("cnn-128", "finetune"), ("cnn-224", "finetune"), ("synthetic", "logreg")]
    assert "| Head | cnn-128 | cnn-224 | synthetic |" in summary.results_md.read_text()
    lines = learning_curve_figure(summarize_cells(rows)).axes[0].get_lines()
    assert sorted(line.get_label() for line in lines) == ["cnn-128 · finetune", "cnn-224 · finetune", "synthetic · logreg"]


def test_an_unlabelled_cnn_keeps_the_rows_under_its_kind(tmp_path, study):
    manifest, store = study
    config = load_config(config_file(tmp_path, manifest, store, '[[baselines]]\nkind = "cnn"\nseeds = [0]\n'))
    run_sweep(config, baselines=False)
    fine_tuned_rows(config, ["cnn"])  # a row as a sweep from before baselines had labels wrote it
    summary = run_sweep(config)
    assert (summary.cells_run, summary.cells_already_done) == (0, 2)
    assert not (config.out / "baselines").exists()  # resumed, not fine-tuned again
    assert "| Head | cnn | synthetic |" in summary.results_md.read_text()

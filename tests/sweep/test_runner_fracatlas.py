"""run_sweep on real FracAtlas images: the sweep extracts its own store, trains both baselines, one results table."""

import json
from pathlib import Path

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.data.manifest import read_manifest, write_manifest
from medembed.store import open_store
from medembed.sweep import load_config, read_results, run_sweep

CANONICAL = Path(__file__).resolve().parents[2] / "data_manifests" / "fracatlas.csv"
PER_CLASS = 6  # images of each class in each split
TRUNCATED_ID = "IMG0004036"  # a train JPEG truncated in the release: listed as failed, never fitted


@pytest.fixture(scope="module")
def fracatlas_sweep(fracatlas_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest = read_manifest(CANONICAL)
    rows = [int(np.flatnonzero(manifest.image_id == TRUNCATED_ID)[0])]
    for split in ("train", "val", "test"):
        for label in (0, 1):
            rows += np.flatnonzero((manifest.split == split) & (manifest.label == label) & (manifest.image_id < "IMG0004000"))[:PER_CLASS].tolist()
    directory = tmp_path_factory.mktemp("fracatlas-sweep")
    write_manifest(manifest.subset(np.asarray(rows)), directory / "manifest.csv")
    config = directory / "sweep.toml"
    config.write_text(f"""
name = "fracatlas-tiny"
manifest = "{directory / 'manifest.csv'}"
root = "{fracatlas_root}"
out = "{directory / 'out'}"
budgets = [0.5, 1.0]
seeds = [0]
heads = ["logreg"]
bootstrap = 10
[extract]
batch_size = 16
num_workers = 0
[[encoders]]
name = "efficientnet-lite0"
label = "effl0-64"
options = {{ size = 64 }}
[[baselines]]
kind = "cnn"
options = {{ size = 32, epochs = 1, batch_size = 8, num_workers = 0, threads = 1 }}
budgets = [0.5, 1.0]
[[baselines]]
kind = "autoencoder"
options = {{ size = 32, width = 4, bottleneck = 8, epochs = 1, num_workers = 0, threads = 1 }}
""")
    return config


def test_extracts_trains_baselines_and_reports_them_together(fracatlas_sweep: Path):
    config = load_config(fracatlas_sweep)
    summary = run_sweep(config)
    store = open_store(config.out / "stores" / "effl0-64.h5")
    assert len(store) == 6 * PER_CLASS and TRUNCATED_ID in store.failed()
    assert (config.out / "stores" / "autoencoder.h5").is_file()
    rows = read_results(summary.results_csv)
    assert sorted((r["encoder"], r["head"], r["budget"]) for r in rows) == [
        ("autoencoder", "logreg", 0.5), ("autoencoder", "logreg", 1.0),
        ("cnn", "finetune", 0.5), ("cnn", "finetune", 1.0),
        ("effl0-64", "logreg", 0.5), ("effl0-64", "logreg", 1.0),
    ]
    by_cell = {(r["encoder"], r["budget"]): r for r in rows}
    # The CNN fine-tunes on the same budgeted rows as the heads, and is tested on the same images.
    for budget in (0.5, 1.0):
        assert by_cell[("cnn", budget)]["train_images"] == by_cell[("effl0-64", budget)]["train_images"]
        assert by_cell[("cnn", budget)]["test_images"] == by_cell[("effl0-64", budget)]["test_images"] == 2 * PER_CLASS
    assert by_cell[("cnn", 1.0)]["train_images"] == 2 * PER_CLASS
    budget_run = json.loads((config.out / "baselines" / "cnn-budget0.5-seed0" / "run.json").read_text())
    assert budget_run["inputs"]["manifest"] == str(config.manifest.resolve())  # the budget is a train subset, no copy
    markdown = summary.results_md.read_text()
    assert "| Head | autoencoder | cnn | effl0-64 |" in markdown and "| finetune |" in markdown

    # Nothing left to do: no extraction, no training.
    assert run_sweep(config).cells_run == 0


def test_a_sweep_store_made_with_other_options_is_refused(fracatlas_sweep: Path):
    config = load_config(fracatlas_sweep)
    if not (config.out / "stores" / "effl0-64.h5").exists():
        pytest.skip("needs the store of the test above")
    (config.out / "results.csv").unlink()
    changed = fracatlas_sweep.with_name("changed.toml")
    changed.write_text(fracatlas_sweep.read_text().replace("{ size = 64 }", "{ size = 96 }"))
    with pytest.raises(MedembedError, match=r"effl0-64.h5 was made with other options \(size: 64 vs 96 now\)"):
        run_sweep(load_config(changed))

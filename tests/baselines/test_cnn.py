"""The CNN baseline on 71 real FracAtlas images at 64 px: a complete run directory, fit's protocol, reloadable weights."""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from medembed.scorers.baselines._data import cache_images, grey_spec
from medembed.scorers.baselines._training import cpu_threads, predict_batches
from medembed.baseline import CNNRun, run_cnn_baseline
from medembed.scorers.baselines.cnn import KIND, load_cnn
from medembed.options.baselines import CNNOptions
from medembed.encoders.efficientnet_lite import EfficientNetLite0Encoder
from medembed.errors import MedembedError
from medembed.scorers.options import FitOptions
from medembed.data.manifest import read_manifest, write_manifest
from tests.baselines.conftest import TRUNCATED_ID

# One thread: fast and repeatable even when other processes share the two cores.
OPTIONS = CNNOptions(size=64, epochs=2, patience=2, batch_size=16, threads=1, seed=0)


@pytest.fixture(scope="module")
def cnn_run(fracatlas_subset: Path, fracatlas_root: Path, tmp_path_factory: pytest.TempPathFactory) -> CNNRun:
    out = tmp_path_factory.mktemp("cnn") / "run"
    return run_cnn_baseline(fracatlas_subset, fracatlas_root, out, OPTIONS, FitOptions(n_resamples=50, threshold="youden"))


def _cached(manifest_path: Path, root: Path, split: str) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The split's decodable images as the run cached them, with labels and ids."""
    manifest = read_manifest(manifest_path)
    manifest = manifest.subset(manifest.split == split)
    cache = cache_images(manifest, root, grey_spec(EfficientNetLite0Encoder(OPTIONS.size).preprocess), num_workers=0)
    return cache.pixels, manifest.label[cache.rows], manifest.image_id[cache.rows].tolist()


def test_run_directory_is_complete_and_records_the_cnn(cnn_run: CNNRun) -> None:
    out = cnn_run.out
    for name in ("run.json", "metrics.json", "report.md", "predictions.csv", "scorer/model.safetensors", "scorer/model.json"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
    info = json.loads((out / "run.json").read_text())
    fingerprint = info["fingerprint"]
    assert fingerprint["encoder"] == KIND
    assert fingerprint["weights_sha256"] == hashlib.sha256((out / "scorer/model.safetensors").read_bytes()).hexdigest()
    assert fingerprint["preprocess_hash"] == EfficientNetLite0Encoder(64).preprocess.hash()
    assert info["options"]["head"] == KIND and info["options"]["head_params"]["size"] == 64
    assert info["options"]["threshold"] == "youden"
    assert 0 < info["image_threshold"] < 1
    assert info["details"]["training"]["epochs"] == len(info["details"]["training"]["val_auroc"]) <= 2
    overall = cnn_run.metrics["image"]["overall"]
    assert 0 <= overall["auroc"]["value"] <= 1 and len(overall["kappa"]["ci"]) == 2
    assert json.loads((out / "metrics.json").read_text())["image"]["overall"]["n"]["value"] == 16


def test_truncated_image_is_left_out_and_named(cnn_run: CNNRun) -> None:
    info = json.loads((cnn_run.out / "run.json").read_text())
    assert set(cnn_run.failed) == {TRUNCATED_ID}
    assert "truncated" in info["details"]["failed_images"][TRUNCATED_ID]
    assert any(TRUNCATED_ID in note for note in info["notes"])
    assert info["split_sizes"]["train"]["images"] == 39  # 40 listed, the truncated one left out


def test_saved_weights_are_the_best_epoch_and_reload_to_identical_predictions(
    cnn_run: CNNRun, fracatlas_subset: Path, fracatlas_root: Path
) -> None:
    network, spec = load_cnn(cnn_run.out / "scorer")
    assert spec == EfficientNetLite0Encoder(64).preprocess
    val_pixels, val_labels, _ = _cached(fracatlas_subset, fracatlas_root, "val")
    test_pixels, _, test_ids = _cached(fracatlas_subset, fracatlas_root, "test")
    with cpu_threads(OPTIONS.threads):
        val_logits = predict_batches(network, val_pixels, 32, torch.device("cpu")).numpy()
        reloaded = expit(predict_batches(network, test_pixels, 32, torch.device("cpu")).numpy().astype(np.float64))

    best = cnn_run.history["best_epoch"]
    assert roc_auc_score(val_labels, val_logits) == pytest.approx(cnn_run.history["val_auroc"][best - 1], abs=1e-9)
    with (cnn_run.out / "predictions.csv").open() as f:
        written = {row["image_id"]: float(row["probability"]) for row in csv.DictReader(f)}
    # calibration "none": the written probability is the network's own, rounded to 6 decimals
    np.testing.assert_allclose(reloaded, [written[i] for i in test_ids], atol=1e-6)


def test_manifest_without_val_split_is_refused_before_any_work(fracatlas_subset: Path, fracatlas_root: Path, tmp_path: Path) -> None:
    manifest = read_manifest(fracatlas_subset)
    write_manifest(manifest.subset(manifest.split != "val"), tmp_path / "no-val.csv")
    with pytest.raises(MedembedError, match="no rows in split"):
        run_cnn_baseline(tmp_path / "no-val.csv", fracatlas_root, tmp_path / "run", OPTIONS)


def test_bad_options_are_refused(fracatlas_subset: Path, fracatlas_root: Path, tmp_path: Path) -> None:
    with pytest.raises(MedembedError, match="pos_weight"):
        run_cnn_baseline(fracatlas_subset, fracatlas_root, tmp_path / "run", CNNOptions(pos_weight="heavy"))
    with pytest.raises(MedembedError, match="too small"):
        run_cnn_baseline(fracatlas_subset, fracatlas_root, tmp_path / "run", CNNOptions(size=16))


def test_a_cnn_run_round_trips_through_evaluate_compare_predict(cnn_run, fracatlas_subset, fracatlas_root, tmp_path):
    from tests.cli.test_entry_point import assert_round_trip

    manifest = read_manifest(fracatlas_subset)
    test = manifest.subset(manifest.split == "test")
    assert_round_trip(cnn_run.out, test.resolve(fracatlas_root)[:3], tmp_path)

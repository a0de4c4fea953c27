"""The autoencoder baseline on 71 real FracAtlas images: a valid store that `fit_run` takes, reloadable weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medembed.scorers.baselines._data import cache_images
from medembed.scorers.baselines._training import cpu_threads, predict_batches
from medembed.scorers.baselines.autoencoder import (
    KIND,
    AutoencoderRun,
    autoencoder_spec,
    load_autoencoder,
    run_autoencoder_baseline,
)
from medembed.options.baselines import AutoencoderOptions
from medembed.errors import MedembedError
from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from medembed.data.manifest import read_manifest
from medembed.encoders import get_encoder
from medembed.encoders.base import files_sha256
from medembed.store import open_store
from tests.baselines.conftest import TRUNCATED_ID

# One thread: fast and repeatable even when other processes share the two cores.
OPTIONS = AutoencoderOptions(size=64, width=8, bottleneck=32, epochs=3, patience=2, batch_size=16, threads=1, seed=0)


@pytest.fixture(scope="module")
def ae_run(fracatlas_subset: Path, fracatlas_root: Path, tmp_path_factory: pytest.TempPathFactory) -> AutoencoderRun:
    return run_autoencoder_baseline(fracatlas_subset, fracatlas_root, tmp_path_factory.mktemp("ae") / "subset-ae.h5", OPTIONS)


def test_store_holds_every_decodable_image_with_the_autoencoder_fingerprint(ae_run: AutoencoderRun) -> None:
    store = open_store(ae_run.store)
    table = store.read()
    assert len(table) == ae_run.embedded == 71 and store.dim == 32
    assert store.failed().keys() == {TRUNCATED_ID} and "truncated" in store.failed()[TRUNCATED_ID]
    assert TRUNCATED_ID not in set(table.image_id)
    assert sorted(set(table.columns["split"])) == ["test", "train", "val"]
    assert np.isfinite(table.embeddings).all() and table.embeddings.std(axis=0).max() > 0
    fingerprint = store.fingerprint
    assert fingerprint["encoder"] == KIND and fingerprint["dtype"] == "float32"
    assert fingerprint["weights_sha256"] == files_sha256([ae_run.weights / "model.safetensors"])
    assert fingerprint["preprocess_hash"] == autoencoder_spec(64).hash()
    # the store is an extraction with the trained encoder, which `predict` can rebuild from encoder_options
    assert json.loads(str(store.attrs["encoder_options"])) == {"weights": str(ae_run.weights.resolve())}
    assert get_encoder(KIND, **json.loads(str(store.attrs["encoder_options"]))).dim == 32


def test_fit_run_fits_a_head_on_the_store(ae_run: AutoencoderRun, tmp_path: Path) -> None:
    metrics = fit_run([ae_run.store], tmp_path / "run", FitOptions(head="logreg", n_resamples=50))
    assert 0 <= metrics["image"]["overall"]["auroc"]["value"] <= 1
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["fingerprint"]["encoder"] == KIND and info["split_sizes"]["train"]["images"] == 39


def test_saved_weights_are_the_best_epoch_and_reproduce_the_stored_embeddings(
    ae_run: AutoencoderRun, fracatlas_subset: Path, fracatlas_root: Path
) -> None:
    network, spec = load_autoencoder(ae_run.weights)
    assert spec == autoencoder_spec(64)
    manifest = read_manifest(fracatlas_subset)
    cache = cache_images(manifest, fracatlas_root, spec, num_workers=0)
    val = cache.pixels[torch.from_numpy(np.flatnonzero(manifest.split[cache.rows] == "val"))]
    with cpu_threads(OPTIONS.threads):
        embeddings = predict_batches(network.embed, cache.pixels, 32, torch.device("cpu")).numpy()
        per_image = predict_batches(lambda x: (network(x) - x).square().mean(dim=(1, 2, 3)), val, 32, torch.device("cpu"))

    table = open_store(ae_run.store).read()
    order = {image_id: k for k, image_id in enumerate(table.image_id)}
    stored = table.embeddings[[order[i] for i in manifest.image_id[cache.rows]]]
    np.testing.assert_allclose(embeddings, stored, rtol=1e-4, atol=1e-5)
    history = ae_run.history
    assert history["best_epoch"] == int(np.argmin(history["val_mse"])) + 1
    assert per_image.mean().item() == pytest.approx(history["val_mse"][history["best_epoch"] - 1], rel=1e-4)


def test_a_rerun_with_the_same_seed_trains_identical_weights(ae_run: AutoencoderRun, fracatlas_subset: Path, fracatlas_root: Path, tmp_path: Path) -> None:
    again = run_autoencoder_baseline(fracatlas_subset, fracatlas_root, tmp_path / "again.h5", OPTIONS)
    assert open_store(again.store).fingerprint == open_store(ae_run.store).fingerprint
    assert again.history == ae_run.history


def test_an_existing_store_is_never_overwritten(ae_run: AutoencoderRun, fracatlas_subset: Path, fracatlas_root: Path) -> None:
    with pytest.raises(MedembedError, match="already exists"):
        run_autoencoder_baseline(fracatlas_subset, fracatlas_root, ae_run.store, OPTIONS)


def test_a_size_the_network_cannot_halve_four_times_is_refused(fracatlas_subset: Path, fracatlas_root: Path, tmp_path: Path) -> None:
    with pytest.raises(MedembedError, match="multiple of 16"):
        run_autoencoder_baseline(fracatlas_subset, fracatlas_root, tmp_path / "ae.h5", AutoencoderOptions(size=100))

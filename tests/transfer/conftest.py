"""Tiny real runs for the transfer tests: a logistic head on a synthetic store, a shifted target store with a
site column, and (where FracAtlas is present) a one-epoch CNN on 71 real images."""

from pathlib import Path

import numpy as np
import pytest

from medembed.scorers.options import FitOptions
from medembed.fit import fit_run
from tests.baselines.conftest import fracatlas_subset  # noqa: F401  (the baselines' 71-image FracAtlas manifest)
from tests.test_fit import write_store

SHIFT = 0.6  # target embeddings move this far (in units of write_store's abnormal shift / 1.5) towards abnormal


def add_site(shift: float = 0.0, seed: int = 0):
    """A write_store hook: a 'site' column (two sites by patient parity) and a shift of every embedding along the
    store's abnormal direction (write_store's first draw of its seed): the scores of a site whose films differ."""

    def hook(ids, emb, cols):
        emb += shift * np.random.default_rng(seed).standard_normal(emb.shape[1])
        cols["site"] = ["north" if int(i.split("_")[0][1:]) % 2 else "south" for i in ids]

    return hook


@pytest.fixture(scope="session")
def head_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("transfer")
    store = write_store(work / "source.h5", n_patients=90, corrupt=add_site())
    fit_run([store], work / "run", FitOptions(n_resamples=0))
    return work / "run"


@pytest.fixture(scope="session")
def target_store(tmp_path_factory) -> Path:
    """The source's distribution shifted by SHIFT, with a site column; every row labelled (split 'test')."""
    return write_store(tmp_path_factory.mktemp("target") / "target.h5", n_patients=120, seed=0, splits=("test",), corrupt=add_site(SHIFT))


@pytest.fixture(scope="session")
def cnn_run(fracatlas_root: Path, fracatlas_subset: Path, tmp_path_factory) -> Path:
    from medembed.options.baselines import CNNOptions
    from medembed.baseline import run_cnn_baseline

    out = tmp_path_factory.mktemp("cnn") / "run"
    run_cnn_baseline(fracatlas_subset, fracatlas_root, out, CNNOptions(size=32, epochs=1, patience=1, batch_size=16, threads=1, seed=0),
                     FitOptions(n_resamples=0, threshold="youden"))
    return out


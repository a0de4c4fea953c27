"""Shared fixtures: the real FracAtlas data beside the checkout, skipped with a reason where absent."""

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
FRACATLAS_ROOT = Path(os.environ.get("MEDEMBED_FRACATLAS", REPO.parent / "shared" / "data" / "fracatlas"))


@pytest.fixture(scope="session", autouse=True)
def predict_cache(tmp_path_factory) -> Iterator[Path]:
    """predict's embedding cache in a temporary folder for the whole session (in-process calls and the `medembed`
    subprocesses, which inherit the environment), so the suite never writes into the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("predict-cache")
    previous = os.environ.get("MEDEMBED_CACHE")
    os.environ["MEDEMBED_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MEDEMBED_CACHE", None)
    else:
        os.environ["MEDEMBED_CACHE"] = previous


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Tiny forwards: one intra-op thread avoids OpenMP spin-waits when the 2 CI cores are busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fracatlas_root() -> Path:
    """The FracAtlas folder (../shared/data/fracatlas). Required in CI, skipped elsewhere when absent."""
    if not (FRACATLAS_ROOT / "dataset.csv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"FracAtlas not found at {FRACATLAS_ROOT}; CI must run with ../shared beside the checkout")
        pytest.skip(f"FracAtlas not found at {FRACATLAS_ROOT} (set MEDEMBED_FRACATLAS)")
    return FRACATLAS_ROOT


TRUNCATED = ["IMG0004028", "IMG0004029"]  # two of the 59 JPEGs truncated in the FracAtlas release itself


@pytest.fixture(scope="session")
def small_manifest(tmp_path_factory, fracatlas_root) -> Path:
    """26 rows of the canonical FracAtlas manifest: 4 normal + 4 abnormal per split, plus two truncated JPEGs."""
    from medembed.data.manifest import read_manifest, write_manifest

    manifest = read_manifest(REPO / "data_manifests" / "fracatlas.csv")
    picks = []
    for split in ("train", "val", "test"):
        for label in (0, 1):
            picks += np.flatnonzero((manifest.split == split) & (manifest.label == label))[:4].tolist()
    picks += [int(np.flatnonzero(manifest.image_id == i)[0]) for i in TRUNCATED]
    path = tmp_path_factory.mktemp("manifest") / "small.csv"
    write_manifest(manifest.subset(np.asarray(picks)), path)
    return path


def kill_after_batches(proc, store: Path, batches: int = 3, timeout: float = 120.0) -> None:
    """SIGKILL an extraction once its store's write-ahead log holds about `batches` appended batches.

    Polling the log's size every few milliseconds (not opening the store, which takes longer than a batch of
    tiny images) is what makes the kill land mid-run rather than after the last batch."""
    import signal
    import time

    log = store.with_name(store.name + ".wal")
    deadline, first = time.time() + timeout, 0
    while time.time() < deadline and proc.poll() is None:
        size = log.stat().st_size if log.exists() else 0
        first = first or size
        if first and size >= batches * first:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

"""A small real FracAtlas manifest for the baseline tests: 40 train / 16 val / 16 test images, one truncated."""

from pathlib import Path

import numpy as np
import pytest

from medembed.data.manifest import read_manifest, write_manifest

CANONICAL = Path(__file__).resolve().parents[2] / "data_manifests" / "fracatlas.csv"
TRUNCATED_ID = "IMG0004036"  # a train image whose JPEG lacks its end-of-image marker in the release
# (normal, abnormal) images taken from each split of the canonical manifest, in id order.
COUNTS = {"train": (29, 10), "val": (10, 6), "test": (10, 6)}


@pytest.fixture(scope="session")
def fracatlas_subset(fracatlas_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest CSV of the subset; paths are relative to `fracatlas_root`. Train also holds TRUNCATED_ID."""
    manifest = read_manifest(CANONICAL)
    rows = [int(np.flatnonzero(manifest.image_id == TRUNCATED_ID)[0])]
    for split, (normal, abnormal) in COUNTS.items():
        for label, count in ((0, normal), (1, abnormal)):
            candidates = np.flatnonzero((manifest.split == split) & (manifest.label == label) & (manifest.image_id < "IMG0004000"))
            rows += candidates[:count].tolist()
    path = tmp_path_factory.mktemp("baselines") / "fracatlas-subset.csv"
    write_manifest(manifest.subset(np.asarray(rows)), path)
    return path

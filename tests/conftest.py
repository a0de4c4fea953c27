"""Shared fixtures: the real FracAtlas data beside the checkout, skipped with a reason where absent."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FRACATLAS_ROOT = Path(os.environ.get("MEDEMBED_FRACATLAS", REPO_ROOT.parent / "shared" / "data" / "fracatlas"))


@pytest.fixture(scope="session")
def fracatlas_root() -> Path:
    """The FracAtlas folder (../shared/data/fracatlas). Required in CI, skipped elsewhere when absent."""
    if not (FRACATLAS_ROOT / "dataset.csv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"FracAtlas not found at {FRACATLAS_ROOT}; CI must run with ../shared beside the checkout")
        pytest.skip(f"FracAtlas not found at {FRACATLAS_ROOT} (set MEDEMBED_FRACATLAS)")
    return FRACATLAS_ROOT

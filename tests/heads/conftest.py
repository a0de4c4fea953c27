"""Synthetic embedding splits for the head tests: small, seeded, float16 like a real store."""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pytest

from medembed.scorers.options import HEAD_NAMES
from medembed.scorers.heads import Head, make_head


class Splits(NamedTuple):
    """Train / val / test embeddings `[N, D] float16` and 0/1 labels `[N]`."""

    X: np.ndarray
    y: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def make_splits(
    sizes: tuple[int, int, int] = (400, 200, 200),
    dim: int = 48,
    shift: float = 3.0,
    positive_rate: float = 0.5,
    seed: int = 0,
) -> Splits:
    """Train/val/test `sizes` rows of two Gaussian classes whose means differ by `shift` on the first 3 features."""
    rng = np.random.default_rng(seed)
    arrays = []
    for n in sizes:
        y = (rng.random(n) < positive_rate).astype(np.int64)
        y[:2] = [0, 1]  # every split holds both classes
        X = rng.standard_normal((n, dim)) * 2.0 + 0.5
        X[:, :3] += shift * y[:, None]
        arrays += [X.astype(np.float16), y]
    return Splits(*arrays)


@pytest.fixture(scope="session")
def separable() -> Splits:
    """Easily separable splits: a fitted head should reach val AUROC well above 0.9."""
    return make_splits()


@pytest.fixture(scope="session")
def imbalanced() -> Splits:
    """Splits with 10% abnormal and a weaker signal, for class weighting."""
    return make_splits(positive_rate=0.1, shift=2.0, seed=3)


# Small settings so each head fits in well under a second; the defaults are sized for MURA. One thread: on
# 400 rows threading costs more than it saves, and a busy CI core makes multi-threaded tiny ops crawl.
FAST_PARAMS: dict[str, dict] = {
    "logreg": {},
    "mlp": {"hidden": (32,), "lr": 1e-2, "batch_size": 64, "max_epochs": 12, "patience": 3, "n_jobs": 1},
    "xgboost": {"n_estimators": 40, "early_stopping_rounds": 10, "n_jobs": 1},
}


@pytest.fixture(scope="session")
def fast_head() -> Callable[..., Head]:
    """Factory: an unfitted head by name with FAST_PARAMS, overridden by keyword arguments."""

    def build(name: str, **params) -> Head:
        return make_head(name, **(FAST_PARAMS[name] | params))

    return build


@pytest.fixture(scope="session")
def fitted(separable: Splits, fast_head: Callable[..., Head]) -> dict[str, Head]:
    """Every head fitted once on `separable` (shared read-only by the tests)."""
    splits = separable
    return {name: fast_head(name).fit(splits.X, splits.y, eval_set=[(splits.X_val, splits.y_val)]) for name in HEAD_NAMES}

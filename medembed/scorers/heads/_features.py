"""Feature transforms heads apply to embeddings before their model: row L2-normalisation and standardisation."""

from dataclasses import dataclass

import numpy as np

# Rows or features whose norm / standard deviation is below this are left unscaled instead of blown up.
_TINY = 1e-12


def l2_normalize_rows(X: np.ndarray) -> np.ndarray:
    """Return `X` `[N, D] float32` with every row scaled to unit L2 norm (all-zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, _TINY).astype(np.float32)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature `(x - mean) / std` with statistics learned on the training split only."""

    mean: np.ndarray  # [D] float32
    std: np.ndarray  # [D] float32; constant features get 1 so they map to 0 rather than inf

    @classmethod
    def fit(cls, X: np.ndarray) -> "Standardizer":
        """Learn mean and std of `X` `[N, D] float32` (accumulated in float64 for accuracy on 40k+ rows)."""
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
        std[std < _TINY] = 1.0
        return cls(mean=mean.astype(np.float32), std=std.astype(np.float32))

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Return the standardised copy of `X` `[N, D] float32`."""
        standardized = X - self.mean
        standardized /= self.std
        return standardized

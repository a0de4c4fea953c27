"""A per-image out-of-distribution score: Mahalanobis distance to the training embeddings (Lee et al. 2018).

The mean and a Ledoit-Wolf shrunk covariance are fitted on train embeddings (a seeded sample kept in the run
directory); an image's score is sqrt((x - mu)^T Sigma^-1 (x - mu)). Shrinkage keeps Sigma invertible when there
are fewer samples than dimensions (1,024 samples of 1,280-d EfficientNet embeddings). The flag threshold is the
conformal quantile of the val scores at the chosen false-alarm rate, so at most that fraction of in-distribution
images (exchangeable with val) is flagged, in expectation.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

from medembed.errors import MedembedError
from medembed.transfer.conformal import conformal_quantile


def embedding_matrix(X: object) -> np.ndarray | None:
    """Rows as a [N, D] float64 matrix (token grids [N, T, D] averaged over tokens), or None when the scorer's
    inputs are not numeric arrays."""
    try:
        array = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if array.ndim < 2:
        return None
    return array.reshape(len(array), -1, array.shape[-1]).mean(axis=1) if array.ndim > 2 else array


class MahalanobisOOD:
    """Mahalanobis distance to a fitted Gaussian; `fit(X [N, D])`, `score(X [M, D]) -> [M] float64`."""

    def fit(self, X: np.ndarray) -> MahalanobisOOD:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) < 2:
            raise MedembedError(f"the OOD score needs at least 2 reference embeddings; got shape {X.shape}")
        self.mean_ = X.mean(axis=0)
        covariance = LedoitWolf(assume_centered=False).fit(X).covariance_
        self.precision_ = np.linalg.pinv(covariance, hermitian=True)
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.mean_):
            raise MedembedError(f"OOD score: embeddings of dimension {len(self.mean_)} expected, got shape {X.shape}")
        centred = X - self.mean_
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision_, centred), 0.0))


def ood_threshold(val_scores: np.ndarray, false_alarm: float) -> float:
    """The score above which an image is flagged, so that about `false_alarm` of val-like images are."""
    if not 0 < false_alarm < 1:
        raise MedembedError(f"OOD false-alarm rate must be in (0, 1); got {false_alarm!r}")
    return conformal_quantile(val_scores, false_alarm)

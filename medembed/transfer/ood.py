"""A per-image out-of-distribution score: Mahalanobis distance to the training embeddings (Lee et al. 2018).

The mean and a Ledoit-Wolf shrunk covariance are fitted on train embeddings (a seeded sample kept in the run
directory); an image's score is sqrt((x - mu)^T Sigma^-1 (x - mu)). Shrinkage keeps Sigma invertible when there
are fewer samples than dimensions (1,024 samples of 1,280-d EfficientNet embeddings). The flag threshold is the
conformal quantile of the val scores at the chosen false-alarm rate, so at most that fraction of in-distribution
images (exchangeable with val) is flagged, in expectation.
"""

from __future__ import annotations

import numpy as np

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
    """Mahalanobis distance to a fitted Gaussian; `fit(X [N, D])`, `score(X [M, D]) -> [M] float64`.

    With fewer reference rows than dimensions (1,024 rows of a 3,840-d ensemble), the shrunk covariance
    b I + a Xc^T Xc is inverted in sample space (Woodbury: an N x N solve, O(N^2 D)) instead of as a D x D
    matrix (O(D^3)); both forms give the same distances (tests/transfer/test_ood.py)."""

    def fit(self, X: np.ndarray) -> MahalanobisOOD:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) < 2:
            raise MedembedError(f"the OOD score needs at least 2 reference embeddings; got shape {X.shape}")
        self.mean_ = X.mean(axis=0)
        centred = X - self.mean_
        n, d = centred.shape
        shrinkage, mu = ledoit_wolf_shrinkage(centred)
        self.dual_ = n < d and shrinkage > 0
        if self.dual_:
            # Sigma = b I + a U^T U  =>  d^2(c) = (|c|^2 - (U c)^T (b/a I + U U^T)^-1 (U c)) / b
            a, b = (1 - shrinkage) / n, shrinkage * mu
            self.basis_, self.ridge_ = centred, b
            gram = centred @ centred.T
            self.inner_ = np.linalg.inv(gram + (b / a) * np.eye(n)) if a > 0 else np.zeros((n, n))
        else:
            covariance = (1 - shrinkage) * (centred.T @ centred) / n + shrinkage * mu * np.eye(d)
            self.precision_ = np.linalg.pinv(covariance, hermitian=True)
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.mean_):
            raise MedembedError(f"OOD score: embeddings of dimension {len(self.mean_)} expected, got shape {X.shape}")
        centred = X - self.mean_
        if self.dual_:
            projected = centred @ self.basis_.T
            squared = ((centred * centred).sum(axis=1) - ((projected @ self.inner_) * projected).sum(axis=1)) / self.ridge_
        else:
            # (c P) . c row by row: one BLAS product, not einsum's loop over three operands
            squared = ((centred @ self.precision_) * centred).sum(axis=1)
        return np.sqrt(np.maximum(squared, 0.0))


def ledoit_wolf_shrinkage(centred: np.ndarray) -> tuple[float, float]:
    """Ledoit-Wolf's shrinkage intensity and target scale mu (trace / D) for centred rows [N, D], from the
    N x N Gram matrix: the same figures as scikit-learn's `ledoit_wolf_shrinkage`, without a D x D matrix."""
    n, d = centred.shape
    gram = centred @ centred.T
    norms = np.diag(gram)  # |x_k|^2
    mu = norms.sum() / n / d
    delta_ = (gram * gram).sum() / n**2  # |S|_F^2, as |X X^T|_F = |X^T X|_F
    beta_ = (norms * norms).sum()
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * norms.sum() / n + d * mu**2) / d
    beta = min(beta, delta)
    return (0.0 if beta == 0 else float(beta / delta)), float(mu)


def ood_threshold(val_scores: np.ndarray, false_alarm: float) -> float:
    """The score above which an image is flagged, so that about `false_alarm` of val-like images are."""
    if not 0 < false_alarm < 1:
        raise MedembedError(f"OOD false-alarm rate must be in (0, 1); got {false_alarm!r}")
    return conformal_quantile(val_scores, false_alarm)

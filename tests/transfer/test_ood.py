"""The Mahalanobis OOD score and its val-calibrated threshold, against hand-computed values."""

import numpy as np
import pytest

from medembed.errors import MedembedError
from medembed.transfer.ood import MahalanobisOOD, embedding_matrix, ood_threshold


def test_distance_by_hand_where_shrinkage_changes_nothing():
    # Covariance diag(0.5, 0.5) is already a multiple of the identity, the Ledoit-Wolf target: no change.
    model = MahalanobisOOD().fit(np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    assert model.score(np.array([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])) == pytest.approx([2.0, 0.0, np.sqrt(8.0)])


def test_one_dimension_by_hand():
    model = MahalanobisOOD().fit(np.array([[0.0], [2.0]]))  # mean 1, variance 1
    assert model.score(np.array([[3.0], [1.0]])) == pytest.approx([2.0, 0.0])


def test_threshold_is_the_val_quantile_at_the_false_alarm_rate():
    val = np.arange(1.0, 20.0)  # 19 scores: rank ceil(20 * 0.9) = 18
    assert ood_threshold(val, 0.1) == 18.0
    assert (val > ood_threshold(val, 0.1)).mean() == pytest.approx(1 / 19)
    with pytest.raises(MedembedError, match="false-alarm"):
        ood_threshold(val, 0.0)


def test_far_inputs_score_higher_than_in_distribution_ones():
    rng = np.random.default_rng(0)
    model = MahalanobisOOD().fit(rng.standard_normal((300, 20)))
    inside, outside = model.score(rng.standard_normal((100, 20))), model.score(rng.standard_normal((100, 20)) + 3)
    assert inside.max() < outside.min()


def test_embedding_matrix_pools_token_grids_and_refuses_non_numeric_inputs():
    tokens = np.arange(12, dtype=float).reshape(2, 3, 2)
    assert embedding_matrix(tokens).tolist() == [[2.0, 3.0], [8.0, 9.0]]
    assert embedding_matrix(np.array(["a", "b"])) is None
    with pytest.raises(MedembedError, match="dimension 2"):
        MahalanobisOOD().fit(np.zeros((3, 2)) + np.eye(3, 2)).score(np.zeros((1, 3)))


@pytest.mark.parametrize("rows, dim", [(40, 120), (120, 30)])
def test_sample_space_and_feature_space_forms_agree_with_scikit_learn(rows, dim):
    # Wider than tall takes the Woodbury form; both must equal the D x D Ledoit-Wolf precision's distances.
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(3)
    X = rng.normal(size=(rows, dim)) * rng.uniform(0.5, 2.0, size=dim)
    Y = rng.normal(size=(25, dim))
    model = MahalanobisOOD().fit(X)
    assert model.dual_ == (rows < dim)
    precision = np.linalg.pinv(LedoitWolf().fit(X).covariance_, hermitian=True)
    centred = Y - X.mean(axis=0)
    expected = np.sqrt(np.einsum("ij,jk,ik->i", centred, precision, centred))
    np.testing.assert_allclose(model.score(Y), expected, rtol=1e-9)

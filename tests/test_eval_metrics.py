"""Feature-space metrics against direct computations: Fréchet distance, KID, IS, precision/recall."""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg

from patchdiffusion.eval import (
    EvalError,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)
from patchdiffusion.eval.inception_score import softmax


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with scipy's general matrix square root, as EDM's fid.py computes it."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * root)))


def random_gaussian_pair(rng, dim, count1, count2):
    a = rng.normal(size=(count1, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    b = rng.normal(size=(count2, dim)) * rng.uniform(0.5, 2.0, size=dim) + 0.3
    return feature_statistics(a), feature_statistics(b)


@pytest.mark.parametrize(
    "dim,count1,count2",
    [
        (8, 200, 300),  # well conditioned
        (64, 1000, 500),
        (64, 20, 30),  # fewer samples than dimensions: both covariances singular (rank 19 and 29)
        (128, 40, 2000),  # one singular, one full rank
    ],
)
def test_frechet_distance_matches_scipy_sqrtm(dim, count1, count2):
    s1, s2 = random_gaussian_pair(np.random.default_rng(dim + count1), dim, count1, count2)
    ours = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    direct = scipy_frechet(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert ours == pytest.approx(direct, rel=1e-6)


def test_frechet_distance_near_singular_and_negative_eigenvalues():
    rng = np.random.default_rng(0)
    dim = 32
    basis = rng.normal(size=(dim, 4))
    # Rank-4 covariances plus tiny noise: S1 S2 has eigenvalues ~1e-12 that round-off makes
    # negative or complex; scipy's sqrtm then returns a complex matrix whose real part is used.
    sigma1 = basis @ basis.T + 1e-12 * np.eye(dim)
    sigma2 = basis @ np.diag([1.0, 2.0, 3.0, 4.0]) @ basis.T
    sigma2 -= 1e-10 * np.eye(dim)  # slightly indefinite: negative eigenvalues
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    assert np.iscomplexobj(root) or np.linalg.eigvals(sigma1 @ sigma2).real.min() < 0
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(ours)
    assert ours == pytest.approx(scipy_frechet(mu1, sigma1, mu2, sigma2), rel=1e-6)


def test_fid_of_a_feature_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    for count in (50, 1000):  # singular and full-rank covariance in 256 dimensions
        features = rng.normal(size=(count, 256)) * 3 + 1
        s = feature_statistics(features)
        assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-6
    # Features of realistic scale (Inception pool3 values are ReLU outputs around 0..5).
    features = np.abs(rng.normal(size=(600, 512))).astype(np.float32)
    s = feature_statistics(features)
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-6


def test_frechet_distance_checks_shapes():
    s = feature_statistics(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(EvalError):
        frechet_distance(s.mu, s.sigma, s.mu[:3], s.sigma[:3, :3])


# ------------------------------------------------------------------------------------------------
# KID


def closed_form_mmd2(x, y):
    """Bińkowski et al. (2018) unbiased estimator, written out with explicit sums over index pairs."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_closed_form_on_hand_made_sets():
    x = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [2.0, 2.0, 0.0], [-1.0, 0.5, 0.5]])
    y = np.array([[1.0, 1.0, 1.0], [0.0, -2.0, 1.0], [3.0, 0.0, 0.0]])
    assert mmd2_unbiased(x, y) == pytest.approx(closed_form_mmd2(x, y), rel=1e-12)
    # A hand-checkable value: 1-d sets {0, 1} and {2, 3}, k(a, b) = (ab + 1)^3.
    xx = 2 * (0 * 1 + 1) ** 3 / 2  # k(0,1) + k(1,0) over m(m-1) = 2
    yy = 2 * (2 * 3 + 1) ** 3 / 2
    xy = ((0 * 2 + 1) ** 3 + (0 * 3 + 1) ** 3 + (1 * 2 + 1) ** 3 + (1 * 3 + 1) ** 3) / 4
    assert mmd2_unbiased(np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])) == pytest.approx(xx + yy - 2 * xy)
    # With subsets as large as the sets, every subset is the whole set: KID is that estimator exactly.
    kid = kernel_inception_distance(x[:3], y, num_subsets=5, subset_size=1000)
    assert kid.subset_size == 3
    assert kid.mean == pytest.approx(closed_form_mmd2(x[:3], y), rel=1e-12)
    assert kid.std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same = kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted = kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 10 * abs(same.mean) and shifted.mean > 0


# ------------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_of_uniform_logits_is_one():
    result = inception_score(softmax(np.zeros((100, 1008))), splits=10)
    assert result.mean == pytest.approx(1.0, abs=1e-12)
    assert result.std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    classes = 8
    probs = np.eye(classes)[np.arange(400) % classes]  # each split holds every class equally often
    assert inception_score(probs, splits=10).mean == pytest.approx(classes, rel=1e-9)
    # Confident but all the same class: no diversity, IS = 1.
    assert inception_score(np.eye(classes)[np.zeros(100, int)], splits=10).mean == pytest.approx(1.0)


def test_inception_score_needs_enough_images():
    with pytest.raises(EvalError):
        inception_score(np.full((5, 10), 0.1), splits=10)


# ------------------------------------------------------------------------------------------------
# Precision / recall


def test_precision_recall_are_one_for_identical_sets():
    features = np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32) * 4 + 7
    result = precision_recall(features, features.copy(), k=3)
    assert result.precision == 1.0 and result.recall == 1.0


def test_precision_recall_fall_as_sets_are_shifted_apart():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 16)).astype(np.float32)
    fake = rng.normal(size=(400, 16)).astype(np.float32)
    direction = np.ones(16, np.float32) / math.sqrt(16)
    values = [precision_recall(real, fake + shift * direction, k=3) for shift in (0.0, 1.0, 2.0, 4.0, 8.0)]
    precisions = [v.precision for v in values]
    recalls = [v.recall for v in values]
    assert precisions[0] > 0.7 and recalls[0] > 0.7
    assert all(a > b for a, b in zip(precisions, precisions[1:])), precisions
    assert all(a > b for a, b in zip(recalls, recalls[1:])), recalls
    assert precisions[-1] < 0.1 and recalls[-1] < 0.1


def test_precision_recall_radius_is_the_kth_nearest_other_point():
    # Real points on a line at 0, 1, 2, 3, 10. With k=1 the ball of 10 has radius 7 (nearest other: 3).
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]], np.float32)
    assert precision_recall(real, np.full((5, 1), 6.5, np.float32), k=1).precision == 1.0
    # With k=3 the ball of 0 has radius 3 (others at 1, 2, 3, 10): -2.5 is inside it, -3.5 is not.
    assert precision_recall(real, np.full((5, 1), -2.5, np.float32), k=3).precision == 1.0
    assert precision_recall(real, np.full((5, 1), -3.5, np.float32), k=3).precision == 0.0

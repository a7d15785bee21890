"""Fréchet distance between Gaussians fitted to feature sets: the FID (Heusel et al. 2017, eq. 6).

    d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)

The reference tools (TF FID, pytorch-fid, EDM's fid.py) take the trace term from
scipy.linalg.sqrtm(S1 S2), which is slow in 2048 dimensions and returns complex values with small
imaginary parts when S1 S2 is near singular (few samples, duplicated images). Here the same number
comes from symmetric eigendecompositions only: with A = S1^½ (symmetric, PSD),

    tr((S1 S2)^½) = tr((A S2 A)^½) = sum_i sqrt(lambda_i(A S2 A)),

because S1 S2 = A (A S2 A) A^-1 is similar to the symmetric PSD matrix A S2 A (by continuity the
identity also holds for singular S1). Eigenvalues that round-off pushes below zero are clipped to 0,
which is what taking the real part of sqrtm does to them. Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EvalError


@dataclass(frozen=True)
class GaussianStatistics:
    """Mean and covariance of a feature set (the `mu`, `sigma` of an FID reference file)."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased (divided by N - 1) as in EDM and pytorch-fid
    count: int  # number of feature vectors they were computed from (0 = unknown, e.g. a foreign .npz)


def feature_statistics(features: np.ndarray) -> GaussianStatistics:
    """Mean and unbiased covariance of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise EvalError(f"statistics need at least 2 feature vectors, got an array of shape {features.shape}")
    mu = features.mean(axis=0)
    centred = features - mu
    sigma = centred.T @ centred / (len(features) - 1)
    return GaussianStatistics(mu, sigma, len(features))


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^½) for symmetric PSD S1, S2, via the eigenvalues of S1^½ S2 S1^½ (see module doc)."""
    root1 = _symmetric_sqrt(np.asarray(sigma1, dtype=np.float64))
    middle = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvalError(
            f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    mean_term = float(np.square(mu1 - mu2).sum())
    distance = mean_term + float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    # A distance is >= 0; round-off can leave a identical-statistics result a hair below.
    return max(distance, 0.0)


def frechet_distance_between(stats1: GaussianStatistics, stats2: GaussianStatistics) -> float:
    """`frechet_distance` of two GaussianStatistics."""
    return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)

"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", sec. 4 and appendix).

KID is the squared maximum mean discrepancy between the two feature distributions under the cubic
polynomial kernel

    k(x, y) = (x·y / d + 1)^3          (d = feature width, 2048 for Inception pool3),

estimated without bias (the U-statistic of Gretton et al. 2012, lemma 6) from X (m samples) and Y
(n samples):

    MMD²_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1))
             - 2 sum_{i, j} k(x_i, y_j) / (m n).

Being unbiased, it can be slightly negative when the sets match. As in the paper's code and
StyleGAN's metrics, it is averaged over random subsets (default 100 subsets of up to 1000 samples,
drawn without replacement), which keeps the cost fixed; the spread over subsets is reported too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import EvalError

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000


@dataclass(frozen=True)
class KIDResult:
    mean: float  # KID: MMD²_u averaged over subsets
    std: float  # standard deviation over subsets
    num_subsets: int
    subset_size: int  # samples drawn from each set per subset


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)^3 for every pair of rows: (m, d), (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between the rows of x (m, d) and y (n, d) under the polynomial kernel."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise EvalError(f"KID needs at least 2 samples in each set, got {m} and {n}")
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    # Leave out the i == j terms: they would bias the within-set averages upwards.
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = DEFAULT_SUBSETS,
    subset_size: int = DEFAULT_SUBSET_SIZE,
    seed: int = 0,
) -> KIDResult:
    """KID between two feature sets, averaged over `num_subsets` random subsets of equal size.

    The subset size is min(subset_size, len(features1), len(features2)); with sets no larger than
    that, every subset is the whole of both sets and all subsets agree.
    """
    size = min(subset_size, len(features1), len(features2))
    if size < 2:
        raise EvalError(f"KID needs at least 2 samples in each set, got {len(features1)} and {len(features2)}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = features1[rng.choice(len(features1), size, replace=False)]
        y = features2[rng.choice(len(features2), size, replace=False)]
        values.append(mmd2_unbiased(x, y))
    return KIDResult(float(np.mean(values)), float(np.std(values)), num_subsets, size)

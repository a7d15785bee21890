"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models", sec. 2).

Each set's manifold is approximated by the union of balls around its feature vectors, each ball's
radius being the distance to the k-th nearest *other* vector of the same set (k = 3):

    f(phi, Phi) = 1 if ||phi - phi'|| <= NND_k(phi') for some phi' in Phi, else 0
    precision   = mean over generated phi_g of f(phi_g, Phi_real)   (generated images that look real)
    recall      = mean over real phi_r      of f(phi_r, Phi_gen)    (real images the model covers)

Distances are computed in row blocks so memory stays bounded (block x N floats).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import EvalError

DEFAULT_K = 3
BLOCK_ROWS = 1024  # rows of each pairwise-distance block


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between rows, (m, d) x (n, d) -> (m, n)."""
    return torch.cdist(a, b)


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row, (N,). The row itself (distance 0) is skipped."""
    if len(features) <= k:
        raise EvalError(f"precision/recall with k={k} needs more than {k} images per set, got {len(features)}")
    radii = []
    for start in range(0, len(features), block_rows):
        block = _distances(features[start:start + block_rows], features)
        # k + 1 smallest includes the row itself at distance 0.
        radii.append(block.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(
    queries: torch.Tensor, support: torch.Tensor, support_radii: torch.Tensor, block_rows: int = BLOCK_ROWS
) -> float:
    """Fraction of query rows inside at least one ball (support row, its radius)."""
    inside = []
    for start in range(0, len(queries), block_rows):
        block = _distances(queries[start:start + block_rows], support)  # (b, N)
        inside.append((block <= support_radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(
    real_features: np.ndarray,
    generated_features: np.ndarray,
    k: int = DEFAULT_K,
    device: str | torch.device = "cpu",
    block_rows: int = BLOCK_ROWS,
) -> PrecisionRecall:
    """Kynkäänniemi et al. (2019) precision and recall of generated features against real ones."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32, device=device)
    generated = torch.as_tensor(np.asarray(generated_features), dtype=torch.float32, device=device)
    # Centre both sets on the real mean: distances are unchanged, and the |a|² + |b|² - 2ab form that
    # cdist uses loses less precision on vectors near the origin.
    centre = real.mean(dim=0, keepdim=True)
    real, generated = real - centre, generated - centre
    real_radii = knn_radii(real, k, block_rows)
    generated_radii = knn_radii(generated, k, block_rows)
    return PrecisionRecall(
        precision=manifold_coverage(generated, real, real_radii, block_rows),
        recall=manifold_coverage(real, generated, generated_radii, block_rows),
        k=k,
    )

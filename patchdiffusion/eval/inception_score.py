"""Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", sec. 4).

    IS = exp( E_x KL( p(y|x) || p(y) ) ),   p(y) = E_x p(y|x),

computed, as in the paper's code, on `splits` (10) equal parts of the image set: the score of each
part uses that part's own marginal p(y), and the mean and standard deviation over parts are reported.
p(y|x) is the softmax of the 1008 Inception logits taken *without* the output bias, which is what
the original TF code (and StyleGAN's `no_output_bias=True`) does. Uniform predictions give IS = 1;
the maximum is the number of classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import xlogy

from .errors import EvalError

DEFAULT_SPLITS = 10


@dataclass(frozen=True)
class InceptionScoreResult:
    mean: float  # mean over splits
    std: float  # standard deviation over splits
    splits: int


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum so large logits do not overflow."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def inception_score(class_probs: np.ndarray, splits: int = DEFAULT_SPLITS) -> InceptionScoreResult:
    """IS of (N, C) class probabilities p(y|x), over `splits` parts (Salimans et al. 2016)."""
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < splits:
        raise EvalError(f"Inception Score over {splits} splits needs at least {splits} images, got {len(probs)}")
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)
        # KL(p(y|x) || p(y)) per image; xlogy takes 0 * log 0 as 0 (classes no image predicts).
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return InceptionScoreResult(float(np.mean(scores)), float(np.std(scores)), splits)

"""Classifier-free guidance as a wrapper around a denoiser (Ho & Salimans 2022, eq. 6, in x0 form):

    D_guided(x; sigma) = D(x; sigma, null) + s (D(x; sigma, c) - D(x; sigma, null))

Scale 1 is the conditional denoiser alone, 0 the unconditional one. Both passes run as one batch.
Since eps = (x - x0)/sigma is affine in x0 with weights summing to one, guiding x0 is the same as
guiding eps (ADM, Luhman & Luhman) or v. A denoiser that clips x0 clips each branch before the mix;
to clip the guided result instead, wrap an unclipped denoiser and clamp afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ClassifierFreeGuidance", "guided"]


class ClassifierFreeGuidance(nn.Module):
    """Guide ``denoiser`` with scale ``scale``. ``null_cond`` maps a conditioning keyword to its
    "no condition" value: a tensor (broadcast to the conditional value's shape) or a number (filled,
    e.g. 0 for one-hot labels, or the null class index). Keywords not in ``null_cond`` are shared by
    both passes. For a denoiser returning ``(x0_hat, v)`` the guided x0_hat is returned with the
    conditional v."""

    def __init__(self, denoiser, scale: float, null_cond: dict[str, Any]):
        super().__init__()
        self.denoiser = denoiser
        self.scale = float(scale)
        self.null_cond = dict(null_cond)

    def _null(self, key: str, value):
        null = self.null_cond[key]
        if value is None:
            return None
        if isinstance(null, torch.Tensor):
            return null.to(device=value.device, dtype=value.dtype).expand_as(value)
        return torch.full_like(value, null)

    def forward(self, x: torch.Tensor, sigma, **cond):
        if self.scale == 1:
            return self.denoiser(x, sigma, **cond)
        B = x.shape[0]
        # One batch: the first B examples conditional, the last B with the null condition.
        both = {}
        for key, value in cond.items():
            if key in self.null_cond and value is not None:
                both[key] = torch.cat([value, self._null(key, value)])
            elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == B:
                both[key] = torch.cat([value, value])
            elif isinstance(value, list) and len(value) == B:  # one entry per example (a tiled model's boxes)
                both[key] = value + value
            else:
                both[key] = value
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim > 0 and sigma.shape[0] == B:  # per-example sigmas; a scalar broadcasts
            sigma = torch.cat([sigma, sigma])
        out = self.denoiser(torch.cat([x, x]), sigma, **both)
        x0, v = out if isinstance(out, tuple) else (out, None)
        d_cond, d_uncond = x0[:B], x0[B:]
        # Extrapolate from the unconditional towards the conditional prediction.
        x0 = d_uncond + self.scale * (d_cond - d_uncond)
        return x0 if v is None else (x0, v[:B])


def guided(denoiser, scale: float, cond_key: str = "class_labels", null_value: Any = 0) -> ClassifierFreeGuidance:
    """Classifier-free guidance on one conditioning keyword (default: zeroed one-hot class labels)."""
    return ClassifierFreeGuidance(denoiser, scale, {cond_key: null_value})

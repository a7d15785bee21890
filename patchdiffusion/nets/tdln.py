"""Time-dependent normalisation (DiMR, Liu et al. 2024, "TD-LN"), and adaLN as its ablation.

DiMR's network has no time embedding. Time enters only through the affine parameters of its norms:
every parameter vector θ of a norm (the scale, and the shift of a LayerNorm) is

    θ(τ) = p1 + sigmoid(w·τ + b) ⊙ (p0 − p1)                      (elementwise; the paper's TD-LN)

with four learned vectors p0, p1, w̃, b̃ of the norm's width, w = 1 + w̃ and b = b̃ (w̃ = b̃ = 0 at
init, so w starts at 1 and b at 0) and p0 = p1 at init (θ does not depend on time until trained).
The time coordinate is τ = log_snr / 4 where the reference code's "log_snr" is linear in the
discrete step n ∈ {1..T}: log_snr = 8·n/T − 4, so τ = 2n/T − 1 ∈ (−1, 1] (METHODS.md §5).

The norms are called as ``norm(x, cond)``: ``cond`` is τ of shape (B,) for the TD norms and a time
embedding (B, E) for adaLN, so a block passes one `cond` along and does not care which it is.
Parameter cost per norm of width d: TD-RMSNorm 4d, TD-LayerNorm 8d, adaLN 2·d·E + 2d.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import timestep_embedding

__all__ = [
    "time_coordinate",
    "shared_time",
    "TimeDependentParameter",
    "TDRMSNorm",
    "TDLayerNorm",
    "AdaLayerNorm",
    "TimeEmbedding",
    "NORM_KINDS",
    "make_norm",
]

NORM_KINDS = ("td", "adaln")  # the network's time conditioning: DiMR's TD norms, or DiT's adaLN (ablation)


def time_coordinate(timesteps: torch.Tensor, num_timesteps: int = 1000) -> torch.Tensor:
    """τ = log_snr/4 with the reference's log_snr = 8·n/T − 4 and n = t + 1 (t zero-based, as
    `DDPMLoss` and `DiscretePrecond` pass it); (B,) float -> (B,) in (−1, 1]."""
    n = timesteps.float() + 1
    return 2 * n / num_timesteps - 1


def shared_time(tau: torch.Tensor) -> torch.Tensor:
    """τ (B,) as (1,) when every example has the same τ (always so in sampling), so each time-dependent
    vector is computed once for the batch, as the reference does; otherwise unchanged. One host sync."""
    if tau.numel() > 1 and tau.device.type != "meta" and bool((tau == tau[0]).all()):
        return tau[:1]
    return tau


def _per_row(vec: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B | 1, d) -> (B | 1, 1, ..., 1, d) so it broadcasts over x's middle (token / spatial) axes."""
    return vec.reshape(vec.shape[0], *([1] * (like.ndim - 2)), vec.shape[-1])


class TimeDependentParameter(nn.Module):
    """θ(τ) = p1 + σ((1 + w̃)·τ + b̃) ⊙ (p0 − p1), a vector of width `dim`."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.p0 = nn.Parameter(torch.full((dim,), float(init)))
        self.p1 = nn.Parameter(torch.full((dim,), float(init)))
        self.w = nn.Parameter(torch.zeros(dim))  # w̃: the sigmoid's slope is 1 + w̃
        self.b = nn.Parameter(torch.zeros(dim))  # b̃: the sigmoid's offset

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        """τ (B,) -> θ (B, dim); τ of shape (1,) (see `shared_time`) gives one row for the whole batch."""
        tau = tau.reshape(-1).to(self.p0.dtype)
        gate = torch.sigmoid(torch.addcmul(self.b, tau[:, None], 1 + self.w))  # (B, dim)
        return torch.addcmul(self.p1, gate, self.p0 - self.p1)


class TDRMSNorm(nn.Module):
    """RMSNorm whose scale is time dependent: θ_s(τ) ⊙ x / (rms(x) + ε), over the last axis, no shift
    (the reference's TDRMSNorm, ε = 1e-8 added to the RMS as there). 4·dim parameters."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = TimeDependentParameter(dim, 1.0)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        rms = x.norm(2, dim=-1, keepdim=True) / math.sqrt(self.dim)
        return _per_row(self.scale(tau), x).to(x.dtype) * (x / (rms + self.eps))


class TDLayerNorm(nn.Module):
    """LayerNorm over the last axis with time-dependent weight and bias (the reference's LayerNorm,
    used before the upsampler, after it, and before each output conv). 8·dim parameters."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = TimeDependentParameter(dim, 1.0)
        self.bias = TimeDependentParameter(dim, 0.0)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight(tau), self.bias(tau)  # (B | 1, dim) each
        if weight.shape[0] == 1:  # one τ for the batch: the fused kernel with plain vectors
            return F.layer_norm(x, (self.dim,), weight[0].to(x.dtype), bias[0].to(x.dtype), self.eps)
        x = F.layer_norm(x, (self.dim,), eps=self.eps)
        return torch.addcmul(_per_row(bias, x).to(x.dtype), _per_row(weight, x).to(x.dtype), x)


class AdaLayerNorm(nn.Module):
    """The ablation (DiT's adaLN, Peebles & Xie 2023 §3.2): LayerNorm without affine parameters, then
    x·(1 + γ) + β with (γ, β) = Linear(SiLU(e)) from the time embedding e. The linear map is zero at
    init so the norm starts as a plain LayerNorm. 2·dim·E + 2·dim parameters."""

    def __init__(self, dim: int, embed_dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.modulation = nn.Linear(embed_dim, 2 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation(F.silu(emb)).chunk(2, dim=-1)  # (B, dim) each
        x = F.layer_norm(x, (self.dim,), eps=self.eps)
        return x * (1 + _per_row(gamma, x).to(x.dtype)) + _per_row(beta, x).to(x.dtype)


class TimeEmbedding(nn.Module):
    """The time embedding adaLN needs (DiT's TimestepEmbedder): sinusoidal features of the timestep,
    then Linear -> SiLU -> Linear. `cond` for the adaLN norms; DiMR's own TD norms need none."""

    def __init__(self, embed_dim: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(timesteps, self.frequencies)  # (B, frequencies)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def make_norm(kind: str, dim: int, role: str, embed_dim: int = 0) -> nn.Module:
    """The norm at one place of the network. `role`: "rms" inside the blocks (TD-RMSNorm in DiMR),
    "ln" in the upsampler and the output heads (TD-LayerNorm). With kind "adaln" both are adaLN."""
    if kind == "td":
        return TDRMSNorm(dim) if role == "rms" else TDLayerNorm(dim)
    if kind == "adaln":
        return AdaLayerNorm(dim, embed_dim)
    raise ValueError(f"norm kind must be one of {', '.join(NORM_KINDS)}, got {kind!r}")

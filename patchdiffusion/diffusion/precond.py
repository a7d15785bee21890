"""Preconditioning: wrap a raw backbone into a denoiser ``D(x, sigma, **cond) -> x0_hat``.

A backbone ``net(x_in, noise_labels, **cond) -> (B, C_out, H, W)`` knows nothing of sigma. The
wrappers here decide what it sees and how its output becomes an estimate of the clean image, in
EDM's coordinates ``x = x0 + sigma * n`` (Karras et al. 2022, eq. 7):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

``EDMPrecond`` uses EDM's own coefficients; ``DiscretePrecond`` adapts a discrete-time VP network
(DDPM/ADM style, predicting eps, x0 or v at an integer timestep) to the same interface.
"""

from __future__ import annotations

import torch
from torch import nn

from . import parameterization
from .parameterization import (  # re-exported: the conversions are part of this module's public surface
    edm_coefficients,
    eps_to_x0,
    v_to_eps,
    v_to_x0,
    vp_coefficients,
    x0_to_eps,
    x0_to_v,
)
from .schedules import VPSchedule

__all__ = [
    "edm_coefficients",
    "vp_coefficients",
    "eps_to_x0",
    "x0_to_eps",
    "v_to_x0",
    "x0_to_v",
    "v_to_eps",
    "EDMPrecond",
    "DiscretePrecond",
]


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the wrappers.


def _mix_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the skip/output mixing is done in: at least float32 (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _net_dtype(net, default: torch.dtype) -> torch.dtype:
    """The dtype a backbone computes in: that of its first floating parameter, else ``default``."""
    if isinstance(net, nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return default


def _sigma_like(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (python number, 0-d, (1,), (B,) or (B, 1, 1, 1)) as a (B, 1, ..., 1) tensor of x's dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(x.shape[0])
    return sigma.reshape(x.shape[0], *([1] * (x.ndim - 1)))


class EDMPrecond(nn.Module):
    """EDM's denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, eq. 7).

    The backbone runs in its own dtype (that of its parameters); the skip/output mixing is done in
    float32 (float64 inputs stay float64). Returns x0_hat in that mixing dtype.
    """

    def __init__(self, net, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        dtype = _mix_dtype(x)
        x = x.to(dtype)
        sigma = _sigma_like(sigma, x)  # (B, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = parameterization.edm_coefficients(sigma, self.sigma_data)
        F_x = self.net((c_in * x).to(_net_dtype(self.net, dtype)), c_noise.flatten(), **cond)
        return parameterization.edm_x0(x, F_x.to(dtype), c_skip, c_out)


# ----------------------------------------------------------------------------------------------
# A discrete-time VP network as a denoiser (its identities are in parameterization.py).


class DiscretePrecond(nn.Module):
    """A discrete-time VP network (DDPM/ADM style) as a denoiser D(x, sigma, **cond).

    For EDM's sigma the network sees ``x_vp = x / sqrt(1 + sigma^2)`` and the continuous timestep
    ``t = schedule.sigma_to_t(sigma)`` as its noise label (ADM passes t as a float; EDM's
    VEPrecond/VPPrecond do the same for their own schedules, Karras et al. 2022 Table 1). Its
    output, an eps / x0 / v prediction in VP coordinates, is converted to x0 (in EDM coordinates
    x0 = x - sigma eps for eps-prediction).

    ``learned_variance``: the net outputs 2C channels, the prediction then a raw interpolation
    value v (already in [0, 1], Luhman & Luhman 2022); the denoiser returns ``(x0_hat, v)``.
    ``clip_x0``: clamp x0_hat to [-1, 1] (DDPM's ``clip_denoised``).
    """

    def __init__(
        self,
        net,
        schedule: VPSchedule,
        prediction: str = "eps",
        learned_variance: bool = False,
        clip_x0: bool = False,
    ):
        super().__init__()
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.learned_variance = learned_variance
        self.clip_x0 = clip_x0

    def forward(self, x: torch.Tensor, sigma, **cond):
        dtype = _mix_dtype(x)
        x = x.to(dtype)
        sigma = _sigma_like(sigma, x)  # (B, 1, 1, 1)
        alpha, sigma_vp = parameterization.vp_coefficients(sigma)
        x_vp = alpha * x  # the same point in VP coordinates
        t = self.schedule.sigma_to_t(sigma.flatten())  # (B,) continuous timestep labels
        out = self.net(x_vp.to(_net_dtype(self.net, dtype)), t, **cond).to(dtype)

        C = x.shape[1]
        if self.learned_variance:
            if out.shape[1] != 2 * C:
                raise ValueError(f"learned variance needs {2 * C} output channels, got {out.shape[1]}")
            out, v = out[:, :C], out[:, C:]
        x0 = parameterization.x0_from_prediction(self.prediction, x_vp, out, alpha, sigma_vp)
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        return (x0, v) if self.learned_variance else x0

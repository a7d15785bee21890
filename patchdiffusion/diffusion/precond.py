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


# ----------------------------------------------------------------------------------------------
# EDM preconditioning, Karras et al. 2022, Table 1 ("Network and preconditioning", EDM column):
#   c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)        c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)
#   c_in   = 1 / sqrt(sigma^2 + sigma_d^2)             c_noise = ln(sigma) / 4


def edm_coefficients(sigma, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning (Karras et al. 2022, Table 1, eq. 7).
    ``sigma`` is a tensor (any shape); the four results have its shape."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


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
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        F_x = self.net((c_in * x).to(_net_dtype(self.net, dtype)), c_noise.flatten(), **cond)
        return c_skip * x + c_out * F_x.to(dtype)


# ----------------------------------------------------------------------------------------------
# Parameterisations of a VP model, x_t = alpha x0 + sigma eps with alpha^2 + sigma^2 = 1
# (alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar); Ho et al. 2020 eq. 4, and the velocity
# v = alpha eps - sigma x0 of Salimans & Ho 2022, §4 and Appendix D).
# Here `sigma` is the VP noise scale, not EDM's sigma; `vp_coefficients` converts.


def vp_coefficients(sigma):
    """(alpha, sigma_vp) of the VP point equivalent to EDM's sigma: alpha = 1/sqrt(1 + sigma^2),
    sigma_vp = sigma/sqrt(1 + sigma^2) (so x_vp = alpha x and alpha^2 = alpha_bar)."""
    sigma = torch.as_tensor(sigma)
    alpha = 1 / (1 + sigma**2).sqrt()
    return alpha, sigma * alpha


def eps_to_x0(x_t, eps, alpha, sigma):
    """x0 = (x_t - sigma eps) / alpha  (Ho et al. 2020, eq. 4 solved for x0)."""
    return (x_t - sigma * eps) / alpha


def x0_to_eps(x_t, x0, alpha, sigma):
    """eps = (x_t - alpha x0) / sigma  (Ho et al. 2020, eq. 4 solved for eps)."""
    return (x_t - alpha * x0) / sigma


def v_to_x0(x_t, v, alpha, sigma):
    """x0 = alpha x_t - sigma v  (Salimans & Ho 2022, §4; needs alpha^2 + sigma^2 = 1)."""
    return alpha * x_t - sigma * v


def x0_to_v(x_t, x0, alpha, sigma):
    """v = alpha eps - sigma x0 = (alpha x_t - x0) / sigma  (Salimans & Ho 2022, §4)."""
    return (alpha * x_t - x0) / sigma


def v_to_eps(x_t, v, alpha, sigma):
    """eps = sigma x_t + alpha v  (Salimans & Ho 2022, Appendix D; needs alpha^2 + sigma^2 = 1)."""
    return sigma * x_t + alpha * v


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
        alpha, sigma_vp = vp_coefficients(sigma)
        x_vp = alpha * x  # the same point in VP coordinates
        t = self.schedule.sigma_to_t(sigma.flatten())  # (B,) continuous timestep labels
        out = self.net(x_vp.to(_net_dtype(self.net, dtype)), t, **cond).to(dtype)

        C = x.shape[1]
        if self.learned_variance:
            if out.shape[1] != 2 * C:
                raise ValueError(f"learned variance needs {2 * C} output channels, got {out.shape[1]}")
            out, v = out[:, :C], out[:, C:]
        if self.prediction == "eps":
            x0 = eps_to_x0(x_vp, out, alpha, sigma_vp)
        elif self.prediction == "v":
            x0 = v_to_x0(x_vp, out, alpha, sigma_vp)
        else:
            x0 = out
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        return (x0, v) if self.learned_variance else x0

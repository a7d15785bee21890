"""The diffusion identities, written once: how a clean image is noised and how a network's output
becomes an estimate of the clean image. Every loss, preconditioner and method goes through these.

Two coordinate systems meet here:
  * EDM's variance-exploding one, ``x = x0 + sigma n`` (Karras et al. 2022), which the samplers use;
  * the variance-preserving one of discrete-time models, ``x_t = alpha x0 + sigma_vp eps`` with
    ``alpha^2 + sigma_vp^2 = 1`` (alpha = sqrt(alpha_bar); Ho et al. 2020, eq. 4).
The same noisy point is ``x_vp = alpha x`` with ``alpha = 1/sqrt(1 + sigma^2)`` (`vp_coefficients`).
In the VE system ``diffuse`` is called with alpha = 1.

Callers use these through the module (``parameterization.diffuse(...)``), so one place defines them.
"""

from __future__ import annotations

import torch

PREDICTIONS = ("eps", "x0", "v")


# ----------------------------------------------------------------------------------------------
# Coordinates.


def vp_coefficients(sigma):
    """(alpha, sigma_vp) of the VP point equivalent to EDM's sigma: alpha = 1/sqrt(1 + sigma^2),
    sigma_vp = sigma/sqrt(1 + sigma^2) (so x_vp = alpha x and alpha^2 = alpha_bar)."""
    sigma = torch.as_tensor(sigma)
    alpha = 1 / (1 + sigma**2).sqrt()
    return alpha, sigma * alpha


def diffuse(x0, noise, alpha, sigma):
    """The noisy point x_t = alpha x0 + sigma noise (Ho et al. 2020, eq. 4; EDM's x0 + sigma n with alpha = 1)."""
    return alpha * x0 + sigma * noise


# ----------------------------------------------------------------------------------------------
# What a VP network predicts: eps, x0, or the velocity v = alpha eps - sigma x0 (Salimans & Ho 2022,
# §4 and Appendix D). `sigma` below is the VP noise scale.


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


def prediction_target(prediction: str, x0, noise, alpha, sigma):
    """The regression target of a network predicting `prediction` for x_t = alpha x0 + sigma noise:
    eps -> noise, x0 -> x0, v -> alpha noise - sigma x0 (Salimans & Ho 2022, §4)."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * noise - sigma * x0
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def x0_from_prediction(prediction: str, x_t, output, alpha, sigma):
    """x0 estimate from a VP network's output at x_t (the inverse of `prediction_target`)."""
    if prediction == "eps":
        return eps_to_x0(x_t, output, alpha, sigma)
    if prediction == "x0":
        return output
    if prediction == "v":
        return v_to_x0(x_t, output, alpha, sigma)
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


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


def edm_x0(x, F_x, c_skip, c_out):
    """EDM's denoiser output D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, eq. 7)."""
    return c_skip * x + c_out * F_x

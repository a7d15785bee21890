"""Samplers: pure functions that turn noise into images with a denoiser.

Every sampler has one signature (k-diffusion's, with EDM's sigma convention)::

    sample_<name>(denoiser, x, sigmas, *, extra_args=None, noise_fn=None, callback=None,
                  progress=False, **options) -> x0

- ``denoiser(x, sigma, **extra_args) -> x0_hat`` (or ``(x0_hat, v)``; only the DDPM sampler's
  learned variance uses v);
- ``x`` is the starting noise already multiplied by ``sigmas[0]``;
- ``sigmas`` is a 1-D descending tensor ending in 0 (``edm_sigmas`` or ``VPSchedule.sigmas_for_sampling``);
- ``noise_fn(like, step)`` draws fresh noise for sampling step ``step`` (each sampler draws at most
  once per step; default ``torch.randn_like``; pass ``SampleRNG.randn_like`` for per-seed
  reproducibility, or a step-keyed source such as ``canvas.BlockNoise`` so that a resumed run draws
  the same noise as an uninterrupted one);
- ``callback(dict)`` gets ``{i, x, sigma, denoised}`` each step (x before the step);
- ``start`` resumes at step ``start``: ``x`` is then the state before that step (what the callback
  saw as ``x`` at step ``start``). A sampler with history also needs the keyword named in
  ``HISTORY_ARGS`` (dpmpp_2m: ``previous_denoised``, the callback's ``denoised`` of step start - 1).

The samplers only use arithmetic (``+ - * /`` with floats and arrays, ``.sqrt()``, ``.exp()``,
``.to()``) on ``x`` and on what the denoiser returns, so they run unchanged on array types other than
``torch.Tensor``, such as the lazy out-of-core ``canvas.CanvasArray``.

All the formulas are written in EDM's variance-exploding coordinates ``x = x0 + sigma n``: a VP
state x_vp at alpha_bar is the VE point x = x_vp / sqrt(alpha_bar) at sigma^2 = (1 - alpha_bar)/alpha_bar,
and dividing a VP update by sqrt(alpha_bar_s) gives the VE one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

__all__ = [
    "sample_euler",
    "sample_heun",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "ddpm_posterior_variance",
    "SAMPLERS",
    "HISTORY_ARGS",
    "get_sampler",
]


# ----------------------------------------------------------------------------------------------
# Shared plumbing.


def _sigma_list(sigmas) -> list[float]:
    """The noise levels as python floats (coefficients are then computed in double precision)."""
    sigmas = torch.as_tensor(sigmas).detach().cpu().to(torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    return sigmas.tolist()


def _steps(num_steps: int, progress: bool, start: int = 0):
    """Step indices start..num_steps-1 (a resumed run starts later)."""
    if not 0 <= start <= num_steps:
        raise ValueError(f"start must be in [0, {num_steps}] for {num_steps} steps, got {start}")
    return tqdm(range(start, num_steps), initial=start, total=num_steps, disable=not progress, leave=False)


def _denoise(denoiser, x, sigma: float, extra_args: dict):
    """Call the denoiser at one noise level; returns (x0_hat, v or None), x0_hat in x's dtype."""
    sigma_batch = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)  # (B,)
    out = denoiser(x, sigma_batch, **extra_args)
    x0, v = out if isinstance(out, tuple) else (out, None)
    return x0.to(x.dtype), v


def _noise(noise_fn: Callable | None, x, step: int):
    """Fresh standard normal noise like x for sampling step `step`."""
    n = torch.randn_like(x) if noise_fn is None else noise_fn(x, step)
    return n.to(device=x.device, dtype=x.dtype)


def _churn(x, sigma, num_steps, S_churn, S_min, S_max, S_noise, noise_fn, step):
    """EDM Algorithm 2, lines 4-6: raise the noise level from sigma to sigma_hat = (1 + gamma) sigma,
    gamma = min(S_churn/N, sqrt(2) - 1) for sigma in [S_min, S_max], adding fresh noise of std
    sqrt(sigma_hat^2 - sigma^2) S_noise. Returns (x_hat, sigma_hat)."""
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma <= S_max else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + math.sqrt(sigma_hat**2 - sigma**2) * S_noise * _noise(noise_fn, x, step)
    return x, sigma_hat


# ----------------------------------------------------------------------------------------------
# EDM samplers (Karras et al. 2022, Algorithm 2, with sigma(t) = t and s(t) = 1, so the ODE is
# dx/dsigma = (x - D(x; sigma)) / sigma, eq. 1 / Table 1).


def _edm_sample(denoiser, x, sigmas, extra_args, noise_fn, callback, progress, churn, second_order, start):
    """EDM Algorithm 2; `second_order=False` drops the Heun correction (lines 9-11), giving Euler."""
    extra_args = extra_args or {}
    sigmas = _sigma_list(sigmas)
    num_steps = len(sigmas) - 1
    for i in _steps(num_steps, progress, start):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Increase noise temporarily (lines 4-6).
        x_hat, sigma_hat = _churn(x, sigma, num_steps, *churn, noise_fn, i)
        # Euler step (lines 7-8).
        denoised, _ = _denoise(denoiser, x_hat, sigma_hat, extra_args)
        d = (x_hat - denoised) / sigma_hat
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_hat=sigma_hat, denoised=denoised))
        x_next = x_hat + (sigma_next - sigma_hat) * d
        # Apply 2nd order correction (lines 9-11), unless this step lands on sigma = 0.
        if second_order and sigma_next != 0:
            denoised_next, _ = _denoise(denoiser, x_next, sigma_next, extra_args)
            d_prime = (x_next - denoised_next) / sigma_next
            x_next = x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


@torch.no_grad()
def sample_euler(
    denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    extra_args: dict | None = None,
    noise_fn: Callable | None = None,
    callback: Callable | None = None,
    progress: bool = False,
    start: int = 0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE: EDM Algorithm 2 without the 2nd-order
    correction (lines 9-11), with the same optional churn (lines 4-6)."""
    churn = (S_churn, S_min, S_max, S_noise)
    return _edm_sample(denoiser, x, sigmas, extra_args, noise_fn, callback, progress, churn, second_order=False,
                       start=start)


@torch.no_grad()
def sample_heun(
    denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    extra_args: dict | None = None,
    noise_fn: Callable | None = None,
    callback: Callable | None = None,
    progress: bool = False,
    start: int = 0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2); with S_churn = 0 it is the
    deterministic Heun sampler of Algorithm 1. The last step, to sigma = 0, is a plain Euler step."""
    churn = (S_churn, S_min, S_max, S_noise)
    return _edm_sample(denoiser, x, sigmas, extra_args, noise_fn, callback, progress, churn, second_order=True,
                       start=start)


# ----------------------------------------------------------------------------------------------
# DDIM (Song et al. 2020, eq. 12 with sigma_t(eta) of eq. 16), in VE coordinates.
#
# VP:  x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - c_vp^2) eps_hat + c_vp z,
#      c_vp^2 = eta^2 (1 - ab_s)/(1 - ab_t) (1 - ab_t/ab_s).
# Divide by sqrt(ab_s) and use ab = 1/(1 + sigma^2), eps_hat = (x_t - x0)/sigma_t in VE coordinates:
#      x_s = x0 + sqrt(sigma_s^2 - c^2) eps_hat + c z,   c^2 = eta^2 sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2.
# eta = 0 is deterministic DDIM (Euler's method in sigma, the same as sample_euler without churn);
# eta = 1 makes c^2 the DDPM posterior variance and the mean x0 + (sigma_s^2/sigma_t^2)(x_t - x0).


@torch.no_grad()
def sample_ddim(
    denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    extra_args: dict | None = None,
    noise_fn: Callable | None = None,
    callback: Callable | None = None,
    progress: bool = False,
    start: int = 0,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2020, eq. 12 and 16) in sigma-space:
    ``x_s = x0 + sqrt(sigma_s^2 - c^2) (x_t - x0)/sigma_t + c z`` with
    ``c = eta sigma_s sqrt(sigma_t^2 - sigma_s^2) / sigma_t``."""
    extra_args = extra_args or {}
    sigmas = _sigma_list(sigmas)
    for i in _steps(len(sigmas) - 1, progress, start):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Predict x0 and the noise direction.
        denoised, _ = _denoise(denoiser, x, sigma, extra_args)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, denoised=denoised))
        eps = (x - denoised) / sigma
        # Noise of this step, eq. 16 in sigma-space.
        c = eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma
        # Step to sigma_next along the predicted noise, plus fresh noise (eq. 12).
        x = denoised + math.sqrt(max(sigma_next**2 - c**2, 0.0)) * eps
        if c > 0:
            x = x + c * _noise(noise_fn, x, i)
    return x


# ----------------------------------------------------------------------------------------------
# DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with the posterior q(x_s | x_t, x0) of
# eq. 6-7 between any two noise levels (ADM's respacing), in VE coordinates:
#   mean     = x0 + (sigma_s^2 / sigma_t^2)(x_t - x0)
#   'small'  : beta_tilde -> sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2
#   'large'  : beta' = 1 - ab_t/ab_s -> beta'/ab_s = (sigma_t^2 - sigma_s^2)(1 + sigma_s^2)/(1 + sigma_t^2)
#   'learned': log var = v log small + (1 - v) log large


def ddpm_posterior_variance(sigma: float, sigma_next: float, variance: str = "small", v: torch.Tensor | None = None):
    """Variance of one DDPM step from sigma to sigma_next < sigma, in VE coordinates.

    - ``small``: the posterior variance beta_tilde (Ho et al. 2020, eq. 7),
      sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2;
    - ``large``: beta' = 1 - alpha_bar_t/alpha_bar_s (Ho et al. 2020, §3.2), i.e.
      (sigma_t^2 - sigma_s^2)(1 + sigma_s^2)/(1 + sigma_t^2);
    - ``learned``: exp(v log small + (1 - v) log large), per element (Nichol & Dhariwal 2021, eq. 15,
      with Luhman & Luhman's orientation: v = 1 gives small, v = 0 gives large).

    Returns a float for small/large, an array like v for learned.
    """
    small = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
    large = (sigma**2 - sigma_next**2) * (1 + sigma_next**2) / (1 + sigma**2)
    if variance == "small":
        return small
    if variance == "large":
        return large
    if variance == "learned":
        if v is None:
            raise ValueError("variance='learned' needs a denoiser that returns (x0_hat, v)")
        if small <= 0:
            return torch.zeros_like(v) if isinstance(v, torch.Tensor) else v * 0.0  # another array type: v * 0
        return (v * math.log(small) + (1 - v) * math.log(large)).exp()
    raise ValueError(f"variance must be 'small', 'large' or 'learned', got {variance!r}")


@torch.no_grad()
def sample_ddpm(
    denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    extra_args: dict | None = None,
    noise_fn: Callable | None = None,
    callback: Callable | None = None,
    progress: bool = False,
    start: int = 0,
    variance: str = "small",
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with q(x_s | x_t, x0 = D(x_t)) written
    in sigma-space; see :func:`ddpm_posterior_variance` for ``variance``. No noise on the step to 0."""
    if variance not in ("small", "large", "learned"):
        raise ValueError(f"variance must be 'small', 'large' or 'learned', got {variance!r}")
    extra_args = extra_args or {}
    sigmas = _sigma_list(sigmas)
    for i in _steps(len(sigmas) - 1, progress, start):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Predict x0 (and the variance interpolation v, if the model has one).
        denoised, v = _denoise(denoiser, x, sigma, extra_args)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, denoised=denoised))
        # Posterior mean of q(x_s | x_t, x0) (eq. 7).
        mean = denoised + (sigma_next**2 / sigma**2) * (x - denoised)
        # Sample from the posterior, except on the last step.
        if sigma_next > 0:
            var = ddpm_posterior_variance(sigma, sigma_next, variance, v)
            std = math.sqrt(var) if isinstance(var, float) else var.sqrt().to(x.dtype)
            x = mean + std * _noise(noise_fn, x, i)
        else:
            x = mean
    return x


# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), multistep in lambda = -log sigma.
#
# With data prediction the exact solution from t to s (Lu et al. 2022, eq. 9) needs the integral of
# e^lambda x0(lambda); DPM-Solver++(2M) approximates x0 on the step by
#   D_i = (1 + 1/(2 r)) x0_i - 1/(2 r) x0_{i-1},   r = h_{i-1}/h_i,  h_i = lambda_{i+1} - lambda_i,
# and updates  x_vp_s = (sigma_vp_s/sigma_vp_t) x_vp_t - alpha_s (e^{-h} - 1) D_i.
# Divided by alpha_s this is, in VE coordinates,  x_s = (sigma_s/sigma_t) x_t + (1 - sigma_s/sigma_t) D_i.


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser,
    x: torch.Tensor,
    sigmas,
    *,
    extra_args: dict | None = None,
    noise_fn: Callable | None = None,
    callback: Callable | None = None,
    progress: bool = False,
    start: int = 0,
    previous_denoised=None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in sigma-space:
    ``x_s = (sigma_s/sigma_t) x_t - expm1(-h) D_i``. The first step is first order (DDIM); the step
    to sigma = 0 returns the denoised image (h is infinite there). ``noise_fn`` is unused.
    Resuming at ``start > 0`` needs ``previous_denoised``, the data prediction of step start - 1."""
    extra_args = extra_args or {}
    sigmas = _sigma_list(sigmas)
    old_denoised, h_last = None, None
    if start > 0:
        if previous_denoised is None:
            raise ValueError("sample_dpmpp_2m resumed at start > 0 needs previous_denoised (step start - 1's denoised)")
        old_denoised, h_last = previous_denoised, math.log(sigmas[start - 1]) - math.log(sigmas[start])
    for i in _steps(len(sigmas) - 1, progress, start):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        # Data prediction at the current point.
        denoised, _ = _denoise(denoiser, x, sigma, extra_args)
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, denoised=denoised))
        if sigma_next == 0:
            # Last step: the solution at sigma = 0 is the denoised image.
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)  # lambda_{i+1} - lambda_i
        if old_denoised is None:
            # First step: first-order update (DPM-Solver++(1), i.e. DDIM).
            D = denoised
        else:
            # Second-order multistep estimate from the previous data prediction.
            r = h_last / h
            D = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * D
        old_denoised, h_last = denoised, h
    return x


# ----------------------------------------------------------------------------------------------
# Registry.

SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
}


# Samplers whose step depends on more than x (a multistep history), and the keyword that restores
# it on resume: the callback's `denoised` of step start - 1. The others resume from x alone.
HISTORY_ARGS: dict[str, str] = {"dpmpp_2m": "previous_denoised"}


def get_sampler(name: str) -> Callable:
    """The sampler function registered under ``name`` (see ``SAMPLERS``)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}") from None

"""Noise levels: EDM sigma sequences, discrete VP/DDPM beta schedules and conversions between them.

Everything in patchdiffusion speaks EDM's sigma (a noisy image is ``x = x0 + sigma * n``). A
discrete VP model with cumulative product alpha_bar_t sees ``x_vp = sqrt(alpha_bar) x0 +
sqrt(1 - alpha_bar) n``, the same point as ``x = x_vp / sqrt(alpha_bar)`` at

    sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)          (Karras et al. 2022, Table 1, VP column)

so a VP schedule is just a table of T sigmas, and a discrete timestep is an index into it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

__all__ = [
    "edm_sigmas",
    "sigma_to_alpha_bar",
    "alpha_bar_to_sigma",
    "snr",
    "VPSchedule",
    "schedule_from_name",
    "SCHEDULE_NAMES",
]


# ----------------------------------------------------------------------------------------------
# EDM time steps, Karras et al. 2022 eq. 5:
#   sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  sigma_N = 0


def edm_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """EDM noise levels (Karras et al. 2022, eq. 5): ``num_steps`` sigmas from sigma_max down to
    sigma_min, spaced uniformly in sigma^(1/rho), then a trailing 0. Returns shape (num_steps + 1,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Conversions (Karras et al. 2022, Table 1; Kingma et al. 2021 for the SNR).
# They work on python floats and tensors alike.


def sigma_to_alpha_bar(sigma):
    """alpha_bar = 1 / (1 + sigma^2)  (inverse of sigma = sqrt((1 - alpha_bar) / alpha_bar))."""
    return 1.0 / (1.0 + sigma**2)


def alpha_bar_to_sigma(alpha_bar):
    """sigma = sqrt((1 - alpha_bar) / alpha_bar)  (EDM Table 1, VP: sigma(t) = sqrt(e^(...) - 1))."""
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5


def snr(sigma):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2 (Kingma et al. 2021, eq. 2)."""
    return 1.0 / sigma**2


# ----------------------------------------------------------------------------------------------
# Discrete VP schedules.


@dataclass(eq=False)
class VPSchedule:
    """A discrete variance-preserving (DDPM) schedule: ``betas[t]`` for t = 0..T-1 (float64).

    Timestep t here is ADM's zero-based index: alpha_bar_t = prod_{k<=t} (1 - beta_k), and
    ``sigmas[t] = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` increases with t.
    """

    betas: torch.Tensor  # (T,) float64, each in (0, 1]
    _alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    _log_sigmas: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu().flatten()
        if betas.numel() < 2:
            raise ValueError("a VP schedule needs at least 2 timesteps")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self._alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._log_sigmas = torch.log(alpha_bar_to_sigma(self._alphas_cumprod))

    # -- Tables ---------------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t = prod_{k<=t} (1 - beta_k), shape (T,)  (Ho et al. 2020, eq. 4)."""
        return self._alphas_cumprod

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1, increasing, shape (T,)."""
        return self._log_sigmas.exp()

    @property
    def sigma_min(self) -> float:
        return float(self._log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self._log_sigmas[-1].exp())

    # -- sigma <-> t ----------------------------------------------------------------------------

    @staticmethod
    def _work_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float32 if x.device.type == "mps" else torch.float64

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """Continuous timestep for a sigma: piecewise-linear interpolation of t against log sigma,
        clamped to [0, T-1]. Table sigmas map to their integer t. Returns sigma's float dtype
        (float64 for python numbers), same shape and device."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.as_tensor(sigma, dtype=torch.float64)
        out_dtype = sigma.dtype if sigma.is_floating_point() else torch.float64
        log_sigmas = self._log_sigmas.to(device=sigma.device, dtype=self._work_dtype(sigma))
        log_sigma = sigma.to(log_sigmas.dtype).log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = (log_sigma.reshape(-1) - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        t = low.to(w.dtype) + w.clamp(0, 1)
        return t.reshape(sigma.shape).to(out_dtype)

    def t_to_sigma(self, t) -> torch.Tensor:
        """sigma at a (possibly fractional) timestep, interpolating log sigma linearly between the
        neighbouring integer steps; the inverse of ``sigma_to_t``. Returns t's float dtype
        (float64 for integers and python numbers)."""
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=torch.float64)
        out_dtype = t.dtype if t.is_floating_point() else torch.float64
        log_sigmas = self._log_sigmas.to(device=t.device, dtype=self._work_dtype(t))
        t = t.to(log_sigmas.dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low.to(t.dtype)
        log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[high]
        return log_sigma.exp().to(out_dtype)

    # -- Respacing for sampling -----------------------------------------------------------------

    def respaced_timesteps(self, n: int) -> torch.Tensor:
        """n evenly spaced integer timesteps in [0, T-1], ascending, both ends included
        (ADM's ``space_timesteps(T, [n])``: t_i = round(i (T-1)/(n-1))). n = 1 gives [T-1]."""
        T = self.num_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"cannot respace {T} timesteps to {n}")
        if n == 1:
            return torch.tensor([T - 1], dtype=torch.long)
        stride = (T - 1) / (n - 1)
        taken, cur = [], 0.0
        for _ in range(n):  # accumulate the float stride as ADM does, so the same steps come out
            taken.append(round(cur))
            cur += stride
        return torch.tensor(sorted(set(taken)), dtype=torch.long)

    def sigmas_for_sampling(self, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Descending sigmas of the n respaced timesteps, then 0; shape (n + 1,). Between two of
        them the samplers take one (non-adjacent) DDPM/DDIM step, which is ADM's respacing."""
        t = self.respaced_timesteps(n).flip(0)
        sigmas = self._log_sigmas[t].exp()
        return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)

    # -- Constructors ---------------------------------------------------------------------------

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "VPSchedule":
        """Linear betas (Ho et al. 2020, §4), scaled by 1000/T as ADM does so any T covers the same
        range of noise levels."""
        scale = 1000.0 / T
        return cls(torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "VPSchedule":
        """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = f(t)/f(0) with
        f(t) = cos((t/T + s)/(1 + s) * pi/2)^2, and beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), max_beta)."""

        def f(u: float) -> float:
            return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]
        return cls(torch.tensor(betas, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "VPSchedule":
        """Betas linear in sqrt(beta) (Rombach et al. 2022, Stable Diffusion; also DiMR)."""
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2)

    @classmethod
    def constant(cls, T: int = 1000, beta: float = 0.008) -> "VPSchedule":
        """Constant beta (Patch-DM's latent model uses beta = 0.008)."""
        return cls(torch.full((T,), beta, dtype=torch.float64))


SCHEDULE_NAMES = ("linear", "linear<beta_end>", "cosine", "scaled_linear", "const<beta>")


def schedule_from_name(name: str, T: int = 1000) -> VPSchedule:
    """Build a VP schedule from its config name: ``"linear"`` (1e-4..0.02), ``"linear0.025"``
    (1e-4..beta_end, here 0.025), ``"cosine"``, ``"scaled_linear"``, ``"const0.008"`` (constant beta)."""
    number = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
    if name == "linear":
        return VPSchedule.linear(T)
    if m := re.fullmatch(r"linear" + number, name):
        return VPSchedule.linear(T, beta_end=float(m.group(1)))
    if name == "cosine":
        return VPSchedule.cosine(T)
    if name == "scaled_linear":
        return VPSchedule.scaled_linear(T)
    if m := re.fullmatch(r"const(?:ant)?" + number, name):
        return VPSchedule.constant(T, beta=float(m.group(1)))
    raise ValueError(f"unknown VP schedule {name!r}; choose from {', '.join(SCHEDULE_NAMES)}")

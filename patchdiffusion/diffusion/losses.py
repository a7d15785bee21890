"""Training losses. Each is a callable ``loss(model, images, rng, **cond) -> (B, C, H, W)``.

``rng`` is a :class:`~patchdiffusion.rng.SampleRNG` (one generator per example), so the draws of an
example do not depend on its batch. The training loop averages the per-element loss.
"""

from __future__ import annotations

import torch

from ..rng import SampleRNG
from . import parameterization
from .schedules import VPSchedule

__all__ = ["edm_loss_weight", "EDMLoss", "ddpm_loss_weight", "DDPMLoss"]


def _first(out):
    """A denoiser may return (x0_hat, v); the losses here only use x0_hat."""
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------------------------
# EDM loss, Karras et al. 2022, eq. 8 with Table 1 (EDM column):
#   ln sigma ~ N(P_mean, P_std^2),  lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2,
#   loss = lambda(sigma) || D(y + n; sigma) - y ||^2,  n ~ N(0, sigma^2 I).


def edm_loss_weight(sigma, sigma_data: float = 0.5):
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out^2 (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMLoss:
    """EDM's denoising score-matching loss (Karras et al. 2022, eq. 8, Table 1 "Training")."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, denoiser, images: torch.Tensor, rng: SampleRNG, **cond) -> torch.Tensor:
        B = images.shape[0]
        ones = [1] * (images.ndim - 1)
        # Draw the noise level: ln(sigma) ~ N(P_mean, P_std^2).
        rnd_normal = rng.randn(*ones, dtype=images.dtype).to(images.device)  # (B, 1, 1, 1)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = edm_loss_weight(sigma, self.sigma_data)
        # Noise the images (y + n, n ~ N(0, sigma^2 I)) and denoise them.
        noise = rng.randn_like(images).to(images.device)
        D_yn = _first(denoiser(parameterization.diffuse(images, noise, 1.0, sigma), sigma.reshape(B), **cond))
        return weight * (D_yn - images) ** 2


# ----------------------------------------------------------------------------------------------
# DDPM loss (Ho et al. 2020, Algorithm 1 / eq. 14), with x0 / v targets (Salimans & Ho 2022, §4)
# and the usual weightings of the per-element loss.

_WEIGHTINGS = ("none", "sqrt_snr", "snr", "snr+1", "truncated_snr", "p2")


def ddpm_loss_weight(
    alpha_bar: torch.Tensor,
    weighting: str,
    prediction: str = "x0",
    p2_k: float = 1.0,
    p2_gamma: float = 0.5,
) -> torch.Tensor:
    """Weight of the per-element loss at alpha_bar, with SNR = alpha_bar / (1 - alpha_bar):

    - ``none``: 1 (Ho et al. 2020, L_simple);
    - ``snr``: SNR, ``snr+1``: SNR + 1, ``truncated_snr``: max(SNR, 1) (Salimans & Ho 2022, §4: on an
      x0 loss these give the eps loss, the v loss and "truncated SNR" weighting);
    - ``sqrt_snr``: sqrt(SNR) (Luhman & Luhman 2022's weighting of their x0 loss);
    - ``p2``: Choi et al. 2022's P2 weighting, 1 / (k + SNR)^gamma on the eps loss (eq. 8), expressed
      for the loss of ``prediction``: the eps error is sqrt(SNR) times the x0 error and
      sqrt(SNR / (1 + SNR)) times the v error, so x0 gets SNR / (k + SNR)^gamma (with k = 1,
      gamma = 1/2 Luhman & Luhman's "p2", SNR sqrt(1 - alpha_bar)) and v gets SNR / (1 + SNR) / (k + SNR)^gamma.

    All but ``p2`` are plain functions of SNR, whatever the prediction.
    """
    s = alpha_bar / (1 - alpha_bar)
    if weighting == "none":
        return torch.ones_like(s)
    if weighting == "sqrt_snr":
        return s.sqrt()
    if weighting == "snr":
        return s
    if weighting == "snr+1":
        return s + 1
    if weighting == "truncated_snr":
        return s.clamp(min=1)
    if weighting == "p2":
        to_eps = {"eps": torch.ones_like(s), "x0": s, "v": s / (1 + s)}[prediction]
        return to_eps * (p2_k + s) ** -p2_gamma
    raise ValueError(f"unknown weighting {weighting!r}; choose from {', '.join(_WEIGHTINGS)}")


class DDPMLoss:
    """Discrete-time VP loss (Ho et al. 2020, Algorithm 1): t ~ U{0..T-1} per example,
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, and the raw network
    ``net(x_t, t_float, **cond)`` regresses eps, x0 or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.

    The weight (see :func:`ddpm_loss_weight`) multiplies the loss in the prediction's own space
    (``p2``, defined on the eps loss, is converted to that space).
    A network with 2C output channels (learned variance) is compared on its first C only; the
    variance term is the method's business, so ``return_details=True`` returns
    ``(loss, {"t", "x_t", "noise", "alpha_bar", "target", "prediction", "output"})`` where
    ``output`` is the full network output.
    """

    def __init__(
        self,
        schedule: VPSchedule,
        prediction: str = "eps",
        loss_type: str = "l2",
        weighting: str = "none",
        p2_k: float = 1.0,
        p2_gamma: float = 0.5,
    ):
        if prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")
        if loss_type not in ("l2", "l1"):
            raise ValueError(f"loss_type must be 'l2' or 'l1', got {loss_type!r}")
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose from {', '.join(_WEIGHTINGS)}")
        self.schedule = schedule
        self.prediction = prediction
        self.loss_type = loss_type
        self.weighting = weighting
        self.p2_k = p2_k
        self.p2_gamma = p2_gamma

    def __call__(self, net, images: torch.Tensor, rng: SampleRNG, return_details: bool = False, **cond):
        B, C = images.shape[:2]
        shape = (B,) + (1,) * (images.ndim - 1)
        # Draw a timestep and noise per example.
        t = rng.randint(0, self.schedule.num_timesteps).reshape(B).cpu()  # (B,) long
        noise = rng.randn_like(images).to(images.device)
        alpha_bar = self.schedule.alphas_cumprod[t].reshape(shape)  # float64 on the CPU
        weight = ddpm_loss_weight(alpha_bar, self.weighting, self.prediction, self.p2_k, self.p2_gamma)
        like = dict(device=images.device, dtype=images.dtype)
        alpha, sigma = alpha_bar.sqrt().to(**like), (1 - alpha_bar).sqrt().to(**like)
        alpha_bar, weight, t = alpha_bar.to(**like), weight.to(**like), t.to(images.device)
        # Diffuse: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (Ho et al. 2020, eq. 4).
        x_t = parameterization.diffuse(images, noise, alpha, sigma)
        output = net(x_t, t.to(torch.promote_types(images.dtype, torch.float32)), **cond)  # t as a float label
        prediction = output[:, :C] if output.shape[1] == 2 * C else output
        target = parameterization.prediction_target(self.prediction, images, noise, alpha, sigma)
        err = prediction - target
        loss = err.square() if self.loss_type == "l2" else err.abs()
        loss = weight * loss
        if not return_details:
            return loss
        details = dict(
            t=t, x_t=x_t, noise=noise, alpha_bar=alpha_bar, target=target, prediction=prediction, output=output
        )
        return loss, details

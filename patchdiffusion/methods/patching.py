"""Luhman & Luhman 2022, "Improving Diffusion Model Efficiency Through Patching" (arXiv 2207.04316).

The image is cut into P×P patches stacked as channels at the U-Net input and put back at the output
(`nets/unet.py`, `patch_size`), so a 256² image runs at 64² inside the network when P = 4. The rest
of the recipe, as the reference code defines it (METHODS.md §3):
  * discrete DDPM with a linear β schedule (T = 1000), the network predicts x0;
  * loss = √SNR_t · ‖x0 − x̂0‖² (mean over pixels) + the variational bound for the learned variance,
    computed with the mean detached (Nichol & Dhariwal 2021, eq. 16 "L_hybrid");
  * learned variance: log σ²_t = v·log β̃_t + (1 − v)·log β_t with v ∈ [0, 1] from a sigmoid head
    (the reverse of ADM's convention);
  * a fixed 2-D sin position map after the first conv, a time embedding of width
    model_channels · channel_mult[-1], a multiplicative class gate;
  * sampling: 250-step ancestral DDPM with the learned variance; classifier-free guidance in ε-space.
Assumption (the public code has no label dropout): labels are dropped with p = 0.1 for guidance.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from patchdiffusion.config import Range
from patchdiffusion.diffusion.losses import DDPMLoss
from patchdiffusion.diffusion.precond import DiscretePrecond
from patchdiffusion.diffusion.schedules import VPSchedule
from patchdiffusion.errors import ConfigError
from patchdiffusion.methods.base import (Claim, Method, TrainBatch, comparison_record, discrete_schedule, ratio,
                                         record_value)
from patchdiffusion.methods.full import check_divisible
from patchdiffusion.nets.unet import UNet, UNetConfig
from patchdiffusion.rng import SampleRNG


def _luhman_net() -> UNetConfig:
    return UNetConfig(
        model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,),
        patch_size=4, position_map=True, class_gate=True, learn_sigma=True, use_scale_shift_norm=True,
    )


@dataclass
class PatchingConfig:
    net: UNetConfig = field(default_factory=_luhman_net)  # time_embed_dim None -> model_channels·mult[-1]
    schedule: str = "linear"             # β schedule: linear (1e-4..0.02), linearX (β_end = X), cosine
    timesteps: int = 1000                # T
    weighting: str = "sqrt_snr"          # loss weight w_t on ‖x0 − x̂0‖²: sqrt_snr | snr | snr+1 | truncated_snr | p2 | none
    vb_weight: float = 1.0               # weight of the variational-bound term (learned variance only)
    label_dropout: float = 0.1           # assumption: the paper trained with CFG, the code shows no dropout

    RANGES: ClassVar[dict] = {"timesteps": Range(2, 1e6), "vb_weight": Range(0, 1e6), "label_dropout": Range(0, 1)}


# ------------------------------------------------------------------------------------------------
# Gaussian terms of the variational bound (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021 §3.1)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of data on 256 levels in [-1, 1] under N(mean, e^{2 log_scale}) (Ho et al. 2020 §3.3)."""
    def cdf(z):
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))

    inv_std = torch.exp(-log_scale)
    upper = cdf(inv_std * (x - mean + 1.0 / 255))
    lower = cdf(inv_std * (x - mean - 1.0 / 255))
    log_upper = torch.log(upper.clamp(min=1e-12))
    log_one_minus_lower = torch.log((1.0 - lower).clamp(min=1e-12))
    log_mid = torch.log((upper - lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_upper, torch.where(x > 0.999, log_one_minus_lower, log_mid))


@dataclass
class PosteriorTables:
    """Per-timestep constants of q(x_{t−1} | x_t, x0) (Ho et al. 2020 eqs. 6–7), float64."""

    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    log_var_small: torch.Tensor  # log β̃_t, with β̃_0 replaced by β̃_1 (as ADM does) to stay finite
    log_var_large: torch.Tensor  # log β_t

    @classmethod
    def of(cls, schedule: VPSchedule) -> "PosteriorTables":
        betas = schedule.betas.double()
        alpha_bar = schedule.alphas_cumprod.double()
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        var_small = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        return cls(
            coef_x0=betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            coef_xt=(1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar),
            log_var_small=torch.log(torch.cat([var_small[1:2], var_small[1:]])),
            log_var_large=torch.log(betas),
        )


def learned_log_variance(v: torch.Tensor, log_small: torch.Tensor, log_large: torch.Tensor) -> torch.Tensor:
    """Luhman & Luhman's interpolation: log σ² = v·log β̃ + (1 − v)·log β (v = 1 → β̃, v = 0 → β)."""
    return v * log_small + (1 - v) * log_large


def variational_bound_bits(
    tables: PosteriorTables, x0, x_t, t, x0_hat, v
) -> torch.Tensor:
    """Per-example VB term in bits/dim: KL(q(x_{t−1}|x_t,x0) ‖ p(x_{t−1}|x_t)) for t > 0, and the
    decoder NLL −log p(x0|x1) for t = 0 (Ho et al. 2020 eq. 5). Only v gets gradients here."""
    shape = (-1,) + (1,) * (x0.ndim - 1)

    def at(table):
        return table.to(x0.device)[t].view(shape).to(x0.dtype)

    true_mean = at(tables.coef_x0) * x0 + at(tables.coef_xt) * x_t
    true_log_var = at(tables.log_var_small)
    model_mean = at(tables.coef_x0) * x0_hat.detach() + at(tables.coef_xt) * x_t
    model_log_var = learned_log_variance(v, at(tables.log_var_small), at(tables.log_var_large))
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


class PatchingMethod(Method):
    name = "patching"
    Config = PatchingConfig
    default_sampler = "ddpm"
    default_steps = 250
    clip_denoised = True

    comparison_unmatched = {
        "flops": "P = 4 runs the U-Net on 1/16 of the pixels: the same parameters at a fraction of the FLOPs is "
                 "what Luhman & Luhman claim, so only the parameters are matched",
    }

    def __init__(self, config, resolution, image_channels=3):
        super().__init__(config, resolution, image_channels)
        self.schedule = discrete_schedule(config)
        self.tables = PosteriorTables.of(self.schedule)

    @classmethod
    def comparison_overrides(cls, resolution: tuple[int, int]) -> list[str]:
        # Luhman's network (learned variance, position map, scale-shift norms) at the baseline's widths, so the
        # parameters match; P = 4 (the paper's headline setting) where the side allows it. Attention on the
        # 8×8 level of a 32² image, as the baseline: at P = 4 that is the U-Net's first level. Ancestral DDPM
        # with the learned variance, respaced to 100 steps (the paper: 250) to keep a CPU comparison affordable.
        side = min(resolution)
        P = 4 if side % 16 == 0 else 2
        return ["model.net.model_channels=32", "model.net.channel_mult=[1,2,2]", "model.net.num_res_blocks=1",
                f"model.net.patch_size={P}", f"model.net.attention_resolutions=[{max(1, side // 4)}]",
                "sample.sampler=ddpm", "sample.num_steps=100"]

    @classmethod
    def comparison_claims(cls, records: dict[str, dict]) -> list[Claim]:
        claim = ("P = 4 makes a U-Net on a 4× larger side cost about what it costs at P = 1 on the small side "
                 "(Luhman & Luhman 2022)")
        test = ("at matched parameters, this U-Net at P = 4 against the full-image U-Net at P = 1 on the same images: "
                "the claim predicts about 1/P² = 1/16 of the FLOPs and time per image; also quality at equal CPU time")
        mine, full = comparison_record(records, cls.name), comparison_record(records, "full")
        if mine is None or full is None:
            return [Claim(cls.name, claim, test, "not testable", "needs a 'full' entry in the same comparison")]
        flops = ratio(record_value(mine, "network.train_flops"), record_value(full, "network.train_flops"))
        train_time = ratio(record_value(mine, "training.cpu_seconds_per_image"),
                           record_value(full, "training.cpu_seconds_per_image"))
        per_eval = ratio(record_value(mine, "network.forward_flops"), record_value(full, "network.forward_flops"))
        evidence = (
            f"train multiply-adds per image {flops:.3f}× the full-image U-Net's (one evaluation {per_eval:.3f}×); "
            f"CPU s per training image {train_time:.3f}×; in the same CPU budget {record_value(mine, 'training.steps')} "
            f"vs {record_value(full, 'training.steps')} steps; parameters "
            f"{ratio(record_value(mine, 'network.parameters'), record_value(full, 'network.parameters')):.2f}×; "
            f"SWD {record_value(mine, 'quality.swd'):.1f} vs {record_value(full, 'quality.swd'):.1f}")
        if flops is None or train_time is None:
            verdict = "not testable"
        elif flops <= 1 / 8 and train_time <= 1 / 8:
            verdict = "holds"
        elif flops <= 1 / 8:
            verdict = "partly (FLOPs yes, CPU time less so)"
        else:
            verdict = "does not hold"
        return [Claim(cls.name, claim, test, verdict, evidence)]

    def validate(self) -> None:
        net = self.config.net
        if net.patch_size not in (1, 2, 4, 8):
            raise ConfigError(f"model.net.patch_size must be 1, 2, 4 or 8, got {net.patch_size}")
        if net.in_channels != self.image_channels:
            raise ConfigError(f"model.net.in_channels is {net.in_channels} but the data has {self.image_channels}")
        check_divisible(net, *self.resolution)

    @property
    def num_classes(self) -> int:
        return self.config.net.num_classes

    def network_config(self) -> UNetConfig:
        net = self.config.net
        time_embed_dim = net.time_embed_dim or int(net.model_channels * net.channel_mult[-1])
        return dataclasses.replace(net, time_embed_dim=time_embed_dim, resolution=min(self.resolution))

    def build_network(self) -> UNet:
        return UNet(self.network_config())

    def loss(self, net, batch: TrainBatch, rng: SampleRNG) -> torch.Tensor:
        cfg, images = self.config, batch.images
        cond = {}
        labels = self.drop_labels(batch.labels, rng, cfg.label_dropout)
        if labels is not None:
            cond["class_labels"] = labels
        ddpm_loss = DDPMLoss(self.schedule, prediction="x0", loss_type="l2", weighting=cfg.weighting)
        weighted, d = ddpm_loss(net, images, rng, return_details=True, **cond)
        loss = weighted.flatten(1).mean(1)
        if cfg.net.learn_sigma and cfg.vb_weight > 0:
            C = images.shape[1]
            v = d["output"][:, C:]
            vb = variational_bound_bits(self.tables, images, d["x_t"], d["t"], d["prediction"], v)
            loss = loss + cfg.vb_weight * vb * (self.schedule.num_timesteps / 1000.0)
        return loss

    def denoiser(self, net, options=None):
        return DiscretePrecond(
            net, self.schedule, prediction="x0", learned_variance=self.config.net.learn_sigma
        )

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        return self.schedule.sigmas_for_sampling(steps).float()

    def sampler_defaults(self, sampler: str) -> dict:
        if sampler == "ddpm" and self.config.net.learn_sigma:
            return {"variance": "learned"}
        return {}

    def check_canvas(self, height: int, width: int) -> None:
        check_divisible(self.config.net, height, width)


METHOD = PatchingMethod

"""DiMR (Liu et al., NeurIPS 2024, arXiv 2406.09416): a multi-resolution network trained with a
multi-scale noise-prediction loss, class-conditional with classifier-free guidance.

The recipe, as the reference configuration (configs/DiMR-XL-2R_imagenet256.py) defines it:
  * discrete VP schedule of Stable Diffusion: β linear in √β from 0.00085 to 0.012, T = 1000;
    n ~ U{1..T}, x_n = √ᾱ_n x0 + √(1 − ᾱ_n) ε (our t = n − 1, zero-based);
  * ε-prediction at every stage of the network (`nets/dimr.py`). Stage k predicts the noise at its
    own resolution; its target is the noise 2^j×2^j sum-pooled and divided by 2^j (the average
    ×2^j, which keeps unit variance, "scale_correction"); the loss is Σ_k c_k · mean((ε̂_k − ε_k)²)
    with c = (1/4, 1) for (16², 32²);
  * labels dropped to the null label with p = 0.1; guidance at sampling on the final output
    (the reference's scale 0.4 in U-ViT's convention ε_c + s(ε_c − ε_u) is our --cfg-scale 1.4);
  * DPM-Solver with data prediction (our dpmpp_2m) on the respaced discrete timesteps;
  * AdamW lr 2e-4, weight decay 0.03, betas (0.99, 0.99), 5k warm-up steps: set by the presets
    (`patchdiff config --preset dimr-xl-2r-imagenet256`).

Latent space (`latent: true`, `vae_path`): images are encoded with a local diffusers AutoencoderKL
(`patchdiffusion/latent.py`; ×0.18215), the network runs on the latents, samples are decoded.
A backbone that returns one tensor instead of a list (e.g. a U-Net) trains with the same recipe, its
output weighted like the final stage: `benchmarks/dimr_comparison.py` uses that.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from patchdiffusion.config import Range, to_dict
from patchdiffusion.diffusion import parameterization
from patchdiffusion.diffusion.precond import DiscretePrecond
from patchdiffusion.diffusion.tiled import TilingConfig
from patchdiffusion.errors import ConfigError
from patchdiffusion.methods.base import (COMPARISON_TOLERANCE, Claim, Method, TrainBatch, comparison_record,
                                         discrete_schedule, ratio, record_value)
from patchdiffusion.methods.latent_space import LatentSpaceMixin
from patchdiffusion.nets.dimr import DIMR_PRESETS, DiMRNet, DiMRNetConfig, check_dimr_config, dimr_config
from patchdiffusion.rng import SampleRNG


@dataclass
class DiMRConfig:
    net: DiMRNetConfig = field(default_factory=lambda: dimr_config("dimr-tiny"))  # the architecture (--model NAME)
    schedule: str = "scaled_linear"      # β schedule (Stable Diffusion's: √β linear, 0.00085..0.012)
    timesteps: int = 1000                # T
    loss_weights: tuple[float, ...] = (0.25, 1.0)  # c_k per stage, low to high resolution
    label_dropout: float = 0.1           # share of labels replaced by the null label (for guidance)
    latent: bool = False                 # train on VAE latents (needs vae_path and net.in_channels = latent channels)
    vae_path: str = ""                   # local diffusers AutoencoderKL directory (save_pretrained layout)
    latent_cache: str = ""               # directory caching each image's encoder Gaussian ("" = encode every step)

    RANGES: ClassVar[dict] = {"timesteps": Range(2, 1e6), "loss_weights": Range(0, 1e6), "label_dropout": Range(0, 1)}


def multi_scale_targets(noise: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The noise at each size: (B, C, H, W) -> [(B, C, h, w)], each r×r block summed and divided by r
    (r = H/h), so unit-variance noise stays unit variance (the reference's scale_correction)."""
    H, W = noise.shape[-2:]
    targets = []
    for h, w in sizes:
        r = H // h
        if r * h != H or r * w != W:
            raise ValueError(f"cannot pool a {W}x{H} target to {w}x{h}")
        targets.append(noise if r == 1 else F.avg_pool2d(noise, r) * r)
    return targets


class FinalOutput(nn.Module):
    """The multi-resolution net as a plain backbone: its last (full-resolution) prediction."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, noise_labels, **cond):
        out = self.net(x, noise_labels, **cond)
        return out[-1] if isinstance(out, (list, tuple)) else out


class DiMRMethod(LatentSpaceMixin, Method):
    name = "dimr"
    Config = DiMRConfig
    default_sampler = "dpmpp_2m"
    default_steps = 50                   # the reference's in-training FID setting (final FID: 250 steps)
    architectures = tuple(DIMR_PRESETS)  # --model NAME
    presets = {
        "dimr-tiny-digits": (
            "DiMR-tiny (1.4M) class-conditional on builtin:digits at 16² for a CPU "
            "(benchmarks/dimr_class_conditioning.py); DPM-Solver++(2M) 25 steps, guidance 6",
            ["--model=dimr-tiny", "data.source=builtin:digits", "data.resolution=16", "data.use_labels=true",
             "data.hflip=false", "train.batch_size=32", "train.lr=2e-3", "train.betas=[0.9,0.99]",
             "train.weight_decay=0.03", "train.warmup_steps=50", "train.ema_halflife_kimg=2", "train.ema_rampup=0.2",
             "train.steps=2500", "train.sample_images=20", "sample.num_steps=25", "sample.guidance=6"],
        ),
    }

    @classmethod
    def comparison_overrides(cls, resolution: tuple[int, int]) -> list[str]:
        # Two stages as DiMR-XL/2R: a transformer on 2×2 patches, then ConvNeXt blocks at full size, widths
        # chosen to match the baseline U-Net's parameters and FLOPs (1.10M, 280M multiply-adds per 32² image);
        # unconditional, like the other entries; DPM-Solver++(2M) with 25 steps (the default 50, halved for a CPU).
        stages = ("[{block: transformer, dim: 128, hidden_dim: 256, num_blocks: 5, heads: 4, patch_size: 2}, "
                  "{block: convnext, dim: 32, hidden_dim: 64, num_blocks: 2, kernel_size: 7}]")
        return ["model.net.num_classes=0", f"model.net.stages={stages}", "model.loss_weights=[0.25,1.0]",
                "sample.sampler=dpmpp_2m", "sample.num_steps=25", "sample.guidance=1.0"]

    @classmethod
    def comparison_claims(cls, records: dict[str, dict]) -> list[Claim]:
        claim = "a multi-resolution network gives better quality than a single-resolution one at equal FLOPs (Liu et al. 2024)"
        test = ("final SWD against the full-image U-Net's with FLOPs per evaluation matched within "
                f"{COMPARISON_TOLERANCE}×, same data, batch and CPU budget (not the same number of steps)")
        mine, full = comparison_record(records, cls.name), comparison_record(records, "full")
        if mine is None or full is None:
            return [Claim(cls.name, claim, test, "not testable", "needs a 'full' entry in the same comparison")]
        flops = ratio(record_value(mine, "network.forward_flops"), record_value(full, "network.forward_flops"))
        swd, swd_full = record_value(mine, "quality.swd"), record_value(full, "quality.swd")
        noise = max(filter(None, [record_value(r, "quality.swd_curve_last_change") for r in (mine, full)]), default=0)
        evidence = (f"FLOPs per evaluation {flops:.2f}×; SWD {swd:.1f} vs {swd_full:.1f}; steps in the budget "
                    f"{record_value(mine, 'training.steps')} vs {record_value(full, 'training.steps')} (CPU s per training "
                    f"image {ratio(record_value(mine, 'training.cpu_seconds_per_image'), record_value(full, 'training.cpu_seconds_per_image')):.2f}×); "
                    f"noise scale (change between the last two curve points) {noise:.1f}")
        if flops is None or not 1 / COMPARISON_TOLERANCE <= flops <= COMPARISON_TOLERANCE:
            verdict = "not testable (FLOPs not matched)"
        elif abs(swd - swd_full) <= noise:
            verdict = "not shown (within noise)"
        elif swd < swd_full:
            verdict = "holds"
        else:
            verdict = "does not hold"
        return [Claim(cls.name, claim, test, verdict, evidence)]

    @classmethod
    def architecture_overrides(cls, name: str) -> list[str]:
        """`--model NAME`: the whole `model.net` of a named architecture (JSON is YAML flow syntax)."""
        if name not in DIMR_PRESETS:
            raise ConfigError(f"unknown --model '{name}' (choose from: {', '.join(DIMR_PRESETS)})")
        return ["model.net=" + json.dumps(to_dict(dimr_config(name)))]

    def __init__(self, config, resolution, image_channels=3):
        super().__init__(config, resolution, image_channels)
        self.schedule = discrete_schedule(config)

    def validate(self) -> None:
        cfg = self.config
        net = cfg.net
        channels = self.image_channels
        if cfg.latent:
            if not cfg.vae_path:
                raise ConfigError("latent: true needs model.vae_path (a local AutoencoderKL directory)")
            from patchdiffusion.latent import vae_info

            info = vae_info(cfg.vae_path)
            if self.resolution[0] % info.downsample or self.resolution[1] % info.downsample:
                raise ConfigError(f"image size is not divisible by the VAE's factor {info.downsample}")
            channels = info.latent_channels
        if net.in_channels != channels:
            raise ConfigError(
                f"model.net.in_channels is {net.in_channels} but {'the latents have' if cfg.latent else 'the data has'} "
                f"{channels} channels"
            )
        if len(cfg.loss_weights) != len(net.stages):
            raise ConfigError(
                f"model.loss_weights has {len(cfg.loss_weights)} values for {len(net.stages)} stages (one per stage)"
            )
        if not 0 <= cfg.label_dropout < 1:
            raise ConfigError(f"model.label_dropout must be in [0, 1), got {cfg.label_dropout}")
        try:
            check_dimr_config(net, *self.canvas_size)
        except ValueError as e:
            raise ConfigError(f"model.net: {e}") from None

    # -- sizes -------------------------------------------------------------------------------
    @property
    def canvas_size(self) -> tuple[int, int]:
        """(H, W) of what the network sees: the image, or its latent."""
        f = self.downsample
        return (self.resolution[0] // f, self.resolution[1] // f)

    @property
    def num_classes(self) -> int:
        return self.config.net.num_classes

    # -- training ----------------------------------------------------------------------------
    def default_tiling(self) -> TilingConfig:
        """Gaussian windows on a moving grid, four grids averaged in the last two steps: the transformer's
        4×4 patches leave borders a single grid keeps in place (bench any-size seams, a model trained at
        32²: a 1536×1024 canvas scored 1.093 with one grid, 1.048 with four in the last 2 of 10 steps)."""
        return TilingConfig(window="gaussian", grid="random", passes=4, passes_last=2)

    def build_network(self) -> DiMRNet:
        return DiMRNet(dataclasses.replace(self.config.net, canvas=self.canvas_size))

    def loss(self, net, batch: TrainBatch, rng: SampleRNG) -> torch.Tensor:
        cfg, images, labels = self.config, batch.images, batch.labels
        if cfg.latent:
            codec = self.codec(images.device)
            mean, std = codec.moments(images)
            images = (mean + std * rng.randn_like(mean).to(mean)) * codec.scaling_factor  # latent_dist.sample()
        labels = self.training_labels(labels, rng, images.shape[0], images.device)
        B = images.shape[0]
        shape = (B,) + (1,) * (images.ndim - 1)
        # Draw a timestep and noise per example; diffuse (Ho et al. 2020, eq. 4).
        t = rng.randint(0, self.schedule.num_timesteps).reshape(B).cpu()
        noise = rng.randn_like(images).to(images.device)
        alpha_bar = self.schedule.alphas_cumprod[t].reshape(shape).to(images.device, images.dtype)
        x_t = parameterization.diffuse(images, noise, alpha_bar.sqrt(), (1 - alpha_bar).sqrt())
        cond = {} if labels is None else {"class_labels": labels}
        outputs = net(x_t, t.to(images.device, torch.promote_types(images.dtype, torch.float32)), **cond)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        weights = cfg.loss_weights[-len(outputs):]
        target = parameterization.prediction_target("eps", images, noise, None, None)
        targets = multi_scale_targets(target, [tuple(o.shape[-2:]) for o in outputs])
        # Σ_k c_k · mean over elements of (ε̂_k − ε_k)², per example (the reference's LSimple).
        return sum(c * (o.float() - e.float()).square().flatten(1).mean(1) for c, o, e in zip(weights, outputs, targets))

    def training_labels(self, labels, rng: SampleRNG, batch: int, device) -> torch.Tensor | None:
        """Labels with dropout to the null label; all null for a conditional net trained without labels."""
        if self.num_classes == 0:
            return None
        if labels is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if int(labels.max()) >= self.num_classes or int(labels.min()) < 0:
            raise ConfigError(
                f"the data has label {int(labels.max())} but model.net.num_classes is {self.num_classes}"
            )
        return self.drop_labels(labels, rng, self.config.label_dropout)

    # -- sampling ----------------------------------------------------------------------------
    def denoiser(self, net, options=None):
        return DiscretePrecond(FinalOutput(net), self.schedule, prediction="eps")

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        return self.schedule.sigmas_for_sampling(steps).float()

    def check_canvas(self, height: int, width: int) -> None:
        f = self.downsample
        if (height // f, width // f) != self.canvas_size or height % f or width % f:
            raise ConfigError(
                f"DiMR samples at its training size {self.resolution[1]}x{self.resolution[0]} in one piece "
                f"(its position embeddings are learned for it); got {width}x{height}: make larger images from "
                "tiles of the training size (`patchdiff sample --size WxH`, or Method.sample(tiling=...))"
            )


METHOD = DiMRMethod

"""Patch Diffusion (Wang et al., NeurIPS 2023): random-size patches plus coordinate channels.

Training: each step draws one patch size p for the whole global batch, from (R/4, R/2, R) with
probabilities ((1 − p_real)·2/5, (1 − p_real)·3/5, p_real) in pixel space or (R/2, R) with
(1 − p_real, p_real) in latent space. A step of smaller patches loads `multiplier` times more
images (R=64: ×4 at 16², ×2 at 32², the reference code's batch_mul table); every image gets its own
uniform random crop, and the loss is the mean over all those patches. Two coordinate channels, the
(x, y) position of each pixel in the full canvas scaled to [−1, 1], are cropped with the patch and
concatenated to the network input after EDM's c_in scaling. Images seen and the EMA count
batch × E[multiplier] per step, as the reference does.

Sampling: the full canvas with the full coordinate grid, one network call per step, through any sampler.

Latent space (`latent: true`, `vae_path`): images are encoded with a local diffusers AutoencoderKL
(`patchdiffusion/latent.py`), patches are cut from the latents (R is then the latent side) and samples
are decoded back to images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from patchdiffusion.config import Range
from patchdiffusion.diffusion.losses import EDMLoss
from patchdiffusion.diffusion.precond import EDMPrecond
from patchdiffusion.errors import ConfigError
from patchdiffusion.methods.base import (Claim, Method, StepPlan, TrainBatch, comparison_record, ratio,
                                         record_value, time_to_reach)
from patchdiffusion.methods.full import EDMSettings, check_divisible, comparison_unet, edm_sampling_sigmas
from patchdiffusion.methods.latent_space import LatentSpaceMixin
from patchdiffusion.nets.unet import UNet, UNetConfig
from patchdiffusion.rng import SampleRNG


def _default_net() -> UNetConfig:
    return UNetConfig(
        extra_in_channels=2, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
    )


@dataclass
class PatchDiffusionConfig(EDMSettings):
    net: UNetConfig = field(default_factory=_default_net)  # the backbone; extra_in_channels=2 (x, y)
    real_p: float = 0.5                  # probability of a full-size patch in a step
    progressive: bool = False            # the paper's ablation: smallest patches first (by training progress)
    latent: bool = False                 # train on VAE latents (needs vae_path and net in/out_channels = latent's)
    vae_path: str = ""                   # local diffusers AutoencoderKL directory (save_pretrained layout)
    latent_cache: str = ""               # directory caching each image's encoder Gaussian ("" = encode every step)

    RANGES: ClassVar[dict] = {**EDMSettings.RANGES, "real_p": Range(0, 1)}


@dataclass(frozen=True)
class PatchPlan(StepPlan):
    """A step of patches of one side for the whole global batch."""

    patch_size: int = 0  # side of this step's patches (canvas units); 0 = the full canvas


# Reference code's images-per-batch table; a step of patch p carries M[p] / M[R] times the batch.
_BATCH_MUL = {512: 1, 256: 2, 128: 4, 64: 16, 32: 32, 16: 64}


def batch_multiplier(patch: int, resolution: int) -> int:
    """Images per batch slot for patches of side `patch` on a canvas of side `resolution`."""
    if patch in _BATCH_MUL and resolution in _BATCH_MUL:
        return _BATCH_MUL[patch] // _BATCH_MUL[resolution]
    return resolution // patch  # sides outside the table: ×2 per halving, like the table at R=64


def patch_schedule(resolution: int, real_p: float, latent: bool) -> tuple[list[int], list[float]]:
    """(patch sides, probabilities) of one step's draw."""
    if latent:
        return [resolution // 2, resolution], [1 - real_p, real_p]
    return [resolution // 4, resolution // 2, resolution], [(1 - real_p) * 2 / 5, (1 - real_p) * 3 / 5, real_p]


def draw_patch_size(sizes: list[int], probs: list[float], seed: int, progress: float, progressive: bool) -> int:
    """Stochastic: one draw from `probs` with a generator seeded by `seed`. Progressive: the first size
    whose cumulative probability reaches the training progress (reference `--progressive`)."""
    cumulative = torch.tensor(probs, dtype=torch.float64).cumsum(0)
    cumulative[-1] = float("inf")
    if progressive:
        return sizes[int((cumulative < progress).sum())]  # first size with progress <= cumulative
    u = torch.rand((), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sizes[int((cumulative <= u).sum())]


def coordinate_grid(height: int, width: int, device=None, dtype=torch.float32, top: int = 0, left: int = 0,
                    rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """(2, rows, cols) of the H×W canvas's grid from (top, left): channel 0 x = 2·(j/(W−1) − 0.5) along
    columns, channel 1 y = 2·(i/(H−1) − 0.5) along rows (by default the whole canvas). Positions off the
    canvas (a tile on a moved grid) continue the same lines."""
    rows, cols = height if rows is None else rows, width if cols is None else cols
    x = ((torch.arange(cols, dtype=torch.float64) + left) / max(width - 1, 1) - 0.5) * 2
    y = ((torch.arange(rows, dtype=torch.float64) + top) / max(height - 1, 1) - 0.5) * 2
    grid = torch.stack([x.expand(rows, cols), y[:, None].expand(rows, cols)])
    return grid.to(device=device, dtype=dtype)


class CoordinateTiles:
    """Patch Diffusion on tiles of a larger canvas: each tile sees the coordinate channels of its own
    place in the canvas (Wang et al.'s coordinates of a patch in its image), so the tiles of one canvas
    share one coordinate system, as the patches of a training image do."""

    def __init__(self, net, sigma_data: float, tile: tuple[int, int]):
        self.precond, self.tile, self.halo = EDMPrecond(net, sigma_data=sigma_data), tuple(tile), 0

    def __call__(self, x, sigma, boxes, **cond):
        grids = torch.stack([coordinate_grid(*box.canvas, device=x.device, dtype=x.dtype, top=box.top, left=box.left,
                                             rows=box.height, cols=box.width) for box in boxes])
        return self.precond(x, sigma, extra_channels=grids, **cond)


def crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Per-example square crops: x (B, C, H, W), corners top/left (B,) -> (B, C, size, size)."""
    offsets = torch.arange(size, device=x.device)
    rows = (top.to(x.device)[:, None] + offsets)[:, :, None]  # (B, size, 1)
    cols = (left.to(x.device)[:, None] + offsets)[:, None, :]  # (B, 1, size)
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[batch, :, rows, cols].permute(0, 3, 1, 2)  # (B, size, size, C) -> (B, C, size, size)


def random_patches(images: torch.Tensor, size: int, rng: SampleRNG) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's own uniform random crop and its coordinates: ((B, C, p, p), (B, 2, p, p))."""
    B, _, H, W = images.shape
    top = rng.randint(0, H - size + 1).reshape(B)
    left = rng.randint(0, W - size + 1).reshape(B)
    grid = coordinate_grid(H, W, device=images.device, dtype=images.dtype).expand(B, -1, -1, -1)
    return crop(images, top, left, size), crop(grid, top, left, size)


class PatchDiffusionMethod(LatentSpaceMixin, Method):
    name = "patch_diffusion"
    Config = PatchDiffusionConfig
    default_sampler = "heun"
    default_steps = 18
    presets = {
        "patch-diffusion-celeba64": (
            "Wang et al.'s CelebA-64 recipe (DDPM++ widths on our U-Net; batch 256, lr 2e-4, dropout 0.05, "
            "real_p 0.5; sample with Heun, 50 steps) — a GPU job; set data.source to your CelebA-64 zip",
            ["data.resolution=64", "data.hflip=false", "model.net.model_channels=128",
             "model.net.channel_mult=[1,2,2,2]", "model.net.num_res_blocks=4", "model.net.attention_resolutions=[16]",
             "model.net.dropout=0.05", "model.real_p=0.5", "train.batch_size=256", "train.lr=2e-4",
             "train.ema_halflife_kimg=500", "train.warmup_steps=40", "train.steps=800000", "train.precision=bf16",
             "sample.sampler=heun", "sample.num_steps=50"],
        ),
        "patch-diffusion-cpu": (
            "Patch Diffusion small enough for a 2-core CPU: builtin textures at 32², a ~1.7M-parameter U-Net",
            ["data.source=builtin:textures", "data.resolution=32", "model.net.model_channels=32",
             "model.net.channel_mult=[1,2,2]", "model.net.num_res_blocks=2", "model.net.attention_resolutions=[8]",
             "model.real_p=0.5", "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=50",
             "train.ema_halflife_kimg=2", "train.ema_rampup=0.2", "train.steps=3000", "sample.sampler=heun",
             "sample.num_steps=18"],
        ),
    }

    @classmethod
    def comparison_overrides(cls, resolution: tuple[int, int]) -> list[str]:
        # The baseline's U-Net exactly (plus the two coordinate channels), so any difference is the patch
        # training; real_p 0.5 as the paper's main results; full-canvas Heun sampling as the baseline.
        return comparison_unet(min(resolution)) + ["model.real_p=0.5", "sample.sampler=heun", "sample.num_steps=18"]

    @classmethod
    def comparison_claims(cls, records: dict[str, dict]) -> list[Claim]:
        claim = "about 2× faster training than full-image training to the same quality (Wang et al. 2023)"
        test = ("training CPU time until its SWD curve first reaches the quality the full-image run ends with (the "
                "mean of its last two curve points: single checkpoints swing), over that run's budget (0.5 = 2× "
                "faster); same U-Net, data, batch and CPU budget")
        mine, full = comparison_record(records, cls.name), comparison_record(records, "full")
        if mine is None or full is None:
            return [Claim(cls.name, claim, test, "not testable", "needs a 'full' entry in the same comparison")]
        last = full["curve"][-2:]
        target, budget = sum(p["swd"] for p in last) / len(last), full["curve"][-1]["cpu_seconds"]
        reached = time_to_reach(mine["curve"], target)
        share = ratio(reached, budget)
        noise = max(filter(None, [record_value(r, "quality.swd_curve_last_change") for r in (mine, full)]), default=0)
        curve = ", ".join(f"{p['swd']:.0f}@{p['cpu_seconds'] / 60:.1f}min" for p in mine["curve"] if p["cpu_seconds"])
        evidence = (
            f"full ends at curve SWD {target:.1f} (mean of its last {len(last)} points, budget {budget / 60:.1f} CPU min); "
            f"{cls.name} curve: {curve}; "
            + (f"reached at {share:.2f} of the budget" if share is not None else "never reached it")
            + f"; final SWD {record_value(mine, 'quality.swd'):.1f} vs {record_value(full, 'quality.swd'):.1f}; "
            f"train multiply-adds per image {record_value(mine, 'network.train_flops') / 1e6:.0f}M vs "
            f"{record_value(full, 'network.train_flops') / 1e6:.0f}M; CPU s per training image "
            f"{record_value(mine, 'training.cpu_seconds_per_image'):.4f} vs "
            f"{record_value(full, 'training.cpu_seconds_per_image'):.4f}; noise scale (change between the last two "
            f"curve points) {noise:.1f}; the curve has {len(mine['curve'])} points, so times are coarse")
        if share is None or share > 0.85:
            verdict = "does not hold"
        elif share <= 0.6:
            verdict = "holds"
        else:
            verdict = "partly"
        mine_end = sum(p["swd"] for p in mine["curve"][-2:]) / len(mine["curve"][-2:])
        if verdict != "does not hold" and noise > 0 and abs(mine_end - target) < noise:
            verdict += " (within noise)"
        return [Claim(cls.name, claim, test, verdict, evidence)]

    def validate(self) -> None:
        cfg = self.config
        height, width = self.resolution
        if height != width:
            raise ConfigError(f"patch_diffusion trains on square images; got {width}x{height}")
        if not 0 <= cfg.real_p <= 1:
            raise ConfigError(f"real_p must be in [0, 1], got {cfg.real_p}")
        if cfg.net.extra_in_channels != 2:
            raise ConfigError("patch_diffusion needs model.net.extra_in_channels=2 (the x, y coordinate channels)")
        channels = self.image_channels
        if cfg.latent:
            if not cfg.vae_path:
                raise ConfigError("latent: true needs model.vae_path (a local AutoencoderKL directory)")
            from patchdiffusion.latent import vae_info

            info = vae_info(cfg.vae_path)
            if height % info.downsample:
                raise ConfigError(f"image side {height} is not divisible by the VAE's factor {info.downsample}")
            channels = info.latent_channels
        if cfg.net.in_channels != channels or cfg.net.out_channels != channels:
            raise ConfigError(
                f"model.net.in_channels/out_channels are {cfg.net.in_channels}/{cfg.net.out_channels} but "
                f"{'the latents have' if cfg.latent else 'the data has'} {channels} channels"
            )
        for size in self.patch_sizes:
            check_divisible(cfg.net, size, size)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def canvas_side(self) -> int:
        """R: the side of the training canvas the patches are cut from (latent side in latent space)."""
        return self.resolution[0] // self.downsample

    @property
    def patch_sizes(self) -> list[int]:
        return patch_schedule(self.canvas_side, self.config.real_p, self.config.latent)[0]

    @property
    def patch_probabilities(self) -> list[float]:
        return patch_schedule(self.canvas_side, self.config.real_p, self.config.latent)[1]

    @property
    def average_multiplier(self) -> float:
        R = self.canvas_side
        return sum(p * batch_multiplier(s, R) for s, p in zip(self.patch_sizes, self.patch_probabilities))

    @property
    def num_classes(self) -> int:
        return self.config.net.num_classes

    # -- training ----------------------------------------------------------------------------
    def build_network(self) -> UNet:
        return UNet(dataclasses.replace(self.config.net, resolution=self.canvas_side))

    def plan_step(self, seed: int, progress: float) -> StepPlan:
        size = draw_patch_size(self.patch_sizes, self.patch_probabilities, seed, progress, self.config.progressive)
        return PatchPlan(multiplier=batch_multiplier(size, self.canvas_side), patch_size=size)

    def loss(self, net, batch: TrainBatch, rng: SampleRNG) -> torch.Tensor:
        cfg, images = self.config, batch.images
        patch_size = getattr(batch.plan, "patch_size", 0)
        cond = {}
        labels = self.drop_labels(batch.labels, rng, cfg.label_dropout)
        if labels is not None:
            cond["class_labels"] = labels
        if cfg.latent:
            codec = self.codec(images.device)
            mean, std = codec.moments(images)
            images = (mean + std * rng.randn_like(mean).to(mean)) * codec.scaling_factor  # latent_dist.sample()
        canvas_elements = images[0].numel()
        patches, coords = random_patches(images, patch_size or images.shape[-1], rng)
        edm_loss = EDMLoss(P_mean=cfg.P_mean, P_std=cfg.P_std, sigma_data=cfg.sigma_data)
        per_element = edm_loss(EDMPrecond(net, sigma_data=cfg.sigma_data), patches, rng, extra_channels=coords, **cond)
        # The reference sums the loss over a patch's pixels; dividing by the canvas's element count keeps that
        # weighting between patch sizes and makes a full-size step the per-element mean (as `full` does).
        return per_element.flatten(1).sum(1) / canvas_elements

    # -- sampling ----------------------------------------------------------------------------
    def denoiser(self, net, options=None):
        precond = EDMPrecond(net, sigma_data=self.config.sigma_data)

        def with_coordinates(x, sigma, **cond):
            grid = coordinate_grid(x.shape[-2], x.shape[-1], device=x.device, dtype=x.dtype)
            return precond(x, sigma, extra_channels=grid.expand(x.shape[0], -1, -1, -1), **cond)

        return with_coordinates

    def tile_model(self, net, options=None) -> CoordinateTiles:
        return CoordinateTiles(net, self.config.sigma_data, self.native_tile)

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        return edm_sampling_sigmas(self.config, steps)

    def check_canvas(self, height: int, width: int) -> None:
        self.check_tiled_canvas(height, width)
        f = self.downsample
        check_divisible(self.config.net, height // f, width // f)


METHOD = PatchDiffusionMethod

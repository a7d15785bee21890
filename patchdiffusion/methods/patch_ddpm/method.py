"""Patch-based DDPM (Arakawa et al., CVPRW 2023, "Memory Efficient Diffusion Probabilistic Models
via Patch-based Generation"); the reference code's mechanics are in METHODS.md §2.

An R×R image is cut into D×D non-overlapping patches of R/D (D = `patch_divider`) on a fixed grid.
One network, the lucidrains DDPM U-Net (`nets/ddpm_unet.py`), denoises every patch; it sees
  * the patch of the current noisy image x_t (VP coordinates, as DDPM's network sees it);
  * Global Content Conditioning (paper §3.3): the whole x_t average-pooled to the patch size,
    concatenated to the patch as 3 more channels (`gcc`);
  * its position (paper §3.2): a one-hot vector over the D² cells, cell (i, j) -> i·D + j, embedded
    and fused with the time embedding (`position`).
Patches are stacked patch-major (all B images of cell 0, then cell 1, ...), so the per-image
timesteps are tiled D² times. The D² outputs ε̂ are put back on the image grid.

Diffusion as the reference: T = 1000, cosine β schedule (s = 0.008, β ≤ 0.999), one t per image
shared by its patches, L1 loss on ε over the whole reassembled image; sampling is ancestral DDPM
with the posterior variance and x0 clipped to [−1, 1], 1000 steps by default.

Memory: sampling calls the U-Net on `patch_batch` cells at a time (B × K patches per call), so the
activations held at once are those of K patches, not of the image (the paper's claim; the
reference runs all D² cells in one call, which is `patch_batch = 0`). The pooled x_t is computed
once per denoiser call and shared by all chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from patchdiffusion.config import Range
from patchdiffusion.diffusion.losses import DDPMLoss
from patchdiffusion.diffusion.precond import DiscretePrecond
from patchdiffusion.diffusion.tiled import TilingConfig
from patchdiffusion.errors import ConfigError
from patchdiffusion.methods.base import (Claim, Method, TrainBatch, comparison_record, discrete_schedule, ratio,
                                         record_value)
from patchdiffusion.nets.ddpm_unet import DDPMUNet, DDPMUNetConfig
from patchdiffusion.rng import SampleRNG

_PREDICTIONS = {"pred_noise": "eps", "pred_x0": "x0", "eps": "eps", "x0": "x0"}
COMPARISON_SAMPLE_STEPS = 100  # respaced ancestral steps in `patchdiff compare` (as Patching's there)


@dataclass
class PatchDDPMConfig:
    net: DDPMUNetConfig = field(default_factory=DDPMUNetConfig)  # the per-patch U-Net
    patch_divider: int = 4               # D: patches per side (D² patches of R/D); 1 = a plain full-image DDPM
    gcc: bool = True                     # Global Content Conditioning: pooled x_t as 3 extra input channels
    position: bool = True                # one-hot position over the D² cells, fused into the time embedding
    schedule: str = "cosine"             # β schedule (the reference: cosine, s = 0.008, β ≤ 0.999)
    timesteps: int = 1000                # T
    loss_type: str = "l1"                # l1 (the reference) | l2, on the prediction target
    objective: str = "pred_noise"        # pred_noise (ε, the reference) | pred_x0
    patch_batch: int = 0                 # cells per network call when sampling (0 = all D² at once);
    #                                      `patchdiff sample --patch-batch K` overrides it

    RANGES: ClassVar[dict] = {"patch_divider": Range(1, 1 << 10), "timesteps": Range(2, 1e6),
                              "patch_batch": Range(0, 1 << 20)}
    CHOICES: ClassVar[dict] = {"loss_type": ("l1", "l2"), "objective": tuple(_PREDICTIONS)}


@dataclass(frozen=True)
class PatchDDPMSampleOptions:
    patch_batch: int | None = field(default=None, metadata={
        "help": "grid cells per network call: fewer bound memory, more run faster; 0 = all cells at once "
                "(default: the run's model.patch_batch)", "min": 0})


# ------------------------------------------------------------------------------------------------
# The patch grid (patch-major stacking: index = k·B + b for cell k = i·D + j of image b)


def patch_side(height: int, width: int, divider: int) -> tuple[int, int]:
    """(ph, pw) of a D×D grid on an H×W canvas."""
    return height // divider, width // divider


def split_patches(x: torch.Tensor, divider: int, cells: range | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (K·B, C, H/D, W/D): the patches of `cells` (default all D²), patch-major."""
    B, C, H, W = x.shape
    ph, pw = patch_side(H, W, divider)
    if cells is None or len(cells) == divider * divider:
        grid = x.reshape(B, C, divider, ph, divider, pw).permute(2, 4, 0, 1, 3, 5)  # (D, D, B, C, ph, pw)
        patches = grid.reshape(divider * divider, B, C, ph, pw)
        if cells is not None:
            patches = patches[cells.start:cells.stop]
        return patches.reshape(-1, C, ph, pw)
    return torch.cat(
        [x[:, :, (k // divider) * ph:(k // divider + 1) * ph, (k % divider) * pw:(k % divider + 1) * pw] for k in cells]
    )  # (K·B, C, ph, pw)


def merge_patches(patches: torch.Tensor, divider: int, batch: int) -> torch.Tensor:
    """(D²·B, C, ph, pw) patch-major -> (B, C, D·ph, D·pw); the inverse of `split_patches`."""
    _, C, ph, pw = patches.shape
    grid = patches.reshape(divider, divider, batch, C, ph, pw).permute(2, 3, 0, 4, 1, 5)  # (B, C, D, ph, D, pw)
    return grid.reshape(batch, C, divider * ph, divider * pw)


def position_one_hot(cells: range, divider: int, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(K·B, D²): row k·B + b is the one-hot of cell cells[k] (cell (i, j) = i·D + j), patch-major."""
    index = torch.arange(cells.start, cells.stop, device=device).repeat_interleave(batch)  # (K·B,)
    return F.one_hot(index, divider * divider).to(dtype)


def global_content(x: torch.Tensor, divider: int) -> torch.Tensor:
    """GCC input: x_t average-pooled to the patch size, (B, C, H, W) -> (B, C, H/D, W/D)."""
    return F.adaptive_avg_pool2d(x, patch_side(x.shape[-2], x.shape[-1], divider))


class PatchDividedUNet(nn.Module):
    """The whole-canvas ε-network of Patch-based DDPM: net(x_t, t) -> ε̂ (B, C, H, W).

    It cuts x_t into the D×D grid, runs the U-Net on `patch_batch` cells at a time (B·K patches per
    call, 0 = all cells in one call as the reference does) and writes each chunk's outputs into the
    canvas, so only one chunk's activations are alive at once.
    """

    def __init__(self, unet: DDPMUNet, divider: int, gcc: bool, position: bool):
        super().__init__()
        self.unet = unet
        self.divider, self.gcc, self.position = divider, gcc, position

    @property
    def num_cells(self) -> int:
        return self.divider * self.divider

    def chunks(self, patch_batch: int = 0) -> list[range]:
        K = patch_batch if 0 < patch_batch < self.num_cells else self.num_cells
        return [range(k, min(k + K, self.num_cells)) for k in range(0, self.num_cells, K)]

    def patch_inputs(self, x: torch.Tensor, time: torch.Tensor, cells: range, pooled: torch.Tensor | None = None):
        """The U-Net's inputs for `cells`: (patches (K·B, C, p, p), time (K·B,), position (K·B, D²) or None,
        global content (K·B, C, p, p) or None)."""
        B, K = x.shape[0], len(cells)
        patches = split_patches(x, self.divider, cells)
        time = time.reshape(-1).expand(B).repeat(K)  # tiled (not interleaved): patch-major order
        position = position_one_hot(cells, self.divider, B, x.device, x.dtype) if self.position else None
        content = None
        if self.gcc:
            pooled = global_content(x, self.divider) if pooled is None else pooled
            content = pooled.repeat(K, 1, 1, 1)  # (K·B, C, p, p): every patch sees the same pooled image
        return patches, time, position, content

    def forward(self, x: torch.Tensor, time: torch.Tensor, patch_batch: int = 0) -> torch.Tensor:
        B = x.shape[0]
        pooled = global_content(x, self.divider) if self.gcc else None  # once per call, shared by all chunks
        ranges = self.chunks(patch_batch)
        if len(ranges) == 1:  # all cells at once: one call, then one reshape back (training takes this path)
            out = self.unet(*self.patch_inputs(x, time, ranges[0], pooled))
            return merge_patches(out, self.divider, B)
        canvas = None
        ph, pw = patch_side(x.shape[-2], x.shape[-1], self.divider)
        for cells in ranges:
            out = self.unet(*self.patch_inputs(x, time, cells, pooled))  # (K·B, C_out, ph, pw)
            if canvas is None:
                canvas = x.new_empty(B, out.shape[1], x.shape[-2], x.shape[-1], dtype=out.dtype)
            for n, k in enumerate(cells):
                i, j = divmod(k, self.divider)
                canvas[:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw] = out[n * B:(n + 1) * B]
        return canvas


# ------------------------------------------------------------------------------------------------


class PatchDDPMMethod(Method):
    name = "patch_ddpm"
    Config = PatchDDPMConfig
    SampleOptions = PatchDDPMSampleOptions
    config_suffixes = (".json",)  # the reference's JSON configs (`train --config X.json`)
    default_sampler = "ddpm"             # ancestral, as the reference's p_sample_loop
    default_steps = 1000
    clip_denoised = True                 # the reference clips x0 to [-1, 1]

    def __init__(self, config, resolution, image_channels=3):
        super().__init__(config, resolution, image_channels)
        self.schedule = discrete_schedule(config)

    @classmethod
    def comparison_overrides(cls, resolution: tuple[int, int]) -> list[str]:
        # The paper's memory claim is for 2×2 patches with one patch per network call (patch_batch 1); the
        # lucidrains U-Net at width 32 with one level less than the default matches the baseline's size.
        # Ancestral DDPM respaced to SAMPLE_STEPS (the reference walks all 1000) keeps the comparison's
        # sampling affordable on a CPU.
        return ["model.patch_divider=2", "model.patch_batch=1", "model.net.dim=32", "model.net.dim_mults=[1,2,2]",
                "sample.sampler=ddpm", f"sample.num_steps={COMPARISON_SAMPLE_STEPS}"]

    @classmethod
    def comparison_claims(cls, records: dict[str, dict]) -> list[Claim]:
        claim = "2×2 patches halve the peak sampling memory at comparable quality (Arakawa et al. 2023)"
        test = ("sampling memory above the loaded model (fresh process; one patch per network call) against the "
                "full-image U-Net of matched size: its growth per image at the training size (judged), the raw peak "
                "and the large canvas's; SWD for quality (the paper compares the same network with and without patches)")
        mine, full = comparison_record(records, cls.name), comparison_record(records, "full")
        if mine is None or full is None:
            return [Claim(cls.name, claim, test, "not testable", "needs a 'full' entry in the same comparison")]
        peak = ratio(record_value(mine, "sampling.train_size.peak_memory"),
                     record_value(full, "sampling.train_size.peak_memory"))
        # The memory that grows with the images (activations): fixed costs of a small model on a CPU (allocator,
        # kernels' scratch) would hide any saving in the raw peak.
        memory = ratio(record_value(mine, "sampling.train_size.memory_per_image"),
                       record_value(full, "sampling.train_size.memory_per_image"))
        large = ratio(record_value(mine, "sampling.large_size.peak_memory"),
                      record_value(full, "sampling.large_size.peak_memory"))
        quality = ratio(record_value(mine, "quality.swd"), record_value(full, "quality.swd"))
        batch = mine["sampling"]["train_size"]["batch"]
        per_image = [record_value(r, "sampling.train_size.memory_per_image") for r in (mine, full)]
        evidence = (
            (f"memory per extra image {memory:.2f}× the full-image U-Net's ({per_image[0] / 2**20:.2f} vs "
             f"{per_image[1] / 2**20:.2f} MB); " if memory is not None else "")
            + f"peak {peak:.2f}× ({record_value(mine, 'sampling.train_size.peak_memory') / 2**20:.1f} "
            f"vs {record_value(full, 'sampling.train_size.peak_memory') / 2**20:.1f} MB, {batch} images at the training size); "
            f"large canvas {large:.2f}× (both made of tiles); SWD {quality:.2f}× "
            f"({record_value(mine, 'quality.swd'):.1f} vs {record_value(full, 'quality.swd'):.1f}); sampling CPU s per image "
            f"{ratio(record_value(mine, 'sampling.train_size.cpu_seconds_per_image'), record_value(full, 'sampling.train_size.cpu_seconds_per_image')):.1f}×")
        if memory is None:
            verdict = "not testable"
        elif memory <= 0.55:
            verdict = "holds" if quality is not None and quality <= 1.25 else "partly (memory yes, quality worse)"
        elif memory <= 0.8:
            verdict = "partly (less memory, not half)"
        else:
            verdict = "does not hold"
        return [Claim(cls.name, claim, test, verdict, evidence)]

    def validate(self) -> None:
        cfg = self.config
        if cfg.patch_divider < 1:
            raise ConfigError(f"model.patch_divider must be a positive integer, got {cfg.patch_divider}")
        if cfg.objective not in _PREDICTIONS:
            raise ConfigError(f"model.objective must be pred_noise or pred_x0, got '{cfg.objective}'")
        if cfg.loss_type not in ("l1", "l2"):
            raise ConfigError(f"model.loss_type must be l1 or l2, got '{cfg.loss_type}'")
        if cfg.patch_batch < 0:
            raise ConfigError(f"model.patch_batch must be 0 (all cells) or positive, got {cfg.patch_batch}")
        if cfg.net.channels != self.image_channels:
            raise ConfigError(f"model.net.channels is {cfg.net.channels} but the data has {self.image_channels}")
        if cfg.net.out_dim not in (None, cfg.net.channels):
            raise ConfigError("model.net.out_dim must equal the image channels (learned variance is not supported)")
        self.check_canvas(*self.resolution)

    def check_canvas(self, height: int, width: int) -> None:
        D, divisor = self.config.patch_divider, self.config.net.size_divisor
        if height % D or width % D:
            raise ConfigError(f"image size {width}x{height} is not divisible by patch_divider {D}")
        ph, pw = patch_side(height, width, D)
        if ph % divisor or pw % divisor:
            raise ConfigError(
                f"patches of {pw}x{ph} ({width}x{height} / patch_divider {D}) are not divisible by {divisor} "
                f"(2^{len(self.config.net.dim_mults) - 1} downsamplings); use fewer dim_mults or a smaller patch_divider"
            )

    def default_tiling(self) -> TilingConfig:
        """Four grids averaged at every step: the network's own N×N patch borders sit at a fixed place in
        every tile, and a single moving grid leaves them where a few late steps happen to share an offset
        (bench any-size seams, a model trained at 32²: worst-offset seam 1.151 with one grid, 1.059 with
        four at every step, 1.067 with four in the last 5 of 20 steps; 1536×1024 canvas 1.048)."""
        return TilingConfig(window="cosine", grid="random", passes=4)

    def build_network(self) -> PatchDividedUNet:
        cfg = self.config
        unet = DDPMUNet(
            cfg.net, extra_channels=cfg.net.channels if cfg.gcc else 0,
            num_positions=cfg.patch_divider**2 if cfg.position else 0,
        )
        return PatchDividedUNet(unet, cfg.patch_divider, cfg.gcc, cfg.position)

    def loss(self, net, batch: TrainBatch, rng: SampleRNG) -> torch.Tensor:
        """Ho et al. 2020 Algorithm 1 on the whole canvas: one t per image, all its patches share it,
        L1 on ε (the reference's loss_type), mean over the reassembled image."""
        cfg = self.config
        ddpm_loss = DDPMLoss(self.schedule, prediction=_PREDICTIONS[cfg.objective], loss_type=cfg.loss_type)
        return ddpm_loss(net, batch.images, rng).flatten(1).mean(1)

    def denoiser(self, net, options: PatchDDPMSampleOptions | None = None):
        """D(x, σ) over the whole canvas: DiscretePrecond around the patch-divided ε-network, which
        calls the U-Net on `patch_batch` cells at a time (the option, else model.patch_batch)."""
        K = options.patch_batch if options is not None and options.patch_batch is not None else self.config.patch_batch
        if K < 0:
            raise ConfigError(f"patch_batch must be 0 (all cells) or positive, got {K}")
        precond = DiscretePrecond(net, self.schedule, prediction=_PREDICTIONS[self.config.objective])

        def patchwise(x, sigma, **cond):
            return precond(x, sigma, patch_batch=K, **cond)

        return patchwise

    @classmethod
    def read_config_file(cls, path: Path):
        """The reference's JSON config (trainer / model / diffusion sections) as a RunConfig."""
        from patchdiffusion.methods.patch_ddpm.seed_config import load_seed_config

        return load_seed_config(path)

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        if not 1 <= steps <= self.schedule.num_timesteps:
            raise ConfigError(f"steps must be between 1 and {self.schedule.num_timesteps}, got {steps}")
        return self.schedule.sigmas_for_sampling(steps).float()


METHOD = PatchDDPMMethod

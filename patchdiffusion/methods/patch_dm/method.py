"""Patch-DM (Ding, Zhang, Wu, Tu, ICLR 2024, arXiv 2308.01316): feature collage + global semantic codes.

A model that only sees p×p patches (p = 64 in the paper) generates canvases of any size that are a
multiple of p, without seams, in one coherent style:

  * the network is the collage U-Net (`nets/collage.py`): encoder per patch, decoder on windows
    shifted by p/2 whose features (bottleneck and skips) are collaged from four neighbours;
  * every training image owns a learnable semantic code (a row of `net.codes`), initialised from
    its CLIP image embedding (`codes.py`) and injected into every ResBlock; the
    codes are trained with the net and later modelled by a small latent diffusion model;
  * diffusion is the reference's: DDPM, linear β, T = 1000, ε-prediction, MSE; DDIM sampling.

Training (paper §3.2, METHODS.md §1). The image (H = ny·p, W = nx·p) is zero-padded by p/2 on every
side and noised, x_t = √ᾱ x0 + √(1 − ᾱ) ε, then multiplied by the pad mask so the pad stays 0. One
random 2×2 group of cells of the padded (ny+1)×(nx+1) grid is cut out (positions: the integer cell
coordinates). Two decoder passes share the encoder: (a) the collage of the four patches into the
one centre window (position + 0.5), target = the centre p×p of the window's noise; (b) the plain
decode of the four patches, target = their noise, masked to the image. loss = MSE_a + MSE_b.
Classifier-free guidance: a per-image draw zeroes the code (p = 0.1) and the position (p = 0.5).

Sampling an H×W canvas: at every step the canvas is padded by p/2 and cut into (ny+1)×(nx+1)
patches; the collage decodes the ny×nx windows, which are exactly the canvas's own p-grid, so
every pixel is predicted once and no patch boundary is ever produced by a single patch. To bound
memory the windows are processed in tiles of a×b windows from (a+1)×(b+1) encoder patches (at most
`patch_batch` patches per network call); encoder patches on tile borders are computed again by the
neighbouring tile, which gives the same numbers (each patch is encoded on its own).

With `collage: false` (the ablation) the same net decodes each patch from its own features only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from patchdiffusion.config import Range
from patchdiffusion.diffusion import parameterization
from patchdiffusion.diffusion.guidance import ClassifierFreeGuidance
from patchdiffusion.diffusion.tiled import TilingConfig
from patchdiffusion.errors import ConfigError
from patchdiffusion.methods.base import Claim, Method, TrainBatch, comparison_record, discrete_schedule, record_value
from patchdiffusion.methods.patch_dm.codes import LatentCodeConfig
from patchdiffusion.methods.patch_dm.commands import COMMANDS
from patchdiffusion.methods.patch_dm.tiles import (
    PatchPredictor,
    Tile,
    packed_jobs,
    plan_tiles,
    read_region,
    shift_margins,
)
from patchdiffusion.nets.collage import CollageUNet, CollageUNetConfig, cut_grid
from patchdiffusion.rng import SampleRNG, mix_seed


_POSITIONS, _GRID_SHIFTS = ("auto", "grid", "none"), ("fixed", "random")


def _paper_net() -> CollageUNetConfig:
    return CollageUNetConfig(patch_size=64, model_channels=64, channel_mult=(1, 2, 4, 8), num_res_blocks=2,
                             attention_resolutions=(16,), code_dim=512)


@dataclass
class PatchDMConfig:
    net: CollageUNetConfig = field(default_factory=_paper_net)  # collage U-Net; net.num_codes is set from the data
    collage: bool = True                 # feature collage (false: the no-collage ablation, patches decoded alone)
    schedule: str = "linear"             # β schedule (linear 1e-4..0.02, as the reference)
    timesteps: int = 1000                # T
    prediction: str = "eps"              # what the net predicts: eps (the paper) | v (learns faster on tiny budgets) | x0
    code_dropout: float = 0.1            # CFG training: share of images whose code is zeroed (paper --cfg: 0.1)
    position_dropout: float = 0.5        # CFG training: share of images whose position embedding is zeroed (0.5)
    codes_path: str = ""                 # initial codes (patchdiff patchdm init-codes); "" = N(0, code_init_std²)
    code_init_std: float = 1.0           # std of random initial codes when there is no codes_path
    patch_batch: int = 64                # sampling: encoder patches per network call (bounds activation memory)
    positions: str = "auto"              # sampling: grid (the paper's cell coordinates) | none (the guidance null) |
    #                                      auto (grid while the canvas fits the training grid, else none)
    grid_shift: str = "fixed"            # sampling: fixed (the paper: windows on the canvas's p-grid every step) |
    #                                      random (the window grid moves by a random offset every step; see
    #                                      grid_offset); also the default --grid of tiled canvases
    latent: LatentCodeConfig = field(default_factory=LatentCodeConfig)  # the latent code model (train-codes)

    RANGES: ClassVar[dict] = {"timesteps": Range(2, 1e6), "code_dropout": Range(0, 1), "position_dropout": Range(0, 1),
                              "code_init_std": Range(0, 1e3), "patch_batch": Range(1, 1 << 20)}
    CHOICES: ClassVar[dict] = {"prediction": ("eps", "v", "x0"), "positions": _POSITIONS, "grid_shift": _GRID_SHIFTS}


_GRID_SHIFT_STREAM = 13  # rng stream of the random window-grid offsets


@dataclass(frozen=True)
class PatchDMSampleOptions:
    code_from: int | None = field(default=None, metadata={
        "help": "use this training image's semantic code for every canvas (style reuse); default: a new code "
                "from the run's latent code model (patchdiff train-codes), else a training image's code drawn per seed",
        "min": 0})
    positions: str | None = field(default=None, metadata={
        "choices": _POSITIONS,
        "help": "grid = the patches' cell coordinates (the paper), none = the position-free branch, auto = grid while "
                "the canvas fits the training images' grid (default: the run's model.positions)"})
    patch_batch: int | None = field(default=None, metadata={
        "help": "encoder patches per network call (bounds activation memory; default: the run's model.patch_batch)",
        "min": 1})
    codes: Any = field(default=None, metadata={"cli": False, "help": "(B, K) codes to sample with (Python API)"})


class PatchDMMethod(Method):
    name = "patch_dm"
    Config = PatchDMConfig
    SampleOptions = PatchDMSampleOptions
    default_sampler = "ddim"
    default_steps = 50
    clip_denoised = True
    commands = COMMANDS
    presets = {
        "patch-dm-cpu": (
            "Patch-DM small enough for a CPU: builtin textures at 128² (a 4×4 grid of 32² patches), a 1.1M-parameter "
            "collage U-Net, 64-d codes (init them with `patchdiff patchdm init-codes`), v-prediction (a CPU budget; "
            "the paper: ε); DDIM 50 steps, guidance 1.5, the window grid moved each step (grid_shift=random; the "
            "paper: fixed)",
            ["data.source=builtin:textures?count=50", "data.resolution=128", "model.net.patch_size=32",
             "model.net.model_channels=16", "model.net.channel_mult=[1,2,5]", "model.net.num_res_blocks=1",
             "model.net.attention_resolutions=[8]", "model.net.code_dim=64", "model.prediction=v",
             "model.grid_shift=random", "model.latent.hidden=256", "model.latent.steps=3000",
             "model.latent.batch_size=256", "model.latent.lr=1e-3", "train.batch_size=8", "train.lr=2e-3",
             "train.warmup_steps=50", "train.ema_halflife_kimg=2", "train.ema_rampup=0.2", "train.steps=5000",
             "train.checkpoint_every=250", "train.sample_images=16", "sample.sampler=ddim", "sample.num_steps=50",
             "sample.guidance=1.5"],
        ),
    }

    def __init__(self, config, resolution, image_channels=3):
        super().__init__(config, resolution, image_channels)
        self.schedule = discrete_schedule(config)
        self._initial_codes: torch.Tensor | None = None

    @classmethod
    def comparison_overrides(cls, resolution: tuple[int, int]) -> list[str]:
        # A 2×2 grid of patches on the training images (p = side / 2, at most the paper's 64), the collage U-Net
        # at widths that match the baseline (1.30M parameters, 226M multiply-adds per 32² image), 64-d codes from random initial values (no CLIP here), v-prediction as the
        # CPU preset (the paper: ε; v learns faster on small budgets), and the paper's fixed window grid:
        # the comparison tests the paper's seamlessness claim, not this package's moving grid.
        # Guided DDIM as the paper (guidance 1.5 as the CPU preset; 25 steps, the paper 50, for the CPU's sake).
        p = min(64, min(resolution) // 2)
        return [f"model.net.patch_size={p}", "model.net.model_channels=24", "model.net.channel_mult=[1,2,3]",
                "model.net.num_res_blocks=1", f"model.net.attention_resolutions=[{max(1, p // 4)}]",
                "model.net.code_dim=64", "model.prediction=v", "model.grid_shift=fixed",
                "sample.sampler=ddim", "sample.num_steps=25", "sample.guidance=1.5"]

    @classmethod
    def comparison_claims(cls, records: dict[str, dict]) -> list[Claim]:
        claim = "large images from patches without seams, thanks to the feature collage (Ding et al. 2024)"
        mine = comparison_record(records, cls.name)
        if mine is None:
            return []
        seams = mine["seams"]
        tiling = seams["tiling"]
        test = (f"seam score of a large canvas made of training-size tiles ({tiling['grid']} window grid), on the grid's "
                "lines and at the worst offset of its period, against real images' figures at the same period "
                "(seamless: at most 1.05 on the grid's lines, and a worst offset no more than 5% above real images')")
        at_grid, worst = record_value(mine, "seams.at_grid"), record_value(mine, "seams.worst")
        real_grid, real_worst = record_value(mine, "seams.real_at_grid"), record_value(mine, "seams.real_worst")
        bar = 1.05 * max(1.0, real_worst)  # the worst offset of one image is the largest of many noisy scores
        others = "; ".join(f"{label} {record_value(r, 'seams.at_grid'):.2f}/{record_value(r, 'seams.worst'):.2f}"
                           for label, r in records.items() if r is not mine)
        evidence = (f"on the grid {at_grid:.3f}, worst offset {worst:.3f} (real images {real_grid:.3f} / {real_worst:.3f} "
                    f"at period {seams['period'][1]}); other entries (on grid / worst, their own tilings): {others or 'none'}")
        if at_grid <= 1.05 and worst <= bar:
            verdict = "holds"
        elif at_grid <= 1.15:
            verdict = "partly (faint seams)"
        else:
            verdict = "does not hold"
        return [Claim(cls.name, claim, test, verdict, evidence)]

    # -- configuration -------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.config.net.patch_size

    def validate(self) -> None:
        cfg, p = self.config, self.config.net.patch_size
        levels = len(cfg.net.channel_mult)
        if p % 2**levels:
            raise ConfigError(
                f"model.net.patch_size {p} must be divisible by 2^{levels} (the collage shifts the "
                f"{p // 2 ** (levels - 1)}-pixel bottleneck by half)"
            )
        if cfg.net.in_channels != self.image_channels or cfg.net.out_channels != self.image_channels:
            raise ConfigError(f"model.net.in_channels/out_channels must be {self.image_channels} (the data's channels)")
        self.check_canvas(*self.resolution)
        for name in ("code_dropout", "position_dropout"):
            if not 0 <= getattr(cfg, name) <= 1:
                raise ConfigError(f"model.{name} must be in [0, 1], got {getattr(cfg, name)}")
        if cfg.prediction not in ("eps", "v", "x0"):
            raise ConfigError(f"model.prediction must be 'eps', 'v' or 'x0', got {cfg.prediction!r}")
        if cfg.positions not in ("grid", "none", "auto"):
            raise ConfigError(f"model.positions must be 'grid', 'none' or 'auto', got {cfg.positions!r}")
        if cfg.grid_shift not in ("fixed", "random"):
            raise ConfigError(f"model.grid_shift must be 'fixed' or 'random', got {cfg.grid_shift!r}")

    def check_canvas(self, height: int, width: int) -> None:
        p = self.patch_size
        if height % p or width % p:
            raise ConfigError(
                f"canvas {width}x{height} is not a multiple of the patch size {p} (a whole-canvas pass); "
                f"use e.g. {max(p, round(width / p) * p)}x{max(p, round(height / p) * p)}, or sample it from tiles"
            )

    def bind_data(self, num_images: int) -> None:
        """One code per training image: fix the table's size and load the initial codes (before build_network)."""
        cfg = self.config
        if cfg.net.code_dim <= 0:
            cfg.net.num_codes = 0
            return
        if cfg.net.num_codes not in (0, num_images):
            raise ConfigError(f"model.net.num_codes is {cfg.net.num_codes} but the data set holds {num_images} images")
        cfg.net.num_codes = num_images
        if cfg.codes_path:
            from patchdiffusion.methods.patch_dm.codes import load_codes

            codes = load_codes(cfg.codes_path)
            if codes.shape != (num_images, cfg.net.code_dim):
                raise ConfigError(
                    f"codes in '{cfg.codes_path}' have shape {tuple(codes.shape)} but the model needs "
                    f"({num_images}, {cfg.net.code_dim}) (images × model.net.code_dim); were they made from this data?"
                )
            self._initial_codes = codes

    # -- training ------------------------------------------------------------------------------
    def build_network(self) -> CollageUNet:
        net = CollageUNet(self.config.net)
        if net.codes is not None:
            with torch.no_grad():
                if self._initial_codes is not None:
                    net.codes.weight.copy_(self._initial_codes)
                else:
                    net.codes.weight.normal_(0.0, self.config.code_init_std)
        return net

    def loss(self, net, batch: TrainBatch, rng: SampleRNG) -> torch.Tensor:
        cfg, p, images = self.config, self.patch_size, batch.images
        B, C, H, W = images.shape
        ny, nx = H // p, W // p
        dev = images.device
        code_index = batch.index.to(dev) if cfg.net.code_dim > 0 else None  # each image's own code
        # One timestep per image, shared by its patches (reference).
        t = rng.randint(0, self.schedule.num_timesteps).reshape(B).cpu()
        alpha_bar = self.schedule.alphas_cumprod[t].to(device=dev, dtype=images.dtype).view(B, 1, 1, 1)
        m = p // 2 if cfg.collage else 0
        # Pad by p/2 (collage) and noise; the mask keeps the pad at exactly 0.
        x0 = F.pad(images, (m, m, m, m))  # (B, C, H + 2m, W + 2m)
        mask = F.pad(torch.ones_like(images[:, :1]), (m, m, m, m))  # (B, 1, H + 2m, W + 2m)
        noise = rng.randn_like(x0).to(dev)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x_t = parameterization.diffuse(x0, noise, alpha, sigma) * mask
        target = parameterization.prediction_target(cfg.prediction, x0, noise, alpha, sigma)
        # One random 2×2 group of cells (of the padded grid when collaging).
        cells_y, cells_x = ny + (1 if cfg.collage else 0), nx + (1 if cfg.collage else 0)
        gy, gx = min(2, cells_y), min(2, cells_x)
        top = rng.randint(0, cells_y - gy + 1).reshape(B).cpu()
        left = rng.randint(0, cells_x - gx + 1).reshape(B).cpu()

        def window(v):  # (B, ·, gy·p, gx·p) at each image's cell
            return torch.stack([v[b, :, top[b] * p:(top[b] + gy) * p, left[b] * p:(left[b] + gx) * p]
                                for b in range(B)])

        x_w, n_w, m_w = window(x_t), window(target), window(mask)
        patches = cut_grid(x_w, gy, gx)  # (B·gy·gx, C, p, p)
        k = gy * gx
        cell = torch.stack(torch.meshgrid(torch.arange(gx), torch.arange(gy), indexing="xy"), -1).reshape(1, k, 2)
        positions = (torch.stack([left, top], 1)[:, None, :] + cell).reshape(-1, 2).to(dev, torch.float32)
        # Classifier-free guidance dropout: one uniform draw per image against each threshold.
        keep_code = (rng.rand() >= cfg.code_dropout).to(dev, images.dtype)
        keep_pos = (rng.rand() >= cfg.position_dropout).to(dev, images.dtype)

        def per_patch(v):
            return None if v is None else v.repeat_interleave(k, dim=0)

        cond = dict(code_index=per_patch(code_index), position_keep=per_patch(keep_pos), code_keep=per_patch(keep_code))
        t_patch = per_patch(t.to(dev, torch.float32))
        plain_target = cut_grid(n_w, gy, gx)
        plain_mask = cut_grid(m_w, gy, gx)
        if cfg.collage and gy == 2 and gx == 2:
            eps_c, eps_p = net(patches, t_patch, positions, (gy, gx), mode="both", **cond)
            centre = n_w[:, :, p // 2: p // 2 + p, p // 2: p // 2 + p]  # (B, C, p, p): the window's centre crop
            loss_a = (eps_c - centre).square().flatten(1).mean(1)  # (B,)
        else:
            eps_p = net(patches, t_patch, positions, (gy, gx), mode="plain", **cond)
            loss_a = torch.zeros(B, device=dev, dtype=images.dtype)
        err = ((eps_p - plain_target).square() * plain_mask).reshape(B, k, C, p, p)
        covered = plain_mask.reshape(B, k, 1, p, p).expand(-1, -1, C, -1, -1).sum(dim=(1, 2, 3, 4))
        loss_b = err.sum(dim=(1, 2, 3, 4)) / covered.clamp(min=1)  # masked MSE over the image's pixels
        return loss_a + loss_b

    # -- sampling ------------------------------------------------------------------------------
    def setting(self, options: PatchDMSampleOptions | None, name: str):
        """A sampling setting: the option when given, else the run's model config."""
        value = None if options is None else getattr(options, name)
        return getattr(self.config, name) if value is None else value

    def predictor(self, net) -> PatchPredictor:
        return PatchPredictor(net, self.patch_size, self.config.collage)

    def tiles(self, height: int, width: int, patch_batch: int | None = None) -> list[Tile]:
        p = self.patch_size
        return plan_tiles(height // p, width // p, patch_batch or self.config.patch_batch, self.config.collage)

    def x0_from_output(self, x: torch.Tensor, sigma, out: torch.Tensor) -> torch.Tensor:
        """x0 in EDM coordinates from the net's output at x = x0 + σ n (the net saw x_vp = α x)."""
        alpha, sigma_vp = parameterization.vp_coefficients(sigma)
        return parameterization.x0_from_prediction(self.config.prediction, alpha * x, out, alpha, sigma_vp)

    # -- the window grid while sampling -------------------------------------------------------
    def grid_offset(self, sigma: float, grid_shift: str | None = None) -> tuple[int, int]:
        """(dy, dx) pixels by which the decoded window grid is moved at noise level σ.

        fixed (the paper): (0, 0) at every step, the windows sit on the canvas's own p-grid, so
        whatever small jump a step leaves at a window boundary, every later step adds to it on
        the same lines. random (this package's option): a draw in [0, p)² keyed by σ alone, so the
        whole-canvas and the tiled path and every image of a batch agree; each step's boundaries
        fall elsewhere and the following steps, whose windows straddle them, smooth them away."""
        if (grid_shift or self.config.grid_shift) == "fixed":
            return 0, 0
        bits = struct.unpack("<I", struct.pack("<f", float(sigma)))[0]
        generator = torch.Generator().manual_seed(mix_seed(_GRID_SHIFT_STREAM, bits))
        dy, dx = torch.randint(0, self.patch_size, (2,), generator=generator).tolist()
        return dy, dx

    def position_keep(self, keep: torch.Tensor, height: int, width: int, positions: str | None = None) -> torch.Tensor:
        """positions=auto: the cell coordinates while the canvas fits the training images' grid, the
        position-free branch (trained by the CFG dropout) on larger canvases, whose cells the
        position embedding never saw."""
        too_large = height > self.resolution[0] or width > self.resolution[1]
        if (positions or self.config.positions) == "auto" and too_large:
            return torch.zeros_like(keep)
        return keep

    def windows_output(self, net, x_vp: torch.Tensor, t: torch.Tensor, code, position_keep,
                       origins: list[tuple[float, float]], patch_batch: int | None = None) -> torch.Tensor:
        """The net's output (ε, v or x0) over N tiles of the p-grid, (N, C, h, w), from their VP-scaled
        inputs with a p/2 margin (collage) on every side, x_vp (N, C, h + 2m, w + 2m); origins[n] = (x, y)
        of tile n's first window in cells of the canvas's grid. Windows are decoded in groups of at most
        `patch_batch` encoder patches (bounded activation memory)."""
        predictor = self.predictor(net)
        patch_batch = patch_batch or self.config.patch_batch
        p, m, extra = self.patch_size, self.halo, 1 if self.config.collage else 0
        N, C = x_vp.shape[:2]
        h, w = x_vp.shape[-2] - 2 * m, x_vp.shape[-1] - 2 * m
        out = x_vp.new_empty(N, C, h, w)
        jobs = [(n, tile) for tile in plan_tiles(h // p, w // p, patch_batch, self.config.collage) for n in range(N)]
        for group in packed_jobs(jobs, patch_batch, extra):
            regions = torch.stack([x_vp[n, :, tile.row * p:(tile.row + tile.rows) * p + 2 * m,
                                        tile.col * p:(tile.col + tile.cols) * p + 2 * m] for n, tile in group])
            # The group's windows at their places in the canvas grid (fractional on a moved grid).
            placed = [Tile(tile.row + origins[n][1], tile.col + origins[n][0], tile.rows, tile.cols) for n, tile in group]
            index = torch.tensor([n for n, _ in group], device=x_vp.device)
            result = predictor(regions, placed, t[index], None if code is None else code[index],
                               None if position_keep is None else position_keep[index])
            for (n, tile), e in zip(group, result):
                out[n, :, tile.row * p:(tile.row + tile.rows) * p, tile.col * p:(tile.col + tile.cols) * p] = e
        return out

    @property
    def halo(self) -> int:
        """Pixels a collage window reads beyond its own p-grid cell on every side (0 without collage)."""
        return self.patch_size // 2 if self.config.collage else 0

    def output_of_canvas(self, net, x_vp: torch.Tensor, t: torch.Tensor, code, position_keep,
                         offset: tuple[int, int] = (0, 0), patch_batch: int | None = None) -> torch.Tensor:
        """The net's output (ε, v or x0) over VP-scaled canvases x_vp (B, C, H, W), with the window grid
        moved by offset = (dy, dx) pixels (`grid_offset`): the canvas mirrored by the moved grid's margins
        and padded with zeros by the collage's p/2, then `windows_output`."""
        B, C, H, W = x_vp.shape
        p, m = self.patch_size, self.halo
        dy, dx = offset
        margins = shift_margins(offset, p)
        Hv, Wv = H + margins[0] + margins[1], W + margins[2] + margins[3]  # the moved grid's canvas
        padded = torch.stack([read_region(x_vp[b], -dy - m, -dy + Hv + m, -dx - m, -dx + Wv + m, margins)
                              for b in range(B)])
        out = self.windows_output(net, padded, t, code, position_keep, [(-dx / p, -dy / p)] * B, patch_batch)
        return out[:, :, dy:dy + H, dx:dx + W]

    def tile_model(self, net, options: PatchDMSampleOptions | None = None) -> "CollageTiles":
        return CollageTiles(self, net, options)

    def default_tiling(self) -> TilingConfig:
        """Tiles meet without overlap: the collage makes neighbouring windows agree (it reads the halo), so
        blending is not needed; the grid moves each step when model.grid_shift is random."""
        return TilingConfig(overlap=(0, 0), window="uniform", grid=self.config.grid_shift)

    def denoiser(self, net, options: PatchDMSampleOptions | None = None) -> Callable:
        """D(x, σ, code=(B, K), position_keep=(B,)) -> x0 over whole canvases (EDM coordinates)."""
        schedule = self.schedule
        grid_shift, positions = self.config.grid_shift, self.setting(options, "positions")
        patch_batch = self.setting(options, "patch_batch")

        def collage_denoiser(x, sigma, code=None, position_keep=None):
            B, _, H, W = x.shape
            x = x.float()
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
            alpha, _ = parameterization.vp_coefficients(sigma)
            t = schedule.sigma_to_t(sigma)  # (B,) continuous timestep labels
            if position_keep is not None:
                position_keep = self.position_keep(position_keep, H, W, positions)
            out = self.output_of_canvas(net, x * alpha.view(B, 1, 1, 1), t, code, position_keep,
                                        self.grid_offset(float(sigma[0]), grid_shift), patch_batch)
            return self.x0_from_output(x, sigma.view(B, 1, 1, 1), out)

        return collage_denoiser

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        return self.schedule.sigmas_for_sampling(steps).float()

    def guided(self, denoiser, scale: float):
        """Classifier-free guidance, paper form ε = (1 + w) ε_c − w ε_u with scale s = 1 + w: the null
        branch zeroes the code and the position (reference)."""
        return ClassifierFreeGuidance(denoiser, scale, {"code": 0.0, "position_keep": 0.0})

    def sampling_condition(self, net, rng: SampleRNG, labels, options: PatchDMSampleOptions | None) -> dict:
        """Per-image position switch and semantic code (see `sampling_codes`)."""
        if labels is not None:
            raise ConfigError("patch_dm models are not class-conditional; they take a semantic code instead")
        positions = self.setting(options, "positions")
        cond = {"position_keep": torch.full((len(rng),), 0.0 if positions == "none" else 1.0, device=rng.device)}
        if self.config.net.code_dim > 0:
            cond["code"] = self.sampling_codes(net, rng, options)
        return cond

    def sampling_codes(self, net, rng: SampleRNG, options: PatchDMSampleOptions | None) -> torch.Tensor:
        """(B, K) codes: the given ones; else training image `code_from`'s for every canvas (style reuse);
        else new codes from the run's latent code model when it has one; else a training image's code
        drawn per image from its seed."""
        B = len(rng)
        given = None if options is None else options.codes
        if given is not None:
            codes = torch.as_tensor(given).float().reshape(-1, self.config.net.code_dim)
            return codes.expand(B, -1).to(rng.device) if len(codes) == 1 else codes.to(rng.device)
        table = self.code_table(net)
        code_from = None if options is None else options.code_from
        if code_from is not None:
            if not 0 <= code_from < len(table):
                raise ConfigError(f"--code-from {code_from}: the run has codes for images 0..{len(table) - 1}")
            return table[code_from].expand(B, -1).to(rng.device, torch.float32)
        if self.run_dir is not None and (self.latent_dir(self.run_dir) / "net.safetensors").is_file():
            from patchdiffusion.methods.patch_dm.codes import LatentCodeModel

            return LatentCodeModel.load(self.latent_dir(self.run_dir), rng.device).sample(rng).float()
        rows = rng.randint(0, len(table)).reshape(B)
        return net.lookup_codes(rows.to(table.device)).to(rng.device, torch.float32)

    # -- the latent code model -------------------------------------------------------------------
    def code_table(self, net) -> torch.Tensor:
        """The learned codes (num_images, K): what the latent code model is trained on."""
        if net.codes is None:
            raise ConfigError("this patch_dm model has no code table (model.net.code_dim = 0)")
        return net.codes.weight.detach()

    @staticmethod
    def latent_dir(run_dir: str | Path) -> Path:
        return Path(run_dir) / "codes_model"


class CollageTiles:
    """Patch-DM on tiles of a canvas: each tile's p-grid of windows is decoded by the collage from encoder
    patches that reach p/2 into the neighbouring tiles (the halo), so tiles placed side by side give
    what one whole-canvas pass gives; positions are the windows' cells in the canvas's own grid."""

    def __init__(self, method: PatchDMMethod, net, options: PatchDMSampleOptions | None):
        self.method, self.net = method, net
        self.tile, self.halo = method.native_tile, method.halo
        self.positions = method.setting(options, "positions")
        self.patch_batch = method.setting(options, "patch_batch")

    def check_tile(self, tile: tuple[int, int]) -> None:
        p = self.method.patch_size
        if tile[0] % p or tile[1] % p:
            raise ConfigError(f"Patch-DM tiles are made of whole {p}x{p} patches; the tile {tile[1]}x{tile[0]} is not")

    def __call__(self, x, sigma, boxes, code=None, position_keep=None):
        method, p, m = self.method, self.method.patch_size, self.halo
        N, _, h, w = x.shape[0], x.shape[1], x.shape[2] - 2 * m, x.shape[3] - 2 * m
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(N)
        alpha, _ = parameterization.vp_coefficients(sigma)
        t = method.schedule.sigma_to_t(sigma)  # (N,) continuous timestep labels
        if position_keep is not None:
            position_keep = torch.cat([method.position_keep(position_keep[n:n + 1], *box.canvas, self.positions)
                                       for n, box in enumerate(boxes)])
        origins = [(box.left / p, box.top / p) for box in boxes]
        out = method.windows_output(self.net, x * alpha.view(N, 1, 1, 1), t, code, position_keep, origins,
                                    self.patch_batch)
        return method.x0_from_output(x[:, :, m:m + h, m:m + w], sigma.view(N, 1, 1, 1), out)


METHOD = PatchDMMethod

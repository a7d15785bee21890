"""Patch-DM (Ding, Zhang, Wu, Tu, ICLR 2024, arXiv 2308.01316): feature collage + global semantic codes.

A model that only sees p×p patches (p = 64 in the paper) generates canvases of any size that are a
multiple of p, without seams, in one coherent style:

  * the network is the collage U-Net (`nets/collage.py`): encoder per patch, decoder on windows
    shifted by p/2 whose features (bottleneck and skips) are collaged from four neighbours;
  * every training image owns a learnable semantic code (a row of `net.codes`), initialised from
    its CLIP image embedding (`patchdiffusion/codes.py`) and injected into every ResBlock; the
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

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from patchdiffusion.config import ConfigError
from patchdiffusion.diffusion.guidance import ClassifierFreeGuidance
from patchdiffusion.diffusion.precond import vp_coefficients
from patchdiffusion.methods.base import Method, discrete_schedule
from patchdiffusion.nets.collage import CollageUNet, CollageUNetConfig, cut_grid, join_grid
from patchdiffusion.rng import SampleRNG, mix_seed
from patchdiffusion.codes import LatentCodeConfig


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
    #                                      random (the window grid moves by a random offset every step; see grid_shift)
    latent: LatentCodeConfig = field(default_factory=LatentCodeConfig)  # the latent code model (train-codes)


@dataclass(frozen=True)
class Tile:
    """A block of output patches of a canvas: rows [row, row + rows) × cols [col, col + cols) of its p-grid."""

    row: int
    col: int
    rows: int
    cols: int


_GRID_SHIFT_STREAM = 13  # rng stream of the random window-grid offsets


def shift_margins(offset: tuple[int, int], p: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) mirrored pixels that make a canvas moved by offset = (dy, dx) a
    multiple of p again: dy above and p − dy below (none on an axis that is not moved)."""
    dy, dx = offset
    return dy, (p - dy) if dy else 0, dx, (p - dx) if dx else 0


def tile_shape(ny: int, nx: int, patch_batch: int, extra: int) -> tuple[int, int]:
    """(a, b) windows per tile such that (a + extra)·(b + extra) encoder patches ≤ patch_batch, as square as fits."""
    if patch_batch < (1 + extra) ** 2:
        raise ConfigError(f"patch_batch must be at least {(1 + extra) ** 2}, got {patch_batch}")
    a = min(ny, max(1, math.isqrt(patch_batch) - extra))
    b = min(nx, max(1, patch_batch // (a + extra) - extra))
    if b == nx:  # a narrow canvas: give the spare budget to the rows
        a = min(ny, max(1, patch_batch // (b + extra) - extra))
    return a, b


def plan_tiles(ny: int, nx: int, patch_batch: int, collage: bool = True) -> list[Tile]:
    """Tiles covering an ny×nx patch grid, row-major; each needs at most patch_batch encoder patches."""
    a, b = tile_shape(ny, nx, patch_batch, 1 if collage else 0)
    return [Tile(r, c, min(a, ny - r), min(b, nx - c)) for r in range(0, ny, a) for c in range(0, nx, b)]


def _axis_index(start: int, stop: int, n: int, mirror_before: int, mirror_after: int):
    """Source indices for positions start..stop-1 of an axis of length n, mirrored up to
    `mirror_before`/`mirror_after` pixels beyond its ends, and the mask of positions inside that span."""
    i = torch.arange(start, stop)
    inside = (i >= -mirror_before) & (i < n + mirror_after)
    i = torch.where(i < 0, -i, i)
    i = torch.where(i >= n, 2 * (n - 1) - i, i)
    return i.clamp(0, n - 1), inside


def read_region(canvas, top: int, bottom: int, left: int, right: int,
                mirror: tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
    """canvas[..., top:bottom, left:right]; outside the canvas a mirror image of it up to `mirror` =
    (top, bottom, left, right) pixels beyond each edge (a shifted window grid, `grid_shift`), zeros
    further out (the collage's p/2 pad).

    canvas: a torch tensor or a numpy array / memmap (C, H, W); returns a tensor (C, bottom−top, right−left)."""
    C, H, W = canvas.shape[-3:]
    m_top, m_bottom, m_left, m_right = mirror
    if not any(mirror) or (top >= 0 and bottom <= H and left >= 0 and right <= W):
        y0, y1, x0, x1 = max(top, 0), min(bottom, H), max(left, 0), min(right, W)
        inside = canvas[..., y0:y1, x0:x1]
        inside = inside if isinstance(inside, torch.Tensor) else torch.from_numpy(inside.copy())
        return F.pad(inside, (x0 - left, right - x1, y0 - top, bottom - y1))
    rows, rows_in = _axis_index(top, bottom, H, m_top, m_bottom)
    cols, cols_in = _axis_index(left, right, W, m_left, m_right)
    r0, c0 = int(rows.min()), int(cols.min())
    block = canvas[..., r0:int(rows.max()) + 1, c0:int(cols.max()) + 1]  # a slice: a memmap reads only this
    block = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(block))
    region = block[..., (rows - r0).to(block.device), :][..., (cols - c0).to(block.device)]
    keep = (rows_in[:, None] & cols_in[None, :]).to(region.device, region.dtype)
    return region * keep


class PatchPredictor:
    """The net's output (ε, or v / x0) over tiles of canvases from the collage net: the one piece both sampling paths share.

    A call gets the VP-scaled input regions of J tiles of one shape (each with its p/2 margin when
    collaging) and returns ε over the tiles' own pixels, (J, C, rows·p, cols·p)."""

    def __init__(self, net: CollageUNet, patch_size: int, collage: bool):
        self.net, self.p, self.collage = net, patch_size, collage

    def input_box(self, tile: Tile) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) canvas pixels the tile's encoder patches cover."""
        p, m = self.p, (self.p // 2 if self.collage else 0)
        return (tile.row * p - m, (tile.row + tile.rows) * p + m, tile.col * p - m, (tile.col + tile.cols) * p + m)

    def __call__(self, regions: torch.Tensor, tiles: list[Tile], t: torch.Tensor, code: torch.Tensor | None,
                 position_keep: torch.Tensor | None, offset: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
        """offset: (x, y) of the tiles' grid in cells of the canvas's own grid (−shift/p on a shifted grid)."""
        extra = 1 if self.collage else 0
        rows, cols = tiles[0].rows + extra, tiles[0].cols + extra  # encoder grid of each tile
        patches = cut_grid(regions, rows, cols)  # (J·rows·cols, C, p, p)
        dev = regions.device
        ys = torch.arange(rows, device=dev, dtype=torch.float32)
        xs = torch.arange(cols, device=dev, dtype=torch.float32)
        origin = torch.tensor([[tile.col + offset[0], tile.row + offset[1]] for tile in tiles], device=dev,
                              dtype=torch.float32)  # (J, 2)
        local = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, rows * cols, 2)  # (1, rc, 2) (x, y)
        positions = (origin[:, None, :] + local).reshape(-1, 2)  # grid cells of the padded (or plain) canvas grid

        def per_patch(v):
            return None if v is None else v.repeat_interleave(rows * cols, dim=0)

        eps = self.net(
            patches, per_patch(t), positions, (rows, cols), code=per_patch(code),
            position_keep=per_patch(position_keep), mode="collage" if self.collage else "plain",
        )  # (J·tile.rows·tile.cols, C, p, p)
        return join_grid(eps, tiles[0].rows, tiles[0].cols)  # (J, C, rows·p, cols·p)


def packed_jobs(jobs: list[tuple[int, Tile]], patch_batch: int, extra: int) -> Iterator[list[tuple[int, Tile]]]:
    """Group (image, tile) jobs of one tile shape into calls of at most patch_batch encoder patches."""
    group: list[tuple[int, Tile]] = []
    for job in jobs:
        tile = job[1]
        size = (tile.rows + extra) * (tile.cols + extra)
        other_shape = group and (group[0][1].rows, group[0][1].cols) != (tile.rows, tile.cols)
        if group and (other_shape or (len(group) + 1) * size > patch_batch):
            yield group
            group = []
        group.append(job)
    if group:
        yield group


class PatchDMMethod(Method):
    name = "patch_dm"
    Config = PatchDMConfig
    default_sampler = "ddim"
    default_steps = 50
    clip_denoised = True
    needs_image_index = True  # the loss looks up each image's code by its data set index

    def __init__(self, config, resolution, image_channels=3):
        super().__init__(config, resolution, image_channels)
        self.schedule = discrete_schedule(config)
        self._initial_codes: torch.Tensor | None = None

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
                f"canvas {width}x{height} is not a multiple of the patch size {p}; "
                f"use e.g. {max(p, round(width / p) * p)}x{max(p, round(height / p) * p)}"
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
            from patchdiffusion.codes import load_codes

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

    def loss(self, net, images, labels, rng: SampleRNG, image_index: torch.Tensor | None = None) -> torch.Tensor:
        cfg, p = self.config, self.patch_size
        B, C, H, W = images.shape
        ny, nx = H // p, W // p
        dev = images.device
        code_index = None
        if cfg.net.code_dim > 0:
            if image_index is None:
                raise ConfigError("patch_dm's loss needs the images' data set indices (image_index) for their codes")
            code_index = image_index.to(dev)
        # One timestep per image, shared by its patches (reference).
        t = rng.randint(0, self.schedule.num_timesteps).reshape(B).cpu()
        alpha_bar = self.schedule.alphas_cumprod[t].to(device=dev, dtype=images.dtype).view(B, 1, 1, 1)
        m = p // 2 if cfg.collage else 0
        # Pad by p/2 (collage) and noise; the mask keeps the pad at exactly 0.
        x0 = F.pad(images, (m, m, m, m))  # (B, C, H + 2m, W + 2m)
        mask = F.pad(torch.ones_like(images[:, :1]), (m, m, m, m))  # (B, 1, H + 2m, W + 2m)
        noise = rng.randn_like(x0).to(dev)
        x_t = (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise) * mask
        target = {"eps": noise, "x0": x0,  # v = √ᾱ ε − √(1 − ᾱ) x0 (Salimans & Ho 2022)
                  "v": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0}[cfg.prediction]
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
    def predictor(self, net) -> PatchPredictor:
        return PatchPredictor(net, self.patch_size, self.config.collage)

    def tiles(self, height: int, width: int) -> list[Tile]:
        p = self.patch_size
        return plan_tiles(height // p, width // p, self.config.patch_batch, self.config.collage)

    def x0_from_output(self, x: torch.Tensor, sigma, out: torch.Tensor) -> torch.Tensor:
        """x0 in EDM coordinates from the net's output at x = x0 + σ n (x_vp = α x, σ_vp = α σ, α = 1/√(1+σ²))."""
        pred = self.config.prediction
        if pred == "eps":
            return x - sigma * out  # x0 = (x_vp − σ_vp ε)/α
        alpha = 1 / (1 + sigma**2) ** 0.5
        if pred == "v":
            return alpha**2 * x - alpha * sigma * out  # x0 = α x_vp − σ_vp v
        return out

    # -- the window grid while sampling -------------------------------------------------------
    def grid_offset(self, sigma: float) -> tuple[int, int]:
        """(dy, dx) pixels by which the decoded window grid is moved at noise level σ.

        fixed (the paper): (0, 0) at every step, the windows sit on the canvas's own p-grid, so
        whatever small jump a step leaves at a window boundary, every later step adds to it on
        the same lines. random (this package's option): a draw in [0, p)² keyed by σ alone, so the
        whole-canvas and the tiled path and every image of a batch agree; each step's boundaries
        fall elsewhere and the following steps, whose windows straddle them, smooth them away."""
        if self.config.grid_shift == "fixed":
            return 0, 0
        bits = struct.unpack("<I", struct.pack("<f", float(sigma)))[0]
        generator = torch.Generator().manual_seed(mix_seed(_GRID_SHIFT_STREAM, bits))
        dy, dx = torch.randint(0, self.patch_size, (2,), generator=generator).tolist()
        return dy, dx

    def position_keep(self, keep: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """positions=auto: the cell coordinates while the canvas fits the training images' grid, the
        position-free branch (trained by the CFG dropout) on larger canvases, whose cells the
        position embedding never saw."""
        if self.config.positions == "auto" and (height > self.resolution[0] or width > self.resolution[1]):
            return torch.zeros_like(keep)
        return keep

    def output_of_canvas(self, net, x_vp: torch.Tensor, t: torch.Tensor, code, position_keep,
                         offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """The net's output (ε, v or x0) over VP-scaled canvases x_vp (B, C, H, W), tile by tile (bounded
        activation memory), with the window grid moved by offset = (dy, dx) pixels (`grid_offset`)."""
        predictor = self.predictor(net)
        B, C, H, W = x_vp.shape
        p, extra = self.patch_size, 1 if self.config.collage else 0
        dy, dx = offset
        margins = shift_margins(offset, p)
        Hv, Wv = H + margins[0] + margins[1], W + margins[2] + margins[3]  # the moved grid's canvas
        out = x_vp.new_empty(B, C, Hv, Wv)
        jobs = [(b, tile) for tile in self.tiles(Hv, Wv) for b in range(B)]
        for group in packed_jobs(jobs, self.config.patch_batch, extra):
            regions = []
            for b, tile in group:
                top, bottom, left, right = predictor.input_box(tile)
                regions.append(read_region(x_vp[b], top - dy, bottom - dy, left - dx, right - dx, margins))
            index = torch.tensor([b for b, _ in group], device=x_vp.device)
            result = predictor(torch.stack(regions), [tile for _, tile in group], t[index],
                               None if code is None else code[index],
                               None if position_keep is None else position_keep[index], offset=(-dx / p, -dy / p))
            for (b, tile), e in zip(group, result):
                out[b, :, tile.row * p:(tile.row + tile.rows) * p, tile.col * p:(tile.col + tile.cols) * p] = e
        return out[:, :, dy:dy + H, dx:dx + W]

    def denoiser(self, net) -> Callable:
        """D(x, σ, code=(B, K), position_keep=(B,)) -> x0 over whole canvases (EDM coordinates)."""
        schedule = self.schedule

        def collage_denoiser(x, sigma, code=None, position_keep=None):
            B, _, H, W = x.shape
            x = x.float()
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
            alpha, _ = vp_coefficients(sigma)
            t = schedule.sigma_to_t(sigma)  # (B,) continuous timestep labels
            if position_keep is not None:
                position_keep = self.position_keep(position_keep, H, W)
            out = self.output_of_canvas(net, x * alpha.view(B, 1, 1, 1), t, code, position_keep,
                                        self.grid_offset(float(sigma[0])))
            return self.x0_from_output(x, sigma.view(B, 1, 1, 1), out)

        return collage_denoiser

    def sampling_sigmas(self, steps: int) -> torch.Tensor:
        return self.schedule.sigmas_for_sampling(steps).float()

    def guided(self, denoiser, scale: float):
        """Classifier-free guidance, paper form ε = (1 + w) ε_c − w ε_u with scale s = 1 + w: the null
        branch zeroes the code and the position (reference)."""
        return ClassifierFreeGuidance(denoiser, scale, {"code": 0.0, "position_keep": 0.0})

    def condition(self, net, batch: int, device, codes: torch.Tensor | None = None,
                  code_index: torch.Tensor | None = None, rng: SampleRNG | None = None) -> dict:
        """Per-image sampling condition: given codes, or table rows (given, or drawn from rng per image)."""
        cfg = self.config
        keep = torch.full((batch,), 0.0 if cfg.positions == "none" else 1.0, device=device)
        cond = {"position_keep": keep}
        if cfg.net.code_dim > 0:
            if codes is None:
                if code_index is None:
                    if rng is None or net.codes is None:
                        raise ConfigError("sampling patch_dm needs codes (from the latent code model or the table)")
                    code_index = rng.randint(0, net.codes.num_embeddings).reshape(batch)
                codes = net.lookup_codes(code_index.to(device))
            cond["code"] = codes.to(device=device, dtype=torch.float32)
        return cond

    def sample(self, net, rng: SampleRNG, *args, codes=None, code_index=None, **kwargs) -> torch.Tensor:
        """Whole canvases with any sampler (canvases in memory on rng.device; see `tiling.py` for
        memory-bounded canvases). Codes: `codes` (B, K), else table rows `code_index`, else a table row
        drawn per image from its seed."""
        cond = self.condition(net, len(rng), rng.device, codes, code_index, rng)
        return super().sample(net, rng, *args, cond=cond, **kwargs)

    # -- the latent code model -------------------------------------------------------------------
    def code_table(self, net) -> torch.Tensor:
        """The learned codes (num_images, K): what the latent code model is trained on."""
        if net.codes is None:
            raise ConfigError("this patch_dm model has no code table (model.net.code_dim = 0)")
        return net.codes.weight.detach()

    @staticmethod
    def latent_dir(run_dir: str | Path) -> Path:
        return Path(run_dir) / "codes_model"


METHOD = PatchDMMethod

"""Patch-DM's collage tiles: blocks of output patches of a canvas, the pixels each needs, and the
collage net's output over a batch of tiles (see `method.py` for how sampling uses them).

A tile of a×b output windows reads (a+1)×(b+1) encoder patches (collage: a p/2 margin on every
side); encoder patches on tile borders are computed again by the neighbouring tile, which gives
the same numbers since each patch is encoded on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from patchdiffusion.errors import ConfigError
from patchdiffusion.nets.collage import CollageUNet, cut_grid, join_grid


@dataclass(frozen=True)
class Tile:
    """A block of output patches of a canvas: rows [row, row + rows) × cols [col, col + cols) of its p-grid."""

    row: int
    col: int
    rows: int
    cols: int


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

"""Seam score: how visible the tile boundaries of images assembled from patches are.

Patch methods (a fixed N x N grid, collaged or tiled sampling) put images together from tiles of
a known size; a seam shows as a jump in intensity exactly where two tiles meet. The score is the
mean absolute step between neighbouring pixels *across* a tile boundary divided by the same mean
over neighbouring pixels *inside* the tiles, right beside the boundary:

    d(p, q) = (1/C) sum_c |I_c(p) - I_c(q)|     neighbour pairs, pixel values on the 0..255 scale
    a pair (x, x+1) along an axis with tile side t and first boundary at offset o lies at
    r = (x + 1 - o) mod t from the grid:
        B = pairs with r = 0                    (the two pixels are in different tiles)
        I = pairs with 0 < min(r, t - r) <= 2   (inside a tile, within two pairs of a boundary)
    seam = mean_B d / mean_I d                  (pooled over both axes and all images of the set)

Comparing each boundary with the pixels beside it, rather than with whole tiles, keeps the score
at 1.0 when content is not spread evenly over the image (photos have more detail in the middle,
where a 2x2 grid puts its boundaries); for an image that does not know where the grid lies (a
natural photo, a seamless sample) the score is 1.0 up to sampling noise. A visible seam makes it
larger: 1.5 means pixel steps across boundaries are 50% larger than those beside them. Only pairs
the grid cuts count as boundaries, so an image edge is never mistaken for a seam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import EvalError


@dataclass(frozen=True)
class SeamScore:
    score: float  # mean step across tile boundaries / mean step inside tiles (1.0 = seamless)
    boundary_step: float  # mean |difference| (0..255 scale) across boundaries
    interior_step: float  # mean |difference| (0..255 scale) inside tiles, beside the boundaries
    tile: tuple[int, int]  # (th, tw)
    num_images: int


REFERENCE_BAND = 2  # interior pairs compared with a boundary: up to this many pairs away from it
SEAM_PROTOCOL = "mean |pixel step| across tile boundaries / the same within 2 pixels beside them (1.0 = seamless)"


def pair_classes(
    length: int, tile: int, offset: int = 0, band: int = REFERENCE_BAND
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks over the length-1 neighbour pairs (i, i+1) of an axis: (across a boundary, beside one)."""
    remainder = (torch.arange(1, length) - offset) % tile
    across = remainder == 0
    beside = ~across & (torch.minimum(remainder, tile - remainder) <= band)
    return across, beside


class SeamAccumulator:
    """Sums boundary and interior neighbour differences over batches of images (uint8 or 0..255 floats)."""

    def __init__(self, tile: tuple[int, int], offset: tuple[int, int] = (0, 0)):
        if min(tile) < 2:
            raise EvalError(f"seam score needs tiles of at least 2x2 pixels, got {tile} (h, w)")
        self.tile, self.offset = tile, offset
        self.boundary_sum = self.interior_sum = 0.0
        self.boundary_count = self.interior_count = 0
        self.num_images = 0

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        """Add (B, C, H, W) images on the 0..255 scale."""
        x = images.double()
        height, width = x.shape[2], x.shape[3]
        if height <= self.tile[0] and width <= self.tile[1]:
            raise EvalError(f"seam score: images of {height}x{width} hold a single {self.tile[0]}x{self.tile[1]} tile")
        steps_x = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=1)  # (B, H, W-1)
        steps_y = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=1)  # (B, H-1, W)
        across_x, beside_x = pair_classes(width, self.tile[1], self.offset[1])  # (W-1,) each
        across_y, beside_y = pair_classes(height, self.tile[0], self.offset[0])  # (H-1,) each
        self._add(steps_x[:, :, across_x], steps_x[:, :, beside_x])
        self._add(steps_y[:, across_y, :], steps_y[:, beside_y, :])
        self.num_images += len(images)

    def _add(self, boundary_steps: torch.Tensor, interior_steps: torch.Tensor) -> None:
        self.boundary_sum += float(boundary_steps.sum())
        self.boundary_count += boundary_steps.numel()
        self.interior_sum += float(interior_steps.sum())
        self.interior_count += interior_steps.numel()

    def result(self) -> SeamScore:
        if self.boundary_count == 0 or self.interior_count == 0:
            raise EvalError("seam score: no tile boundary (or no tile interior) falls inside these images")
        boundary = self.boundary_sum / self.boundary_count
        interior = self.interior_sum / self.interior_count
        score = boundary / interior if interior > 0 else (1.0 if boundary == 0 else float("inf"))
        return SeamScore(score, boundary, interior, self.tile, self.num_images)


def seam_score(images: torch.Tensor, tile: int | tuple[int, int], offset: tuple[int, int] = (0, 0)) -> SeamScore:
    """Seam score of (N, C, H, W) images (uint8 or 0..255) assembled from tiles of `tile` (th, tw) pixels."""
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    accumulator = SeamAccumulator(tile, offset)
    accumulator.add(images)
    return accumulator.result()


@dataclass(frozen=True)
class SeamProfile:
    """Seam scores of tiled images at one tile period, on the grid's own lines and at every offset."""

    period: tuple[int, int]  # (th, tw): the tile stride the images were made with
    at_grid: float  # score on the lines of an unmoved grid (offset 0)
    worst: float  # the largest score over all offsets of the period
    worst_offset: tuple[int, int]
    mean: float  # the mean over the offsets

    def as_dict(self) -> dict:
        return {"period": list(self.period), "at_grid": self.at_grid, "worst": self.worst,
                "worst_offset": list(self.worst_offset), "mean": self.mean}


def seam_profile(images: torch.Tensor, period: int | tuple[int, int], step: int = 1) -> SeamProfile:
    """Seam scores of (N, C, H, W) images (uint8 or 0..255) at tile period `period` for every offset
    (every `step` pixels): a fixed tile grid leaves its seams at offset 0; a grid that moves each
    sampling step has no lines of its own, so the worst offset is the fair figure to compare; natural
    images give about 1 at every offset."""
    period = (period, period) if isinstance(period, int) else tuple(period)
    scores = {}
    for dy in range(0, period[0], step):
        for dx in range(0, period[1], step):
            scores[(dy, dx)] = seam_score(images, period, offset=(dy, dx)).score
    worst = max(scores, key=scores.get)
    return SeamProfile(period, scores[(0, 0)], scores[worst], worst, sum(scores.values()) / len(scores))

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
WRAP_PROTOCOL = ("the seam score of the line across each image's wrap edge (last row/column against the first), "
                 "pooled over the images, beside 200 lines at random places pooled the same way (5th-95th percentile)")


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
    images give about 1 at every offset.

    The same numbers as `seam_score` at each offset, computed from the neighbour steps summed per
    column (horizontal pairs) and per row (vertical pairs) once: whether a pair is across or beside a
    boundary depends only on its column or row, so every offset costs O(H + W) instead of a pass over
    the pixels (a 1024² image at period 24: well under a second instead of minutes)."""
    period = (period, period) if isinstance(period, int) else tuple(period)
    if min(period) < 2:
        raise EvalError(f"seam score needs tiles of at least 2x2 pixels, got {period} (h, w)")
    x = images.double()
    count, height, width = x.shape[0], x.shape[2], x.shape[3]
    if height <= period[0] and width <= period[1]:
        raise EvalError(f"seam score: images of {height}x{width} hold a single {period[0]}x{period[1]} tile")
    columns = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean(dim=1).sum(dim=(0, 1))  # (W-1,) horizontal pairs
    rows = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean(dim=1).sum(dim=(0, 2))  # (H-1,) vertical pairs
    scores = {}
    for dy in range(0, period[0], step):
        across_y, beside_y = pair_classes(height, period[0], dy)
        for dx in range(0, period[1], step):
            across_x, beside_x = pair_classes(width, period[1], dx)
            boundary_count = int(across_x.sum()) * count * height + int(across_y.sum()) * count * width
            interior_count = int(beside_x.sum()) * count * height + int(beside_y.sum()) * count * width
            if boundary_count == 0 or interior_count == 0:
                raise EvalError("seam score: no tile boundary (or no tile interior) falls inside these images")
            boundary = float(columns[across_x].sum() + rows[across_y].sum()) / boundary_count
            interior = float(columns[beside_x].sum() + rows[beside_y].sum()) / interior_count
            scores[(dy, dx)] = boundary / interior if interior > 0 else (1.0 if boundary == 0 else float("inf"))
    worst = max(scores, key=scores.get)
    return SeamProfile(period, scores[(0, 0)], scores[worst], worst, sum(scores.values()) / len(scores))


class WrapSeamAccumulator:
    """Sums of neighbour steps per column and per row of images meant to tile with themselves, the
    pairs across the wrap edge included (column W−1 with column 0, row H−1 with row 0): from them, the
    seam score of any one line, the wrap edge or a line elsewhere, in O(H + W).

    The score of the line between rows at[0] − 1 and at[0] and columns at[1] − 1 and at[1] is the one
    `seam_score` gives the images rolled so that line comes to the middle, with a tile of half the image
    (one boundary per axis; the wrap edge: at = (0, 0))."""

    def __init__(self):
        self.size: tuple[int, int] | None = None
        self.columns = self.rows = None
        self.num_images = 0

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        """Add (B, C, H, W) images on the 0..255 scale, all of one size."""
        x = images.double()
        height, width = x.shape[2], x.shape[3]
        if height < 4 or width < 4:
            raise EvalError(f"seam score across a line: images of {height}x{width} are too small")
        if self.size is None:
            self.size = (height, width)
            self.columns, self.rows = torch.zeros(width, dtype=torch.float64), torch.zeros(height, dtype=torch.float64)
        elif self.size != (height, width):
            raise EvalError(f"the wrap seam needs images of one size: {self.size[1]}x{self.size[0]} and {width}x{height}")
        self.columns += (x.roll(-1, dims=3) - x).abs().mean(dim=1).sum(dim=(0, 1)).cpu()  # pair (c, c+1 mod W)
        self.rows += (x.roll(-1, dims=2) - x).abs().mean(dim=1).sum(dim=(0, 2)).cpu()  # pair (r, r+1 mod H)
        self.num_images += len(x)

    def line(self, at: tuple[int, int] = (0, 0)) -> SeamScore:
        if self.size is None:
            raise EvalError("seam score across a line: no images")
        height, width = self.size
        sums, counts = [0.0, 0.0], [0, 0]
        for steps, length, place, other in ((self.rows, height, at[0], width), (self.columns, width, at[1], height)):
            across, beside = pair_classes(length, length // 2)  # the rolled image's pairs (i, i+1), i < length-1
            original = (torch.arange(length - 1) - (length // 2 - place)) % length  # the same pairs unrolled
            for k, mask in enumerate((across, beside)):
                sums[k] += float(steps[original[mask]].sum())
                counts[k] += int(mask.sum()) * self.num_images * other
        boundary, interior = sums[0] / counts[0], sums[1] / counts[1]
        score = boundary / interior if interior > 0 else (1.0 if boundary == 0 else float("inf"))
        return SeamScore(score, boundary, interior, (height // 2, width // 2), self.num_images)

    def elsewhere(self, draws: int = 200, seed: int = 0) -> list[float]:
        """Scores of `draws` lines at random places (one place for all the images), sorted."""
        height, width = self.size
        generator = torch.Generator().manual_seed(seed)
        places = torch.stack([torch.randint(1, height, (draws,), generator=generator),
                              torch.randint(1, width, (draws,), generator=generator)], 1).tolist()
        return sorted(self.line((r, c)).score for r, c in places)

    def summary(self, draws: int = 200, seed: int = 0, per_image: tuple[float, ...] = ()) -> "WrapSeam":
        """The wrap edge's score beside the median and 5th–95th percentile of `elsewhere`."""
        elsewhere = self.elsewhere(draws, seed)
        return WrapSeam(self.line().score, per_image, _percentile(elsewhere, 0.5), _percentile(elsewhere, 0.05),
                        _percentile(elsewhere, 0.95))


def line_seam(images: torch.Tensor, at: tuple[int, int]) -> SeamScore:
    """Seam score of one horizontal and one vertical line per image, the one between rows at[0] − 1 and
    at[0] and the one between columns at[1] − 1 and at[1], counted as if the images wrapped around their
    edges (at = (0, 0): the line across the wrap edge itself)."""
    accumulator = WrapSeamAccumulator()
    accumulator.add(images)
    return accumulator.line(at)


@dataclass(frozen=True)
class WrapSeam:
    """Seam score across the wrap edge of images meant to tile with themselves, beside the same score
    of lines elsewhere in them (what a seamless edge scores, with the noise of so few pixel pairs)."""

    score: float  # across the wrap edge, pooled over the images
    per_image: tuple[float, ...]  # across the wrap edge, each image alone
    elsewhere_median: float  # lines at random places, pooled over the images in the same way
    elsewhere_low: float  # 5th percentile
    elsewhere_high: float  # 95th percentile

    def as_dict(self) -> dict:
        return {"score": self.score, "per_image": list(self.per_image), "elsewhere_median": self.elsewhere_median,
                "elsewhere_5_95": [self.elsewhere_low, self.elsewhere_high]}


def _percentile(values: list[float], q: float) -> float:
    """The q-quantile of sorted values (nearest rank)."""
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def wrap_seam(images: torch.Tensor, draws: int = 200, seed: int = 0) -> WrapSeam:
    """Seam score across the wrap edge of (N, C, H, W) images (uint8 or 0..255), pooled over the N images,
    and the 5th–95th percentile of `draws` lines at random places of the same images (one place for all N,
    pooled the same way). One line of one image is a few hundred pixel pairs: on seamless images its score
    spreads by several percent either side of 1, so the edge's score means something beside that spread."""
    pooled = WrapSeamAccumulator()
    pooled.add(images)
    return pooled.summary(draws, seed, per_image=tuple(line_seam(images[i:i + 1], (0, 0)).score
                                                        for i in range(len(images))))

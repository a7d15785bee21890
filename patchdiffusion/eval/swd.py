"""Sliced Wasserstein distance between Laplacian-pyramid patches (Karras et al. 2018, "Progressive
Growing of GANs", sec. 5.1 and appendix D).

For every image of a set:
  1. build a Laplacian pyramid from the full resolution down to 16x16 (5-tap binomial filter
     [1, 4, 6, 4, 1] / 16, mirror borders; the last level is the 16x16 low-pass image itself);
  2. cut `patches_per_image` (128) random 7x7 neighbourhoods from every level: 7 x 7 x 3 = 147-d
     descriptors.
Per level, each set's descriptors are normalised by that set's own per-channel mean and standard
deviation (as ProGAN does: SWD then compares the *structure* of patches, not global colour). The
distance between the two sets of descriptors is the sliced Wasserstein-1 distance: project both
onto `directions` (512, in 4 draws of 128) random unit vectors, sort each projection, and average
|sorted_a - sorted_b|. It is reported x 10^3, one number per level (finest first) and their mean,
as in the paper's tables.

Patch positions and projection directions come from `seed`; positions depend only on (seed, level,
image index), so a set compared with itself gives exactly 0 and results do not depend on batching.
Descriptors are kept as float16 (their values are Laplacian pixel differences in -255..255, where
float16 keeps ~3 significant digits, far below SWD's sampling noise) to halve memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EvalError

MIN_LEVEL_SIDE = 16  # coarsest pyramid level (ProGAN: 16x16)
PATCH_SIDE = 7  # descriptor neighbourhood (7x7)
DEFAULT_PATCHES_PER_IMAGE = 128
DEFAULT_DIRECTIONS = 512  # total projection directions
DIRECTIONS_PER_DRAW = 128  # directions drawn (and sorted) at a time, which bounds memory
REPORT_SCALE = 1e3  # SWD values are reported x 10^3

_BINOMIAL_TAPS = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def _blur_axis(x: torch.Tensor, dim: int, gain: float) -> torch.Tensor:
    """5-tap binomial filter along one axis, mirror borders (as scipy.ndimage's 'mirror' mode)."""
    length = x.shape[dim]
    padded = torch.cat([x.narrow(dim, 1, 2).flip(dim), x, x.narrow(dim, length - 3, 2).flip(dim)], dim=dim)
    # Shifted slices instead of a depthwise conv: the same sums, several times faster on CPU.
    return sum((gain * tap) * padded.narrow(dim, shift, length) for shift, tap in enumerate(_BINOMIAL_TAPS))


def _blur(images: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Separable 5x5 binomial filter [1, 4, 6, 4, 1] / 16 with mirror borders: (B, C, H, W) -> same."""
    return _blur_axis(_blur_axis(images, 3, gain), 2, gain)


def pyramid_down(images: torch.Tensor) -> torch.Tensor:
    """Blur, then keep every second row and column (Burt & Adelson 1983 REDUCE)."""
    return _blur(images)[:, :, ::2, ::2]


def pyramid_up(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Insert zeros between pixels, then blur with gain 2 per axis (4 overall) to keep brightness (EXPAND)."""
    batch, channels, height, width = images.shape
    spread = images.new_zeros(batch, channels, size[0], size[1])
    spread[:, :, ::2, ::2] = images
    return _blur(spread, gain=2.0)


def pyramid_sides(height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of every level: halve (rounding up) while the shorter side stays >= 16."""
    sides = []
    while min(height, width) >= MIN_LEVEL_SIDE:
        sides.append((height, width))
        height, width = (height + 1) // 2, (width + 1) // 2
    return sides


def laplacian_pyramid(images: torch.Tensor) -> list[torch.Tensor]:
    """Band-pass levels of (B, C, H, W) float images, finest first; the last level is the low-pass image."""
    sides = pyramid_sides(images.shape[2], images.shape[3])
    if not sides:
        raise EvalError(f"SWD needs images of at least {MIN_LEVEL_SIDE}x{MIN_LEVEL_SIDE}, got {tuple(images.shape[2:])}")
    gaussians = [images]
    for _ in sides[1:]:
        gaussians.append(pyramid_down(gaussians[-1]))
    levels = [fine - pyramid_up(coarse, fine.shape[2:]) for fine, coarse in zip(gaussians, gaussians[1:])]
    return levels + [gaussians[-1]]


def patch_positions(seed: int, level: int, image_indices: torch.Tensor, patches_per_image: int,
                    height: int, width: int) -> torch.Tensor:
    """Top-left corners (len(indices), P, 2) of 7x7 patches, from (seed, level, image index) alone."""
    corners = np.empty((len(image_indices), patches_per_image, 2), dtype=np.int64)
    for row, index in enumerate(image_indices.tolist()):
        rng = np.random.default_rng([seed, level, index])
        corners[row, :, 0] = rng.integers(0, height - PATCH_SIDE + 1, patches_per_image)
        corners[row, :, 1] = rng.integers(0, width - PATCH_SIDE + 1, patches_per_image)
    return torch.from_numpy(corners)


def extract_patches(level: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """7x7 neighbourhoods of (B, C, H, W) at corners (B, P, 2) -> (B * P, C * 49) descriptors."""
    batch, channels, height, width = level.shape
    offsets = torch.arange(PATCH_SIDE, device=level.device)
    rows = (corners[:, :, 0, None] + offsets).to(level.device)  # (B, P, 7)
    cols = (corners[:, :, 1, None] + offsets).to(level.device)  # (B, P, 7)
    flat = rows[:, :, :, None] * width + cols[:, :, None, :]  # (B, P, 7, 7) indices into H*W
    pixels = level.flatten(2)  # (B, C, H*W)
    gathered = pixels.gather(2, flat.flatten(1)[:, None, :].expand(-1, channels, -1))  # (B, C, P*49)
    gathered = gathered.view(batch, channels, -1, PATCH_SIDE * PATCH_SIDE).permute(0, 2, 1, 3)
    return gathered.reshape(-1, channels * PATCH_SIDE * PATCH_SIDE)  # (B*P, C*49)


class SWDDescriptors:
    """Collects the patch descriptors of one image set, batch by batch.

        collector = SWDDescriptors(seed=0)
        for batch in batches:             # uint8 (B, 3, H, W), every image the same size
            collector.add(batch)
        descriptors = collector.levels()   # one (N * P, 147) float16 tensor per level, finest first
    """

    def __init__(self, seed: int = 0, patches_per_image: int = DEFAULT_PATCHES_PER_IMAGE):
        self.seed = seed
        self.patches_per_image = patches_per_image
        self.image_size: tuple[int, int] | None = None  # (H, W)
        self.num_images = 0
        self._levels: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        """Add a batch of (B, 3, H, W) images (uint8, or float in any fixed range)."""
        size = (images.shape[2], images.shape[3])
        if self.image_size is None:
            self.image_size = size
            self._levels = [[] for _ in pyramid_sides(*size)]
        elif size != self.image_size:
            raise EvalError(f"SWD needs images of one size; got {size} after {self.image_size}")
        indices = torch.arange(self.num_images, self.num_images + len(images))
        for level_index, level in enumerate(laplacian_pyramid(images.float())):
            corners = patch_positions(self.seed, level_index, indices, self.patches_per_image, *level.shape[2:])
            self._levels[level_index].append(extract_patches(level, corners).to("cpu", torch.float16))
        self.num_images += len(images)

    def levels(self) -> list[torch.Tensor]:
        """Descriptors per level, finest first: (num_images * patches_per_image, 147) float16."""
        return [torch.cat(parts) for parts in self._levels]

    def level_sides(self) -> list[int]:
        """The shorter side of every level, finest first (the 'resolution' SWD levels are named by)."""
        return [min(side) for side in pyramid_sides(*self.image_size)] if self.image_size else []


def normalise_descriptors(descriptors: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Subtract each channel's mean and divide by its standard deviation over the whole set (float32)."""
    x = descriptors.float().view(len(descriptors), channels, -1)
    mean = x.mean(dim=(0, 2), keepdim=True)
    std = x.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
    return ((x - mean) / std).view(len(descriptors), -1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = DEFAULT_DIRECTIONS,
                       seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two equally sized sets of vectors (rows of a and b)."""
    if a.shape != b.shape:
        raise EvalError(f"sliced Wasserstein needs sets of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    generator = torch.Generator().manual_seed(seed)
    distances = []
    for start in range(0, directions, DIRECTIONS_PER_DRAW):
        count = min(DIRECTIONS_PER_DRAW, directions - start)
        unit = torch.randn(a.shape[1], count, generator=generator)
        unit = (unit / unit.norm(dim=0, keepdim=True)).to(a)
        sorted_a, sorted_b = _sorted_projections(a, unit), _sorted_projections(b, unit)
        distances.append((sorted_a - sorted_b).abs().mean(dim=1))
    return float(torch.cat(distances).mean())


def _sorted_projections(vectors: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Projections of the rows onto each direction, sorted: (N, d) x (d, K) -> (K, N)."""
    projected = directions.T @ vectors.T  # (K, N): each sort runs over contiguous memory
    if projected.device.type == "cpu":
        # numpy's vectorised (AVX-512) sort is several times faster than torch.sort on CPU.
        return torch.from_numpy(np.sort(projected.numpy(), axis=1))
    return torch.sort(projected, dim=1).values


def _equal_counts(a: torch.Tensor, b: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsample the larger set (without replacement, seeded) so both have the same number of rows."""
    if len(a) == len(b):
        return a, b
    generator = torch.Generator().manual_seed(seed)
    if len(a) > len(b):
        return a[torch.randperm(len(a), generator=generator)[: len(b)]], b
    return a, b[torch.randperm(len(b), generator=generator)[: len(a)]]


@dataclass(frozen=True)
class SWDResult:
    levels: dict[int, float]  # level side (finest first) -> SWD x 10^3
    average: float  # mean over levels, x 10^3
    num_images: tuple[int, int]  # images in the two sets
    patches_per_image: int


def swd_between(first: SWDDescriptors, second: SWDDescriptors, directions: int = DEFAULT_DIRECTIONS,
                seed: int = 0) -> SWDResult:
    """SWD (x 10^3) per pyramid level and on average between two collected image sets."""
    if first.image_size != second.image_size:
        raise EvalError(f"SWD compares images of one size, got {first.image_size} and {second.image_size} (H, W)")
    if first.num_images == 0:
        raise EvalError("SWD got no images")
    values = {}
    for level_index, (side, a, b) in enumerate(zip(first.level_sides(), first.levels(), second.levels())):
        a, b = _equal_counts(normalise_descriptors(a), normalise_descriptors(b), seed + level_index)
        values[side] = REPORT_SCALE * sliced_wasserstein(a, b, directions, seed=seed + level_index)
    return SWDResult(values, float(np.mean(list(values.values()))), (first.num_images, second.num_images),
                     first.patches_per_image)


def sliced_wasserstein_distance(images1: torch.Tensor, images2: torch.Tensor, seed: int = 0,
                                patches_per_image: int = DEFAULT_PATCHES_PER_IMAGE,
                                directions: int = DEFAULT_DIRECTIONS, batch_size: int = 256) -> SWDResult:
    """SWD between two in-memory image sets (N, 3, H, W) of the same size (uint8, or float in one range)."""
    collectors = []
    for images in (images1, images2):
        collector = SWDDescriptors(seed, patches_per_image)
        for start in range(0, len(images), batch_size):
            collector.add(images[start:start + batch_size])
        collectors.append(collector)
    return swd_between(*collectors, directions=directions, seed=seed)

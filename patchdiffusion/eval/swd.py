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

from .errors import EvalError

MIN_LEVEL_SIDE = 16  # coarsest pyramid level (ProGAN: 16x16)
PATCH_SIDE = 7  # descriptor neighbourhood (7x7)
DEFAULT_PATCHES_PER_IMAGE = 128
DEFAULT_DIRECTIONS = 512  # total projection directions
DIRECTIONS_PER_DRAW = 128  # directions drawn (and sorted) at a time, which bounds memory
REPORT_SCALE = 1e3  # SWD values are reported x 10^3
SWD_PROTOCOL = (
    "ProGAN (Karras et al. 2018): Laplacian pyramid down to 16x16, 128 random 7x7 patches per image and level, "
    "each set normalised per channel, 512 random directions; values x10^3"
)

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
        side = MIN_LEVEL_SIDE
        raise EvalError(f"SWD needs images of at least {side}x{side}, got {tuple(images.shape[2:])} (H, W)")
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

    keep_projections: remember the sorted projections computed for a comparison, so a set that is
    compared again and again (the training monitor's reference) is projected and sorted only once.
    They take 512 floats per descriptor, so this is off for one-off evaluations of large sets.
    """

    def __init__(self, seed: int = 0, patches_per_image: int = DEFAULT_PATCHES_PER_IMAGE,
                 keep_projections: bool = False):
        self.seed = seed
        self.patches_per_image = patches_per_image
        self.keep_projections = keep_projections
        self.image_size: tuple[int, int] | None = None  # (H, W)
        self.num_images = 0
        self._parts: list[list[torch.Tensor]] = []
        self._normalised: dict[int, torch.Tensor] = {}
        self._sorted: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        """Add a batch of (B, 3, H, W) images (uint8, or float in any fixed range)."""
        size = (images.shape[2], images.shape[3])
        if self.image_size is None:
            self.image_size = size
            self._parts = [[] for _ in pyramid_sides(*size)]
        elif size != self.image_size:
            raise EvalError(f"SWD needs images of one size; got {size} after {self.image_size}")
        indices = torch.arange(self.num_images, self.num_images + len(images))
        for level_index, level in enumerate(laplacian_pyramid(images.float())):
            corners = patch_positions(self.seed, level_index, indices, self.patches_per_image, *level.shape[2:])
            self._parts[level_index].append(extract_patches(level, corners).to("cpu", torch.float16))
        self.num_images += len(images)
        self._normalised.clear()
        self._sorted.clear()

    def levels(self) -> list[torch.Tensor]:
        """Descriptors per level, finest first: (num_images * patches_per_image, 147) float16."""
        return [torch.cat(parts) for parts in self._parts]

    def level_sides(self) -> list[int]:
        """The shorter side of every level, finest first (the 'resolution' SWD levels are named by)."""
        return [min(side) for side in pyramid_sides(*self.image_size)] if self.image_size else []

    def normalised(self, level_index: int) -> torch.Tensor:
        """Descriptors of one level, normalised per channel over this set (float32)."""
        if level_index not in self._normalised:
            self._normalised[level_index] = normalise_descriptors(torch.cat(self._parts[level_index]))
        return self._normalised[level_index]

    def sorted_projections(self, level_index: int, draw: int, unit: torch.Tensor, key: tuple) -> torch.Tensor:
        """Normalised descriptors of a level projected onto `unit` (d, K) and sorted: (K, N)."""
        cache_key = (level_index, draw) + key
        if cache_key in self._sorted:
            return self._sorted[cache_key]
        projections = _sorted_projections(self.normalised(level_index), unit)
        if self.keep_projections:
            self._sorted[cache_key] = projections
        return projections

    def done_with(self, level_index: int) -> None:
        """After a comparison of one level: free its float32 copy unless this set is compared again."""
        if not self.keep_projections:
            self._normalised.pop(level_index, None)

    @property
    def descriptor_dim(self) -> int:
        return self._parts[0][0].shape[1] if self._parts and self._parts[0] else 0


def normalise_descriptors(descriptors: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Subtract each channel's mean and divide by its standard deviation over the whole set (float32)."""
    x = descriptors.float().view(len(descriptors), channels, -1)
    mean = x.mean(dim=(0, 2), keepdim=True)
    std = x.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
    return ((x - mean) / std).view(len(descriptors), -1)


def direction_draws(dim: int, directions: int = DEFAULT_DIRECTIONS, seed: int = 0) -> list[torch.Tensor]:
    """`directions` random unit vectors in R^dim, in draws of up to 128: a list of (dim, K) tensors."""
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for start in range(0, directions, DIRECTIONS_PER_DRAW):
        unit = torch.randn(dim, min(DIRECTIONS_PER_DRAW, directions - start), generator=generator)
        draws.append(unit / unit.norm(dim=0, keepdim=True))
    return draws


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = DEFAULT_DIRECTIONS,
                       seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two equally sized sets of vectors (rows of a and b)."""
    if a.shape != b.shape:
        raise EvalError(f"sliced Wasserstein needs sets of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    distances = []
    for unit in direction_draws(a.shape[1], directions, seed):
        sorted_a, sorted_b = _sorted_projections(a, unit.to(a)), _sorted_projections(b, unit.to(b))
        distances.append((sorted_a - sorted_b).abs().mean(dim=1))
    return float(torch.cat(distances).mean())


def _sorted_projections(vectors: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Projections of the rows onto each direction, sorted: (N, d) x (d, K) -> (K, N)."""
    projected = directions.T @ vectors.T  # (K, N): each sort runs over contiguous memory
    if projected.device.type == "cpu":
        # numpy's vectorised (AVX-512) sort is several times faster than torch.sort on CPU;
        # `projected` is a fresh tensor, so it is sorted in place through its numpy view.
        projected.numpy().sort(axis=1)
        return projected
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
    for level_index, side in enumerate(first.level_sides()):
        level_seed = seed + level_index
        if first.num_images == second.num_images and first.patches_per_image == second.patches_per_image:
            # Equal descriptor counts: sort each set's projections (cached for a set compared repeatedly).
            distances = []
            for draw, unit in enumerate(direction_draws(first.descriptor_dim, directions, level_seed)):
                key = (directions, level_seed)
                a = first.sorted_projections(level_index, draw, unit, key)
                b = second.sorted_projections(level_index, draw, unit, key)
                distances.append((a - b).abs().mean(dim=1))
            distance = float(torch.cat(distances).mean())
        else:
            a, b = _equal_counts(first.normalised(level_index), second.normalised(level_index), level_seed)
            distance = sliced_wasserstein(a, b, directions, seed=level_seed)
        first.done_with(level_index)
        second.done_with(level_index)
        values[side] = REPORT_SCALE * distance
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

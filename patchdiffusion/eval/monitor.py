"""A cheap quality number for the training loop: SWD of samples against a fixed reference set.

    monitor = SWDMonitor(reference_images, num_images=256, seed=0)   # once, before training
    ...
    if step % K == 0:
        metrics = monitor(samples)    # samples (B, 3, H, W) in [-1, 1]; {'swd': ..., 'swd_32': ..., ...}

The reference descriptors are computed once; each call quantises the samples to uint8 the way saved
PNGs are (EDM's rounding), so the in-training number matches `patchdiff eval --metrics swd` on the
same images. The patch positions are fixed by `seed` and the image index, so two calls on the same
images give the same value, and successive calls measure the model, not the sampling of patches.
With 256 images at 32-64 px a call takes about a second on CPU; its cost grows linearly with the
number of images. Values are SWD x 10^3 (Karras et al. 2018), one per pyramid level plus the mean.
"""

from __future__ import annotations

import torch

from .errors import EvalError
from .swd import DEFAULT_DIRECTIONS, SWDDescriptors, swd_between

MONITOR_PATCHES_PER_IMAGE = 64  # half of the full metric's 128: enough for a trend, twice as fast


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, 3, H, W), rounding as saved samples are (`images.to_uint8`)."""
    if images.dtype == torch.uint8:
        pixels = images
    else:
        pixels = (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        raise EvalError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(pixels.shape)}")
    return pixels.expand(-1, 3, -1, -1).cpu() if pixels.shape[1] == 1 else pixels.cpu()


class SWDMonitor:
    """SWD of generated batches against `reference_images`, cheap enough to call every K steps."""

    def __init__(self, reference_images: torch.Tensor, num_images: int = 256, seed: int = 0,
                 patches_per_image: int = MONITOR_PATCHES_PER_IMAGE, directions: int = DEFAULT_DIRECTIONS):
        """reference_images: (N, 3, H, W) uint8, or float in [-1, 1]; the first `num_images` are used."""
        self.num_images = num_images
        self.seed = seed
        self.patches_per_image = patches_per_image
        self.directions = directions
        reference = to_uint8_images(reference_images[:num_images])
        self.image_size = tuple(reference.shape[2:])
        # The reference is compared at every call: its sorted projections are computed once and kept.
        self.reference = self._collect(reference, keep_projections=True)

    def _collect(self, images: torch.Tensor, keep_projections: bool = False) -> SWDDescriptors:
        collector = SWDDescriptors(self.seed, self.patches_per_image, keep_projections)
        collector.add(images)
        return collector

    @torch.no_grad()
    def __call__(self, generated: torch.Tensor) -> dict[str, float]:
        """generated: (B, 3, H, W) in [-1, 1] (or uint8) -> {'swd': mean, 'swd_<side>': per level}, x 10^3."""
        images = to_uint8_images(generated[: self.num_images])
        if tuple(images.shape[2:]) != self.image_size:
            raise EvalError(f"SWDMonitor was built for {self.image_size} images (H, W), got {tuple(images.shape[2:])}")
        result = swd_between(self._collect(images), self.reference, self.directions, self.seed)
        metrics = {"swd": result.average}
        metrics.update({f"swd_{side}": value for side, value in result.levels.items()})
        return metrics

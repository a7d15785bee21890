"""The torch Dataset over an image source, and the horizontal flip the training loop applies."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ImageSource
from .errors import DataError
from .transforms import apply_transform, check_transform, width_height


class ImageDataset(Dataset):
    """Images of `source` as float tensors (3, H, W) in [-1, 1], with an integer label (-1 = none).

    resolution: (width, height) (or N, or "WxH") of every returned image. Images stored at another
        size are brought to it with `transform` ('center-crop' or 'resize'), the same functions
        `convert_dataset` uses, so converting first or resizing on the fly gives the same pixels.
    use_labels: return the source's class labels; the source must then label every image.

    No flipping happens here: the training loop draws flips from each example's own random
    stream (see `rng.SampleRNG`) and applies `hflip`, so augmentation does not depend on workers.
    """

    def __init__(
        self,
        source: ImageSource,
        resolution: tuple[int, int] | int | str,
        transform: str = "center-crop",
        use_labels: bool = False,
    ):
        check_transform(transform)
        self.source = source
        self.width, self.height = width_height(resolution)
        self.transform = transform
        self.use_labels = use_labels
        self._num_classes: int | None = None
        if use_labels:
            self._num_classes = _count_classes(source)

    @property
    def num_classes(self) -> int:
        """Number of classes (the source's class names, or max label + 1); 0 when labels are not used."""
        return self._num_classes or 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.source.read(index)
        if pixels.shape[:2] != (self.height, self.width):
            pixels = apply_transform(pixels, self.width, self.height, self.transform)
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).float() / 127.5 - 1.0  # (3, H, W)
        label = self.source.label_of(index) if self.use_labels else None
        return image, -1 if label is None else int(label)


def _count_classes(source: ImageSource) -> int:
    labels = [source.label_of(index) for index in range(len(source))]
    missing = sum(label is None for label in labels)
    if missing:
        raise DataError(
            f"use_labels needs a label for every image, but {missing} of {len(labels)} in {source!r} have none"
        )
    # A subset may miss the last classes; a source that names its classes knows how many there are.
    class_names = getattr(source, "class_names", None)
    return max(len(class_names or ()), max(labels) + 1 if labels else 0)


def hflip(batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images of batch (B, C, H, W) where mask (B,) is True."""
    return torch.where(mask.to(torch.bool).view(-1, 1, 1, 1), batch.flip(-1), batch)

"""The one read interface every image source offers, and the decoding step they share."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps

from .errors import UnreadableImageError
from .transforms import to_rgb_uint8


@dataclass(frozen=True)
class DecodedImage:
    """An image as RGB pixels, plus the mode it was stored in (kept so conversion can report it)."""

    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    stored_mode: str  # PIL mode of the stored file, e.g. "RGB", "L", "I;16", "RGBA", "P"


@runtime_checkable
class ImageSource(Protocol):
    """A numbered collection of RGB images.

    Sources are cheap to pickle (file handles are opened lazily in each process), so a torch
    DataLoader can fork or spawn workers that read from the same source.
    """

    def __len__(self) -> int: ...

    def name_of(self, index: int) -> str:
        """A relative, '/'-separated name for image `index` (used when writing a folder)."""
        ...

    def read(self, index: int) -> np.ndarray:
        """Image `index` as a uint8 (H, W, 3) RGB array."""
        ...

    def read_decoded(self, index: int) -> DecodedImage:
        """Image `index` with the mode it was stored in."""
        ...

    def label_of(self, index: int) -> int | None:
        """The class label of image `index`, or None when the source has no labels."""
        ...

    def close(self) -> None:
        """Release open files; the source reopens them if read again."""
        ...


def decode_image(data: bytes | str | os.PathLike, name: str) -> DecodedImage:
    """Decode encoded image bytes (or a file path) to RGB pixels.

    Raises UnreadableImageError, naming `name`, for anything PIL cannot fully decode (random bytes,
    truncated files, unsupported formats). PIL's LOAD_TRUNCATED_IMAGES is left off on purpose: a
    truncated file should be reported, not silently padded with grey.
    """
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()
            # Camera photos often store their rotation as an EXIF tag rather than in the pixels.
            upright = ImageOps.exif_transpose(image)
            mode = image.mode
            pixels = to_rgb_uint8(upright)
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise UnreadableImageError(name, _describe_decode_failure(error)) from error
    return DecodedImage(pixels=pixels, stored_mode=mode)


def _describe_decode_failure(error: Exception) -> str:
    message = str(error)
    if "cannot identify image file" in message:
        return "not an image file PIL can identify"
    if "truncated" in message.lower():
        return "truncated image file"
    return f"{type(error).__name__}: {message}"

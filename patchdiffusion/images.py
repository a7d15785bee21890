"""Tensor <-> image file helpers (uint8 PNG, grids)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding as EDM's generate.py does."""
    x = (images.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (B, H, W, 3) uint8 images into one image with `pad` white pixels between them."""
    b, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(b)))
    rows = int(math.ceil(b / columns))
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i in range(b):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = images[i]
    return canvas


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, columns: int | None = None, upscale: int = 1) -> Path:
    """Save a grid of images; small images can be upscaled (nearest) so they can be seen."""
    array = to_uint8(images) if isinstance(images, torch.Tensor) else images
    picture = Image.fromarray(grid(array, columns))
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path

"""Pixel-level conversions shared by conversion (`convert.py`) and loading (`dataset.py`).

Both paths use these same functions, so an image converted offline at 64x64 and an image resized
on the fly to 64x64 are the same pixels. Every function returns uint8 HxWx3 RGB arrays.

Sizes are always given as (width, height), the order PIL uses; arrays are (height, width, 3).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from patchdiffusion.config import parse_size
from patchdiffusion.errors import ConfigError

from .errors import DataError

# Modes whose pixels PIL stores as 16-bit unsigned integers.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes that carry transparency, directly or through a palette entry.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def width_height(value: int | str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """A size in the data layer's (width, height) order, PIL's: 64 -> (64, 64), "64x32" (WxH) -> (64, 32),
    and a pair is taken as (width, height). Text is read by the project's one size parser, `config.parse_size`."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise DataError(f"resolution {value!r} is not understood; give N, 'WxH' or (W, H)")
        value = (value[1], value[0])  # parse_size takes a pair as (height, width)
    try:
        height, width = parse_size(value)
    except ConfigError:
        raise DataError(f"resolution {value!r} is not understood; give N, 'WxH' or (W, H)") from None
    return width, height


# ---------------------------------------------------------------------------------------------
# Any picture -> uint8 RGB


def to_rgb_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    """Convert a PIL image or an array of any common kind to a uint8 HxWx3 RGB array.

    - grayscale (L, 1, I;16, ...) is repeated over the three channels;
    - 16-bit data (PIL I;16 modes, uint16 arrays) is scaled by 255/65535 with rounding, so the
      full 16-bit range maps onto the full 8-bit range (clipping would turn almost every pixel white);
    - PIL mode I (32-bit integers) and other integer arrays are read as 8-bit when every value is in
      0..255 and as 16-bit when every value is in 0..65535;
    - float data is taken to lie in [0, 1] and clipped there; PIL mode F images, which TIFF files
      usually fill with 0..255, are read as 0..255 when their maximum exceeds 1;
    - transparency (RGBA, LA, PA, palettes with a transparent entry) is composited over white:
      transparent regions are usually background drawn for a white page, and the colour values
      hidden under alpha = 0 are often junk that dropping alpha would reveal;
    - palette (P), CMYK, YCbCr, LAB, HSV go through PIL's own conversion to RGB (ICC profiles are
      not applied).
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb_uint8(image)
    return _array_to_rgb_uint8(np.asarray(image))


def _pil_to_rgb_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.array(image, dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_scale_16bit_to_8bit(np.array(image)))
    if mode == "I":
        return _array_to_rgb_uint8(np.array(image))
    if mode == "F":
        values = np.array(image, dtype=np.float32)
        if np.nanmax(values, initial=0.0) > 1.0:
            values = values / 255.0
        return _gray_to_rgb(_float_to_uint8(values))
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(np.array(image.convert("RGBA"), dtype=np.uint8))
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _array_to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (2, 3, 4))):
        raise DataError(f"an image array must be HxW or HxWxC with C in 1..4, got shape {array.shape}")
    values = _values_to_uint8(array)
    if values.ndim == 2:
        return _gray_to_rgb(values)
    channels = values.shape[2]
    if channels == 2:  # gray + alpha
        return _composite_on_white(np.concatenate([_gray_to_rgb(values[:, :, 0]), values[:, :, 1:]], axis=2))
    if channels == 4:
        return _composite_on_white(values)
    return np.ascontiguousarray(values)


def _values_to_uint8(array: np.ndarray) -> np.ndarray:
    """Map the values of an array of any numeric dtype to uint8 (see `to_rgb_uint8` for the rules)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _scale_16bit_to_8bit(array)
    if np.issubdtype(array.dtype, np.integer):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low >= 0 and high <= 255:
            return array.astype(np.uint8)
        if low >= 0 and high <= 65535:
            return _scale_16bit_to_8bit(array)
        raise DataError(f"integer image values span {low}..{high}; expected 0..255 or 0..65535")
    if np.issubdtype(array.dtype, np.floating):
        return _float_to_uint8(array)
    raise DataError(f"cannot read image values of dtype {array.dtype}")


def _scale_16bit_to_8bit(values: np.ndarray) -> np.ndarray:
    """Round(v * 255 / 65535) in exact integer arithmetic: 0 -> 0, 65535 -> 255, 257*k -> k."""
    wide = values.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    scaled = np.nan_to_num(values.astype(np.float64), nan=0.0) * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blend an HxWx4 uint8 image over a white background with exact integer rounding."""
    rgb = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:].astype(np.uint32)
    blended = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Geometry: every transform maps an HxWx3 uint8 array to exactly (height, width, 3).


def center_crop_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Crop the largest centred region with the target aspect ratio, then resize it to width x height.

    The crop box is fractional and handed to PIL's resize, so no half-pixel shift creeps in from
    rounding; Lanczos filtering widens its support when shrinking, which is the antialiasing.
    An image already at the target size is returned unchanged (bit-exact).
    """
    src_height, src_width = image.shape[:2]
    if (src_width, src_height) == (width, height):
        return image
    scale = min(src_width / width, src_height / height)
    crop_width, crop_height = width * scale, height * scale
    left = (src_width - crop_width) / 2
    top = (src_height - crop_height) / 2
    return crop_resize(image, (left, top, left + crop_width, top + crop_height), width, height)


def crop_resize(image: np.ndarray, box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Resize the region box = (left, top, right, bottom), in fractional pixels, to width x height (Lanczos)."""
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS, box=box)
    return np.asarray(resized, dtype=np.uint8)


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize the whole image to exactly width x height (the aspect ratio is not kept)."""
    src_height, src_width = image.shape[:2]
    if (src_width, src_height) == (width, height):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


# Transform names as the CLI and configs spell them.
TRANSFORMS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    "center-crop": center_crop_resize,
    "resize": resize,
}


def check_transform(name: str) -> None:
    """Raise a DataError unless `name` is one of TRANSFORMS."""
    if name not in TRANSFORMS:
        raise DataError(f"transform {name!r} is unknown; choose one of {', '.join(TRANSFORMS)}")


def apply_transform(image: np.ndarray, width: int, height: int, transform: str = "center-crop") -> np.ndarray:
    """Bring an HxWx3 uint8 image to (height, width, 3) with the named transform."""
    check_transform(transform)
    return TRANSFORMS[transform](image, width, height)


def would_upscale(src_width: int, src_height: int, width: int, height: int, transform: str = "center-crop") -> bool:
    """True when the transform would have to enlarge the image in both directions.

    Center-crop scales both axes by the same factor, so any source side shorter than the target
    side means enlarging. Resize scales each axis on its own; enlarging one axis of a long thin
    image is what asking for a plain resize means, so only an image smaller in both is refused.
    """
    check_transform(transform)
    if transform == "center-crop":
        return src_width < width or src_height < height
    return src_width < width and src_height < height

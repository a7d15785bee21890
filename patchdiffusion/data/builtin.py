"""Built-in image sets made offline from pictures shipped inside scikit-image and scikit-learn.

They exist so that a demo, a test or a first training run needs no download:

- `textures`: crops of five colour-stationary texture families (red brick, green grass, sand
  gravel, stained tissue, deep-sky field). Each family is cropped at one fixed scale in source
  pixels, so a family looks the same in every image and at every output resolution; this is data
  a tiny model can learn in minutes. Label = family.
- `photos`: crops of nine colour photographs with scale jitter (a crop covers 30-100% of the
  largest region that fits). Label = photograph.
- `digits`: scikit-learn's 1797 handwritten digits (8x8, 17 grey levels) upscaled bilinearly,
  white ink on black. Label = digit 0..9.

Image `i` is derived from (seed, i) alone and rendered when asked for, so ten thousand images cost
no memory up front; only the few source pictures are cached, once per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .base import DecodedImage
from .errors import DataError
from .transforms import crop_resize, width_height, to_rgb_uint8

BUILTIN_SETS = ("textures", "photos", "digits")
DEFAULT_RESOLUTION = 64
DEFAULT_COUNTS = {"textures": 1000, "photos": 1000, "digits": 1797}
DIGIT_COUNT = 1797  # images in sklearn.datasets.load_digits()


@dataclass(frozen=True)
class TextureFamily:
    """One kind of texture in the `textures` set."""

    name: str  # folder in image names; families are labelled in table order
    picture: str  # scikit-image picture it is cropped from (skimage.data.<picture>)
    crop_side: int  # crop height in source pixels: one scale for the whole family
    dark: tuple[int, int, int] | None = None  # tint of the darkest tone, for grayscale pictures
    light: tuple[int, int, int] | None = None  # tint of the lightest tone


TEXTURE_FAMILIES = (
    TextureFamily("red-brick", "brick", crop_side=144, dark=(62, 20, 12), light=(222, 122, 86)),
    TextureFamily("green-grass", "grass", crop_side=128, dark=(14, 42, 6), light=(150, 214, 84)),
    TextureFamily("sand-gravel", "gravel", crop_side=128, dark=(66, 54, 38), light=(240, 222, 184)),
    TextureFamily("stained-tissue", "immunohistochemistry", crop_side=160),
    TextureFamily("deep-field", "hubble_deep_field", crop_side=192),
)

# Pictures of the `photos` set, in label order; the prefix says which library ships the picture.
PHOTOGRAPHS = (
    "skimage:astronaut",
    "skimage:chelsea",
    "skimage:coffee",
    "skimage:rocket",
    "sklearn:china",
    "sklearn:flower",
    "skimage:retina",
    "skimage:immunohistochemistry",
    "skimage:hubble_deep_field",
)
PHOTO_CROP_FRACTION = (0.3, 1.0)  # crop size relative to the largest region that fits


class BuiltinSource:
    """One of the built-in sets (`BUILTIN_SETS`), rendered at `resolution` (int or (W, H))."""

    def __init__(
        self,
        name: str,
        resolution: int | tuple[int, int] = DEFAULT_RESOLUTION,
        count: int | None = None,
        seed: int = 0,
    ):
        if name not in BUILTIN_SETS:
            raise DataError(f"built-in set {name!r} is unknown; choose one of {', '.join(BUILTIN_SETS)}")
        self.set_name = name
        self.width, self.height = width_height(resolution)
        self.count = DEFAULT_COUNTS[name] if count is None else int(count)
        self.seed = int(seed)
        if self.count < 1:
            raise DataError(f"built-in set {name!r} needs count >= 1, got {self.count}")
        if name == "digits" and self.count > DIGIT_COUNT:
            raise DataError(f"built-in set 'digits' has {DIGIT_COUNT} images; count={self.count} is too many")
        if name == "digits":
            # A seeded subset; sklearn's order cycles 0..9, the permutation keeps any prefix mixed.
            self._digit_order = _index_rng(self.seed, 0, "digits").permutation(DIGIT_COUNT)[: self.count]

    def __len__(self) -> int:
        return self.count

    def label_of(self, index: int) -> int:
        self._check_index(index)
        if self.set_name == "textures":
            return index % len(TEXTURE_FAMILIES)
        if self.set_name == "photos":
            return index % len(PHOTOGRAPHS)
        return int(_digits()[1][self._digit_order[index]])

    @property
    def class_names(self) -> list[str]:
        """Label names, in label order."""
        if self.set_name == "textures":
            return [family.name for family in TEXTURE_FAMILIES]
        if self.set_name == "photos":
            return [photo.split(":")[1] for photo in PHOTOGRAPHS]
        return [str(digit) for digit in range(10)]

    def name_of(self, index: int) -> str:
        return f"{self.class_names[self.label_of(index)]}/{index:07d}.png"

    def read(self, index: int) -> np.ndarray:
        self._check_index(index)
        rng = _index_rng(self.seed, index, self.set_name)
        if self.set_name == "textures":
            return self._render_texture(TEXTURE_FAMILIES[self.label_of(index)], rng)
        if self.set_name == "photos":
            return self._render_photo(_load_picture(PHOTOGRAPHS[self.label_of(index)]), rng)
        return self._render_digit(_digits()[0][self._digit_order[index]])

    def read_decoded(self, index: int) -> DecodedImage:
        return DecodedImage(pixels=self.read(index), stored_mode="RGB")

    def close(self) -> None:
        pass

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(f"image index {index} out of range for {self.count} images")

    def _render_texture(self, family: TextureFamily, rng: np.random.Generator) -> np.ndarray:
        picture = _tinted_picture(family)
        box_height = float(family.crop_side)
        box_width = box_height * self.width / self.height
        return crop_resize(picture, _random_box(picture, box_width, box_height, rng), self.width, self.height)

    def _render_photo(self, picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        src_height, src_width = picture.shape[:2]
        largest = min(src_width / self.width, src_height / self.height)
        scale = largest * rng.uniform(*PHOTO_CROP_FRACTION)
        box = _random_box(picture, self.width * scale, self.height * scale, rng)
        return crop_resize(picture, box, self.width, self.height)

    def _render_digit(self, digit: np.ndarray) -> np.ndarray:
        ink = Image.fromarray((digit / 16.0).astype(np.float32), mode="F")
        upscaled = np.asarray(ink.resize((self.width, self.height), Image.Resampling.BILINEAR))
        return to_rgb_uint8(upscaled)

    def __repr__(self) -> str:
        return (
            f"BuiltinSource({self.set_name!r}, resolution=({self.width}, {self.height}), "
            f"count={self.count}, seed={self.seed})"
        )


def _index_rng(seed: int, index: int, salt: str) -> np.random.Generator:
    """A generator for one image, from (seed, index, set name) alone."""
    salt_number = int.from_bytes(salt.encode(), "little")
    return np.random.default_rng([seed % 2**63, index, salt_number])


def _random_box(
    picture: np.ndarray, box_width: float, box_height: float, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """A box of the given size at a uniform random position, shrunk (aspect kept) if it does not fit."""
    src_height, src_width = picture.shape[:2]
    shrink = min(1.0, src_width / box_width, src_height / box_height)
    box_width, box_height = box_width * shrink, box_height * shrink
    left = rng.uniform(0.0, src_width - box_width)
    top = rng.uniform(0.0, src_height - box_height)
    return (left, top, left + box_width, top + box_height)


@functools.lru_cache(maxsize=None)
def _load_picture(spec: str) -> np.ndarray:
    """A source picture as uint8 RGB, e.g. 'skimage:brick' or 'sklearn:china' (cached per process)."""
    library, name = spec.split(":")
    if library == "skimage":
        import skimage.data

        return to_rgb_uint8(getattr(skimage.data, name)())
    from sklearn.datasets import load_sample_image

    return to_rgb_uint8(load_sample_image(f"{name}.jpg"))


@functools.lru_cache(maxsize=None)
def _tinted_picture(family: TextureFamily) -> np.ndarray:
    """The family's picture, and for a grayscale picture its tones mapped from `dark` to `light`."""
    picture = _load_picture(f"skimage:{family.picture}")
    if family.dark is None or family.light is None:
        return picture
    gray = picture[:, :, 0].astype(np.float32)
    # Stretch the 1st..99th percentiles to 0..1 so every family has full contrast before tinting.
    low, high = np.percentile(gray, [1, 99])
    tone = np.clip((gray - low) / max(high - low, 1.0), 0.0, 1.0)[:, :, None]
    dark, light = np.array(family.dark, np.float32), np.array(family.light, np.float32)
    return np.round(dark + tone * (light - dark)).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: images (1797, 8, 8) with values 0..16, and labels (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target

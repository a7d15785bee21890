"""Convert any image source into a zip, an LMDB or a folder of PNGs, streaming, never half-written.

One image at a time is read, brought to RGB (and to the target size, if one is given), and handed
to a writer; files that cannot be used are skipped and named with a reason in the summary. The
output is written under a temporary name next to `dest` and renamed into place only at the end.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .base import DecodedImage, ImageSource
from .errors import DataError, UnreadableImageError
from .sources import open_source
from .transforms import apply_transform, check_transform, width_height, to_rgb_uint8, would_upscale
from .writers import StagedOutput, open_writer


@dataclass
class ConvertSummary:
    """What `convert_dataset` did."""

    written: int  # images in the output
    skipped: list[tuple[str, str]]  # (name, reason) of every image left out
    converted_modes: dict[str, int]  # stored mode -> number of written images converted from it to RGB
    dest: Path
    resolution: tuple[int, int] | None = None  # (width, height) of every output image; None = native sizes
    transform: str = "center-crop"

    def __str__(self) -> str:
        if self.resolution is None:
            size = "native sizes"
        else:
            size = f"{self.resolution[0]}x{self.resolution[1]}, {self.transform}"
        lines = [f"Wrote {self.written} images to {self.dest} ({size})."]
        if self.converted_modes:
            modes = ", ".join(f"{count} from {mode}" for mode, count in sorted(self.converted_modes.items()))
            lines.append(f"Converted to RGB: {modes}.")
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)}:")
            lines.extend(f"  {name}: {reason}" for name, reason in self.skipped)
        return "\n".join(lines)


class _TooSmall(Exception):
    """An image that would have to be enlarged; skipped rather than upscaled into blur."""


def convert_dataset(
    source: str | os.PathLike | ImageSource,
    dest: str | os.PathLike,
    resolution: tuple[int, int] | int | str | None = None,
    transform: str = "center-crop",
    progress: bool = True,
    *,
    overwrite: bool = False,
    folder_labels: bool = False,
    allow_upscale: bool = False,
    min_side: int = 2,
) -> ConvertSummary:
    """Write every usable image of `source` to `dest` and say what was skipped.

    source: a spec for `open_source` (folder, .zip, .lmdb, builtin:...) or an open ImageSource.
    dest: `*.zip` (EDM layout), `*.lmdb` (Patch-DM layout, PNG values) or a folder of PNGs.
    resolution: (width, height), N or "WxH" to bring every image to that size with `transform`
        ('center-crop' or 'resize'); None keeps every image at its stored size.
    overwrite: replace an existing dest (only once the new output is complete).
    folder_labels: for a folder source, number its subfolders as class labels.
    allow_upscale: enlarge images smaller than the target instead of skipping them as too small.
    min_side: images with a side shorter than this are skipped as too small, whatever the
        resolution (1-pixel images are placeholders, not pictures).

    Skipped (and listed by name): unreadable or truncated files, images too small for the target,
    any other per-image failure. Grayscale, alpha, palette, 16-bit, CMYK images are converted to RGB
    and counted in `converted_modes`. Raises DataError when nothing could be written.
    """
    check_transform(transform)
    target = None if resolution is None else width_height(resolution)
    dest_path = Path(dest)
    opened_here = isinstance(source, (str, os.PathLike))
    if opened_here:
        if Path(os.fspath(source)).resolve() == dest_path.resolve():
            raise DataError(f"source and destination are the same path {str(dest)!r}")
        source = open_source(source, target, folder_labels=folder_labels)
    try:
        if len(source) == 0:
            raise DataError(f"source {source!r} holds no images")
        return _convert(source, dest_path, target, transform, progress, overwrite, allow_upscale, min_side)
    finally:
        if opened_here:
            source.close()


def _convert(
    source: ImageSource,
    dest: Path,
    target: tuple[int, int] | None,
    transform: str,
    progress: bool,
    overwrite: bool,
    allow_upscale: bool,
    min_side: int,
) -> ConvertSummary:
    staged = StagedOutput(dest, overwrite)
    written = 0
    skipped: list[tuple[str, str]] = []
    converted_modes: Counter[str] = Counter()
    writer = None
    try:
        writer = open_writer(dest, staged.temp_path)
        for index in tqdm(range(len(source)), desc=f"converting to {dest.name}", unit="img", disable=not progress):
            name = source.name_of(index)
            try:
                decoded = _read_decoded(source, index)
                pixels = _fit(decoded.pixels, target, transform, allow_upscale, min_side)
                label = source.label_of(index)
            except (UnreadableImageError, _TooSmall) as error:
                skipped.append((name, error.reason if isinstance(error, UnreadableImageError) else str(error)))
                continue
            except Exception as error:  # one bad image must not end a long conversion
                skipped.append((name, f"{type(error).__name__}: {error}"))
                continue
            writer.add(pixels, name, label)
            written += 1
            if decoded.stored_mode != "RGB":
                converted_modes[decoded.stored_mode] += 1
        if written == 0:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:5])
            raise DataError(f"no image of {len(source)} could be written to {str(dest)!r} ({reasons})")
        writer.close(complete=True)
        staged.commit()
    except BaseException:  # includes Ctrl-C: leave no partial output behind
        if writer is not None:
            try:
                writer.close(complete=False)
            except Exception:
                pass
        staged.discard()
        raise
    return ConvertSummary(
        written=written,
        skipped=skipped,
        converted_modes=dict(converted_modes),
        dest=dest,
        resolution=target,
        transform=transform,
    )


def _read_decoded(source: ImageSource, index: int) -> DecodedImage:
    # A hand-written source may offer only `read`; its images then count as stored in RGB.
    if hasattr(source, "read_decoded"):
        return source.read_decoded(index)
    return DecodedImage(pixels=to_rgb_uint8(source.read(index)), stored_mode="RGB")


def _fit(
    pixels: np.ndarray, target: tuple[int, int] | None, transform: str, allow_upscale: bool, min_side: int
) -> np.ndarray:
    """Bring pixels to the target size, or raise _TooSmall with the reason."""
    height, width = pixels.shape[:2]
    if min(width, height) < min_side:
        raise _TooSmall(f"too small: {width}x{height} (every side must be at least {min_side} pixels)")
    if target is None:
        return pixels
    if not allow_upscale and would_upscale(width, height, *target, transform):
        raise _TooSmall(f"too small: {width}x{height} would have to be enlarged to reach {target[0]}x{target[1]}")
    return apply_transform(pixels, *target, transform)

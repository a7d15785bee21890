"""Image sets to evaluate: any data source, or a run directory that first generates its images.

Every metric reads images the same way: uint8 RGB batches (B, 3, H, W), all of one size. Images
stored at another size are brought to it by the data layer's own center-crop / resize (the
functions `patchdiff data convert` uses), so evaluation sees exactly the pixels training saw.
Generated images are written as PNG first (EDM's rounding, `images.to_uint8`) and read back, so
they are quantised to uint8 exactly as a reference tool reading the folder would see them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from patchdiffusion.data import FolderSource, ImageSource, SubsetSource, decode_image, open_source
from patchdiffusion.data.transforms import apply_transform, check_transform

from .errors import EvalError

# What `patchdiff sample` writes beside the images it generates (sample.generate_images): a contact sheet
# of up to 64 of them. Counted as a sample it would add one image of another size and content.
GRID_FILE_NAMES = ("grid.png",)


def is_grid_file(name: str) -> bool:
    """True for the grid image `patchdiff sample` writes into its output folder (at any depth of a folder)."""
    return name.rsplit("/", 1)[-1].lower() in GRID_FILE_NAMES


def is_run_directory(spec: str | os.PathLike) -> bool:
    """A run directory made by `patchdiff train` (it holds config.yaml)."""
    path = Path(spec)
    return path.is_dir() and (path / "config.yaml").is_file()


class PathListSource:
    """An ImageSource over an explicit list of image files (generated samples, without their grid.png)."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def name_of(self, index: int) -> str:
        return self.paths[index].name

    def read_decoded(self, index: int):
        return decode_image(self.paths[index], str(self.paths[index]))

    def read(self, index: int) -> np.ndarray:
        return self.read_decoded(index).pixels

    def label_of(self, index: int) -> None:
        return None

    def close(self) -> None:
        pass


@dataclass
class ImageSet:
    """Which images of a source are evaluated, and at what size.

    `indices` is every image, or a seeded random subset when fewer are asked for (as EDM's fid.py
    does with --num), so a subset is not biased towards the first files or classes of a folder.
    """

    description: str  # what the user gave (path, spec, or run directory)
    source: ImageSource
    indices: list[int]
    size: tuple[int, int]  # (width, height) every image is brought to
    transform: str = "center-crop"  # how images of another size are fitted
    notes: list[str] = field(default_factory=list)
    skipped_grids: list[str] = field(default_factory=list)  # sample's grid.png files left out of a folder

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, workers: int = 0) -> Iterator[torch.Tensor]:
        """uint8 (B, 3, H, W) batches, in index order."""
        dataset = _Uint8Images(self)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
        yield from loader


class _Uint8Images(Dataset):
    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> torch.Tensor:
        images = self.images
        pixels = images.source.read(images.indices[position])
        width, height = images.size
        if pixels.shape[:2] != (height, width):
            pixels = apply_transform(pixels, width, height, images.transform)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, H, W) uint8


def choose_indices(total: int, num: int | None, seed: int, what: str) -> list[int]:
    """All of 0..total-1, or a sorted seeded random subset of `num` of them."""
    if total == 0:
        raise EvalError(f"{what} holds no images")
    if num is None or num == total:
        return list(range(total))
    if num < 1:
        raise EvalError(f"the number of images must be at least 1, got {num}")
    if num > total:
        raise EvalError(f"{what} holds {total} images, but {num} were asked for")
    return sorted(np.random.default_rng(seed).choice(total, num, replace=False).tolist())


def open_image_set(
    spec: str | os.PathLike,
    size: tuple[int, int] | None = None,
    num: int | None = None,
    seed: int = 0,
    transform: str = "center-crop",
) -> ImageSet:
    """Images of a folder, .zip, .lmdb or builtin:NAME spec; `size` (W, H) defaults to the first image's.

    In a folder, the grid.png files `patchdiff sample` writes beside its images are not samples: they are
    left out and counted in `skipped_grids` (and a note of the report).
    """
    check_transform(transform)
    source = open_source(spec, resolution=size)
    grids: list[str] = []
    if isinstance(source, FolderSource):
        keep = []
        for index in range(len(source)):
            (grids if is_grid_file(source.name_of(index)) else keep).append(index)
        if grids:
            grids = [source.name_of(index) for index in grids]
            source = SubsetSource(source, keep)
    indices = choose_indices(len(source), num, seed, f"'{spec}'")
    if size is None:
        first = source.read(indices[0])
        size = (first.shape[1], first.shape[0])
    notes = []
    if grids:
        shown = ", ".join(grids[:3]) + (f" and {len(grids) - 3} more" if len(grids) > 3 else "")
        notes.append(f"'{spec}': read {len(source)} images, skipped {len(grids)} grid "
                     f"file{'s' if len(grids) > 1 else ''} written by patchdiff sample ({shown})")
    return ImageSet(str(spec), source, indices, size, transform, notes=notes, skipped_grids=grids)


def generate_image_set(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    num: int,
    seed: int = 0,
    batch_size: int = 16,
    sampler: str | None = None,
    steps: int | None = None,
    device: str = "auto",
    use_ema: bool = True,
    progress: bool = True,
) -> ImageSet:
    """Generate `num` images from a run into out_dir (seeds seed..seed+num-1) and return them as a set."""
    from patchdiffusion.sample import generate_images

    paths = generate_images(
        run_dir, out_dir, num=num, seed=seed, batch_size=batch_size, sampler=sampler, steps=steps,
        device=device, use_ema=use_ema, progress=progress,
    )
    source = PathListSource(paths)
    first = source.read(0)
    weights = "EMA" if use_ema else "raw"
    note = f"generated {num} images from run '{run_dir}' (seeds {seed}..{seed + num - 1}, {weights} weights)"
    return ImageSet(str(run_dir), source, list(range(len(paths))), (first.shape[1], first.shape[0]), notes=[note])

"""The training set as the training loop opens it: bad files skipped the way `data convert` skips them.

    dataset, report = open_training_set("photos/", (64, 64), run_dir="runs/x")
    print(report.summary())   # training set photos/: 26 of 27 images usable; skipped 1 (bad.png: ...); ...

A folder, zip or LMDB is scanned once before training: every image is decoded in full (so truncated
files are found here, not half-way through training) and checked against the same rules as
`patchdiff data convert` (`convert._fit`): unreadable files, images with a side under `min_side`, and
images that would have to be enlarged to the training resolution are left out, each named with its
reason in `RUN/skipped_images.txt`. The dataset then holds the usable images in source order, so
dataset index i is the i-th usable image: the same in every process (DDP) and in every run.

The scan's outcome is recorded in `RUN/data_index.json`, and a resumed run reads it back instead of
scanning again: the index -> image mapping stays the one the run started with (exact resume, Patch-DM's
per-image codes) even if a bad file has been fixed since. A source whose image count changed since the
run started is refused. A file that becomes unreadable after the scan stops training with one line
naming it (`UnreadableImageError`). Built-in sets are generated, never unreadable: they are not scanned
and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .base import DecodedImage
from .builtin import BuiltinSource
from .convert import _TooSmall, _fit, _read_decoded
from .dataset import ImageDataset
from .errors import DataError, UnreadableImageError
from .sources import LmdbSource, open_source
from .transforms import check_transform, width_height

SKIPPED_LIST_NAME = "skipped_images.txt"
INDEX_NAME = "data_index.json"
INDEX_FORMAT = "patchdiffusion training-set index"
_SUMMARY_NAMES = 3  # skipped names shown in the one-line summary; the rest are in the list file


class SubsetSource:
    """The images `indices` of `source`, renumbered 0..len-1 in the given order."""

    def __init__(self, source, indices: list[int]):
        self.source = source
        self.indices = list(indices)

    @property
    def class_names(self):
        return getattr(self.source, "class_names", None)

    def __len__(self) -> int:
        return len(self.indices)

    def name_of(self, index: int) -> str:
        return self.source.name_of(self.indices[index])

    def read_decoded(self, index: int) -> DecodedImage:
        return _read_decoded(self.source, self.indices[index])

    def read(self, index: int) -> np.ndarray:
        return self.source.read(self.indices[index])

    def label_of(self, index: int) -> int | None:
        return self.source.label_of(self.indices[index])

    def close(self) -> None:
        self.source.close()

    def __repr__(self) -> str:
        return f"{self.source!r}[{len(self)} usable]"


@dataclass
class TrainingSetReport:
    """What `open_training_set` found."""

    source: str  # the spec as given
    images_in_source: int
    used: int  # images in the dataset
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason), in source order
    builtin: bool = False
    from_index: bool = False  # read back from RUN/data_index.json (a resumed run), not scanned now
    list_path: Path | None = None  # RUN/skipped_images.txt when written

    def summary(self) -> str:
        """One line for the start of training."""
        if self.builtin:
            return f"training set {self.source}: {self.used} images (built-in, generated)"
        line = f"training set {self.source}: {self.used} of {self.images_in_source} images usable"
        if self.from_index:
            line += " (as when the run started)"
        if self.skipped:
            shown = ", ".join(f"{name}: {reason}" for name, reason in self.skipped[:_SUMMARY_NAMES])
            more = len(self.skipped) - _SUMMARY_NAMES
            line += f"; skipped {len(self.skipped)} ({shown}{f', and {more} more' if more > 0 else ''})"
            if self.list_path is not None:
                line += f"; list in {self.list_path}"
        return line


def open_training_set(
    spec: str | os.PathLike,
    resolution: tuple[int, int] | int | str,
    transform: str = "center-crop",
    use_labels: bool = False,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    write: bool = True,
    *,
    allow_upscale: bool = False,
    min_side: int = 2,
    workers: int | None = None,
    progress: bool = False,
) -> tuple[ImageDataset, TrainingSetReport]:
    """Open `spec` for training at `resolution` (width, height) and leave out images that cannot be used.

    run_dir: where skipped_images.txt and data_index.json go (and, with `resume`, where data_index.json
        is read back from). None: scan, write nothing.
    resume: reuse the run's recorded scan when there is one (a run started before this existed is scanned).
    write: write the files (only the main process of a multi-process run should).
    allow_upscale, min_side: as in `convert_dataset`.
    workers: threads decoding images during the scan (default: up to 4; LMDB is always read by one).
    Returns the dataset (ImageDataset over the usable images) and a report; `report.summary()` is one
    line for the start of training. Raises DataError when no image is usable.
    """
    check_transform(transform)
    width, height = width_height(resolution)
    source = open_source(spec, resolution=(width, height))
    if len(source) == 0:
        raise DataError(f"data source {str(spec)!r} holds no images")
    if isinstance(source, BuiltinSource):
        dataset = ImageDataset(source, (width, height), transform=transform, use_labels=use_labels)
        return dataset, TrainingSetReport(str(spec), len(source), len(source), builtin=True)

    run_dir = Path(run_dir) if run_dir is not None else None
    recorded = _read_index(run_dir / INDEX_NAME, source, spec) if (resume and run_dir is not None) else None
    if recorded is not None:
        skipped_at = recorded
    else:
        skipped_at = _scan(source, (width, height), transform, allow_upscale, min_side, workers, progress)
    skipped_indices = set(skipped_at)
    kept = [i for i in range(len(source)) if i not in skipped_indices]
    skipped = [(source.name_of(i), skipped_at[i]) for i in sorted(skipped_at)]
    if not kept:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:5])
        raise DataError(f"no usable image in {str(spec)!r}: all {len(source)} skipped ({reasons})")
    report = TrainingSetReport(str(spec), len(source), len(kept), skipped, from_index=recorded is not None)
    if run_dir is not None:
        report.list_path = run_dir / SKIPPED_LIST_NAME
        if write:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_list(report.list_path, report)
            if recorded is None:
                _write_index(run_dir / INDEX_NAME, spec, len(source), skipped_at, source)
    subset = SubsetSource(source, kept) if skipped else source
    dataset = ImageDataset(subset, (width, height), transform=transform, use_labels=use_labels)
    return dataset, report


def _problem(source, index: int, target: tuple[int, int], transform: str, allow_upscale: bool,
             min_side: int) -> str | None:
    """Why image `index` cannot be trained on (the rules of `data convert`), or None."""
    try:
        _fit(_read_decoded(source, index).pixels, target, transform, allow_upscale, min_side)
    except UnreadableImageError as error:
        return error.reason
    except _TooSmall as error:
        return str(error)
    except DataError:
        raise  # the source itself is broken (e.g. an LMDB missing a key): not one image's problem
    except Exception as error:  # any other per-image failure, as `data convert` treats it
        return f"{type(error).__name__}: {error}"
    return None


def _scan(source, target, transform, allow_upscale, min_side, workers, progress) -> dict[int, str]:
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if isinstance(source, LmdbSource):
        workers = 1  # one read-only environment per process; keep its transactions on one thread
    indices = range(len(source))

    def check(index: int) -> str | None:
        return _problem(source, index, target, transform, allow_upscale, min_side)

    bar = tqdm(total=len(source), desc="checking training images", unit="img", disable=not progress)
    skipped: dict[int, str] = {}
    try:
        if workers <= 1:
            results = map(check, indices)
            for index, problem in zip(indices, results):
                if problem is not None:
                    skipped[index] = problem
                bar.update(1)
        else:
            # map keeps the source order, so the outcome does not depend on thread timing.
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for index, problem in zip(indices, pool.map(check, indices, chunksize=16)):
                    if problem is not None:
                        skipped[index] = problem
                    bar.update(1)
    finally:
        bar.close()
    return skipped


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)


def _write_list(path: Path, report: TrainingSetReport) -> None:
    lines = [
        f"# images of {report.source} left out of training: {len(report.skipped)} of {report.images_in_source}",
        "# name<TAB>reason (the same rules as `patchdiff data convert`)",
    ]
    lines += [f"{name}\t{reason}" for name, reason in report.skipped]
    _write_atomically(path, "\n".join(lines) + "\n")


def _write_index(path: Path, spec, count: int, skipped_at: dict[int, str], source) -> None:
    index = {
        "format": INDEX_FORMAT, "version": 1, "source": str(spec), "images_in_source": count,
        "names_sha256": _names_digest(source),
        "skipped": [{"index": i, "name": source.name_of(i), "reason": skipped_at[i]} for i in sorted(skipped_at)],
    }
    _write_atomically(path, json.dumps(index, indent=1) + "\n")


def _names_digest(source) -> str:
    """sha256 of every image name in source order: tells whether a resumed run sees the same set."""
    digest = hashlib.sha256()
    for i in range(len(source)):
        digest.update(source.name_of(i).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _read_index(path: Path, source, spec) -> dict[int, str] | None:
    """The recorded skipped images {index: reason}, or None when there is no record to reuse."""
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        count = int(index["images_in_source"])
        skipped = {int(entry["index"]): (str(entry["name"]), str(entry["reason"])) for entry in index["skipped"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"'{path}' is not a readable training-set index; delete it to scan the data again") from None
    if count != len(source):
        raise DataError(
            f"the training set {str(spec)!r} holds {len(source)} images, but {count} when this run started "
            f"(recorded in {path}); resuming needs the same images"
        )
    if index.get("names_sha256") not in (None, _names_digest(source)):
        raise DataError(f"the images of {str(spec)!r} are not the ones this run started with (their names "
                        f"differ from those recorded in {path}); resuming needs the same images")
    for i, (name, _) in skipped.items():
        if not 0 <= i < count or source.name_of(i) != name:
            raise DataError(f"the training set {str(spec)!r} changed since this run started (image {i} is no "
                            f"longer {name!r}, recorded in {path}); resuming needs the same images")
    return {i: reason for i, (_, reason) in skipped.items()}

"""Streaming writers for the three output layouts (zip, LMDB, folder), and staged output.

A writer receives one image at a time and keeps only names and labels in memory, never pixels.
Every writer writes under a temporary path next to the destination; `StagedOutput` moves that
path into place only when the whole conversion succeeded, so a destination never exists half
written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Protocol

import lmdb
import numpy as np
from PIL import Image

from . import formats
from .errors import DataError


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 (H, W, 3) RGB array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class DatasetWriter(Protocol):
    """Receives images one by one; `close(complete=True)` finishes the layout (metadata, index)."""

    def add(self, pixels: np.ndarray, name: str, label: int | None) -> None: ...

    def close(self, complete: bool = True) -> None: ...


def open_writer(dest: Path, path: Path) -> DatasetWriter:
    """A writer for the layout that `dest`'s name asks for, writing at `path` (its staging path)."""
    suffix = dest.suffix.lower()
    if suffix == ".zip":
        return ZipWriter(path)
    if suffix == ".lmdb":
        return LmdbWriter(path)
    if suffix in formats.IMAGE_EXTENSIONS:
        raise DataError(f"destination {str(dest)!r} looks like one image file; give a folder, a .zip or a .lmdb")
    return FolderWriter(path)


def _labels_if_complete(labels: list[int | None]) -> list[int] | None:
    # A label list with holes would break loaders that index it (EDM's among them): all or nothing.
    return None if not labels or any(label is None for label in labels) else [int(label) for label in labels]


class ZipWriter:
    """EDM dataset_tool layout: PNGs named 00000/img00000000.png, plus dataset.json."""

    def __init__(self, path: Path):
        # PNG data is already compressed; storing keeps reads fast (EDM does the same).
        self._archive = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED)
        self._archive_names: list[str] = []
        self._names: list[str] = []
        self._labels: list[int | None] = []

    def add(self, pixels: np.ndarray, name: str, label: int | None) -> None:
        archive_name = formats.edm_zip_name(len(self._archive_names))
        self._archive.writestr(archive_name, encode_png(pixels))
        self._archive_names.append(archive_name)
        self._names.append(name)
        self._labels.append(label)

    def close(self, complete: bool = True) -> None:
        if self._archive.fp is None:
            return
        if complete:
            labels = _labels_if_complete(self._labels)
            metadata = {
                "labels": None if labels is None else [list(pair) for pair in zip(self._archive_names, labels)],
                "original_names": [list(pair) for pair in zip(self._archive_names, self._names)],
            }
            self._archive.writestr(formats.ZIP_METADATA_NAME, json.dumps(metadata))
        self._archive.close()


class LmdbWriter:
    """Patch-DM's LMDB layout with PNG values, plus the `names` key (and `labels` when all exist)."""

    INITIAL_MAP_SIZE = 1 << 30  # grows by doubling when full, so small sets stay small on disk
    IMAGES_PER_TRANSACTION = 256  # commits in batches: one transaction per image is slow

    def __init__(self, path: Path):
        path.mkdir(parents=True)
        # lock=False: nobody else knows the staging path, so there is no reader to coordinate with.
        self._environment: lmdb.Environment | None = lmdb.open(
            str(path), map_size=self.INITIAL_MAP_SIZE, subdir=True, lock=False, meminit=False
        )
        self._pending: list[tuple[bytes, bytes]] = []
        self._names: list[str] = []
        self._labels: list[int | None] = []

    def add(self, pixels: np.ndarray, name: str, label: int | None) -> None:
        self._pending.append((formats.lmdb_key(len(self._names)), encode_png(pixels)))
        self._names.append(name)
        self._labels.append(label)
        if len(self._pending) >= self.IMAGES_PER_TRANSACTION:
            self._flush()

    def _flush(self) -> None:
        assert self._environment is not None
        while True:
            try:
                with self._environment.begin(write=True) as transaction:  # aborts if an error escapes
                    for key, value in self._pending:
                        transaction.put(key, value)
                break
            except lmdb.MapFullError:
                self._environment.set_mapsize(2 * self._environment.info()["map_size"])
        self._pending.clear()

    def close(self, complete: bool = True) -> None:
        if self._environment is None:
            return
        try:
            if complete:
                self._pending.append((formats.LMDB_LENGTH_KEY, str(len(self._names)).encode("ascii")))
                self._pending.append((formats.LMDB_NAMES_KEY, json.dumps(self._names).encode("utf-8")))
                labels = _labels_if_complete(self._labels)
                if labels is not None:
                    self._pending.append((formats.LMDB_LABELS_KEY, json.dumps(labels).encode("ascii")))
                self._flush()
                self._environment.sync(True)
        finally:
            self._environment.close()
            self._environment = None


class FolderWriter:
    """PNG files under a folder, keeping each image's relative name (with a .png suffix)."""

    def __init__(self, path: Path):
        path.mkdir(parents=True)
        self._root = path
        self._used_names: set[str] = set()  # lower case: names must not collide on case-insensitive disks

    def add(self, pixels: np.ndarray, name: str, label: int | None) -> None:
        relative = self._unique_name(_safe_png_name(name))
        target = self._root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_png(pixels))

    def _unique_name(self, name: str) -> str:
        stem, candidate, number = name[: -len(".png")], name, 1
        while candidate.lower() in self._used_names:
            candidate = f"{stem}-{number}.png"
            number += 1
        self._used_names.add(candidate.lower())
        return candidate

    def close(self, complete: bool = True) -> None:
        pass


def _safe_png_name(name: str) -> str:
    """A relative '/'-separated name that stays inside the folder, is not hidden, and ends in .png."""
    parts = [part for part in PurePosixPath(name.replace("\\", "/")).parts if part not in ("/", ".", "..")]
    # Leading dots would hide the file from FolderSource when it is read back.
    parts = [part.lstrip(".") or "_" for part in parts] or ["image"]
    last = parts[-1]
    if formats.has_image_extension(last):
        last = last[: last.rfind(".")]
    parts[-1] = f"{last}.png"
    return "/".join(parts)


class StagedOutput:
    """A temporary path next to `dest` that replaces `dest` on `commit()` and vanishes on `discard()`."""

    def __init__(self, dest: Path, overwrite: bool):
        self.dest = dest
        self.overwrite = overwrite
        if dest.exists() and not overwrite:
            raise DataError(f"destination {str(dest)!r} already exists; pass overwrite=True to replace it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Hidden name: a folder source reading the parent folder must not pick it up.
        self.temp_path = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"

    def commit(self) -> None:
        """Move the finished output into place, replacing an old `dest` only when overwrite was asked."""
        if self.dest.exists():
            if not self.overwrite:
                raise DataError(f"destination {str(self.dest)!r} appeared while converting; not replacing it")
            old = self.dest.parent / f".{self.dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.dest, old)
            os.rename(self.temp_path, self.dest)
            _remove(old)
        else:
            os.rename(self.temp_path, self.dest)

    def discard(self) -> None:
        _remove(self.temp_path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()

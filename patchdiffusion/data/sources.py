"""Image sources: a folder of files, an EDM-style zip, an LMDB, or a built-in offline set.

All of them offer the `ImageSource` interface (`base.py`); `open_source` picks one from a spec
string, which is what the CLI and configs store.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar
from urllib.parse import parse_qs

import lmdb
import numpy as np

from . import formats
from .base import DecodedImage, ImageSource, decode_image
from .builtin import BUILTIN_SETS, BuiltinSource
from .errors import DataError
from .transforms import width_height

Handle = TypeVar("Handle")


class _PerProcessHandle(Generic[Handle]):
    """An open file handle that belongs to one process.

    DataLoader workers are forked from the parent: a zip file object or LMDB environment opened
    before the fork would be shared (file offsets, LMDB reader slots) and reads would corrupt each
    other. So the handle is opened on first use, reopened when the process id changes, and dropped
    when pickled.
    """

    def __init__(self, opener: Callable[[], Handle]):
        self._opener = opener  # must pickle: a bound method of the source, not a lambda
        self._handle: Handle | None = None
        self._owner_pid: int | None = None

    def get(self) -> Handle:
        if self._handle is None or self._owner_pid != os.getpid():
            # A handle inherited through fork is left to the parent; this process opens its own.
            self._handle = self._opener()
            self._owner_pid = os.getpid()
        return self._handle

    def close(self) -> None:
        if self._handle is not None and self._owner_pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._owner_pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_opener": self._opener, "_handle": None, "_owner_pid": None}


class _SourceBase:
    """Shared conveniences: `read` from `read_decoded`, index checks, use as a context manager."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read_decoded(self, index: int) -> DecodedImage:
        raise NotImplementedError

    def read(self, index: int) -> np.ndarray:
        return self.read_decoded(index).pixels

    def close(self) -> None:
        pass

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        return index

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# Folder


class FolderSource(_SourceBase):
    """Image files under a directory, sorted by their relative path.

    Hidden files and folders (names starting with '.') are ignored: they are editor backups, macOS
    '._' resource forks, or our own temporary outputs, never training images.
    With `labels_from_subfolders`, the first folder of each relative path is the class, and classes
    are numbered in sorted order of their names; images at the top level then have no label.
    """

    def __init__(self, path: str | os.PathLike, recursive: bool = True, labels_from_subfolders: bool = False):
        self.root = Path(path)
        if not self.root.is_dir():
            raise DataError(f"image folder {str(path)!r} does not exist or is not a directory")
        self.relative_names = _list_image_files(self.root, recursive)
        self.labels_from_subfolders = labels_from_subfolders
        self.class_names: list[str] = []
        self._labels: list[int | None] = []
        if labels_from_subfolders:
            top_folders = [name.split("/")[0] if "/" in name else None for name in self.relative_names]
            self.class_names = sorted({folder for folder in top_folders if folder is not None})
            class_index = {folder: i for i, folder in enumerate(self.class_names)}
            self._labels = [None if folder is None else class_index[folder] for folder in top_folders]

    def __len__(self) -> int:
        return len(self.relative_names)

    def name_of(self, index: int) -> str:
        return self.relative_names[self._check_index(index)]

    def read_decoded(self, index: int) -> DecodedImage:
        name = self.name_of(index)
        return decode_image(self.root / name, name)

    def label_of(self, index: int) -> int | None:
        self._check_index(index)
        return self._labels[index] if self.labels_from_subfolders else None

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r}, {len(self)} images)"


def _list_image_files(root: Path, recursive: bool) -> list[str]:
    names = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".")] if recursive else []
        relative_dir = Path(directory).relative_to(root).as_posix()
        for file_name in files:
            if not file_name.startswith(".") and formats.has_image_extension(file_name):
                names.append(file_name if relative_dir == "." else f"{relative_dir}/{file_name}")
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# Zip


class ZipSource(_SourceBase):
    """Images inside a zip archive in EDM's dataset_tool layout (see `formats.py`).

    Any image file in the archive counts, sorted by archive name, so zips made by other tools work
    too. Labels and original names come from `dataset.json` when present.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"zip file {str(path)!r} does not exist")
        try:
            with zipfile.ZipFile(self.path) as archive:
                self.archive_names = sorted(
                    name for name in archive.namelist()
                    if formats.has_image_extension(name) and not _is_hidden_member(name)
                )
                metadata = _read_zip_metadata(archive)
        except zipfile.BadZipFile as error:
            raise DataError(f"{str(path)!r} is not a readable zip file ({error})") from None
        label_by_name = dict(metadata.get("labels") or [])
        self._labels = [label_by_name.get(name) for name in self.archive_names] if label_by_name else None
        original_by_name = dict(metadata.get("original_names") or [])
        self._names = [original_by_name.get(name, name) for name in self.archive_names]
        self._archive = _PerProcessHandle(self._open_archive)

    def _open_archive(self) -> zipfile.ZipFile:
        return zipfile.ZipFile(self.path)

    def __len__(self) -> int:
        return len(self.archive_names)

    def name_of(self, index: int) -> str:
        return self._names[self._check_index(index)]

    def read_decoded(self, index: int) -> DecodedImage:
        archive_name = self.archive_names[self._check_index(index)]
        return decode_image(self._archive.get().read(archive_name), archive_name)

    def label_of(self, index: int) -> int | None:
        self._check_index(index)
        return None if self._labels is None else _as_label(self._labels[index])

    def close(self) -> None:
        self._archive.close()

    def __repr__(self) -> str:
        return f"ZipSource({str(self.path)!r}, {len(self)} images)"


def _is_hidden_member(name: str) -> bool:
    return name.startswith("__MACOSX/") or any(part.startswith(".") for part in name.split("/"))


def _read_zip_metadata(archive: zipfile.ZipFile) -> dict[str, Any]:
    if formats.ZIP_METADATA_NAME not in archive.namelist():
        return {}
    try:
        metadata = json.loads(archive.read(formats.ZIP_METADATA_NAME))
    except ValueError as error:
        raise DataError(f"{formats.ZIP_METADATA_NAME} in the zip is not valid JSON ({error})") from None
    return metadata if isinstance(metadata, dict) else {}


def _as_label(value: Any) -> int | None:
    # EDM also allows label vectors; only integer class labels are used here.
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------------------------------
# LMDB


class LmdbSource(_SourceBase):
    """Images stored one per key in an LMDB (Patch-DM's img2lmdb layout; see `formats.py`).

    `path` is the LMDB directory (holding data.mdb) or the data file itself. Opened read-only with
    lock=False: readers of a finished data set need no lock file, and the directory may be read-only.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError(f"LMDB {str(path)!r} does not exist")
        self._subdir = self.path.is_dir()
        lease = self._open_environment()
        try:
            with lease.environment.begin() as transaction:
                self._length = _read_lmdb_length(transaction, self.path)
                self._names = _read_lmdb_json_list(transaction, formats.LMDB_NAMES_KEY, self._length)
                self._labels = _read_lmdb_json_list(transaction, formats.LMDB_LABELS_KEY, self._length)
        finally:
            lease.close()
        self._lease = _PerProcessHandle(self._open_environment)

    def _open_environment(self) -> _LmdbLease:
        return _LmdbLease(self.path, self._subdir)

    def __len__(self) -> int:
        return self._length

    def name_of(self, index: int) -> str:
        self._check_index(index)
        return self._names[index] if self._names is not None else f"{index:07d}.png"

    def read_decoded(self, index: int) -> DecodedImage:
        key = formats.lmdb_key(self._check_index(index))
        with self._lease.get().environment.begin(buffers=False) as transaction:
            data = transaction.get(key)
        if data is None:
            raise DataError(f"LMDB {str(self.path)!r} has no key {key.decode()} though its length is {len(self)}")
        return decode_image(data, self.name_of(index))

    def label_of(self, index: int) -> int | None:
        self._check_index(index)
        return None if self._labels is None else _as_label(self._labels[index])

    def close(self) -> None:
        self._lease.close()

    def __repr__(self) -> str:
        return f"LmdbSource({str(self.path)!r}, {len(self)} images)"


@dataclass
class _SharedEnvironment:
    environment: lmdb.Environment
    owner_pid: int
    users: int


# py-lmdb refuses to open one data file twice in a process (it tracks files by device and inode),
# so every LmdbSource on the same file in a process shares one environment, counted by its users.
_SHARED_ENVIRONMENTS: dict[tuple[int, int], _SharedEnvironment] = {}
_SHARED_ENVIRONMENTS_LOCK = threading.Lock()


class _LmdbLease:
    """One user's share of the process-wide read-only environment of an LMDB file."""

    def __init__(self, path: Path, subdir: bool):
        data_file = path / formats.LMDB_DATA_FILE if subdir else path
        try:
            status = os.stat(data_file)
        except OSError as error:
            raise DataError(f"{str(path)!r} is not a readable LMDB ({error.strerror})") from None
        self._key = (status.st_dev, status.st_ino)
        with _SHARED_ENVIRONMENTS_LOCK:
            shared = _SHARED_ENVIRONMENTS.get(self._key)
            if shared is not None and shared.owner_pid != os.getpid():
                # Inherited through fork: the copy is unusable here and would block reopening. Closing
                # this process's copy of a read-only, lock-free environment leaves the parent's alone.
                shared.environment.close()
                shared = None
            if shared is None:
                shared = _SharedEnvironment(_open_lmdb_read_only(path, subdir), os.getpid(), 0)
                _SHARED_ENVIRONMENTS[self._key] = shared
            shared.users += 1
        self.environment = shared.environment
        self._closed = False

    def close(self) -> None:
        with _SHARED_ENVIRONMENTS_LOCK:
            if self._closed:
                return
            self._closed = True
            shared = _SHARED_ENVIRONMENTS.get(self._key)
            if shared is None or shared.environment is not self.environment:
                return
            shared.users -= 1
            if shared.users == 0:
                shared.environment.close()
                del _SHARED_ENVIRONMENTS[self._key]


def _open_lmdb_read_only(path: Path, subdir: bool) -> lmdb.Environment:
    try:
        return lmdb.open(str(path), subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False)
    except lmdb.Error as error:
        raise DataError(f"{str(path)!r} is not a readable LMDB ({error})") from None


def _read_lmdb_length(transaction: lmdb.Transaction, path: Path) -> int:
    raw = transaction.get(formats.LMDB_LENGTH_KEY)
    if raw is not None:
        try:
            return int(raw.decode("ascii").strip())
        except ValueError:
            raise DataError(f"LMDB {str(path)!r} has a 'length' key that is not a number: {raw[:40]!r}") from None
    # Without a length key, count the 7-digit index keys (keys only; values are not read).
    count = sum(1 for key in transaction.cursor().iternext(keys=True, values=False) if len(key) == 7 and key.isdigit())
    if count == 0:
        raise DataError(f"LMDB {str(path)!r} holds no 'length' key and no 7-digit image keys")
    return count


def _read_lmdb_json_list(transaction: lmdb.Transaction, key: bytes, length: int) -> list | None:
    raw = transaction.get(key)
    if raw is None:
        return None
    values = json.loads(raw)
    if not isinstance(values, list) or len(values) != length:
        raise DataError(f"LMDB key {key.decode()!r} must be a JSON list of {length} entries")
    return values


# ---------------------------------------------------------------------------------------------
# Spec strings


SPEC_FORMS = (
    "an image folder, a .zip file, an LMDB (*.lmdb or a folder with data.mdb), "
    f"or builtin:NAME[?count=N&seed=S&resolution=R] with NAME in {', '.join(BUILTIN_SETS)}"
)


def open_source(
    spec: str | os.PathLike,
    resolution: int | str | tuple[int, int] | None = None,
    *,
    folder_labels: bool = False,
) -> ImageSource:
    """Open an image source from a spec string.

    Accepted forms: an existing directory (images in it and its subfolders); `path.zip`;
    `path.lmdb`, a directory holding `data.mdb`, or that `data.mdb` file; `builtin:textures`, `builtin:photos`,
    `builtin:digits`, optionally with a query such as `builtin:textures?count=200&seed=3`.
    `resolution` only matters for built-in sets (the size they are rendered at); file sources
    keep their stored sizes and `ImageDataset` resizes. `folder_labels` numbers the subfolders of
    an image folder as classes.
    """
    text = os.fspath(spec)
    if text.startswith("builtin:"):
        return _open_builtin(text, resolution)
    path = Path(text)
    if text.lower().endswith(".zip"):
        if not path.is_file():
            raise DataError(f"zip file {text!r} does not exist")
        return ZipSource(path)
    looks_like_lmdb = text.lower().rstrip("/").endswith(".lmdb") or path.name == formats.LMDB_DATA_FILE
    if looks_like_lmdb or (path / formats.LMDB_DATA_FILE).is_file():
        if not path.exists():
            raise DataError(f"LMDB {text!r} does not exist")
        return LmdbSource(path)
    if path.is_dir():
        return FolderSource(path, labels_from_subfolders=folder_labels)
    if not path.exists():
        raise DataError(f"data source {text!r} does not exist; expected {SPEC_FORMS}")
    raise DataError(f"data source {text!r} is not a form I can read; expected {SPEC_FORMS}")


def _open_builtin(spec: str, resolution: int | str | tuple[int, int] | None) -> BuiltinSource:
    name, _, query = spec[len("builtin:"):].partition("?")
    if name not in BUILTIN_SETS:
        raise DataError(f"built-in set {name!r} is unknown in spec {spec!r}; expected {SPEC_FORMS}")
    options: dict[str, Any] = {}
    try:
        query_options = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise DataError(f"the options in spec {spec!r} are not of the form key=value&key=value") from None
    for key, values in query_options.items():
        value = values[-1]
        try:
            if key in ("count", "seed"):
                options[key] = int(value)
            elif key == "resolution":
                options[key] = width_height(value)
            else:
                raise DataError(f"option {key!r} in spec {spec!r} is unknown; use count, seed or resolution")
        except ValueError as error:
            if isinstance(error, DataError):
                raise
            raise DataError(f"option {key}={value!r} in spec {spec!r} is not an integer") from None
    if resolution is not None and "resolution" not in options:
        options["resolution"] = width_height(resolution)
    return BuiltinSource(name, **options)

"""Out-of-core canvases: sampling at any size in memory set by the tile batch, not by the canvas.

The canvas (B, C, H, W) float32, the sampler's state (x, and dpmpp_2m's previous data prediction)
and the denoised estimate live in host memory or in files, never whole on the accelerator:

- `CanvasStore`: a write-once-then-read float32 array in blocks of BLOCK × BLOCK pixels (all channels
  of a block contiguous, blocks row-major), in RAM (`MemoryStore`) or in a file read and written with
  positional I/O (`DiskStore`; not a memory map, whose pages would count in the process's RSS);
- `CanvasArray`: a lazy elementwise expression over stores with torch-like arithmetic, so a sampler's
  line ``x = denoised + k * (x - denoised) / sigma + c * noise`` builds a small tree instead of full
  temporaries; `materialize()` evaluates it block by block into a new store and replaces the tree by
  that store in place, which drops the stores it referenced;
- `BlockNoise`: a ``noise_fn(like, step)`` whose values are keyed by (seed, step, draw, block), so they
  do not depend on chunking, tiles, batch or storage, and a resumed run draws the same noise;
- `sample_canvas`: any sampler over a `TiledDenoiser`, with progress, checkpoints every K steps and
  resume after a kill, bit for bit;
- streamed output: PNG in row strips, tiled BigTIFF, and `tiled_decode` for latent canvases.

Bit-for-bit rules kept here: a node evaluates with the same torch operator on the same operands in
the same order as eager code would, on contiguous float32 blocks of the same shape whatever the
storage, so memory and disk runs are identical and elementwise ops equal eager tensor code.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import math
import operator
import os
import shutil
import struct
import sys
import tempfile
import time
import weakref
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from patchdiffusion.diffusion.samplers import HISTORY_ARGS, get_sampler
from patchdiffusion.errors import ConfigError
from patchdiffusion.diffusion.tiled import (
    TensorReader, TiledDenoiser, TilingError, add_tile, plan_axis, read_window,
)
from patchdiffusion.images import to_uint8
from patchdiffusion.rng import mix_seed

__all__ = [
    "BLOCK",
    "CanvasError",
    "CanvasStore",
    "MemoryStore",
    "DiskStore",
    "CanvasSpace",
    "CanvasArray",
    "BlockNoise",
    "canvases_alive",
    "choose_storage",
    "check_disk_space",
    "bound_malloc_heap",
    "CanvasResult",
    "sample_canvas",
    "iter_rows",
    "write_png",
    "write_atomic",
    "write_png_strips",
    "write_tiff",
    "write_tiff_strips",
    "tiled_decode",
    "job_parameters",
    "job_digest",
]

BLOCK = 128  # block side of stores and of the noise grid (fixed: noise values depend on it)
CACHE_BLOCKS = 64  # blocks a tile reader / an accumulator keeps in memory (~12 MB at 3 channels)
MEMORY_FRACTION = 0.25  # storage=auto keeps the canvases in RAM while they take at most this share of it
_START_STREAM, _STEP_STREAM = 0x5354, 0x5354 + 1  # mix_seed streams of the starting noise and step noise
_JOB_VERSION = 1


class CanvasError(ConfigError):
    """A canvas that cannot be sampled as asked (storage, disk space, job folder): one line for the user."""


# ----------------------------------------------------------------------------------------------
# Stores.

STORE_COUNT = {"live": 0, "peak": 0}  # stores alive now / at most since the last reset (tests, estimates)


def _count_store(delta: int) -> None:
    STORE_COUNT["live"] += delta
    STORE_COUNT["peak"] = max(STORE_COUNT["peak"], STORE_COUNT["live"])


class CanvasStore:
    """A float32 (B, C, H, W) array in blocks of BLOCK × BLOCK pixels; written once, then read.

    Regions are canvas rectangles ``(b, y0, y1, x0, x1)``; `blocks()` lists the block regions in a fixed
    order, which is how arrays are materialised (the same block shapes in RAM and on disk)."""

    def __init__(self, shape: Sequence[int], fill: float = 0.0):
        if len(shape) != 4:
            raise ValueError(f"a canvas store is (B, C, H, W), got shape {tuple(shape)}")
        self.shape = tuple(int(s) for s in shape)
        self.fill = float(fill)  # what never-written pixels read as (-0.0 for accumulators)
        self.complete = False
        _count_store(1)
        weakref.finalize(self, _count_store, -1)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 4

    def blocks(self) -> Iterator[tuple[int, int, int, int, int]]:
        B, _, H, W = self.shape
        for b in range(B):
            for y in range(0, H, BLOCK):
                for x in range(0, W, BLOCK):
                    yield b, y, min(y + BLOCK, H), x, min(x + BLOCK, W)

    def finish(self) -> CanvasStore:
        """Mark the store complete: no more writes (so it can be shared and hard-linked safely)."""
        self.flush()
        self.complete = True
        return self

    def _check_writable(self) -> None:
        if self.complete:
            raise RuntimeError("a complete canvas store is immutable")

    # Implemented by the backends.
    def read(self, b: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:  # (C, h, w), contiguous
        raise NotImplementedError

    def write(self, b: int, y0: int, y1: int, x0: int, x1: int, values: torch.Tensor) -> None:
        raise NotImplementedError

    def add(self, b: int, y0: int, y1: int, x0: int, x1: int, values: torch.Tensor) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def save(self, path: str | Path) -> None:
        """Write the store to `path` in the block layout of `DiskStore` (a checkpoint)."""
        raise NotImplementedError


class MemoryStore(CanvasStore):
    """A store in host memory: one (B, C, H, W) tensor."""

    def __init__(self, shape, fill: float = 0.0):
        super().__init__(shape, fill)
        self.data = torch.full(self.shape, self.fill, dtype=torch.float32)

    def read(self, b, y0, y1, x0, x1):
        # A contiguous copy: elementwise kernels then see the same layout as a DiskStore's blocks.
        return self.data[b, :, y0:y1, x0:x1].clone(memory_format=torch.contiguous_format)

    def write(self, b, y0, y1, x0, x1, values):
        self._check_writable()
        self.data[b, :, y0:y1, x0:x1] = values

    def add(self, b, y0, y1, x0, x1, values):
        self._check_writable()
        self.data[b, :, y0:y1, x0:x1] += values

    def save(self, path):
        with open(path, "wb") as f:
            for region in self.blocks():
                f.write(self.read(*region).numpy().tobytes())

    @classmethod
    def load(cls, path: str | Path, shape) -> MemoryStore:
        store, disk = cls(shape), DiskStore.open(path, shape)
        for region in store.blocks():
            store.write(*region, disk.read(*region))
        return store.finish()


def _remove_file(fd: int, path: str | None) -> None:
    os.close(fd)
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class DiskStore(CanvasStore):
    """A store in a file, read and written with os.preadv / os.pwrite (positional I/O: the page
    cache holds the data, not the process). Block (b, by, bx) of h × w pixels is C·h·w float32 at
    byte 4·C·(b·H·W + by·BLOCK·W + h·bx·BLOCK), so the file is exactly B·C·H·W·4 bytes.

    `named=False` unlinks the file at once (nothing is left behind if the process is killed);
    a named file (inside a job folder) can be hard-linked into a checkpoint. Either way the data
    goes when the store is closed or garbage-collected."""

    def __init__(self, shape, folder: str | Path, fill: float = 0.0, *, named: bool = False,
                 path: str | Path | None = None):
        super().__init__(shape, fill)
        if path is None:
            fd, path = tempfile.mkstemp(prefix="canvas-", suffix=".f32", dir=folder)
            os.ftruncate(fd, self.nbytes)  # sparse: blocks never written take no disk space
            self._written = bytearray(self._num_blocks())
        else:  # an existing complete file (a checkpoint linked into the scratch folder)
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            if size != self.nbytes:
                os.close(fd)
                raise CanvasError(f"{path} holds {size} bytes, not a {self.shape} float32 canvas")
            self._written = bytearray(b"\x01" * self._num_blocks())
        if not named:
            os.unlink(path)
        self.fd, self.path = fd, (str(path) if named else None)
        self._cache: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()  # write-back cache
        self._dirty: set[tuple[int, int, int]] = set()
        self._finalizer = weakref.finalize(self, _remove_file, fd, self.path)

    @classmethod
    def open(cls, path: str | Path, shape) -> DiskStore:
        """A complete store over an existing file that it does not own (read-only use)."""
        store = cls.__new__(cls)
        CanvasStore.__init__(store, shape)
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        if size != store.nbytes:
            os.close(fd)
            raise CanvasError(f"{path} holds {size} bytes, not a {tuple(shape)} float32 canvas")
        store.fd, store.path, store._written = fd, None, bytearray(b"\x01" * store._num_blocks())
        store._cache, store._dirty = OrderedDict(), set()
        store._finalizer = weakref.finalize(store, os.close, fd)
        store.complete = True
        return store

    def close(self) -> None:
        self._cache.clear()
        self._finalizer()

    # -- layout
    def _num_blocks(self) -> int:
        B, _, H, W = self.shape
        return B * -(-H // BLOCK) * -(-W // BLOCK)

    def _block_index(self, b, by, bx) -> int:
        _, _, H, W = self.shape
        return (b * -(-H // BLOCK) + by) * -(-W // BLOCK) + bx

    def _block_geometry(self, b, by, bx) -> tuple[int, int, int]:
        """(byte offset, h, w) of a block."""
        _, C, H, W = self.shape
        h, w = min(BLOCK, H - by * BLOCK), min(BLOCK, W - bx * BLOCK)
        return 4 * C * (b * H * W + by * BLOCK * W + h * bx * BLOCK), h, w

    # -- raw block I/O
    def _pread(self, buffer: np.ndarray, offset: int) -> None:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"short read from a canvas store at byte {offset + done}")
            done += n

    def _pwrite(self, data: np.ndarray, offset: int) -> None:
        view, done = memoryview(np.ascontiguousarray(data)).cast("B"), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def _load_block(self, b, by, bx) -> torch.Tensor:
        """The whole block (C, h, w) from disk (the fill value if never written)."""
        offset, h, w = self._block_geometry(b, by, bx)
        if not self._written[self._block_index(b, by, bx)]:
            return torch.full((self.shape[1], h, w), self.fill, dtype=torch.float32)
        block = torch.empty((self.shape[1], h, w), dtype=torch.float32)
        self._pread(block.numpy(), offset)
        return block

    def _load_rows(self, b, by, bx, r0, r1) -> torch.Tensor:
        """Rows r0..r1-1 (block coordinates) of a block, (C, r1 - r0, w): one read per channel."""
        offset, h, w = self._block_geometry(b, by, bx)
        C = self.shape[1]
        if not self._written[self._block_index(b, by, bx)]:
            return torch.full((C, r1 - r0, w), self.fill, dtype=torch.float32)
        rows = torch.empty((C, r1 - r0, w), dtype=torch.float32)
        if r0 == 0 and r1 == h:  # the whole block: one read
            self._pread(rows.numpy(), offset)
        else:
            for c in range(C):
                self._pread(rows[c].numpy(), offset + 4 * (c * h * w + r0 * w))
        return rows

    def _store_block(self, key, block: torch.Tensor) -> None:
        offset, _, _ = self._block_geometry(*key)
        self._pwrite(block.numpy(), offset)
        self._written[self._block_index(*key)] = 1

    def _cached(self, key) -> torch.Tensor:
        """The block in the write-back cache (loaded on a miss; the least recently used written back)."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        block = self._load_block(*key)
        self._cache[key] = block
        while len(self._cache) > CACHE_BLOCKS:
            old, evicted = self._cache.popitem(last=False)
            if old in self._dirty:
                self._store_block(old, evicted)
                self._dirty.discard(old)
        return block

    def _pieces(self, y0, y1, x0, x1):
        """(by, bx, block rows, block cols, region rows, region cols) of the blocks under a region."""
        for by in range(y0 // BLOCK, (y1 - 1) // BLOCK + 1):
            r0, r1 = max(y0, by * BLOCK), min(y1, (by + 1) * BLOCK)
            for bx in range(x0 // BLOCK, (x1 - 1) // BLOCK + 1):
                c0, c1 = max(x0, bx * BLOCK), min(x1, (bx + 1) * BLOCK)
                yield (by, bx, slice(r0 - by * BLOCK, r1 - by * BLOCK), slice(c0 - bx * BLOCK, c1 - bx * BLOCK),
                       slice(r0 - y0, r1 - y0), slice(c0 - x0, c1 - x0))

    # -- the region interface
    def read(self, b, y0, y1, x0, x1):
        out = None
        for by, bx, rows, cols, out_rows, out_cols in self._pieces(y0, y1, x0, x1):
            key = (b, by, bx)
            if key in self._cache:
                piece = self._cache[key][:, rows, cols]
            else:
                piece = self._load_rows(b, by, bx, rows.start, rows.stop)[:, :, cols]
            if out is None and out_rows == slice(0, y1 - y0) and out_cols == slice(0, x1 - x0):
                return piece.contiguous()  # the region is one piece of one block
            if out is None:
                out = torch.empty((self.shape[1], y1 - y0, x1 - x0), dtype=torch.float32)
            out[:, out_rows, out_cols] = piece
        return out

    def write(self, b, y0, y1, x0, x1, values):
        self._check_writable()
        for by, bx, rows, cols, out_rows, out_cols in self._pieces(y0, y1, x0, x1):
            key, (_, h, w) = (b, by, bx), self._block_geometry(b, by, bx)
            if rows == slice(0, h) and cols == slice(0, w) and key not in self._cache:
                self._store_block(key, values[:, out_rows, out_cols].contiguous())  # a whole block: no cache
            else:
                self._cached(key)[:, rows, cols] = values[:, out_rows, out_cols]
                self._dirty.add(key)

    def add(self, b, y0, y1, x0, x1, values):
        self._check_writable()
        for by, bx, rows, cols, out_rows, out_cols in self._pieces(y0, y1, x0, x1):
            key = (b, by, bx)
            self._cached(key)[:, rows, cols] += values[:, out_rows, out_cols]
            self._dirty.add(key)

    def flush(self):
        for key in sorted(self._dirty):
            self._store_block(key, self._cache[key])
        self._dirty.clear()
        self._cache.clear()

    def save(self, path):
        """Hard-link the (complete, immutable) file into a checkpoint: instant; a copy where links fail."""
        if not self.complete:
            raise RuntimeError("only a complete store can be saved")
        if self.path is not None:
            try:
                os.link(self.path, path)
                return
            except OSError:
                pass
        with open(path, "wb") as f:
            for region in self.blocks():
                f.write(self.read(*region).numpy().tobytes())


class _CachedReader:
    """Reads regions of a complete store through a small LRU of whole blocks (tile windows overlap)."""

    def __init__(self, store: CanvasStore):
        self.store = store
        self.cache: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()

    def read(self, b, y0, y1, x0, x1):
        if isinstance(self.store, MemoryStore):
            return self.store.data[b, :, y0:y1, x0:x1]
        pieces = list(self.store._pieces(y0, y1, x0, x1))
        out = torch.empty((self.store.shape[1], y1 - y0, x1 - x0), dtype=torch.float32)
        for by, bx, rows, cols, out_rows, out_cols in pieces:
            key = (b, by, bx)
            if key in self.cache:
                self.cache.move_to_end(key)
            else:
                self.cache[key] = self.store._load_block(*key)
                if len(self.cache) > CACHE_BLOCKS:
                    self.cache.popitem(last=False)
            out[:, out_rows, out_cols] = self.cache[key][:, rows, cols]
        return out


# ----------------------------------------------------------------------------------------------
# Where arrays live.


@dataclass(frozen=True)
class CanvasSpace:
    """Where the stores of one sampling run are made: RAM (`folder=None`) or files in `folder`
    (`named`: files that a job folder can hard-link into its checkpoints)."""

    folder: str | None = None
    named: bool = False

    @property
    def storage(self) -> str:
        return "memory" if self.folder is None else "disk"

    def new_store(self, shape, fill: float = 0.0) -> CanvasStore:
        if self.folder is None:
            return MemoryStore(shape, fill)
        return DiskStore(shape, self.folder, fill, named=self.named)

    def adopt(self, path: str | Path, shape) -> CanvasStore:
        """A complete store with the contents of the store file at `path` (a checkpoint)."""
        if self.folder is None:
            return MemoryStore.load(path, shape)
        fd, own = tempfile.mkstemp(prefix="canvas-", suffix=".f32", dir=self.folder)
        os.close(fd)
        os.unlink(own)
        try:
            os.link(path, own)
        except OSError:
            shutil.copyfile(path, own)
        return DiskStore(shape, self.folder, named=self.named, path=own).finish()


# ----------------------------------------------------------------------------------------------
# Lazy arrays.

Scalar = (int, float)


class CanvasArray:
    """A lazy float32 canvas (B, C, H, W): a store, a noise draw, a constant, or an elementwise
    operation on those, with the arithmetic the samplers use (``+ - * /`` with floats and other
    canvas arrays, unary minus, ``.exp()``, ``.sqrt()``, ``.clamp()``, ``.to()``).

    Nothing is computed until `materialize()` (or a read): then the tree is evaluated block by block,
    each node with the same torch operator on the same operands as eager tensor code, into a new
    store that replaces the tree in place."""

    dtype = torch.float32
    device = torch.device("cpu")
    ndim = 4

    def __init__(self, shape, space: CanvasSpace, *, store: CanvasStore | None = None, op: Callable | None = None,
                 args: tuple = (), noise: tuple | None = None, constant: float | None = None):
        self.shape = torch.Size(shape)
        self.space = space
        self._store, self._op, self._args, self._noise, self._constant = store, op, args, noise, constant

    # -- constructors
    @classmethod
    def from_store(cls, store: CanvasStore, space: CanvasSpace) -> CanvasArray:
        return cls(store.shape, space, store=store.finish() if not store.complete else store)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, space: CanvasSpace) -> CanvasArray:
        store = space.new_store(tuple(tensor.shape))
        values = tensor.detach().to("cpu", torch.float32)
        for b, y0, y1, x0, x1 in store.blocks():
            store.write(b, y0, y1, x0, x1, values[b, :, y0:y1, x0:x1].contiguous())
        return cls.from_store(store, space)

    @classmethod
    def full(cls, shape, value: float, space: CanvasSpace) -> CanvasArray:
        return cls(shape, space, constant=float(value))

    # -- arithmetic (builds the tree)
    def _combine(self, op, left, right) -> CanvasArray:
        for operand in (left, right):
            if isinstance(operand, CanvasArray):
                if operand.shape != self.shape:
                    raise ValueError(f"canvas shapes differ: {tuple(self.shape)} and {tuple(operand.shape)}")
            elif not isinstance(operand, Scalar) or isinstance(operand, bool):
                return NotImplemented
        return CanvasArray(self.shape, self.space, op=op, args=(left, right))

    def __add__(self, other):
        return self._combine(operator.add, self, other)

    def __radd__(self, other):
        return self._combine(operator.add, other, self)

    def __sub__(self, other):
        return self._combine(operator.sub, self, other)

    def __rsub__(self, other):
        return self._combine(operator.sub, other, self)

    def __mul__(self, other):
        return self._combine(operator.mul, self, other)

    def __rmul__(self, other):
        return self._combine(operator.mul, other, self)

    def __truediv__(self, other):
        return self._combine(operator.truediv, self, other)

    def __rtruediv__(self, other):
        return self._combine(operator.truediv, other, self)

    def __neg__(self):
        return CanvasArray(self.shape, self.space, op=operator.neg, args=(self,))

    def exp(self) -> CanvasArray:
        return CanvasArray(self.shape, self.space, op=torch.Tensor.exp, args=(self,))

    def sqrt(self) -> CanvasArray:
        return CanvasArray(self.shape, self.space, op=torch.Tensor.sqrt, args=(self,))

    def clamp(self, min: float | None = None, max: float | None = None) -> CanvasArray:  # noqa: A002
        return CanvasArray(self.shape, self.space, op=_Clamp(min, max), args=(self,))

    def to(self, *args, **kwargs) -> CanvasArray:
        """Only float32 on the CPU is possible: returns self (as ``tensor.to`` does when nothing changes)."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.dtype) and value != torch.float32:
                raise TypeError(f"a CanvasArray is float32, cannot convert it to {value}")
            if isinstance(value, (str, torch.device)) and torch.device(value).type != "cpu":
                raise TypeError(f"a CanvasArray lives in host memory or on disk, not on {value}")
        return self

    def float(self) -> CanvasArray:
        return self

    def detach(self) -> CanvasArray:
        return self

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __repr__(self) -> str:
        kind = "store" if self._store is not None else "noise" if self._noise else "constant" \
            if self._constant is not None else "expression"
        return f"CanvasArray({tuple(self.shape)}, {kind}, {self.space.storage})"

    # -- evaluation
    @property
    def is_materialized(self) -> bool:
        return self._store is not None

    @property
    def store(self) -> CanvasStore:
        return self.materialize()._store

    def _eval(self, region: tuple[int, int, int, int, int], memo: dict) -> torch.Tensor:
        """This node's values over one region (C, h, w); shared sub-trees are evaluated once (memo)."""
        if self._store is not None:
            return self._store.read(*region)
        key = id(self)
        if key in memo:
            return memo[key]
        b, y0, y1, x0, x1 = region
        if self._noise is not None:
            source, noise_key = self._noise
            value = source.region(b, self.shape[1], y0, y1, x0, x1, noise_key)
        elif self._constant is not None:
            value = torch.full((self.shape[1], y1 - y0, x1 - x0), self._constant, dtype=torch.float32)
        else:
            value = self._op(*[a._eval(region, memo) if isinstance(a, CanvasArray) else a for a in self._args])
        memo[key] = value
        return value

    def read(self, b: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Values over a region inside the canvas, (C, h, w) (evaluated, not stored, if lazy)."""
        return self._eval((b, y0, y1, x0, x1), {})

    def materialize(self) -> CanvasArray:
        """Evaluate into a new store, block by block, and become that store (dropping the tree)."""
        if self._store is None:
            store = self.space.new_store(tuple(self.shape))
            for region in store.blocks():
                store.write(*region, self._eval(region, {}))
            self._store = store.finish()
            self._op, self._args, self._noise, self._constant = None, (), None, None
        return self

    def release(self) -> None:
        """Drop the values (a driver's hint that nothing will read this array again); reading it raises."""
        self._store, self._op, self._args, self._noise, self._constant = None, _released, (), None, None

    def tensor(self) -> torch.Tensor:
        """The whole canvas as a tensor (B, C, H, W): for canvases that fit in memory (tests, previews)."""
        self.materialize()
        out = torch.empty(tuple(self.shape), dtype=torch.float32)
        for b, y0, y1, x0, x1 in self._store.blocks():
            out[b, :, y0:y1, x0:x1] = self._store.read(b, y0, y1, x0, x1)
        return out

    # -- the TiledDenoiser's interface
    def reader(self) -> _CachedReader:
        return _CachedReader(self.store)

    def new_accumulator(self) -> _Accumulator:
        return _Accumulator(self.space.new_store(tuple(self.shape), fill=-0.0), self.space)


def _released(*args):
    raise RuntimeError("this canvas array was released by the sampling driver and cannot be read")


class _Clamp:
    def __init__(self, low, high):
        self.low, self.high = low, high

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.low, self.high)


class _Accumulator:
    """Blended tiles added into a store that starts at -0.0 (-0 + a == a, bit for bit)."""

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, store: CanvasStore, space: CanvasSpace):
        self.store, self.space = store, space

    def add(self, b, y0, y1, x0, x1, values):
        self.store.add(b, y0, y1, x0, x1, values)

    def finish(self) -> CanvasArray:
        return CanvasArray.from_store(self.store.finish(), self.space)


# ----------------------------------------------------------------------------------------------
# Block noise.


class BlockNoise:
    """``noise_fn(like, step)``: standard normal noise drawn per BLOCK × BLOCK block of the canvas grid
    from its own generator, seeded by (canvas seed, step, draw number within the step, block row,
    block column) and cropped at the canvas edge, so values do not depend on chunking, tile size,
    batch, storage or canvas size (a canvas is the top-left crop of a larger one with the same seed).

    seeds: one per canvas (canvas b uses seeds[b], whatever the batch), or one int (canvas b then
    uses mix_seed(seed, b)). For a tensor `like` it returns a tensor; for a CanvasArray a lazy leaf,
    generated block by block when materialised. Use one BlockNoise per sampling run (draws within a
    step are counted)."""

    def __init__(self, seeds: int | Sequence[int]):
        self.seeds = seeds
        self._step: Any = object()
        self._draws = 0

    def seed(self, b: int) -> int:
        return mix_seed(self.seeds, b) if isinstance(self.seeds, int) else int(self.seeds[b])

    def __call__(self, like, step: int | None = None):
        if step == self._step:
            self._draws += 1
        else:
            self._step, self._draws = step, 0
        return self.draw(like, (_STEP_STREAM, -1 if step is None else int(step), self._draws))

    def start(self, like):
        """The starting noise x_T / sigma_max (its own stream, apart from every step's)."""
        return self.draw(like, (_START_STREAM,))

    def draw(self, like, key: tuple[int, ...]):
        if not isinstance(self.seeds, int) and len(self.seeds) != like.shape[0]:
            raise ValueError(f"{len(self.seeds)} seeds for a batch of {like.shape[0]} canvases")
        if isinstance(like, CanvasArray):
            return CanvasArray(like.shape, like.space, noise=(self, key))
        B, C, H, W = like.shape
        out = torch.stack([self.region(b, C, 0, H, 0, W, key) for b in range(B)])
        return out.to(device=like.device, dtype=like.dtype)

    def region(self, b: int, channels: int, y0: int, y1: int, x0: int, x1: int, key: tuple[int, ...]) -> torch.Tensor:
        """Noise of canvas b over rows y0..y1-1 and columns x0..x1-1, (C, h, w) float32."""
        out = None
        seed = self.seed(b)
        for by in range(y0 // BLOCK, (y1 - 1) // BLOCK + 1):
            for bx in range(x0 // BLOCK, (x1 - 1) // BLOCK + 1):
                generator = torch.Generator().manual_seed(mix_seed(seed, *key, by, bx))
                block = torch.randn((channels, BLOCK, BLOCK), generator=generator)  # the whole block, always
                r0, r1 = max(y0, by * BLOCK), min(y1, (by + 1) * BLOCK)
                c0, c1 = max(x0, bx * BLOCK), min(x1, (bx + 1) * BLOCK)
                piece = block[:, r0 - by * BLOCK:r1 - by * BLOCK, c0 - bx * BLOCK:c1 - bx * BLOCK]
                if r0 == y0 and r1 == y1 and c0 == x0 and c1 == x1:
                    return piece.contiguous()
                if out is None:
                    out = torch.empty((channels, y1 - y0, x1 - x0), dtype=torch.float32)
                out[:, r0 - y0:r1 - y0, c0 - x0:c1 - x0] = piece
        return out


# ----------------------------------------------------------------------------------------------
# Storage choice and space checks.

# Canvases a sampler keeps alive at once on a CanvasArray: its state, the denoised estimate, the one
# being materialised or accumulated, and what its local variables still hold from the step before
# (e.g. ddim's eps = (x - denoised) / sigma keeps the previous x and denoised until it is reassigned).
# Measured with STORE_COUNT in tests/test_canvas.py.
_ALIVE = {"euler": 4, "heun": 6, "ddim": 4, "ddpm": 4, "dpmpp_2m": 4}


def canvases_alive(sampler: str, options: dict | None = None) -> int:
    """Canvases (B, C, H, W) that `sampler` holds at its peak on a CanvasArray (without checkpoints)."""
    options = options or {}
    if sampler not in _ALIVE:
        raise CanvasError(f"unknown sampler {sampler!r}; choose from {', '.join(_ALIVE)}")
    alive = _ALIVE[sampler]
    if sampler == "heun" and options.get("S_churn", 0) > 0:
        alive += 2  # x_hat = x + noise is a canvas of its own while the lazy x still holds the step before
    if sampler == "ddpm" and options.get("variance") == "learned":
        alive += 2  # the variance interpolation v, and its accumulator
    return alive


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (the total physical memory where that is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk_bytes(folder: str | Path) -> int:
    """Free bytes on the file system of `folder` (or of its nearest existing parent)."""
    return shutil.disk_usage(_existing(Path(folder))).free


def _existing(folder: Path) -> Path:
    """The folder or its nearest existing parent."""
    folder = folder.absolute()
    while not folder.exists():
        folder = folder.parent
    return folder


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def choose_storage(shape, sampler: str, options: dict | None = None, storage: str = "auto") -> str:
    """memory or disk: `auto` keeps the canvases in RAM while the ones the sampler keeps alive take at
    most MEMORY_FRACTION of the available memory."""
    if storage not in ("auto", "memory", "disk"):
        raise CanvasError(f"canvas storage must be auto, memory or disk, got {storage!r}")
    if storage != "auto":
        return storage
    need = canvases_alive(sampler, options) * math.prod(shape) * 4
    return "memory" if need <= MEMORY_FRACTION * available_memory_bytes() else "disk"


def allocated_bytes(folder: str | Path) -> int:
    """Bytes the files below `folder` occupy on disk (each hard-linked file once, sparse holes excluded)."""
    seen, total = set(), 0
    for path in Path(folder).rglob("*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if path.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def check_disk_space(folder: str | Path, need: int, what: str) -> None:
    """Raise one CanvasError line when `folder` has less than `need` bytes free."""
    free = free_disk_bytes(folder)
    if free < need:
        raise CanvasError(f"not enough disk space in {folder} for {what}: it needs about {_gb(need)}, "
                          f"{_gb(free)} are free (free some space or choose another folder)")


# ----------------------------------------------------------------------------------------------
# Resumable jobs.


def job_parameters(sampler: str, denoiser: TiledDenoiser, shape: Sequence[int], sigmas, seeds, extra_args: dict | None,
                   options: dict | None, job_key: str) -> dict:
    """Everything a canvas job's result depends on, in a hashable form (a checkpoint or a finished image
    made with other parameters is never taken for this job's)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    params = dict(version=_JOB_VERSION, sampler=sampler, options=dict(options or {}), sigmas=sigmas.tolist(),
                  shape=tuple(int(s) for s in shape), seeds=seeds, tiling=asdict(denoiser.config), tile=denoiser.tile,
                  overlap=denoiser.overlap, halo=denoiser.halo, extra_args=extra_args or {}, job_key=job_key)
    return _digest_value(params)


def job_digest(params: dict) -> str:
    """sha256 of `job_parameters`."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _digest_value(value) -> Any:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return ["tensor", str(data.dtype), list(data.shape), hashlib.sha256(data.numpy().tobytes()).hexdigest()]
    if isinstance(value, float):
        return float.hex(value)
    if isinstance(value, dict):
        return {str(k): _digest_value(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_digest_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


class _Job:
    """A sampling job's folder: `job.json` (the hash of every parameter), `scratch/` (this run's
    store files), `step-NNNNNN/` checkpoints (x before step N, the sampler's history, state.json).

    A checkpoint is written as `step-NNNNNN.tmp/` and renamed when complete, so a kill leaves either
    the old or the new one; stale temps and scratch files are removed when the job is opened."""

    def __init__(self, folder: str | Path, params: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.digest = job_digest(params)
        self._lock = open(self.folder / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise CanvasError(f"the canvas job in {self.folder} is being sampled by another process") from None
        meta = self.folder / "job.json"
        if meta.exists():
            if json.loads(meta.read_text()).get("digest") != self.digest:
                self._lock.close()
                raise CanvasError(f"{self.folder} holds a canvas job with other parameters; rerun that command to "
                                  "finish it, or remove the folder to start this one")
        else:
            write_atomic(meta, json.dumps({"digest": self.digest, "params": params}, sort_keys=True, indent=1))
        for stale in self.folder.glob("step-*.tmp"):
            shutil.rmtree(stale)
        self.scratch = self.folder / "scratch"
        shutil.rmtree(self.scratch, ignore_errors=True)  # store files of a killed run
        self.scratch.mkdir()

    def latest(self) -> tuple[int, Path, dict] | None:
        """(step, folder, state) of the newest complete checkpoint."""
        found = []
        for folder in self.folder.glob("step-*"):
            state_file = folder / "state.json"
            if folder.suffix != ".tmp" and state_file.exists():
                state = json.loads(state_file.read_text())
                if state.get("digest") == self.digest:
                    found.append((state["step"], folder, state))
        return max(found, key=lambda item: item[0]) if found else None

    def save(self, step: int, x: CanvasStore, history: CanvasStore | None, final: bool = False) -> None:
        name = self.folder / f"step-{step:06d}"
        tmp = name.with_name(name.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        x.save(tmp / "x.f32")
        if history is not None:
            history.save(tmp / "history.f32")
        state = dict(step=step, digest=self.digest, final=final, history=history is not None, time=time.time())
        write_atomic(tmp / "state.json", json.dumps(state))
        shutil.rmtree(name, ignore_errors=True)
        os.rename(tmp, name)
        _fsync_dir(self.folder)
        for old in self.folder.glob("step-*"):
            if old != name and old.suffix != ".tmp":
                shutil.rmtree(old)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._lock.close()


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a synced temp file and a rename: a kill leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# The sampling driver.


@dataclass
class CanvasResult:
    canvas: CanvasArray  # the sampler's result x0, (B, C, H, W), materialised
    storage: str  # memory | disk
    steps: int  # sampler steps run by this call (fewer when a job resumed)
    resumed_from: int | None  # the step a job resumed at
    tiles: int  # tiles evaluated by this call
    seconds: float

    @property
    def seconds_per_megapixel(self) -> float:
        """Wall seconds per canvas megapixel (all canvases of the batch, all steps of this call)."""
        B, _, H, W = self.canvas.shape
        return self.seconds / max(B * H * W / 1e6, 1e-12)


@torch.no_grad()
def sample_canvas(
    sampler: str,
    denoiser: TiledDenoiser,
    shape: Sequence[int],
    sigmas,
    *,
    seeds: int | Sequence[int] = 0,
    extra_args: dict | None = None,
    options: dict | None = None,
    storage: str = "auto",
    folder: str | Path | None = None,
    job: str | Path | None = None,
    checkpoint_every: int = 1,
    job_key: str = "",
    save: Callable[[CanvasArray], Any] | None = None,
    output_folder: str | Path | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> CanvasResult:
    """Run the sampler `sampler` (a name in samplers.SAMPLERS) over a tiled denoiser on canvases of
    `shape` (B, C, H, W) that live in RAM or on disk, with per-canvas block noise (`seeds`).

    - storage: auto | memory | disk (`choose_storage`); disk stores go to the job folder when there is
      one (checkpoints hard-link them), else to `folder` (default: the temp dir). Free disk space is
      checked before any work, including B·H·W·3 bytes (8-bit RGB, uncompressed) in `output_folder`.
    - job: a folder that makes the run resumable: every `checkpoint_every` steps x (and the history of
      a multistep sampler) is checkpointed; rerun with the same parameters after a kill, it continues
      from the last checkpoint and gives the same result bit for bit (on CPU). `job_key` names what
      else the result depends on (the model's weights and options: the caller's hash). When done,
      `save(canvas)` is called (write the outputs there) and the folder is removed.
    - options: the sampler's own options (eta, variance, S_churn, ...); extra_args: its conditioning.
    - progress: tiles and steps with ETA and megapixels per second on stderr (tqdm)."""
    log = log or (lambda message: None)
    shape = tuple(int(s) for s in shape)
    B, C, H, W = shape
    options = dict(options or {})
    sampler_fn = get_sampler(sampler)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    num_steps = len(sigmas) - 1
    denoiser.plan((H, W), float(sigmas[0]))  # impossible tile / overlap / size: one clear error, now
    denoiser.set_schedule(sigmas)
    if checkpoint_every < 1:
        raise CanvasError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    storage = choose_storage(shape, sampler, options, storage)
    history_arg = HISTORY_ARGS.get(sampler)
    canvas_bytes = math.prod(shape) * 4
    needs: dict[str, list] = {}  # file system -> [folder, bytes, what]

    def file_system(where) -> str:
        return str(os.stat(_existing(Path(where))).st_dev)

    def need(where, size: int, what: str) -> None:
        entry = needs.setdefault(file_system(where), [Path(where), 0, []])
        entry[1] += size
        entry[2].append(what)

    if storage == "disk":
        # A checkpoint's hard links keep at most one x (and one history) that the sampler has let go of.
        alive = canvases_alive(sampler, options) + (1 + (1 if history_arg else 0) if job is not None else 0)
        need(job if job is not None else folder or tempfile.gettempdir(), alive * canvas_bytes,
             f"{alive} canvases of {B}x{C}x{H}x{W} float32")
    elif job is not None:
        need(job, 2 * (1 + (1 if history_arg else 0)) * canvas_bytes, "the checkpoints")
    if output_folder is not None:
        need(output_folder, B * H * W * 3, "the images")
    if job is not None and Path(job).is_dir():
        # A resumed job's files are already on disk: its checkpoint is adopted as x, the rest is removed.
        entry = needs.get(file_system(job))
        if entry is not None:
            entry[1] = max(0, entry[1] - allocated_bytes(job))
    for where, size, what in needs.values():
        check_disk_space(where, size, " and ".join(what))

    state = _Job(job, job_parameters(sampler, denoiser, shape, sigmas, seeds, extra_args, options, job_key)) \
        if job is not None else None
    if storage == "disk":
        bound_malloc_heap()  # what the disk is for: a peak RSS that does not grow with the canvas
    if storage == "memory":
        space = CanvasSpace()
    elif state is not None:
        space = CanvasSpace(str(state.scratch), named=True)
    else:
        space = CanvasSpace(str(folder or tempfile.gettempdir()))
    noise = BlockNoise(seeds)

    start, x, previous = 0, None, None
    checkpoint = state.latest() if state is not None else None
    if checkpoint is not None:
        start, ckpt_folder, ckpt_state = checkpoint
        x = CanvasArray.from_store(space.adopt(ckpt_folder / "x.f32", shape), space)
        if ckpt_state["history"]:
            previous = CanvasArray.from_store(space.adopt(ckpt_folder / "history.f32", shape), space)
        log(f"resumed the canvas job in {job} at step {start} of {num_steps}")
    if x is None:
        x = noise.start(CanvasArray.full(shape, 0.0, space)) * float(sigmas[0])

    began, tiles_before = time.time(), denoiser.tiles_done
    per_call = B * denoiser.plan((H, W), float(sigmas[0])).count  # one grid: the MP/s of canvas work
    total = sum(B * denoiser.count((H, W), float(sigmas[i])) * (2 if sampler == "heun" and i < num_steps - 1 else 1)
                for i in range(start, num_steps))
    bar = _progress_bar(progress, total, f"canvas {W}x{H}" + (f" x{B}" if B > 1 else ""))
    last = {"denoised": previous}

    def on_tiles(n: int) -> None:
        bar.update(n)
        elapsed = max(time.time() - began, 1e-9)
        bar.set_postfix_str(f"{(denoiser.tiles_done - tiles_before) / per_call * B * H * W / 1e6 / elapsed:.2f} MP/s",
                            refresh=False)

    def on_step(info: dict) -> None:
        i = info["i"]
        bar.set_description_str(f"canvas {W}x{H} step {i + 1}/{num_steps}", refresh=False)
        if state is not None and i > start and i % checkpoint_every == 0:
            history = last["denoised"].store if history_arg else None
            state.save(i, info["x"].store, history)  # x before step i (materialised in place)
        if history_arg:
            last["denoised"] = info["denoised"]
        if callback is not None:
            callback(info)
        if i == start + 1:
            # From the callback of the step after it on, no sampler reads its starting x (or the
            # history it resumed with) again; only the frames of the call (the no_grad decorator,
            # sample_heun's argument, the sampler's parameters) hold them: free their canvases.
            while handed:
                handed.pop().release()

    if start < num_steps:
        kwargs = dict(options)
        if start > 0 and history_arg:
            kwargs[history_arg] = previous
        saved_hook, denoiser.on_tiles = denoiser.on_tiles, on_tiles
        handed = [x] + ([previous] if previous is not None else [])
        del x, previous
        try:
            x = sampler_fn(denoiser, handed[0], sigmas, extra_args=extra_args, noise_fn=noise,
                           callback=on_step, start=start, **kwargs)
        finally:
            denoiser.on_tiles = saved_hook
            bar.close()
        x.materialize()
        if state is not None and save is not None:
            state.save(num_steps, x.store, None, final=True)  # a kill while saving resumes here
    else:
        bar.close()
    result = CanvasResult(x, storage, num_steps - start, start if checkpoint else None,
                          denoiser.tiles_done - tiles_before, time.time() - began)
    if save is not None:
        save(x)
    if state is not None:
        state.remove()
    log(f"canvas {W}x{H}" + (f" x{B}" if B > 1 else "") + f": {result.steps} {sampler} steps, {result.tiles} tiles, "
        f"{result.seconds:.1f} s ({result.seconds_per_megapixel:.2f} s/MP), storage {storage}")
    return result


_HEAP_BOUNDED = []


def bound_malloc_heap(threshold: int = 64 * 1024) -> None:
    """Keep the process's RSS flat over long out-of-core runs (Linux/glibc; elsewhere nothing).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MB); after that, large
    temporaries (tile batches, conv activations, canvas blocks) come from the heap and fragment it, and
    the RSS creeps up with the number of tiles (measured: +15% from 1024² to 4096²). A fixed threshold,
    which also turns that adjustment off, gives every temporary of `threshold` bytes or more its own
    mapping, returned to the system when freed. Process-wide; done once, by disk-storage sampling."""
    if _HEAP_BOUNDED or not sys.platform.startswith("linux"):
        return
    _HEAP_BOUNDED.append(threshold)
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _progress_bar(enabled: bool, total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tile", desc=description, disable=not enabled, leave=False, file=sys.stderr,
                dynamic_ncols=True)


# ----------------------------------------------------------------------------------------------
# Streamed output: PNG in row strips, tiled BigTIFF.


def iter_rows(canvas, index: int = 0, rows: int = 32) -> Iterator[torch.Tensor]:
    """Canvas `index` of a CanvasArray or a tensor (B, C, H, W) as strips (C, rows, W), top to bottom."""
    _, _, H, W = canvas.shape
    if isinstance(canvas, CanvasArray):
        canvas.materialize()
    for y in range(0, H, rows):
        yield canvas.read(index, y, min(y + rows, H), 0, W) if isinstance(canvas, CanvasArray) \
            else canvas[index, :, y:y + rows]


def _strip_uint8(strip: torch.Tensor) -> np.ndarray:
    """(C, h, W) in [-1, 1] -> (h, W, 3) uint8 with exactly the rounding of images.to_uint8."""
    return to_uint8(strip[None])[0]


def _png_chunk(f, kind: bytes, data: bytes) -> None:
    f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_png_strips(path: str | Path, strips: Iterable[torch.Tensor], height: int, width: int,
                     level: int = 6) -> Path:
    """An 8-bit RGB PNG from float strips (C, h, W) in [-1, 1], never holding the whole image.

    PNG (ISO/IEC 15948): signature, IHDR (8-bit, colour type 2 = RGB, no interlace), one zlib stream
    of the scanlines, each preceded by its filter type byte (0 = None), split into IDAT chunks as it is
    compressed, IEND. Written to a temp name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rows = 0
    with open(tmp, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        _png_chunk(f, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        compressor, pending = zlib.compressobj(level), []
        for strip in strips:
            rgb = _strip_uint8(strip)  # (h, W, 3)
            if rgb.shape[1] != width:
                raise ValueError(f"a strip of width {rgb.shape[1]} for a PNG of width {width}")
            scanlines = np.concatenate([np.zeros((rgb.shape[0], 1), np.uint8), rgb.reshape(rgb.shape[0], -1)], 1)
            pending.append(compressor.compress(scanlines.tobytes()))
            if sum(map(len, pending)) >= 1 << 20:
                _png_chunk(f, b"IDAT", b"".join(pending))
                pending = []
            rows += rgb.shape[0]
        pending.append(compressor.flush())
        _png_chunk(f, b"IDAT", b"".join(pending))
        _png_chunk(f, b"IEND", b"")
    if rows != height:
        tmp.unlink()
        raise ValueError(f"the PNG writer got {rows} rows, expected {height}")
    tmp.replace(path)
    return path


def write_png(path: str | Path, canvas, index: int = 0, rows: int = 32, level: int = 6) -> Path:
    """Canvas `index` of a CanvasArray or tensor (B, C, H, W) in [-1, 1] as a PNG, streamed in row strips."""
    _, _, H, W = canvas.shape
    return write_png_strips(path, iter_rows(canvas, index, rows), H, W, level)


def _write_tiff_tiles(path: Path, tiles: Iterator[np.ndarray], height: int, width: int, tile: int,
                      compression: str | None) -> Path:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tiff:
        # maxworkers=1: tifffile's thread pool would gather up to 512 MB of tiles before compressing them.
        tiff.write(tiles, shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                   compression=compression, maxworkers=1)
    tmp.replace(path)
    return path


def _padded(rgb: np.ndarray, tile: int) -> np.ndarray:
    if rgb.shape[:2] == (tile, tile):
        return rgb
    out = np.zeros((tile, tile, 3), np.uint8)
    out[:rgb.shape[0], :rgb.shape[1]] = rgb
    return out


def write_tiff(path: str | Path, canvas, index: int = 0, tile: int = 256, compression: str | None = None) -> Path:
    """Canvas `index` (CanvasArray or tensor, in [-1, 1]) as a tiled BigTIFF (tifffile), read tile by tile;
    compression: None, 'zlib', 'zstd', ... (what tifffile's imagecodecs provides)."""
    _, _, H, W = canvas.shape
    if isinstance(canvas, CanvasArray):
        canvas.materialize()

    def tiles():
        for y in range(0, H, tile):
            for x in range(0, W, tile):
                region = canvas.read(index, y, min(y + tile, H), x, min(x + tile, W)) \
                    if isinstance(canvas, CanvasArray) else canvas[index, :, y:y + tile, x:x + tile]
                yield _padded(_strip_uint8(region), tile)

    return _write_tiff_tiles(Path(path), tiles(), H, W, tile, compression)


def write_tiff_strips(path: str | Path, strips: Iterable[torch.Tensor], height: int, width: int, tile: int = 256,
                      compression: str | None = None) -> Path:
    """A tiled BigTIFF from float strips (C, h, W) (e.g. `tiled_decode`), holding one band of `tile` rows."""

    def tiles():
        band, rows = np.zeros((0, width, 3), np.uint8), 0
        for strip in strips:
            band = np.concatenate([band, _strip_uint8(strip)])
            rows += strip.shape[1]
            while len(band) >= tile or (rows == height and len(band)):
                for x in range(0, width, tile):
                    yield _padded(band[:tile, x:x + tile], tile)
                band = band[tile:]
        if rows != height:
            raise ValueError(f"the TIFF writer got {rows} rows, expected {height}")

    return _write_tiff_tiles(Path(path), tiles(), height, width, tile, compression)


# ----------------------------------------------------------------------------------------------
# Tiled decoding of latent canvases.


class _Band:
    """Rows top..top+len of a decoded canvas, as blended tiles are added (one canvas, b = 0)."""

    def __init__(self, channels: int, width: int, dtype, device):
        self.top, self.dtype, self.device = 0, dtype, torch.device(device)
        self.rows = torch.empty((channels, 0, width), dtype=dtype, device=device)

    def extend(self, bottom: int) -> None:
        missing = bottom - self.top - self.rows.shape[1]
        if missing > 0:
            fresh = torch.full((self.rows.shape[0], missing, self.rows.shape[2]), -0.0, dtype=self.dtype,
                               device=self.device)  # -0 + a == a: one tile alone gives its own pixels
            self.rows = torch.cat([self.rows, fresh], 1)

    def add(self, b, y0, y1, x0, x1, values):
        self.rows[:, y0 - self.top:y1 - self.top, x0:x1] += values

    def pop(self, bottom: int) -> torch.Tensor:
        done, self.rows = self.rows[:, :bottom - self.top], self.rows[:, bottom - self.top:].clone()
        self.top = bottom
        return done


class _WrappedReader:
    """Regions of a canvas extended by `margin` (my, mx) on every side with its own opposite edges (a
    torus): position y of the extension reads canvas row (y − my) mod H, likewise columns."""

    def __init__(self, reader, height: int, width: int, margin: tuple[int, int]):
        self.reader, self.size, self.margin = reader, (height, width), margin

    @staticmethod
    def _pieces(start: int, stop: int, length: int, margin: int) -> list[tuple[int, int]]:
        pieces, y = [], start
        while y < stop:  # each piece: a run of canvas indices that does not cross the edge
            first = (y - margin) % length
            count = min(stop - y, length - first)
            pieces.append((first, first + count))
            y += count
        return pieces

    def read(self, b, y0, y1, x0, x1):
        (h, w), (my, mx) = self.size, self.margin
        rows = [torch.cat([self.reader.read(b, r0, r1, c0, c1) for c0, c1 in self._pieces(x0, x1, w, mx)], dim=-1)
                for r0, r1 in self._pieces(y0, y1, h, my)]
        return torch.cat(rows, dim=-2)


@torch.no_grad()
def tiled_decode(decode_fn: Callable[[torch.Tensor], torch.Tensor], latent, factor: int,
                 tile: int | tuple[int, int], overlap: int | tuple[int, int], window: str = "cosine",
                 index: int = 0, batch: int = 4, device=None, wrap: bool = False) -> Iterator[torch.Tensor]:
    """Decode canvas `index` of a latent canvas (CanvasArray or tensor (B, C, h, w)) tile by tile and
    yield the finished image rows as strips (3, rows, w·factor), top to bottom.

    decode_fn(latent tiles (N, C, th, tw)) -> images (N, 3, th·f, tw·f). Latent tiles overlap by
    `overlap` (a fixed grid, the last tile clamped to the edge; a tile larger than the latent is cut to
    it) and are blended in image space with the same separable windows as the TiledDenoiser, so one
    tile covering the latent gives exactly decode_fn of the whole latent. Memory: one band of tile
    rows of the image (tile height · f rows) and `batch` tiles.

    wrap: the latent is a torus (a `--wrap` canvas): it is decoded extended on every side by
    max(overlap, 4) of its own opposite rows and columns, and the image is cut back to h·f × w·f, so
    the decoder sees across the wrap edge what it sees across any joint and the image tiles with
    itself (decoded without, the edges meet the decoder's zero padding and no longer match)."""
    _, C, h, w = latent.shape
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    overlap = (overlap, overlap) if isinstance(overlap, int) else tuple(overlap)
    if min(tile) < 1 or min(overlap) < 0:
        raise TilingError(f"tiled decode needs a positive tile and an overlap >= 0, got {tile} and {overlap}")
    if isinstance(latent, CanvasArray):
        reader, dtype, device = latent.reader(), torch.float32, device or torch.device("cpu")
    else:
        reader, dtype, device = TensorReader(latent), latent.dtype, device or latent.device
    if not wrap:
        yield from _decode_strips(decode_fn, reader, (h, w), C, factor, tile, overlap, window, index, batch,
                                  dtype, device)
        return
    margin = tuple(min(max(o, 4), n) for o, n in zip(overlap, (h, w)))
    extended = (h + 2 * margin[0], w + 2 * margin[1])
    cut, top = (margin[0] * factor, (margin[0] + h) * factor), 0
    columns = slice(margin[1] * factor, (margin[1] + w) * factor)
    for strip in _decode_strips(decode_fn, _WrappedReader(reader, h, w, margin), extended, C, factor, tile, overlap,
                                window, index, batch, dtype, device):
        bottom = top + strip.shape[1]
        keep = strip[:, max(cut[0], top) - top:min(cut[1], bottom) - top, columns]
        top = bottom
        if keep.shape[1]:
            yield keep


def _decode_strips(decode_fn, reader, size: tuple[int, int], C: int, factor: int, tile: tuple[int, int],
                   overlap: tuple[int, int], window: str, index: int, batch: int, dtype, device
                   ) -> Iterator[torch.Tensor]:
    """tiled_decode over a canvas of `size` (h, w) read through `reader`."""
    h, w = size
    tile = (min(tile[0], h), min(tile[1], w))
    overlap = (min(overlap[0], tile[0] - 1), min(overlap[1], tile[1] - 1))
    rows = plan_axis(h, tile[0], overlap[0], window_kind=window)
    cols = plan_axis(w, tile[1], overlap[1], window_kind=window)
    image_rows = plan_axis(h * factor, tile[0] * factor, overlap[0] * factor, window_kind=window)
    image_cols = plan_axis(w * factor, tile[1] * factor, overlap[1] * factor, window_kind=window)
    band = None
    for k in range(len(rows.starts)):
        for first in range(0, len(cols.starts), batch):
            js = range(first, min(first + batch, len(cols.starts)))
            tiles = torch.stack([read_window(reader, index, rows.inputs[k], cols.inputs[j], tile, C, dtype, device)
                                 for j in js])  # (N, C, th, tw)
            images = decode_fn(tiles)  # (N, 3, th·f, tw·f)
            if tuple(images.shape[-2:]) != (tile[0] * factor, tile[1] * factor):
                raise ValueError(f"decode_fn returned {tuple(images.shape)} for latent tiles {tuple(tiles.shape)} "
                                 f"and factor {factor}")
            if band is None:
                band = _Band(images.shape[1], w * factor, images.dtype, images.device)
            band.extend(image_rows.starts[k] + tile[0] * factor)
            for n, j in enumerate(js):
                weight = image_rows.factors[k][:, None] * image_cols.factors[j][None, :]  # (th·f, tw·f) float64
                add_tile(band, 0, image_rows.outputs[k], image_cols.outputs[j],
                         weight.to(device=images.device, dtype=images.dtype) * images[n])
        bottom = image_rows.starts[k + 1] if k + 1 < len(rows.starts) else h * factor
        yield band.pop(bottom)



"""Any size, for every model: a denoiser over a whole canvas made of calls on tiles of the model's size.

A *tile model* denoises tiles of its native size (plus a halo of context it reads but does not
output). `TiledDenoiser` evaluates it on a grid of overlapping tiles and fuses the tiles' x0
estimates into one estimate over the canvas, MultiDiffusion's fused step (Bar-Tal et al. 2023,
eq. 3-5) with blend windows as in Mixture of Diffusers (Jiménez 2023):

    D(x; σ)[p] = Σ_k w_k(p) D_tile(x[tile k]; σ)[p − o_k] / Σ_k w_k(p)

Because it is a denoiser `D(x, sigma, **cond)` like any other, every sampler in `samplers.py` runs on
it unchanged, and the canvas can be a `torch.Tensor` or an out-of-core `canvas.CanvasArray`.

Two choices make the fusion exact where it should be:
- the windows are separable, w_k(y, x) = w(y − top_k) w(x − left_k), and the tiles form a Cartesian
  grid (every tile row has the same column starts), so the normaliser factorises,
  Σ_k w_k(y, x) = R(y) C(x) with R, C the per-axis sums of the windows over the tiles covering a
  coordinate. A tile contributes (w(y)/R(y)) (w(x)/C(x)) · tile output;
- where one tile alone covers a pixel its factor is w/w = 1 exactly, and the accumulator starts at
  −0.0 (−0 + a = a for every a), so one tile covering the canvas gives the untiled result bit for bit.

The tile grid is fixed (starts 0, s, 2s, …, the last one clamped to the canvas edge) or moves at
every call (`grid="random"`, Patch-DM's grid shift generalised): an offset (dy, dx) in [0, stride)
keyed by the seed and σ, tiles starting at −dy + k·s, pixels beyond the canvas read as the canvas
mirrored (without repeating the edge) within that grid extension and as zeros in the halo beyond it.
With `wrap` the canvas is a torus: reads, writes and the offset wrap around, so the output tiles with
itself.

`passes` K > 1 averages K fused estimates per call, each from the grid moved on from the call's own
offset by p steps of about stride/K (the nearest step coprime with the stride):

    D(x; σ) = (1/K) Σ_p D_p(x; σ),   offset_p = offset_0 + p · step  (mod stride)

so a tile boundary of one grid lies inside the tiles of the others and boundary artefacts are averaged
away, at K times the tile calls. A step coprime with the stride also puts the passes on different
phases of a network's own patch grid inside a tile (Luhman's 2×2 patches, DiMR's 4×4: with a stride
of 24 and K = 4, a step of 6 would give 4×4 patches two phases of four, a step of 7 gives all four).
Independent random offsets per pass could share a line, as a random grid alone lets a few late steps
do by chance (3 of 20 DDPM steps in one measured canvas, which left faint lines). `passes_last` N
limits the passes to the calls of the sampler's last N steps (`set_schedule` tells the denoiser the noise
levels), where the image's fine detail, and its seams, are decided.
"""

from __future__ import annotations

import functools
import itertools
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import torch

from patchdiffusion.errors import ConfigError
from patchdiffusion.rng import mix_seed

__all__ = [
    "WINDOWS",
    "GRIDS",
    "TilingError",
    "TileBox",
    "TileModel",
    "TilingConfig",
    "TiledDenoiser",
    "AxisPlan",
    "TilePlan",
    "window",
    "plan_axis",
    "check_tiling",
    "resolve_tiling",
    "read_window",
    "add_tile",
    "TensorReader",
]

WINDOWS = ("uniform", "linear", "cosine", "gaussian")
GRIDS = ("fixed", "random")
GAUSSIAN_STD = 0.1  # std of the gaussian window in tile sides (Mixture of Diffusers' variance 0.01)
GROUP = 256  # tiles are visited in square groups of about this many pixels: out-of-core reads stay local
_GRID_STREAM = 0x6772  # mix_seed stream of the random grid offsets


class TilingError(ConfigError):
    """A tile, overlap, window or canvas size that cannot work (one line for the user)."""


# ----------------------------------------------------------------------------------------------
# What a method provides, and the options.


@dataclass(frozen=True)
class TileBox:
    """One tile's output area in canvas coordinates; it may start before 0 / end past the canvas on a
    moved grid (mirrored pixels there) and, with wrap, run over the edge (read modulo the size)."""

    batch: int  # which canvas of the batch (index into B)
    top: int
    left: int
    height: int
    width: int
    canvas: tuple[int, int]  # (H, W) of the canvas


class TileModel(Protocol):
    """A denoiser over tiles: what each method provides.

    ``__call__(x, sigma, boxes, **cond)``: x (N, C, h + 2·halo, w + 2·halo), sigma (N,), boxes the N
    tiles' places, cond the conditioning of each tile's canvas; returns the x0 estimate of the tiles'
    own pixels (N, C, h, w), or a tuple (x0, v) for a model with a learned variance (both are blended).
    An optional ``check_tile(tile) -> None`` raises when the model cannot denoise tiles of that size.
    """

    tile: tuple[int, int]  # native (h, w) of a tile, canvas units
    halo: int  # context pixels on every side that the model reads but does not output

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, boxes: list[TileBox], **cond: Any): ...


@dataclass(frozen=True)
class TilingConfig:
    tile: tuple[int, int] | None = None  # (h, w) of a tile; None = the model's native tile
    overlap: tuple[int, int] | None = None  # pixels shared by neighbours, stride = tile − overlap; None = tile // 4
    window: str = "cosine"  # uniform (MultiDiffusion's plain average) | linear | cosine | gaussian
    grid: str = "fixed"  # fixed | random: a new offset of the grid at every call, keyed by seed and σ
    wrap: bool = False  # circular canvas: tiles cross the edges, the output tiles with itself
    batch: int = 4  # tiles per tile-model call (sets the peak memory)
    seed: int = 0  # seed of the random grid offsets
    passes: int = 1  # grids averaged at each call, moved by 1/passes of the stride (tile calls × passes): fewer seams
    passes_last: int = 0  # use the passes only in the sampler's last N steps (0: at every step)


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise TilingError(f"{name} must be an int or (h, w) ints, got {value!r}")
    return pair


def resolve_tiling(config: TilingConfig, model_tile) -> tuple[tuple[int, int], tuple[int, int]]:
    """(tile, overlap) of a config, the model's native tile and the default overlap filled in, checked."""
    tile = _pair(config.tile if config.tile is not None else model_tile, "tile")
    overlap = _pair(config.overlap, "overlap") if config.overlap is not None else (tile[0] // 4, tile[1] // 4)
    if min(tile) < 1:
        raise TilingError(f"tile must be positive, got {tile[0]}x{tile[1]} (h x w)")
    for axis, t, o in (("height", tile[0], overlap[0]), ("width", tile[1], overlap[1])):
        if not 0 <= o < t:
            raise TilingError(f"overlap must be in [0, tile) on each axis; the tile's {axis} is {t}, "
                              f"the overlap {o}")
    if config.window not in WINDOWS:
        raise TilingError(f"window must be one of {', '.join(WINDOWS)}, got {config.window!r}")
    if config.grid not in GRIDS:
        raise TilingError(f"grid must be one of {', '.join(GRIDS)}, got {config.grid!r}")
    if not isinstance(config.batch, int) or config.batch < 1:
        raise TilingError(f"the tile batch must be a positive int, got {config.batch!r}")
    if not isinstance(config.passes, int) or config.passes < 1:
        raise TilingError(f"passes must be a positive int, got {config.passes!r}")
    if not isinstance(config.passes_last, int) or config.passes_last < 0:
        raise TilingError(f"passes_last must be an int >= 0 (0: every step), got {config.passes_last!r}")
    return tile, overlap


def check_tiling(canvas_hw: tuple[int, int], config: TilingConfig, model) -> tuple[tuple[int, int], tuple[int, int]]:
    """Raise one clear TilingError for an impossible combination, before any work; returns (tile, overlap)."""
    tile, overlap = resolve_tiling(config, model.tile)
    height, width = canvas_hw
    if min(height, width) < 1:
        raise TilingError(f"the canvas must have a positive size, got {height}x{width} (h x w)")
    if not config.wrap and (height < tile[0] or width < tile[1]):
        raise TilingError(f"the canvas {height}x{width} is smaller than the model's {tile[0]}x{tile[1]} tile "
                          f"(h x w); make it at least the tile size, or use wrap")
    if hasattr(model, "check_tile"):
        model.check_tile(tile)
    return tile, overlap


# ----------------------------------------------------------------------------------------------
# Windows.


def window(kind: str, length: int, overlap: int) -> torch.Tensor:
    """Blend weights of one tile side at the pixel centres u + 1/2, (length,) float64, never 0.

    - uniform: 1 (MultiDiffusion's plain average);
    - linear: a ramp d/overlap, d the distance of the pixel centre to the nearer tile edge, up to 1;
      two neighbours' ramps sum to 1 across an overlap;
    - cosine: sin²(π/2 · min(d/overlap, 1)), also summing to 1 across an overlap, smooth at its ends;
    - gaussian: exp(−(u + 1/2 − length/2)² / (2 s²)) over the whole tile, s = 0.1·length
      (Mixture of Diffusers, Jiménez 2023, variance 0.01 in tile units)."""
    centres = torch.arange(length, dtype=torch.float64) + 0.5
    if kind == "uniform" or (kind in ("linear", "cosine") and overlap == 0):
        return torch.ones(length, dtype=torch.float64)
    if kind in ("linear", "cosine"):
        ramp = (torch.minimum(centres, length - centres) / overlap).clamp(max=1.0)
        return ramp if kind == "linear" else torch.sin(0.5 * math.pi * ramp) ** 2
    if kind == "gaussian":
        std = GAUSSIAN_STD * length
        return torch.exp(-((centres - 0.5 * length) ** 2) / (2 * std**2))
    raise TilingError(f"window must be one of {', '.join(WINDOWS)}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# The grid along one axis.


class Run(NamedTuple):
    """Positions dst..dst+length−1 of a tile window that read canvas indices src, src+step, …"""

    dst: int
    src: int
    length: int
    step: int  # +1, or −1 in a mirrored margin


def _runs(sources: Sequence[int | None]) -> tuple[Run, ...]:
    """Split per-position canvas indices (None = zero) into maximal runs of consecutive indices."""
    runs, i = [], 0
    while i < len(sources):
        if sources[i] is None:
            i += 1
            continue
        j, step = i + 1, 0
        while j < len(sources) and sources[j] is not None:
            delta = sources[j] - sources[j - 1]
            if delta not in (1, -1) or (step and delta != step):
                break
            step, j = delta, j + 1
        runs.append(Run(i, sources[i], j - i, step or 1))
        i = j
    return tuple(runs)


@dataclass(frozen=True)
class AxisPlan:
    """The tiles along one axis of a canvas: where they start, what they read, how they are weighted."""

    length: int  # the canvas side
    tile: int
    halo: int
    starts: tuple[int, ...]  # the tiles' first output pixel (< 0 or wrapping on a moved grid)
    mirror: tuple[int, int]  # mirrored pixels before / after the canvas (the grid's extension)
    inputs: tuple[tuple[Run, ...], ...]  # per tile: window position (halo included) -> canvas index
    outputs: tuple[tuple[Run, ...], ...]  # per tile: output position -> canvas index (pixels on the canvas)
    factors: tuple[torch.Tensor, ...] = field(repr=False)  # per tile: w / (sum of w over tiles), (tile,) float64


def _grid_starts(length: int, tile: int, stride: int, offset: int, grid: str, wrap: bool) -> list[int]:
    if wrap:  # ceil(length / stride) tiles around the circle; the last overlaps the first by >= overlap
        return [k * stride - offset for k in range(-(-length // stride))]
    if grid == "fixed":  # 0, s, 2s, ... and the last one clamped to end at the edge
        return list(range(0, length - tile, stride)) + [length - tile]
    starts = [-offset]  # a moved grid: from -offset until the canvas is covered
    while starts[-1] + tile < length:
        starts.append(starts[-1] + stride)
    return starts


def plan_axis(length: int, tile: int, overlap: int, halo: int = 0, offset: int = 0, grid: str = "fixed",
              wrap: bool = False, window_kind: str = "cosine") -> AxisPlan:
    """Tile starts, reads, writes and normalised blend factors along one axis of `length` pixels."""
    starts = _grid_starts(length, tile, tile - overlap, offset, grid, wrap)
    mirror = (0, 0) if wrap or grid == "fixed" else (-starts[0], starts[-1] + tile - length)

    def source(i: int) -> int | None:  # the canvas index a window position reads (None: zero)
        if wrap:
            return i % length
        if 0 <= i < length:
            return i
        if -mirror[0] <= i < 0:
            return -i
        if length <= i < length + mirror[1]:
            return 2 * (length - 1) - i
        return None

    def target(i: int) -> int | None:  # the canvas index an output position lands on (None: discarded)
        return i % length if wrap else (i if 0 <= i < length else None)

    inputs = tuple(_runs([source(i) for i in range(s - halo, s + tile + halo)]) for s in starts)
    outputs = tuple(_runs([target(i) for i in range(s, s + tile)]) for s in starts)
    w = window(window_kind, tile, overlap)
    coverage = torch.zeros(length, dtype=torch.float64)  # R(y): the window sums over the tiles covering y
    for runs in outputs:
        for run in runs:
            coverage[run.src:run.src + run.length] += w[run.dst:run.dst + run.length]
    factors = []
    for runs in outputs:
        f = torch.zeros(tile, dtype=torch.float64)
        for run in runs:  # a tile wider than a wrapped canvas covers some pixels twice: sum once, divide
            f[run.dst:run.dst + run.length] = w[run.dst:run.dst + run.length] / coverage[run.src:run.src + run.length]
        factors.append(f)
    return AxisPlan(length, tile, halo, tuple(starts), mirror, inputs, outputs, tuple(factors))


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one canvas at one call: a Cartesian grid rows × cols."""

    rows: AxisPlan
    cols: AxisPlan
    offset: tuple[int, int]  # (dy, dx) of the grid

    @property
    def count(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    def order(self) -> Iterator[tuple[int, int]]:
        """(row, col) tile indices in a fixed order: square groups of about GROUP pixels, row-major
        within and between groups, so that an out-of-core canvas is read and written locally."""
        for rows in _groups(self.rows.starts):
            for cols in _groups(self.cols.starts):
                for k in rows:
                    for j in cols:
                        yield k, j


def _groups(starts: Sequence[int]) -> list[range]:
    """Consecutive tile indices whose starts fall in the same GROUP-pixel cell."""
    groups, first = [], 0
    for i in range(1, len(starts) + 1):
        if i == len(starts) or starts[i] // GROUP != starts[first] // GROUP:
            groups.append(range(first, i))
            first = i
    return groups


# ----------------------------------------------------------------------------------------------
# Reading tiles and adding their outputs, for tensors (out-of-core canvases provide the same two).


class RegionReader(Protocol):
    def read(self, b: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """canvas[b, :, y0:y1, x0:x1] (inside the canvas) as a (C, h, w) tensor."""


class RegionAccumulator(Protocol):
    dtype: torch.dtype  # what it adds in
    device: torch.device

    def add(self, b: int, y0: int, y1: int, x0: int, x1: int, values: torch.Tensor) -> None:
        """canvas[b, :, y0:y1, x0:x1] += values (inside the canvas)."""

    def finish(self):
        """The accumulated canvas (the same kind of array as the denoiser's input)."""


class TensorReader:
    """Regions of a tensor canvas (B, C, H, W)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def read(self, b, y0, y1, x0, x1):
        return self.x[b, :, y0:y1, x0:x1]


class _TensorAccumulator:
    def __init__(self, shape, dtype, device):
        self.dtype, self.device = dtype, torch.device(device)
        self.out = torch.full(shape, -0.0, dtype=dtype, device=device)  # -0 + a == a, bit for bit

    def add(self, b, y0, y1, x0, x1, values):
        self.out[b, :, y0:y1, x0:x1] += values

    def finish(self):
        return self.out


def read_window(reader: RegionReader, b: int, rows: Sequence[Run], cols: Sequence[Run], size: tuple[int, int],
                channels: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """A tile's input window (C, h, w) assembled from runs of canvas rows × columns, zeros elsewhere."""
    out = torch.zeros((channels, *size), dtype=dtype, device=device)  # (C, h, w)
    for ry in rows:
        y0 = ry.src if ry.step > 0 else ry.src - ry.length + 1
        for rx in cols:
            x0 = rx.src if rx.step > 0 else rx.src - rx.length + 1
            piece = reader.read(b, y0, y0 + ry.length, x0, x0 + rx.length)
            if ry.step < 0:
                piece = piece.flip(1)
            if rx.step < 0:
                piece = piece.flip(2)
            out[:, ry.dst:ry.dst + ry.length, rx.dst:rx.dst + rx.length] = piece
    return out


def add_tile(accumulator: RegionAccumulator, b: int, rows: Sequence[Run], cols: Sequence[Run],
             values: torch.Tensor) -> None:
    """Add a tile's weighted output (C, h, w) to the canvas pixels it lands on."""
    for ry in rows:
        for rx in cols:
            accumulator.add(b, ry.src, ry.src + ry.length, rx.src, rx.src + rx.length,
                            values[:, ry.dst:ry.dst + ry.length, rx.dst:rx.dst + rx.length])


# ----------------------------------------------------------------------------------------------
# The tiled denoiser.


class TiledDenoiser:
    """``D(x, sigma, **cond)`` over a whole canvas from a tile model (see the module docstring).

    x: a tensor (B, C, H, W) or an out-of-core array that provides ``reader()`` (materialising it)
    and ``new_accumulator()`` (``canvas.CanvasArray``); the result is of the same kind. sigma: a
    scalar or (B,). Conditioning tensors whose first axis is B are indexed per tile's canvas; other
    values pass through. `device`: where tiles of an out-of-core canvas are evaluated (a tensor
    canvas uses its own device). `on_tiles(n)` is called after each tile-model call with its n tiles.
    A tensor canvas is blended in the dtype the tile model returns; an out-of-core one in float32.
    """

    def __init__(self, model: TileModel, config: TilingConfig | None = None, *, device=None,
                 on_tiles: Callable[[int], None] | None = None):
        self.model, self.config = model, config or TilingConfig()
        self.tile, self.overlap = resolve_tiling(self.config, model.tile)
        self.halo = int(getattr(model, "halo", 0))
        self.device = torch.device(device) if device is not None else None
        self.on_tiles = on_tiles
        self.calls = 0  # denoiser calls so far
        self.tiles_done = 0  # tiles evaluated so far
        self._plans: dict[tuple, TilePlan] = {}
        self.passes_below = math.inf  # calls at sigma <= this average `config.passes` grids (set_schedule)

    def set_schedule(self, sigmas) -> None:
        """The sampler's noise levels σ_0 > ... (> 0 or = 0 at the end): with `passes_last` N, only the
        calls of the last N steps (σ ≤ σ_{n−N} of n steps) average `passes` grids."""
        levels = [float(s) for s in sigmas]
        n, steps = self.config.passes_last, len(levels) - 1
        # float32 sigmas reach the denoiser: a relative margin keeps σ_{n−N} itself inside.
        self.passes_below = math.inf if n == 0 or n >= steps else levels[steps - n] * (1 + 1e-5)

    def passes_at(self, sigma: float) -> int:
        """How many grids a call at noise level sigma averages."""
        return self.config.passes if float(sigma) <= self.passes_below else 1

    @property
    def stride(self) -> tuple[int, int]:
        return self.tile[0] - self.overlap[0], self.tile[1] - self.overlap[1]

    def grid_offset(self, sigma: float, pass_index: int = 0) -> tuple[int, int]:
        """(dy, dx) in [0, stride) of the grid at noise level sigma: (0, 0) on a fixed grid; on a random
        grid a draw keyed by the seed and sigma's float32 bits (a resumed run gets the same offsets). Pass
        p > 0 of a call moves the grid on by p/K of the stride (K = passes)."""
        sy, sx = self.stride
        if self.config.grid == "fixed":
            dy = dx = 0
        else:
            bits = struct.unpack("<I", struct.pack("<f", float(sigma)))[0]
            generator = torch.Generator().manual_seed(mix_seed(_GRID_STREAM, self.config.seed, bits))
            dy = int(torch.randint(0, sy, (), generator=generator))
            dx = int(torch.randint(0, sx, (), generator=generator))
        if pass_index:
            step_y, step_x = (_pass_step(s, self.config.passes) for s in (sy, sx))
            dy, dx = (dy + pass_index * step_y) % sy, (dx + pass_index * step_x) % sx
        return dy, dx

    def plan(self, canvas_hw: tuple[int, int], sigma: float = 0.0, pass_index: int = 0) -> TilePlan:
        """The tiles of an H×W canvas at noise level sigma (in pass `pass_index` of the call)."""
        check_tiling(canvas_hw, self.config, self.model)
        offset = self.grid_offset(sigma, pass_index)
        grid = self.config.grid if pass_index == 0 else "random"
        key = (*canvas_hw, *offset, grid)
        if key not in self._plans:
            if len(self._plans) >= 16 * self.config.passes:
                self._plans.clear()
            c = self.config
            rows, cols = (plan_axis(canvas_hw[a], self.tile[a], self.overlap[a], self.halo, offset[a], grid, c.wrap,
                                    c.window) for a in (0, 1))
            self._plans[key] = TilePlan(rows, cols, offset)
        return self._plans[key]

    def count(self, canvas_hw: tuple[int, int], sigma: float = 0.0) -> int:
        """Tiles of one canvas per call, all passes (on a moved grid it varies by a row or column with sigma)."""
        return sum(self.plan(canvas_hw, sigma, p).count for p in range(self.passes_at(sigma)))

    @torch.no_grad()
    def __call__(self, x, sigma, **cond):
        B, C, H, W = x.shape
        tensor = isinstance(x, torch.Tensor)
        # Tiles of an out-of-core canvas are read from it (materialised first) and evaluated on `device`.
        reader = TensorReader(x) if tensor else x.reader()
        device, dtype = (x.device, x.dtype) if tensor else (self.device or torch.device("cpu"), torch.float32)
        sigmas = _per_canvas(sigma, B, dtype, device)  # (B,)
        # plans[b]: the grids canvas b averages at its sigma (one, or `passes`).
        plans = [[self.plan((H, W), s, p) for p in range(self.passes_at(s))] for s in sigmas.tolist()]
        tiles = ((b, plan, k, j) for b in range(B) for plan in plans[b] for k, j in plan.order())
        accumulators: list = []
        while batch := list(itertools.islice(tiles, self.config.batch)):
            # Denoise a batch of tile windows (halo included): x0 (and v) of the tiles' own pixels.
            outs = self._denoise_tiles(reader, plans, batch, sigmas, (H, W), C, dtype, device, cond)
            if not accumulators:  # the model's dtype for a tensor canvas; float32 out of core
                accumulators = [_TensorAccumulator(x.shape, o.dtype, x.device) if tensor else x.new_accumulator()
                                for o in outs]
            # Blend: add each tile times its normalised separable window, in a fixed order.
            for n, (b, plan, k, j) in enumerate(batch):
                rows, cols = plan.rows, plan.cols
                weight = rows.factors[k][:, None] * cols.factors[j][None, :]  # (h, w) float64
                if len(plans[b]) > 1:  # the mean of the passes (one pass: no factor, bit for bit untouched)
                    weight = weight / len(plans[b])
                for accumulator, o in zip(accumulators, outs):
                    tile_out = o[n].to(device=accumulator.device, dtype=accumulator.dtype)  # (C, h, w)
                    add_tile(accumulator, b, rows.outputs[k], cols.outputs[j],
                             weight.to(device=accumulator.device, dtype=accumulator.dtype) * tile_out)
            self.tiles_done += len(batch)
            if self.on_tiles is not None:
                self.on_tiles(len(batch))
        self.calls += 1
        results = tuple(a.finish() for a in accumulators)
        return results if len(results) > 1 else results[0]

    def _denoise_tiles(self, reader, plans, batch, sigmas, canvas_hw, channels, dtype, device, cond):
        """The tile model on the windows of `batch` [(canvas, plan, tile row, tile col)]; a tuple of outputs."""
        (th, tw), halo = self.tile, self.halo
        windows = [read_window(reader, b, plan.rows.inputs[k], plan.cols.inputs[j],
                               (th + 2 * halo, tw + 2 * halo), channels, dtype, device) for b, plan, k, j in batch]
        index = torch.tensor([b for b, _, _, _ in batch])
        boxes = [TileBox(b, plan.rows.starts[k], plan.cols.starts[j], th, tw, canvas_hw) for b, plan, k, j in batch]
        tile_cond = {name: _per_tile(value, index, len(plans)) for name, value in cond.items()}
        out = self.model(torch.stack(windows), sigmas[index.to(sigmas.device)], boxes, **tile_cond)
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            if tuple(o.shape) != (len(batch), channels, th, tw):
                raise ValueError(f"the tile model returned {tuple(o.shape)} for {len(batch)} tiles "
                                 f"of {channels}x{th}x{tw}")
        return outs


@functools.lru_cache(maxsize=64)
def _pass_step(stride: int, passes: int) -> int:
    """The integer nearest stride / passes that is coprime with the stride (the larger on a tie)."""
    target = stride / passes
    candidates = [s for s in range(1, stride + 1) if math.gcd(s, stride) == 1]
    return min(candidates, key=lambda s: (abs(s - target), -s))


def _per_canvas(sigma, batch: int, dtype, device) -> torch.Tensor:
    """sigma as a (B,) tensor: a (B,) tensor as is, a scalar repeated."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
        sigmas = sigma.reshape(-1).to(device)
        if len(sigmas) != batch:
            raise ValueError(f"sigma has {len(sigmas)} values for a batch of {batch} canvases")
        return sigmas
    return torch.full((batch,), float(sigma), dtype=dtype, device=device)


def _per_tile(value, index: torch.Tensor, batch: int):
    """A conditioning value for the tiles `index` (canvas indices): per-canvas tensors are indexed."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[index.to(value.device)]
    return value

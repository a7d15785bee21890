"""Memory-bounded sampling of a Patch-DM canvas of any H×W, streamed to disk.

The ordinary path (`Method.sample`) keeps whole canvases as tensors and lets any sampler walk them.
Here the canvas x_t lives outside the accelerator — in host memory or, for very large canvases, in
a numpy memmap on disk — and only one tile of patches at a time is on the device, so peak device
and anonymous host memory are set by `patch_batch`, not by H×W.

Why this works: DDIM and DDPM steps are elementwise once x̂0 is known,
    x_{s} = x̂0 + √(σ_s² − c²)·(x_t − x̂0)/σ_t + c·z        (DDIM; DDPM is its posterior form)
so a step can be applied tile by tile. The loop below computes x̂0 of one tile of output patches
from its (padded) neighbourhood of x_t, then runs the *existing* sampler function for one step
(σ_t → σ_s) on that tile with a denoiser that returns this x̂0. Neighbouring tiles still read x_t
from their margins, so the step writes into a second buffer (x_s), and the buffers swap after each
step. Samplers that evaluate the network twice per step (Heun) or remember earlier steps
(DPM-Solver++ 2M) do not decompose this way; they remain available through `Method.sample`.

With `model.grid_shift=random` the window grid of each step is moved by an offset (dy, dx) < p:
the tiles then cover the canvas mirrored by dy above and p − dy below (dx, p − dx at the sides),
which `CanvasStore.read` serves from the stored canvas, and only each tile's pixels on the canvas
are stepped and written.

Noise is drawn per canvas patch from a generator seeded by (seed, step, patch row, patch column),
so a canvas does not depend on `patch_batch` or on where it is stored. With DDIM (η = 0) the
result equals `Method.sample` started from the same x_T (tested).
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from patchdiffusion.config import ConfigError
from patchdiffusion.diffusion.precond import vp_coefficients
from patchdiffusion.diffusion.samplers import get_sampler
from patchdiffusion.rng import mix_seed

TILED_SAMPLERS = ("ddim", "ddpm")  # one network evaluation per step, Markov: decomposable into tiles
_INIT_STREAM, _STEP_STREAM = 11, 12


# ------------------------------------------------------------------------------------------------
# Canvas storage


class CanvasStore:
    """x_t of one canvas as two float32 (C, H, W) buffers, `current` and `next`, in RAM or memmapped on disk."""

    def __init__(self, channels: int, height: int, width: int, storage: str = "memory", folder: str | None = None):
        if storage not in ("memory", "disk"):
            raise ConfigError(f"canvas storage must be 'memory' or 'disk', got {storage!r}")
        shape = (channels, height, width)
        self.storage, self.shape = storage, shape
        self._tmp = None
        if storage == "disk":
            self._tmp = tempfile.TemporaryDirectory(prefix="patchdm-canvas-", dir=folder)
            self.current = np.memmap(os.path.join(self._tmp.name, "a.f32"), np.float32, "w+", shape=shape)
            self.next = np.memmap(os.path.join(self._tmp.name, "b.f32"), np.float32, "w+", shape=shape)
        else:
            self.current = np.zeros(shape, np.float32)
            self.next = np.zeros(shape, np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of the two buffers (what grows with H×W by nature)."""
        return 2 * int(np.prod(self.shape)) * 4

    def read(self, top: int, bottom: int, left: int, right: int,
             mirror: tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
        """current[:, top:bottom, left:right]; outside the canvas mirrored up to `mirror` pixels, then zeros."""
        from patchdiffusion.methods.patch_dm import read_region

        return read_region(self.current, top, bottom, left, right, mirror)

    def write_next(self, top: int, left: int, values: torch.Tensor) -> None:
        _, h, w = values.shape
        self.next[:, top:top + h, left:left + w] = values.detach().float().cpu().numpy()

    def swap(self) -> None:
        self.current, self.next = self.next, self.current

    def flush(self) -> None:
        if isinstance(self.current, np.memmap):
            self.current.flush()

    def close(self) -> None:
        self.current = self.next = None
        if self._tmp is not None:
            self._tmp.cleanup()


def patch_noise(seed: int, stream: int, step: int, rows: range, cols: range, p: int, channels: int,
                dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise (C, len(rows)·p, len(cols)·p) from one generator per canvas patch (r, c)."""
    blocks = []
    for r in rows:
        row = []
        for c in cols:
            g = torch.Generator().manual_seed(mix_seed(seed, stream, step, r, c))
            row.append(torch.randn((channels, p, p), generator=g, dtype=dtype))
        blocks.append(torch.cat(row, dim=2))
    return torch.cat(blocks, dim=1)


# ------------------------------------------------------------------------------------------------
# The tiled sampling loop


@dataclass
class TiledResult:
    store: CanvasStore  # store.current holds x0 in [-1, 1]
    seconds: float
    steps: int
    network_calls: int


@torch.no_grad()
def sample_canvas(method, net, height: int, width: int, *, seed: int, code: torch.Tensor | None = None,
                  sampler: str = "ddim", steps: int = 50, guidance: float = 1.0, eta: float = 0.0,
                  storage: str = "memory", folder: str | None = None, device: str | torch.device = "cpu",
                  x_init: torch.Tensor | None = None, progress: bool = False) -> TiledResult:
    """Sample one H×W canvas with a Patch-DM `method`/`net`, one tile on the device at a time.

    code: (K,) semantic code (None for a model without codes). x_init: optional starting noise
    (C, H, W), already scaled by σ_max (tests); otherwise drawn per canvas patch from `seed`."""
    import time

    from patchdiffusion.methods.patch_dm import shift_margins

    if sampler not in TILED_SAMPLERS:
        raise ConfigError(f"tiled canvas sampling supports {', '.join(TILED_SAMPLERS)} (one network call per "
                          f"step), not '{sampler}'; use Method.sample for canvases that fit in memory")
    method.check_canvas(height, width)
    device = torch.device(device)
    sampler_fn = get_sampler(sampler)
    options = {"eta": eta} if sampler == "ddim" else {}
    p, C = method.patch_size, method.image_channels
    sigmas = method.sampling_sigmas(steps).double()
    store = CanvasStore(C, height, width, storage, folder)
    tiles = {(height, width): method.tiles(height, width)}  # tile plans by (moved) canvas size
    predictor = method.predictor(net)
    cond = method.condition(net, 1, device, codes=None if code is None else code.reshape(1, -1))
    cond_code, keep = cond.get("code"), method.position_keep(cond["position_keep"], height, width)
    if guidance != 1.0:  # one call holds the conditional and the null branch (code 0, no position)
        cond_code = None if cond_code is None else torch.cat([cond_code, torch.zeros_like(cond_code)])
        keep = torch.cat([keep, torch.zeros_like(keep)])
    start, calls = time.time(), 0

    # x_T: per-patch noise × σ_max (or the given start).
    for tile in tiles[(height, width)]:
        rows, cols = range(tile.row, tile.row + tile.rows), range(tile.col, tile.col + tile.cols)
        if x_init is not None:
            values = x_init[:, tile.row * p:(tile.row + tile.rows) * p, tile.col * p:(tile.col + tile.cols) * p]
        else:
            values = patch_noise(seed, _INIT_STREAM, 0, rows, cols, p, C) * float(sigmas[0])
        store.write_next(tile.row * p, tile.col * p, values)
    store.swap()

    iterator = range(len(sigmas) - 1)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"canvas {width}x{height}", unit="step", leave=False)
    for i in iterator:
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        alpha = float(vp_coefficients(torch.tensor(sigma, dtype=torch.float64))[0])
        t = method.schedule.sigma_to_t(torch.tensor([sigma], dtype=torch.float64)).float().to(device)
        dy, dx = method.grid_offset(sigma)  # the window grid of this step, moved (mirrored margins) or not
        margins = shift_margins((dy, dx), p)
        moved = (height + margins[0] + margins[1], width + margins[2] + margins[3])
        if moved not in tiles:
            tiles[moved] = method.tiles(*moved)
        for tile in tiles[moved]:
            top, bottom, left, right = predictor.input_box(tile)  # on the moved grid
            region = store.read(top - dy, bottom - dy, left - dx, right - dx, margins).to(device)  # VE coordinates
            x_vp = (region * alpha)[None]  # (1, C, Hr, Wr)
            n = 2 if guidance != 1.0 else 1
            out = predictor(x_vp.expand(n, -1, -1, -1), [tile] * n, t.expand(n), cond_code, keep,
                            offset=(-dx / p, -dy / p))  # ε, v or x0
            calls += 1
            if n == 2:  # classifier-free guidance: u + s(c − u); x0 is affine in the output, so as in x0
                out = out[1:] + guidance * (out[:1] - out[1:])
            # The tile's own pixels that lie on the canvas (not in a mirrored margin), canvas coordinates.
            own_top, own_bottom = max(tile.row * p - dy, 0), min((tile.row + tile.rows) * p - dy, height)
            own_left, own_right = max(tile.col * p - dx, 0), min((tile.col + tile.cols) * p - dx, width)
            x = region[None, :, own_top - (top - dy):own_bottom - (top - dy),
                       own_left - (left - dx):own_right - (left - dx)]
            out = out[..., own_top + dy - tile.row * p:own_bottom + dy - tile.row * p,
                      own_left + dx - tile.col * p:own_right + dx - tile.col * p]
            x0 = method.x0_from_output(x, sigma, out).clamp(-1, 1)  # clip_denoised, after guidance

            def noise_fn(like, _sampler_step=None, box=(own_top, own_bottom, own_left, own_right), step=i):
                b_top, b_bottom, b_left, b_right = box  # noise of the canvas patches under the box, cropped to it
                rows, cols = range(b_top // p, -(-b_bottom // p)), range(b_left // p, -(-b_right // p))
                z = patch_noise(seed, _STEP_STREAM, step, rows, cols, p, C)
                return z[None, :, b_top - rows.start * p:b_bottom - rows.start * p,
                         b_left - cols.start * p:b_right - cols.start * p].to(like)

            # One step of the existing sampler, with the x̂0 just computed.
            x_next = sampler_fn(lambda *_a, **_k: x0, x, torch.tensor([sigma, sigma_next]),
                                noise_fn=noise_fn, **options)
            store.write_next(own_top, own_left, x_next[0])
        store.swap()
    store.flush()
    return TiledResult(store, time.time() - start, len(sigmas) - 1, calls)


# ------------------------------------------------------------------------------------------------
# Streaming output


def canvas_rows_uint8(array: np.ndarray, rows_per_chunk: int = 64) -> Iterator[np.ndarray]:
    """(C, H, W) float in [-1, 1] -> uint8 (h, W, C) row chunks, never the whole canvas at once."""
    _, H, _ = array.shape
    for y in range(0, H, rows_per_chunk):
        chunk = np.asarray(array[:, y:y + rows_per_chunk], dtype=np.float32)
        yield np.clip(np.round((chunk + 1) * 127.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def write_png_streaming(path: str | Path, height: int, width: int, chunks: Iterator[np.ndarray]) -> Path:
    """Write an 8-bit RGB PNG from row chunks (h, W, 3) with a streaming zlib compressor (PNG spec §11–12)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")

    def chunk(f, kind: bytes, data: bytes) -> None:
        f.write(struct.pack(">I", len(data)) + kind + data)
        f.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    with open(tmp, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        chunk(f, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB, no interlace
        compressor = zlib.compressobj(6)
        rows = 0
        for rgb in chunks:
            raw = np.concatenate([np.zeros((rgb.shape[0], 1), np.uint8), rgb.reshape(rgb.shape[0], -1)], axis=1)
            data = compressor.compress(raw.tobytes())  # filter byte 0 (None) before every row
            if data:
                chunk(f, b"IDAT", data)
            rows += rgb.shape[0]
        chunk(f, b"IDAT", compressor.flush())
        chunk(f, b"IEND", b"")
    if rows != height:
        tmp.unlink()
        raise ValueError(f"PNG writer got {rows} rows, expected {height}")
    tmp.replace(path)
    return path


def save_canvas(store: CanvasStore, path: str | Path, npy: bool = False) -> list[Path]:
    """The final canvas as a streamed PNG (and optionally a float32 .npy written through a memmap)."""
    C, H, W = store.shape
    written = [write_png_streaming(path, H, W, canvas_rows_uint8(store.current))]
    if npy:
        out = np.lib.format.open_memmap(str(Path(path).with_suffix(".npy")), "w+", np.float32, (C, H, W))
        for y in range(0, H, 256):
            out[:, y:y + 256] = store.current[:, y:y + 256]
        out.flush()
        written.append(Path(path).with_suffix(".npy"))
    return written


# ------------------------------------------------------------------------------------------------
# `patchdiff sample` for Patch-DM runs

DISK_THRESHOLD_PIXELS = 4096 * 4096 // 4  # `auto` storage keeps canvases above this many pixels on disk


def generate_canvases(run_dir: str | Path, out_dir: str | Path, num: int = 1, seed: int = 0,
                      height: int | None = None, width: int | None = None, sampler: str | None = None,
                      steps: int | None = None, guidance: float | None = None, eta: float | None = None,
                      code_from: int | None = None, storage: str = "auto", patch_batch: int | None = None,
                      npy: bool = False, device: str = "auto", use_ema: bool = True, progress: bool = True,
                      grid_shift: str | None = None, positions: str | None = None, log=print) -> list[Path]:
    """Write `num` canvases (image i from seed + i) of a Patch-DM run as PNGs, memory-bounded.

    Codes: `code_from` = the code of that training image (style reuse) for every canvas; else a
    new code from the run's latent code model (RUN/codes_model) when it has one; else the code of a
    training image drawn from the seed. grid_shift / positions override the run's model.grid_shift /
    model.positions (see PatchDMConfig)."""
    from patchdiffusion.codes import LatentCodeModel
    from patchdiffusion.rng import SampleRNG
    from patchdiffusion.sample import load_run
    from patchdiffusion.train import resolve_device

    device = resolve_device(device)
    loaded = load_run(run_dir, device, use_ema)
    method, net, config = loaded.method, loaded.net, loaded.config
    if config.method != "patch_dm":
        raise ConfigError(f"generate_canvases is for patch_dm runs; '{run_dir}' is a '{config.method}' run")
    if patch_batch:
        method.config.patch_batch = int(patch_batch)
    if grid_shift:
        method.config.grid_shift = grid_shift
    if positions:
        method.config.positions = positions
    method.validate()
    height, width = height or config.data.resolution[0], width or config.data.resolution[1]
    method.check_canvas(height, width)
    sampler = sampler or config.sample.sampler or method.default_sampler
    steps = steps or config.sample.num_steps or method.default_steps
    guidance = config.sample.guidance if guidance is None else guidance
    eta = config.sample.eta if eta is None else eta
    if storage == "auto":
        storage = "disk" if height * width > DISK_THRESHOLD_PIXELS else "memory"
    K = config.model.net.code_dim
    codes = [None] * num
    if K > 0:
        table = method.code_table(net)
        latent_dir = method.latent_dir(run_dir)
        if code_from is not None:
            if not 0 <= code_from < len(table):
                raise ConfigError(f"--code-from {code_from}: the run has codes for images 0..{len(table) - 1}")
            codes = [table[code_from]] * num
            log(f"codes: training image {code_from}'s code for every canvas (style reuse)")
        elif (latent_dir / "net.safetensors").is_file():
            model = LatentCodeModel.load(latent_dir, device)
            drawn = model.sample(SampleRNG([mix_seed(_INIT_STREAM, 1, seed + i) for i in range(num)], device))
            codes = list(drawn)
            log(f"codes: new codes from the latent code model in {latent_dir}")
        else:
            rows = [int(torch.randint(0, len(table), (), generator=torch.Generator().manual_seed(
                mix_seed(_INIT_STREAM, 2, seed + i)))) for i in range(num)]
            codes = [table[r] for r in rows]
            log(f"codes: no latent code model ({latent_dir}); using training images' codes {rows} "
                "(train one with `patchdiff train-codes --run RUN`)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    # Large canvases take minutes each: say up front how many are coming (sample's --num defaults to 16).
    log(f"sampling {num} canvas{'es' if num != 1 else ''} of {width}x{height} ({steps} {sampler} steps, guidance "
        f"{guidance}, window grid {method.config.grid_shift}, canvas in {storage}) into {out_dir}")
    for i in range(num):
        result = sample_canvas(method, net, height, width, seed=seed + i, code=codes[i], sampler=sampler,
                               steps=steps, guidance=guidance, eta=eta, storage=storage, folder=str(out_dir),
                               device=device, progress=progress)
        try:
            paths += save_canvas(result.store, out_dir / f"{seed + i:06d}.png", npy=npy)
        finally:
            result.store.close()
        log(f"canvas {seed + i}: {width}x{height}, {result.steps} {sampler} steps, {result.network_calls} net calls, "
            f"{result.seconds:.1f} s ({result.seconds / (height * width / 1e6):.1f} s/megapixel), "
            f"storage {storage}")
    return paths


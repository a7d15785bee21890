"""Any size in bounded memory, probed: peak RSS of sampling 1024² and 16384² canvases on disk.

Each size runs in a fresh interpreter (nothing measured before can leak into its peak) that builds a
tiny conv tile model (random weights: memory and time do not depend on them), samples `--steps`
DDIM steps of one canvas with `canvas.sample_canvas` (storage=disk, the same tile and tile batch
for every size) and streams the result to a tiled TIFF (or PNG, or nothing), then reports VmHWM —
the process's peak resident set, which counts everything it touched, libraries included — and the
RSS once the model was built. The canvas itself lives in files read and written with positional I/O,
so it is in the page cache, not in the process: the 16384² peak should stay within 1.3× of 1024².

    python -m benchmarks.any_size_memory_probe [--sizes 1024 16384] [--steps 2] [--tile 128] [--batch 8]
        [--output tiff] [--threads 1] [--folder DIR]

Prints one JSON line per size and the ratio; `probe(...)` returns the same as a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

TARGET = 1.3  # issue 16: peak RSS at 16384² within 1.3× of 1024² (same tile batch, tiny model)


def _worker(spec: dict) -> dict:
    import torch
    from torch import nn

    from benchmarks.common import proc_status_kib
    from patchdiffusion.canvas import sample_canvas, write_png, write_tiff
    from patchdiffusion.diffusion import edm_sigmas
    from patchdiffusion.diffusion.tiled import TiledDenoiser, TilingConfig

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1)).eval()

    class TinyConv:
        """x0 = x / (1 + σ²) + 0.1·net(x / √(1 + σ²)) on tiles of `tile`²."""

        tile, halo = (spec["tile"], spec["tile"]), 0

        @torch.no_grad()
        def __call__(self, x, sigma, boxes):
            s = sigma.reshape(-1, 1, 1, 1)
            return x / (1 + s * s) + 0.1 * net(x / (1 + s * s).sqrt())

    size = spec["size"]
    config = TilingConfig(overlap=(spec["tile"] // 4,) * 2, batch=spec["batch"], window="cosine")
    denoiser = TiledDenoiser(TinyConv(), config)
    denoiser(torch.zeros(1, 3, spec["tile"], spec["tile"]), 1.0)  # load the math libraries before measuring
    after_setup = proc_status_kib("VmRSS")["VmRSS"] * 1024
    out = os.path.join(spec["folder"], f"probe-{size}.{spec['output']}")
    writers = {"tiff": lambda c: write_tiff(out, c), "png": lambda c: write_png(out, c), "none": None}
    began = time.time()
    result = sample_canvas("ddim", denoiser, (1, 3, size, size), edm_sigmas(spec["steps"]), seeds=[0],
                           storage="disk", folder=spec["folder"], save=writers[spec["output"]])
    seconds = time.time() - began
    status = proc_status_kib("VmHWM", "VmRSS")
    if os.path.exists(out):
        os.remove(out)
    return dict(size=size, peak_rss_bytes=status["VmHWM"] * 1024, rss_after_setup_bytes=after_setup,
                seconds=seconds, sampling_seconds=result.seconds, tiles=result.tiles, steps=spec["steps"],
                seconds_per_megapixel_per_step=seconds / (size * size / 1e6) / spec["steps"])


def probe(sizes=(1024, 16384), steps: int = 2, tile: int = 128, batch: int = 8, output: str = "tiff",
          threads: int = 1, folder: str | None = None) -> dict:
    """Peak RSS of each size in a fresh process, and the ratio of the largest to the smallest."""
    from benchmarks.common import run_in_fresh_process

    folder = folder or tempfile.mkdtemp(prefix="any-size-probe-")
    cases = []
    for size in sizes:
        spec = dict(size=size, steps=steps, tile=tile, batch=batch, output=output, threads=threads, folder=folder)
        cases.append(run_in_fresh_process("benchmarks.any_size_memory_probe", spec, threads))
        print(json.dumps(cases[-1]), flush=True)
    ratio = cases[-1]["peak_rss_bytes"] / cases[0]["peak_rss_bytes"]
    return dict(cases=cases, ratio=ratio, target=TARGET, passed=ratio <= TARGET)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output", choices=("tiff", "png", "none"), default="tiff")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folder", help="where the canvas files go (default: a new temp folder)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    report = probe(args.sizes, args.steps, args.tile, args.batch, args.output, args.threads, args.folder)
    print(f"peak RSS {args.sizes[-1]}² / {args.sizes[0]}² = {report['ratio']:.3f} (target ≤ {TARGET})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

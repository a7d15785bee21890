"""Patch-DM's claim, measured: the memory of sampling a canvas does not grow with the canvas.

For canvases of 256², 1024² and 4096², with a fixed patch batch (`--patch-batch`, encoder patches
per network call), `canvas.sample_canvas` walks `--steps` DDIM steps (`--guidance`; ≠ 1 runs two
branches per call) over the method's tiled denoiser (tiles of the training size, the collage reading
p/2 into the neighbours) with the canvas kept (a) in host memory and (b) in files on disk. Each case runs in a fresh subprocess, which
  1. builds the collage U-Net (the CPU demo's widths, `--preset`'s net, random weights: memory and
     time do not depend on the weights) and runs one tile so the math libraries are loaded;
  2. CPU: resets the resident-set high-water mark (/proc/self/clear_refs) and reads VmRSS = the
     memory held once the model is loaded; CUDA: memory_allocated and a reset of the peak;
  3. samples, while a thread polls RssAnon (anonymous memory: what the process itself allocated,
     as opposed to file pages of the memmap that the kernel may drop) every 2 ms; then reads VmHWM
     (or torch.cuda.max_memory_allocated).
Peak working memory = VmHWM − after-load (it counts the memmap's file pages the process touched);
peak anonymous memory = max RssAnon − RssAnon after load. The canvas arrays (x_t and x_{t−1},
float32) are reported separately: they grow with H×W by nature. Time per megapixel is per step and
extrapolated to 50 steps, on a machine shared with other jobs.

    python -m benchmarks.patch_dm_memory [--steps 1] [--patch-batch 64] [--threads 1] [--device cpu] [--out-dir DIR]

Writes DIR/patch_dm_memory[.cuda].json and .png; exits 1 when the disk canvas's peak anonymous
memory at 4096² exceeds 1.3× that at 256².
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

from benchmarks.common import (
    bench_parser, machine_info, peak_memory, proc_status_kib, run_in_fresh_process, save_figure,
    start_working_memory, write_results,
)

SIDES = (256, 1024, 4096)
STORAGES = ("memory", "disk")
TARGET = 1.3  # issue 7: RssAnon of 4096² within 1.3× of 256² with the canvas on disk
MIB = 2**20


class AnonPoller:
    """Highest RssAnon seen by a thread polling /proc/self/status every `interval` s."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status_kib("RssAnon")["RssAnon"] * 1024)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status_kib("RssAnon")["RssAnon"] * 1024)


def build(preset: str, patch_batch: int, channels: int = 0):
    from patchdiffusion.methods import build_method
    from patchdiffusion.presets import preset_config

    config = preset_config(preset)
    config.model.patch_batch = patch_batch
    if channels:
        config.model.net.model_channels = channels
    method = build_method("patch_dm", config.model, config.data.resolution)
    method.bind_data(16)
    torch.manual_seed(0)
    return method, method.build_network()


def measure(side: int, storage: str, patch_batch: int, steps: int, preset: str, device: str, threads: int,
            folder: str, channels: int = 0, guidance: float = 1.5) -> dict:
    """One case, in this process: the numbers of the module docstring."""
    from patchdiffusion.canvas import sample_canvas
    from patchdiffusion.rng import SampleRNG

    torch.set_num_threads(threads)
    dev = torch.device(device)
    method, net = build(preset, patch_batch, channels)
    net = net.to(dev).eval()
    options = method.make_options({"code_from": 0})
    cond = method.sampling_condition(net, SampleRNG([0], dev), None, options)
    denoiser = method.tiled_denoiser(net, options, guidance, method.default_tiling(), device=dev)
    sigmas = method.sampling_sigmas(steps)
    tile = method.native_tile
    sample_canvas("ddim", denoiser, (1, 3, *tile), method.sampling_sigmas(1), extra_args=cond, storage="memory")
    out = dict(side=side, storage=storage, patch_batch=patch_batch, steps=steps, patch_size=method.patch_size,
               tile=list(tile), parameters=sum(q.numel() for q in net.parameters()),
               canvas_arrays_mib=2 * 3 * side * side * 4 / MIB)
    loaded, hwm_reset = start_working_memory(dev)
    if dev.type != "cuda":
        out["hwm_reset"] = hwm_reset
    anon_loaded = proc_status_kib("RssAnon")["RssAnon"] * 1024
    start = time.perf_counter()
    with AnonPoller() as poller:
        result = sample_canvas("ddim", denoiser, (1, 3, side, side), sigmas, seeds=0, extra_args=cond,
                               storage=storage, folder=folder)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    wall = time.perf_counter() - start
    peak = peak_memory(dev)
    finite = bool(torch.isfinite(result.canvas.read(0, 0, 64, 0, 64)).all())
    mp = side * side / 1e6
    out.update(after_load_mib=loaded / MIB, peak_mib=peak / MIB, working_mib=(peak - loaded) / MIB,
               anon_after_load_mib=anon_loaded / MIB, anon_peak_mib=poller.peak / MIB,
               anon_working_mib=(poller.peak - anon_loaded) / MIB, network_calls=result.tiles,
               seconds=wall, s_per_megapixel_per_step=wall / steps / mp,
               s_per_megapixel_50_steps_extrapolated=wall / steps / mp * 50, finite=finite)
    return out


def _run_case(args, side: int, storage: str) -> dict:
    """One case in a fresh interpreter: nothing measured before can leak into its peak."""
    spec = dict(side=side, storage=storage, patch_batch=args.patch_batch, steps=args.steps, preset=args.preset,
                device=args.device, threads=args.threads, folder=args.tmp_dir, channels=args.channels,
                guidance=args.guidance)
    return run_in_fresh_process("benchmarks.patch_dm_memory", spec, args.threads)


def run(args, command: str) -> dict:
    from patchdiffusion.presets import preset_config

    results = {storage: {} for storage in STORAGES}
    for storage in STORAGES:
        for side in args.sides:
            r = _run_case(args, side, storage)
            results[storage][str(side)] = r
            print(f"{side:5d}² {storage:6s}: working {r['working_mib']:8.1f} MiB, anon working "
                  f"{r['anon_working_mib']:7.1f} MiB (peak RssAnon {r['anon_peak_mib']:.0f}), canvas arrays "
                  f"{r['canvas_arrays_mib']:7.1f} MiB; {r['s_per_megapixel_per_step']:.1f} s/MP/step", flush=True)
    small, large = str(min(args.sides)), str(max(args.sides))
    disk = results["disk"]
    ratio = disk[large]["anon_peak_mib"] / disk[small]["anon_peak_mib"]
    name = f"disk: peak RssAnon {large}² <= {TARGET}x {small}²"
    checks = {name: dict(ratio=ratio, limit=TARGET, holds=ratio <= TARGET)}
    return dict(
        benchmark="patch_dm_memory", command=command, machine=machine_info(torch.device(args.device)),
        note=("each case in a fresh process. working = VmHWM − VmRSS after loading (high-water mark reset through "
              "/proc/self/clear_refs; includes memmap file pages the process touched); anon = peak RssAnon (polled "
              "every 2 ms) − RssAnon after loading; CUDA: max_memory_allocated − memory_allocated. canvas arrays = "
              "x_t and x_{t-1} in float32 (in RAM for 'memory', in files for 'disk'). Random weights (memory and "
              "time do not depend on them). Times on a CPU shared with other jobs."),
        config=dict(preset=args.preset, channels=args.channels, guidance=args.guidance, patch_batch=args.patch_batch,
                    steps=args.steps, threads=args.threads, grid_shift=preset_config(args.preset).model.grid_shift,
                    sampler="ddim", sides=list(args.sides)),
        results=results, checks=checks, all_hold=all(c["holds"] for c in checks.values()),
    )


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, sides = report["results"], [str(s) for s in report["config"]["sides"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    ax = axes[0]
    for storage, color in zip(STORAGES, ("tab:blue", "tab:green")):
        ax.plot(sides, [results[storage][s]["working_mib"] for s in sides], "o-", color=color,
                label=f"{storage}: peak working (VmHWM − loaded)")
        ax.plot(sides, [results[storage][s]["anon_working_mib"] for s in sides], "s--", color=color,
                label=f"{storage}: peak anonymous (RssAnon − loaded)")
    ax.plot(sides, [results["memory"][s]["canvas_arrays_mib"] for s in sides], "k:",
            label="canvas arrays (x_t, x_t−1)")
    ax.set_yscale("log")
    ax.set_xlabel("canvas side (pixels)")
    ax.set_ylabel("MiB")
    check = next(iter(report["checks"].items()))
    ax.set_title(f"{check[0]}: ×{check[1]['ratio']:.2f}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for storage, color in zip(STORAGES, ("tab:blue", "tab:green")):
        ax.plot(sides, [results[storage][s]["s_per_megapixel_per_step"] for s in sides], "o-", color=color,
                label=storage)
    ax.set_xlabel("canvas side (pixels)")
    ax.set_ylabel("s per megapixel per DDIM step")
    ax.set_title("time (CPU shared with other jobs)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    c, m = report["config"], report["machine"]
    fig.suptitle(f"Patch-DM canvas sampling memory — preset {c['preset']} (model_channels "
                 f"{c['channels'] or 'as preset'}, guidance {c['guidance']}), patch batch {c['patch_batch']}; "
                 f"{m['device']}, {c['threads']} thread(s)", fontsize=10)
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("patch-dm-memory", __doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sides", type=int, nargs="+", default=list(SIDES))
    parser.add_argument("--steps", type=int, default=1, help="DDIM steps walked per case (memory peaks in the first)")
    parser.add_argument("--patch-batch", type=int, default=64)
    parser.add_argument("--preset", default="patch-dm-cpu", help="preset whose collage U-Net is measured")
    parser.add_argument("--channels", type=int, default=0, help="override the net's model_channels (0 = the preset's)")
    parser.add_argument("--guidance", type=float, default=1.5, help="guidance scale (≠ 1: two branches per call)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tmp-dir", default=None, help="folder for the disk canvases (default: the system's)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0
    command = "python -m benchmarks.patch_dm_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run(args, command.strip())
    stem = write_results(report, args.out_dir, "patch_dm_memory", torch.device(args.device), plot)
    print(f"wrote {stem}.json and {stem}.png; all targets hold: {report['all_hold']}")
    return 0 if report["all_hold"] else 1


if __name__ == "__main__":
    sys.exit(main())

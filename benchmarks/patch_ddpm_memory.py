"""Patch-based DDPM's claim, measured: the peak *working* memory of sampling falls with the number of patches.

Arakawa et al. 2023 (abstract, Table 1): 2×2 division halves the maximum memory of sampling. Here,
for a batch of 16 images at 128² and for one image at 256² and at 512², and for N = 1, 2, 4, 8, a
short ancestral-DDPM walk (`--steps`, default 3 denoiser calls) samples the full canvas with one
grid cell per network call (`patch_batch` 1, i.e. B patches per call); each case runs in a fresh
subprocess, which:
  1. builds the model (same U-Net widths for every N; only its input/embedding layers differ),
     and runs it once on one tiny patch so the math libraries are loaded;
  2. CPU: resets the resident-set high-water mark (writes 5 to /proc/self/clear_refs; if the kernel
     refuses, the figure is VmHWM after minus VmRSS before, which may include earlier peaks) and
     reads VmRSS = the memory held once the model is loaded; CUDA: memory_allocated after loading
     and a reset of the peak statistics;
  3. samples, then reads the peak (VmHWM, or torch.cuda.max_memory_allocated).
Peak working memory = peak − after-load: the runtime and the weights, the same for every N, are left
out because they would hide the effect. The same walk with all D² cells in one call (`patch_batch`
0, what the reference code does) is measured at 16×128² as a control: without chunking there is
no saving. Time per image is the walk's time per denoiser call × 1000 steps / batch, as wall time and as
this process's CPU time (less disturbed by other jobs on a shared machine): extrapolated.

    python -m benchmarks.patch_ddpm_memory [--dim 32] [--steps 3] [--threads 1] [--device cpu] [--out-dir DIR]

Writes DIR/patch_ddpm_memory[.cuda].json and .png; exits 1 when a target (N=2 ≤ 0.55×, N=4 ≤ 0.35× of N=1)
does not hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.common import (
    machine_info, peak_memory, run_in_fresh_process, save_figure, start_working_memory, write_results,
)

DIVIDERS = (1, 2, 4, 8)
CASES = (("16×128²", 16, 128), ("1×256²", 1, 256), ("1×512²", 1, 512))  # (name, batch, side)
TARGETS = {2: 0.55, 4: 0.35}  # the acceptance: peak working memory at N over N = 1
MIB = 2**20


# ------------------------------------------------------------------------------------------------
# the measured process


def measure(divider: int, batch: int, side: int, patch_batch: int, steps: int, dim: int, mults: list[int],
            device: str, threads: int) -> dict:
    """One case, in this process: the numbers of the module docstring."""
    from patchdiffusion.methods.patch_ddpm import PatchDDPMConfig, PatchDDPMMethod
    from patchdiffusion.nets.ddpm_unet import DDPMUNetConfig
    from patchdiffusion.rng import SampleRNG

    torch.set_num_threads(threads)
    dev = torch.device(device)
    method = PatchDDPMMethod(PatchDDPMConfig(net=DDPMUNetConfig(dim=dim, dim_mults=tuple(mults)),
                                             patch_divider=divider), (side, side))
    torch.manual_seed(0)
    net = method.build_network().to(dev).eval()
    with torch.no_grad():  # load the kernels' libraries on one smallest patch, so they do not count as working memory
        p = method.config.net.size_divisor
        net.unet(torch.zeros(1, 3, p, p, device=dev), torch.zeros(1, device=dev),
                 torch.zeros(1, divider**2, device=dev) if net.position else None,
                 torch.zeros(1, 3, p, p, device=dev) if net.gcc else None)
    rng = SampleRNG(list(range(batch)), dev)
    calls = []
    out = dict(divider=divider, batch=batch, side=side, patch_batch=patch_batch, steps=steps,
               parameters=sum(q.numel() for q in net.parameters()))
    loaded, hwm_reset = start_working_memory(dev)
    if dev.type != "cuda":
        out["hwm_reset"] = hwm_reset
    start, cpu_start = time.perf_counter(), time.process_time()
    images = method.sample(net, rng, steps=steps, options={"patch_batch": patch_batch},
                           callback=lambda info: calls.append(time.perf_counter()))
    peak = peak_memory(dev)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    out.update(after_load_mib=loaded / MIB, peak_mib=peak / MIB, working_mib=(peak - loaded) / MIB,
               walk_s=wall, s_per_call=wall / steps, cpu_s_per_call=cpu / steps, finite=bool(torch.isfinite(images).all()),
               s_per_image_1000_steps_extrapolated=wall / steps * 1000 / batch,
               cpu_s_per_image_1000_steps_extrapolated=cpu / steps * 1000 / batch)
    return out


def _run_case(args, divider: int, batch: int, side: int, patch_batch: int) -> dict:
    """One case in a fresh interpreter: nothing measured before can leak into its peak."""
    spec = dict(divider=divider, batch=batch, side=side, patch_batch=patch_batch, steps=args.steps, dim=args.dim,
                mults=args.mults, device=args.device, threads=args.threads)
    return run_in_fresh_process("benchmarks.patch_ddpm_memory", spec, args.threads)


# ------------------------------------------------------------------------------------------------


def run(args, command: str) -> dict:
    results = {}
    for name, batch, side in CASES:
        rows = {}
        for divider in DIVIDERS:
            rows[str(divider)] = _run_case(args, divider, batch, side, patch_batch=1)
            r = rows[str(divider)]
            print(f"{name:9s} N={divider}: working {r['working_mib']:8.1f} MiB (after load {r['after_load_mib']:.0f}, "
                  f"peak {r['peak_mib']:.0f}); {r['s_per_call']:.2f} s, {r['cpu_s_per_call']:.2f} CPU-s per step", flush=True)
        base = rows["1"]["working_mib"]
        for r in rows.values():
            r["ratio_vs_n1"] = r["working_mib"] / base
            r["time_ratio_vs_n1"] = r["s_per_call"] / rows["1"]["s_per_call"]
            r["cpu_time_ratio_vs_n1"] = r["cpu_s_per_call"] / rows["1"]["cpu_s_per_call"]
        results[name] = rows
    control = {}
    name, batch, side = CASES[0]
    for divider in DIVIDERS[1:]:
        r = _run_case(args, divider, batch, side, patch_batch=0)
        r["ratio_vs_n1"] = r["working_mib"] / results[name]["1"]["working_mib"]
        control[str(divider)] = r
        print(f"{name:9s} N={divider}, all {divider**2} cells in one call (control): working "
              f"{r['working_mib']:8.1f} MiB = {r['ratio_vs_n1']:.2f}× N=1", flush=True)
    checks = {}
    for name in results:
        for divider, limit in TARGETS.items():
            ratio = results[name][str(divider)]["ratio_vs_n1"]
            checks[f"{name} N={divider} <= {limit}x N=1"] = dict(ratio=ratio, limit=limit, holds=ratio <= limit)
    device = torch.device(args.device)
    return dict(
        benchmark="patch_ddpm_memory",
        command=command,
        machine=machine_info(device),
        note=("peak working memory = peak minus the memory held after loading the model, each case in a fresh "
              "process; CPU: VmHWM - VmRSS (high-water mark reset through /proc/self/clear_refs), CUDA: "
              "max_memory_allocated - memory_allocated. Times are extrapolated from a short walk to 1000 steps, "
              "on a machine shared with other jobs."),
        config=dict(dim=args.dim, dim_mults=args.mults, steps=args.steps, threads=args.threads, patch_batch=1,
                    sampler="ddpm", dividers=list(DIVIDERS), cases=[c[0] for c in CASES]),
        results=results,
        control_all_cells_one_call=control,
        checks=checks,
        all_hold=all(c["holds"] for c in checks.values()),
    )


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / len(DIVIDERS)
    colors = ["tab:gray", "tab:blue", "tab:green", "tab:purple"]
    for panel, key, label in ((0, "working_mib", "peak working memory (MiB)"),
                              (1, "cpu_s_per_image_1000_steps_extrapolated", "CPU-s per image, 1000 steps (extrapolated)")):
        ax = axes[panel]
        for i, divider in enumerate(DIVIDERS):
            xs = [c + (i - 1.5) * width for c in range(len(results))]
            vals = [results[name][str(divider)][key] for name in results]
            bars = ax.bar(xs, vals, width, label=f"N={divider} ({divider}×{divider})", color=colors[i])
            if panel == 0:
                ax.bar_label(bars, labels=[f"×{results[n][str(divider)]['ratio_vs_n1']:.2f}" for n in results],
                             fontsize=7)
        ax.set_xticks(range(len(results)), list(results))
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    control = report["control_all_cells_one_call"]
    axes[0].set_title("one cell per call (labels: ratio to N=1); targets N=2 ≤ 0.55×, N=4 ≤ 0.35×\n"
                      "control, all cells in one call at 16×128²: "
                      + ", ".join(f"N={d} ×{r['ratio_vs_n1']:.2f}" for d, r in control.items()), fontsize=9)
    axes[0].legend(fontsize=8)
    axes[1].set_title("time per image: this process's CPU time (wall time is in the JSON; the CPU was shared)", fontsize=9)
    m, c = report["machine"], report["config"]
    fig.suptitle(f"Patch-based DDPM sampling memory — U-Net dim {c['dim']}, mults {c['dim_mults']}; {m['device']}, "
                 f"{c['threads']} thread(s)", fontsize=11)
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchdiff bench patch-ddpm-memory", description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=32, help="U-Net base width (reference: 128)")
    parser.add_argument("--mults", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3, help="denoiser calls of the measured walk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return 0
    command = "python -m benchmarks.patch_ddpm_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args, command.strip())
    write_results(report, args.out_dir, "patch_ddpm_memory", torch.device(args.device), plot)
    for check, c in report["checks"].items():
        print(f"{check:32s} {c['ratio']:.3f}  {'holds' if c['holds'] else 'DOES NOT HOLD'}")
    return 0 if report["all_hold"] else 1


if __name__ == "__main__":
    sys.exit(main())

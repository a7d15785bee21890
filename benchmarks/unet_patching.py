"""Luhman & Luhman's claim, measured: a P=4 U-Net at 256x256 costs about what a P=1 U-Net costs at 64x64.

One U-Net configuration (same widths, same levels, attention at the same level) is run on
  (a) P=4 at 256x256   (internal grid 64x64)
  (b) P=1 at  64x64    (internal grid 64x64)
  (c) a reference: P=1 at 256x256 on CUDA (internal 256x256); on CPU that takes minutes per step,
      so P=2 at 128x128 is timed instead, and P=1 at 256x256 only gets its FLOPs counted.
Forward+backward times are taken side by side in one run: every repeat visits every case (in a
rotating order), and the median over repeats is reported, as wall time and as this process's CPU
time (the latter is less sensitive to other programs sharing the host's cores). FLOPs come from
torch.utils.flop_counter.FlopCounterMode on the meta device (no compute). On CUDA, peak memory too.

    python -m benchmarks.unet_patching [--device cuda] [--repeats 11] [--batch 4] [--out-dir DIR]

Writes DIR/unet_patching.json and DIR/unet_patching.png (DIR/unet_patching.<device>.* off CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import machine_info, save_figure, write_results
from torch.utils.flop_counter import FlopCounterMode

from patchdiffusion.nets import UNetConfig, build_unet, count_parameters

# The shared network: 'small' widths with Luhman's options on. Attention sits at level ATTN_LEVEL
# (side 16 on a 64x64 internal grid) in every case, so all cases run the same architecture.
BASE = dict(model_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, head_channels=64,
            position_map=True, learn_sigma=True, time_embed_dim=64 * 2)
ATTN_LEVEL = 2


def case_config(patch_size: int, image_side: int) -> UNetConfig:
    internal = image_side // patch_size
    return UNetConfig(**BASE, patch_size=patch_size, resolution=image_side,
                      attention_resolutions=(internal // 2**ATTN_LEVEL,))


def count_flops(config: UNetConfig, batch: int, image_side: int) -> tuple[int, int]:
    """(forward FLOPs, forward+backward FLOPs), counted on the meta device."""
    with torch.device("meta"):
        net = build_unet(config)
        x = torch.randn(batch, config.in_channels, image_side, image_side)
        t = torch.rand(batch)
    with FlopCounterMode(display=False) as fwd:
        out = net(x, t)
    with FlopCounterMode(display=False) as bwd:
        out.square().mean().backward()
    return fwd.get_total_flops(), fwd.get_total_flops() + bwd.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
    net.zero_grad(set_to_none=True)
    net(x, t).float().square().mean().backward()


def run(device: str = "cpu", repeats: int = 11, batch: int | None = None, out_dir: str = "benchmarks/results",
        full_reference: bool | None = None, command: str | None = None) -> dict:
    """Time, count and plot the three cases; write JSON + PNG to out_dir and return the results dict."""
    dev = torch.device(device)
    batch = batch or (16 if dev.type == "cuda" else 4)
    if full_reference is None:
        full_reference = dev.type == "cuda"
    ref = (1, 256) if full_reference else (2, 128)
    cases = {  # name: (patch_size, image side)
        "a: P=4 @ 256": (4, 256),
        "b: P=1 @ 64": (1, 64),
        f"c: P={ref[0]} @ {ref[1]}": ref,
    }

    # Build every net from the same seed; only the first conv's input and the heads' outputs differ.
    nets, inputs, results = {}, {}, {}
    for name, (p, side) in cases.items():
        cfg = case_config(p, side)
        torch.manual_seed(0)
        nets[name] = build_unet(cfg).to(dev)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, side, side, generator=g).to(dev)
        inputs[name] = (x, torch.rand(batch, generator=g).to(dev))
        fwd, total = count_flops(cfg, batch, side)
        results[name] = dict(patch_size=p, image_side=side, internal_side=side // p, batch=batch,
                             params=count_parameters(nets[name]), flops_forward=fwd, flops_fwd_bwd=total,
                             times_s=[], cpu_times_s=[])
    if not full_reference:  # FLOPs only: too slow to time here
        fwd, total = count_flops(case_config(1, 256), batch, 256)
        results["P=1 @ 256 (FLOPs only)"] = dict(patch_size=1, image_side=256, internal_side=256, batch=batch,
                                                  flops_forward=fwd, flops_fwd_bwd=total, times_s=[])

    # Warm up, then interleave the timed repeats, rotating the order each time.
    names = list(cases)
    for name in names:
        for _ in range(2 if dev.type == "cuda" else 1):
            train_step(nets[name], *inputs[name])
    sync(dev)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(dev)
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(nets[name], *inputs[name])
            sync(dev)
            results[name]["times_s"].append(time.perf_counter() - start)
            results[name]["cpu_times_s"].append(time.process_time() - cpu_start)

    if dev.type == "cuda":  # peak memory of one training step per case, measured alone
        for name in names:
            nets[name].zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            train_step(nets[name], *inputs[name])
            sync(dev)
            results[name]["peak_memory_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20

    for res in results.values():
        if res["times_s"]:
            res["median_s"] = statistics.median(res["times_s"])
            res["median_cpu_s"] = statistics.median(res["cpu_times_s"])
    a, b = results[names[0]], results[names[1]]
    summary = dict(
        time_ratio_a_over_b=a["median_s"] / b["median_s"],
        cpu_time_ratio_a_over_b=a["median_cpu_s"] / b["median_cpu_s"],  # robust to other load on the host
        flops_ratio_a_over_b=a["flops_fwd_bwd"] / b["flops_fwd_bwd"],
        target_time_ratio=1.25,
    )
    if "peak_memory_mib" in a:
        summary["memory_ratio_a_over_b"] = a["peak_memory_mib"] / b["peak_memory_mib"]
    report = dict(
        benchmark="unet_patching",
        command=command or "python -m benchmarks.unet_patching " + " ".join(sys.argv[1:]),
        machine=machine_info(dev),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in BASE.items()} | {"attention_level": ATTN_LEVEL},
        repeats=repeats,
        cases=results,
        summary=summary,
    )

    write_results(report, out_dir, "unet_patching", dev, plot)
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    timed = [n for n in cases if cases[n]["times_s"]]
    panels = [("time", "forward+backward time (s, median)"), ("flops", "forward+backward GFLOPs")]
    if all("peak_memory_mib" in cases[n] for n in timed):
        panels.append(("mem", "peak memory (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    colors = {n: c for n, c in zip(cases, ["tab:blue", "tab:orange", "tab:green", "tab:gray"])}
    for ax, (kind, title) in zip(axes, panels):
        names = list(cases) if kind == "flops" else timed
        values = {
            "time": lambda n: cases[n]["median_s"],
            "flops": lambda n: cases[n]["flops_fwd_bwd"] / 1e9,
            "mem": lambda n: cases[n]["peak_memory_mib"],
        }[kind]
        bars = ax.bar(range(len(names)), [values(n) for n in names], color=[colors[n] for n in names])
        if kind == "time":  # labels inside, the dots sit on the bar tops
            ax.bar_label(bars, fmt="%.3f", label_type="center", color="white", fontweight="bold", fontsize=10)
        else:
            ax.bar_label(bars, fmt="%.0f", fontsize=10)
        if kind == "time":  # every repeat as a dot
            for i, n in enumerate(names):
                ax.plot([i] * len(cases[n]["times_s"]), cases[n]["times_s"], "k.", ms=4)
        labels = [n.replace(" (FLOPs only)", "") + f"\n({cases[n]['internal_side']}² inside)"
                  + ("\nFLOPs only" if not cases[n]["times_s"] else "") for n in names]
        ax.set_xticks(range(len(names)), labels, fontsize=9)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    s, m = report["summary"], report["machine"]
    fig.suptitle(
        f"U-Net patching (Luhman & Luhman 2022), batch {cases[timed[0]]['batch']}, {m['device']}"
        f"{' ' + m['gpu'] if 'gpu' in m else ''}\nratio a/b: wall time {s['time_ratio_a_over_b']:.3f}"
        f" (target <= {s['target_time_ratio']}), CPU time {s['cpu_time_ratio_a_over_b']:.3f},"
        f" FLOPs {s['flops_ratio_a_over_b']:.3f}",
        fontsize=10,
    )
    save_figure(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchdiff bench unet-patching", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats per case (median reported)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 4 on CPU, 16 on CUDA)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--full-reference", action=argparse.BooleanOptionalAction, default=None,
                        help="time P=1 at 256x256 as case (c) (default: only on CUDA)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.unet_patching " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args.device, args.repeats, args.batch, args.out_dir, args.full_reference, command.strip())
    for name, res in report["cases"].items():
        t = (f"{res['median_s'] * 1e3:8.1f} ms wall {res['median_cpu_s'] * 1e3:8.1f} ms CPU" if "median_s" in res
             else f"{'(not timed)':>31s}")
        mem = f"  {res['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in res else ""
        print(f"{name:24s} {t}  {res['flops_fwd_bwd'] / 1e9:8.1f} GFLOPs fwd+bwd{mem}")
    s = report["summary"]
    print(f"a/b: wall time {s['time_ratio_a_over_b']:.3f} (target <= 1.25), CPU time {s['cpu_time_ratio_a_over_b']:.3f}, "
          f"FLOPs {s['flops_ratio_a_over_b']:.3f}")
    return 0 if s["time_ratio_a_over_b"] <= 1.25 else 1


if __name__ == "__main__":
    main()

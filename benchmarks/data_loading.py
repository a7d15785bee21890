"""Data loading off the training thread: training steps/s with `data.num_workers` 0 vs 2 on a
decoding-heavy source, a folder of PNGs at 256² (each step decodes `--batch` PNGs and resizes them to
the training size, 64² by default, as a run on photos stored larger than it trains does).

The same small training run (the `full` method with a small U-Net, so decoding is a visible share of
a step) is run with 0 and with 2 DataLoader workers, alternating (0, 2, 0, 2, ...) so both see the
same load on the host; steps/s come from each run's own metrics.jsonl, counted after `--warmup`
steps (worker start-up excluded). With 0 workers the main process decodes each batch before its
step; with workers the next batches are decoded while the current step runs.

    python -m benchmarks.data_loading [--steps 40] [--rounds 2] [--batch 8] [--out-dir DIR]

Writes DIR/data_loading.json and DIR/data_loading.png.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import bench_parser, machine_info, save_figure, write_results

NET = ["model.net.model_channels=16", "model.net.channel_mult=[1,2,2]", "model.net.num_res_blocks=1",
       "model.net.attention_resolutions=[]"]


def make_png_folder(folder: Path, count: int, side: int) -> Path:
    """`count` PNGs of side² (built-in photo crops), written once."""
    from patchdiffusion.data.convert import convert_dataset

    if not folder.is_dir():
        convert_dataset(f"builtin:photos?count={count}", str(folder), resolution=(side, side), progress=False)
    return folder


def steps_per_second(run_dir: Path, warmup: int) -> float:
    from patchdiffusion.run import read_metrics

    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    first = next(r for r in rows if r["step"] >= warmup)
    last = rows[-1]
    return (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])


def run_once(data: Path, workers: int, args, work: Path, index: int) -> float:
    from patchdiffusion.config import RunConfig, apply_overrides
    from patchdiffusion.train import train

    config = apply_overrides(RunConfig(), [
        f"data.source={data}", f"data.resolution={args.resolution}", "data.transform=resize",
        f"data.num_workers={workers}", *NET,
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.log_every=1", "train.sample_images=0",
        f"train.checkpoint_every={args.steps}", "train.device=cpu",
    ])
    run_dir = work / f"run-{index}-w{workers}"
    train(config, run_dir, progress=False, log=lambda *a: None)
    return steps_per_second(run_dir, args.warmup)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    labels = [f"{w} workers" for w in report["workers"]]
    medians = [report["steps_per_s"][str(w)]["median"] for w in report["workers"]]
    ax.bar(labels, medians, color=["#999", "#3a7"])
    for i, w in enumerate(report["workers"]):
        ax.scatter([i] * len(report["steps_per_s"][str(w)]["runs"]), report["steps_per_s"][str(w)]["runs"], color="k",
                   zorder=3, s=12)
    ax.set_ylabel("training steps / s")
    ax.set_title(f"{report['batch']} PNGs of {report['side']}² decoded per step: ×{report['speedup']:.2f}",
                 fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("data-loading", __doc__)
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the rate (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each setting, alternating (default 2)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--side", type=int, default=256, help="PNG side (default 256)")
    parser.add_argument("--resolution", type=int, default=64, help="training side the PNGs are resized to (default 64)")
    parser.add_argument("--images", type=int, default=64, help="PNGs in the folder (default 64)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup by at least 2")

    workers = [0, 2]
    with tempfile.TemporaryDirectory(prefix="bench-data-loading-") as tmp:
        work = Path(tmp)
        data = make_png_folder(work / "pngs", args.images, args.side)
        rates: dict[int, list[float]] = {w: [] for w in workers}
        started = time.time()
        for r in range(args.rounds):
            for w in workers:
                rates[w].append(run_once(data, w, args, work, r))
                print(f"round {r + 1}: {w} workers {rates[w][-1]:.3f} steps/s", file=sys.stderr)
    summary = {str(w): {"runs": v, "median": statistics.median(v)} for w, v in rates.items()}
    report = {
        "benchmark": "data-loading", "command": "patchdiff bench data-loading " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info(torch.device("cpu")), "workers": workers, "side": args.side, "resolution": args.resolution, "batch": args.batch,
        "steps": args.steps, "warmup": args.warmup, "steps_per_s": summary,
        "speedup": summary["2"]["median"] / summary["0"]["median"], "seconds": round(time.time() - started, 1),
    }
    stem = write_results(report, args.out_dir, "data_loading", torch.device("cpu"), plot)
    print(f"steps/s: 0 workers {summary['0']['median']:.3f}, 2 workers {summary['2']['median']:.3f} "
          f"(×{report['speedup']:.2f}); {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

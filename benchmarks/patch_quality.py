"""Patch Diffusion's real claim in miniature: quality per unit of training time, and with little data.

Four training runs of the same U-Net on built-in textures at 32² (the CPU preset's network):
  * `pd` and `full`: Patch Diffusion (real_p=0.5) and full-image EDM training on the whole set
    (1000 images), each with the same training budget;
  * `pd-subset` and `full-subset`: the same two on a 5% subset (the first 50 images).
The budget is CPU time spent in training steps (`train.max_cpu_minutes`), each run single-threaded
in its own process: on an idle core that is its wall time, and unlike wall time it does not change
when other programs share the machine, so both arms get the same compute whatever else runs.

Every run writes a checkpoint every `--checkpoint-every` steps; afterwards each checkpoint's EMA
weights draw `--images` samples (Heun, 18 steps, the same seeds for every checkpoint) and their SWD
(x10^3, the mean over pyramid levels; `eval/monitor.py`) is measured against held-out built-in
images (`builtin:textures?seed=1`, crops never seen in training). The report answers:
  (a) final SWD of `pd` / final SWD of `full` (claim: <= 1.1);
  (b) CPU time `pd` needs to first reach `full`'s final SWD, / `full`'s budget (paper: about 0.5);
  (c) final SWD of `pd-subset` vs `full-subset` (claim: pd lower).

    python -m benchmarks.patch_quality [--cpu-minutes 12] [--subset-cpu-minutes 8] [--images 256]
        [--jobs 2] [--work-dir runs/patch_quality] [--out-dir benchmarks/results]

Writes OUT/patch_quality.json, OUT/patch_quality.png (SWD against training CPU time) and
OUT/patch_quality_<arm>.png (a grid of each run's final samples). `--evaluate-only` re-measures
existing runs in the work directory, counting only checkpoints within the budgets given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import machine_info, save_figure, write_results

RESOLUTION = 32
TRAIN_SET = "builtin:textures"             # 1000 images
SUBSET = "builtin:textures?count=50"       # 5%: the first 50 of the same images
HELD_OUT = "builtin:textures?seed=1&count={count}"
SAMPLE_SEED0 = 10_000                      # evaluation seeds: the same for every checkpoint and arm
EVAL_BATCH = 64
BUDGET_TOLERANCE = 1.02                    # the run stops after the step that crosses its budget

# The CPU preset's network and optimiser (`patchdiffusion/presets.py`, patch-diffusion-cpu), for both arms.
COMMON = [
    f"data.resolution={RESOLUTION}", "data.num_workers=0",
    "model.net.model_channels=32", "model.net.channel_mult=[1,2,2]", "model.net.num_res_blocks=2",
    "model.net.attention_resolutions=[8]", "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=50",
    "train.ema_halflife_kimg=2", "train.ema_rampup=0.2", "train.steps=1000000", "train.log_every=1",
    "train.keep_checkpoints=100000", "train.sample_images=0", "train.device=cpu",
    "sample.sampler=heun", "sample.num_steps=18",
]
ARMS = {  # name -> (method override, extra overrides, data source, which budget)
    "pd": (["method=patch_diffusion"], ["model.real_p=0.5"], TRAIN_SET, "main"),
    "full": (["method=full"], [], TRAIN_SET, "main"),
    "pd-subset": (["method=patch_diffusion"], ["model.real_p=0.5"], SUBSET, "subset"),
    "full-subset": (["method=full"], [], SUBSET, "subset"),
}


def arm_config(arm: str, cpu_minutes: float, checkpoint_every: int, precision: str):
    from patchdiffusion.config import RunConfig, apply_overrides

    method, extra, source, _ = ARMS[arm]
    config = apply_overrides(RunConfig(), method)
    return apply_overrides(config, COMMON + extra + [
        f"data.source={source}", f"train.max_cpu_minutes={cpu_minutes}",
        f"train.checkpoint_every={checkpoint_every}", f"train.precision={precision}",
    ])


def train_arm(arm: str, run_dir: Path, cpu_minutes: float, checkpoint_every: int, precision: str) -> None:
    """One run, in this process, on one thread."""
    from patchdiffusion.train import train

    torch.set_num_threads(1)
    config = arm_config(arm, cpu_minutes, checkpoint_every, precision)
    train(config, run_dir, progress=False, log=lambda message: print(f"[{arm}] {message}", flush=True))


# ------------------------------------------------------------------------------------------------
# evaluation


def held_out_images(count: int) -> torch.Tensor:
    from patchdiffusion.data import ImageDataset, open_source

    size = (RESOLUTION, RESOLUTION)
    dataset = ImageDataset(open_source(HELD_OUT.format(count=count), resolution=size), resolution=size)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def checkpoint_cpu_seconds(run_dir: Path) -> dict[int, float]:
    """Training CPU seconds at each logged step (metrics.jsonl)."""
    from patchdiffusion import run as runs

    return {row["step"]: row["cpu_seconds"] for row in runs.read_metrics(run_dir) if "cpu_seconds" in row}


def evaluate_checkpoint(run_dir: str, step: int, num_images: int) -> dict:
    """SWD of one checkpoint's EMA samples against the held-out images (runs in a worker process)."""
    from patchdiffusion import run as runs
    from patchdiffusion.config import load_config
    from patchdiffusion.eval.monitor import SWDMonitor
    from patchdiffusion.methods import build_method
    from patchdiffusion.sample import sample_images

    torch.set_num_threads(1)
    config = load_config(Path(run_dir) / "config.yaml")
    checkpoint = next(c for c in runs.list_checkpoints(run_dir) if c.step == step)
    method = build_method(config.method, config.model, config.data.resolution)
    net = method.build_network()
    runs.load_into(net, runs.load_weights(checkpoint, "ema"), str(checkpoint.path))
    net.eval()
    samples = torch.cat([
        sample_images(method, net, config, min(EVAL_BATCH, num_images - start), seed0=SAMPLE_SEED0 + start, device="cpu")
        for start in range(0, num_images, EVAL_BATCH)
    ])
    monitor = SWDMonitor(held_out_images(num_images), num_images=num_images, seed=0)
    return {"step": step, "swd": monitor(samples)["swd"], "samples": samples[:36]}


def pick_checkpoints(steps: list[int], count: int) -> list[int]:
    """At most `count` steps spread evenly over the run, always including the last."""
    if len(steps) <= count:
        return steps
    picked = {steps[round(i * (len(steps) - 1) / (count - 1))] for i in range(count)}
    return sorted(picked)


def first_time_reaching(curve: list[tuple[float, float]], target: float) -> float | None:
    """CPU seconds at which an SWD curve [(seconds, swd)] first reaches `target`, interpolated linearly."""
    previous = None
    for seconds, swd in curve:
        if swd <= target:
            if previous is None or previous[1] <= target:
                return seconds
            (s0, v0) = previous
            return s0 + (v0 - target) / (v0 - swd) * (seconds - s0)
        previous = (seconds, swd)
    return None


def time_staying_below(curve: list[tuple[float, float]], target: float) -> float | None:
    """CPU seconds of the first checkpoint from which every later one is at or below `target`."""
    since = None
    for seconds, swd in curve:
        if swd <= target:
            since = seconds if since is None else since
        else:
            since = None
    return since


def evaluate(work_dir: Path, num_images: int, points: dict[str, int], jobs: int, budgets: dict[str, float]) -> dict:
    """SWD curves of every arm; only checkpoints within the arm's CPU budget count (so a budget lower
    than the one trained with compares the runs at that budget)."""
    from patchdiffusion import run as runs

    jobs_list = []
    for arm in ARMS:
        run_dir = work_dir / arm
        cpu = checkpoint_cpu_seconds(run_dir)
        limit = budgets[ARMS[arm][3]] * 60 * BUDGET_TOLERANCE
        steps = [c.step for c in runs.list_checkpoints(run_dir) if cpu.get(c.step, float("inf")) <= limit]
        if not steps:
            raise SystemExit(f"{run_dir} has no checkpoints; train first")
        jobs_list += [(arm, str(run_dir), step) for step in pick_checkpoints(steps, points[ARMS[arm][3]])]
    results: dict[str, list] = {arm: [] for arm in ARMS}
    grids = {}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [(arm, pool.submit(evaluate_checkpoint, run_dir, step, num_images)) for arm, run_dir, step in jobs_list]
        for arm, future in futures:
            out = future.result()
            results[arm].append(out)
            grids[arm] = out["samples"]  # jobs are in step order, so the last one is the final checkpoint
            print(f"[eval] {arm} step {out['step']}: SWD {out['swd']:.2f}", flush=True)
    arms = {}
    for arm, rows in results.items():
        cpu = checkpoint_cpu_seconds(work_dir / arm)
        curve = [(cpu[row["step"]], row["swd"]) for row in sorted(rows, key=lambda r: r["step"])]
        arms[arm] = {
            "steps": [row["step"] for row in sorted(rows, key=lambda r: r["step"])],
            "cpu_seconds": [c for c, _ in curve], "swd": [s for _, s in curve],
            "final_swd": curve[-1][1], "final_step": max(r["step"] for r in rows), "budget_cpu_seconds": curve[-1][0],
        }
    return {"arms": arms, "grids": grids}


def summarise(arms: dict, window: int = 3) -> dict:
    """The three claims from each run's final checkpoint; (a) and (b) also from the mean of the last
    `window` evaluated checkpoints, because SWD swings from checkpoint to checkpoint at this learning
    rate. (b) is given twice: the first crossing of the target (noise can make it early) and the
    first checkpoint from which the curve stays at or below it."""
    pd, full = arms["pd"], arms["full"]
    pd_curve = list(zip(pd["cpu_seconds"], pd["swd"]))
    budget = full["budget_cpu_seconds"]

    def ratio(seconds):
        return None if seconds is None else seconds / budget

    claims = {}
    for label, value in (("final", lambda arm: arm["final_swd"]),
                         (f"last{window}", lambda arm: sum(arm["swd"][-window:]) / len(arm["swd"][-window:]))):
        first, sustained = first_time_reaching(pd_curve, value(full)), time_staying_below(pd_curve, value(full))
        claims[label] = {
            "swd_pd": value(pd), "swd_full": value(full),
            "a_swd_ratio_pd_over_full": value(pd) / value(full), "a_holds": value(pd) <= 1.1 * value(full),
            "b_first_crossing_time_ratio": ratio(first), "b_stays_below_time_ratio": ratio(sustained),
        }
    claims["final"].update({
        "c_subset_swd_pd": arms["pd-subset"]["final_swd"], "c_subset_swd_full": arms["full-subset"]["final_swd"],
        "c_holds": arms["pd-subset"]["final_swd"] < arms["full-subset"]["final_swd"],
    })
    return claims


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, names, title in (
        (axes[0], ("pd", "full"), "whole set (1000 images)"),
        (axes[1], ("pd-subset", "full-subset"), "5% subset (50 images)"),
    ):
        for name in names:
            arm = report["arms"][name]
            ax.plot([s / 60 for s in arm["cpu_seconds"]], arm["swd"], "o-", label=name)
        ax.set_xlabel("training CPU minutes (one thread)")
        ax.set_ylabel("SWD x1e3 vs held-out (lower is better)")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend()
    claims = report["claims"]["final"]
    ratio = claims["b_stays_below_time_ratio"]
    fig.suptitle(
        f"Patch Diffusion vs full-image, 32² textures, final checkpoints: (a) SWD ratio "
        f"{claims['a_swd_ratio_pd_over_full']:.2f}, (b) time ratio {'not reached' if ratio is None else round(ratio, 2)}"
        f" (staying below),\n(c) 5% subset SWD pd {claims['c_subset_swd_pd']:.0f} vs full {claims['c_subset_swd_full']:.0f}"
    )
    save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-minutes", type=float, default=12.0, help="training CPU budget of pd and full")
    parser.add_argument("--subset-cpu-minutes", type=float, default=8.0, help="budget of the 5%% subset runs")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--images", type=int, default=256, help="samples (and held-out images) per SWD")
    parser.add_argument("--points", type=int, default=8, help="checkpoints evaluated per whole-set run (SWD curve)")
    parser.add_argument("--subset-points", type=int, default=2, help="checkpoints evaluated per subset run")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained (and checkpoints evaluated) at once")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--work-dir", default="runs/patch_quality")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--from-json", help="re-summarise and re-plot a results JSON written earlier")
    parser.add_argument("--train-arm", help=argparse.SUPPRESS)  # internal: train one arm in this process
    args = parser.parse_args(argv)

    precision = args.precision
    if precision == "auto":
        from patchdiffusion.demo import cpu_has_fast_bf16

        precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        report["claims"] = summarise(report["arms"])
        stem = write_results(report, args.out_dir, "patch_quality", torch.device("cpu"), plot)
        print(json.dumps(report["claims"], indent=2))
        return 0
    work_dir = Path(args.work_dir)
    budgets = {"main": args.cpu_minutes, "subset": args.subset_cpu_minutes}
    if args.train_arm:
        train_arm(args.train_arm, work_dir / args.train_arm, budgets[ARMS[args.train_arm][3]],
                  args.checkpoint_every, precision)
        return 0

    started = time.time()
    if not args.evaluate_only:
        work_dir.mkdir(parents=True, exist_ok=True)
        pending, running = list(ARMS), []
        while pending or running:
            while pending and len(running) < args.jobs:
                arm = pending.pop(0)
                command = [sys.executable, "-m", "benchmarks.patch_quality", "--train-arm", arm,
                           "--work-dir", str(work_dir), "--checkpoint-every", str(args.checkpoint_every),
                           "--cpu-minutes", str(args.cpu_minutes), "--subset-cpu-minutes", str(args.subset_cpu_minutes),
                           "--precision", precision]
                log = open(work_dir / f"{arm}.log", "w")
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                running.append((arm, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
                print(f"training {arm} (log: {work_dir / f'{arm}.log'})", flush=True)
            time.sleep(5)
            for item in list(running):
                arm, process, log = item
                if process.poll() is not None:
                    log.close()
                    running.remove(item)
                    if process.returncode != 0:
                        raise SystemExit(f"training {arm} failed; see {work_dir / f'{arm}.log'}")
                    print(f"trained {arm}", flush=True)
    train_wall = time.time() - started

    evaluated = evaluate(work_dir, args.images, {"main": args.points, "subset": args.subset_points}, args.jobs, budgets)
    report = {
        "benchmark": "patch-quality",
        "command": "python -m benchmarks.patch_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(torch.device("cpu")),
        "setup": {"resolution": RESOLUTION, "train_set": TRAIN_SET, "subset": SUBSET,
                  "held_out": HELD_OUT.format(count=args.images), "precision": precision,
                  "budget_cpu_minutes": budgets, "swd_images": args.images, "sampler": "heun, 18 steps, EMA",
                  "common_overrides": COMMON, "train_wall_seconds": round(train_wall, 1)},
        "arms": evaluated["arms"],
    }
    report["claims"] = summarise(report["arms"])
    stem = write_results(report, args.out_dir, "patch_quality", torch.device("cpu"), plot)
    from patchdiffusion.images import save_grid, to_uint8

    for arm, samples in evaluated["grids"].items():
        save_grid(to_uint8(samples), f"{stem}_{arm}.png")
    print(json.dumps(report["claims"], indent=2))
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

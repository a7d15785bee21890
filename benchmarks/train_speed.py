"""Training speed: the project's step as `train` runs it against diffusers' UNet2DModel of the same
architecture in a plain loop, alternating in one process.

Three steps are timed, one after the other, over and over (so all three see the same load on the host):
  loop       the project's training step exactly as `train` runs it (its Trainer, default settings, the
             demo's network and batch): data from the loader, per-example random streams and flips, the
             denoiser and loss, backward, clipping, fused AdamW, EMA, logging; compiled when the arm is
             `compile on`;
  bare       the same network, denoiser and loss on a fixed batch with its random draws made beforehand,
             backward and the same AdamW: what any loop must do; loop - bare is the loop's overhead;
  diffusers  UNet2DModel with the same architecture (parameters matched within 0.1%) in a plain eager
             loop: noise, timesteps, forward, MSE, backward, the same AdamW, in the same precision.

The loop is timed from inside a real run (`Trainer.between_steps`), after a warm-up long enough for
the first epoch (decoding and caching the images) and any compile to be over. FLOPs come from
torch.utils.flop_counter; the matrix-multiply peak is a large fp32 matmul timed in the same process;
torch.profiler says where a step's time goes (top operators, and time per operator kind). Every step is
timed by wall clock and by CPU time: with `--threads 1` on a machine shared with other jobs, CPU time
leaves out the slices the scheduler gave to someone else, and is the steadier of the two.

    python -m benchmarks.train_speed [--compile off,on] [--steps 12] [--profile-steps 3] [--threads N]
                                     [--train-check] [--cold-cache] [--out-dir DIR]

Writes DIR/train_speed.json and DIR/train_speed.png. `--train-check` also runs
`patchdiff train ... train.compile=on` for 310 steps and reads its step time over steps 100-300 from
its own metrics.jsonl, to compare with the bench's loop step.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import bench_parser, machine_info, save_figure, write_results

# The demo's network and batch (patchdiffusion/demo.py): 32 channels, mult 1-2-2, 2 res blocks, attention at 8x8,
# batch 16 at 32x32. Everything else is train's default.
NET = [
    "method=full", "data.source=builtin:textures", "data.resolution=32", "model.net.model_channels=32",
    "model.net.channel_mult=[1,2,2]", "model.net.num_res_blocks=2", "model.net.attention_resolutions=[8]",
    "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=50",
]
PARAMETER_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------------
# the three steps


def diffusers_twin(net_config, resolution: int):
    """diffusers' UNet2DModel with the project U-Net's architecture (ADM: scale-shift norm, conv resampling)."""
    from diffusers import UNet2DModel

    widths = tuple(int(m * net_config.model_channels) for m in net_config.channel_mult)
    attends = [resolution // 2**level in net_config.attention_resolutions for level in range(len(widths))]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends))
    return UNet2DModel(
        sample_size=resolution, in_channels=net_config.in_channels, out_channels=net_config.out_channels,
        layers_per_block=net_config.num_res_blocks, block_out_channels=widths, down_block_types=down,
        up_block_types=up, attention_head_dim=net_config.head_channels, norm_num_groups=32,
        resnet_time_scale_shift="scale_shift" if net_config.use_scale_shift_norm else "default",
        dropout=net_config.dropout, downsample_type="conv", upsample_type="conv",
    )


class Recorded:
    """A SampleRNG stand-in that draws from a real one and keeps every draw, in order."""

    def __init__(self, rng):
        self.rng, self.draws = rng, []

    def __len__(self):
        return len(self.rng)

    def _keep(self, value):
        self.draws.append(value)
        return value

    def randn(self, *a, **k):
        return self._keep(self.rng.randn(*a, **k))

    def rand(self, *a, **k):
        return self._keep(self.rng.rand(*a, **k))

    def randint(self, *a, **k):
        return self._keep(self.rng.randint(*a, **k))

    def randn_like(self, *a, **k):
        return self._keep(self.rng.randn_like(*a, **k))


class Replay:
    """Gives back recorded draws in order: the loss's numbers without any random-number work."""

    def __init__(self, draws, size):
        self.draws, self.size, self.i = draws, size, 0

    def __len__(self):
        return self.size

    def _next(self, *a, **k):
        value = self.draws[self.i]
        self.i += 1
        return value

    randn = rand = randint = randn_like = _next


class Steps:
    """The bare step and the diffusers step, built beside a Trainer (its network, batch, optimizer and precision)."""

    def __init__(self, trainer, compile_bare: bool):
        # Built with the global RNG put back afterwards: the run's own random stream stays as `train` has it.
        with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
            self._build(trainer, compile_bare)

    def _build(self, trainer, compile_bare: bool):
        from patchdiffusion.methods.base import TrainBatch
        from patchdiffusion.rng import SampleRNG
        from patchdiffusion.runtime import autocast_context, compile_function
        from patchdiffusion.train import build_optimizer, step_plan

        self.trainer, self.device = trainer, trainer.device
        self.precision = trainer.precision
        cfg, method = trainer.cfg, trainer.method
        batch = cfg.batch_size
        images = torch.stack([trainer.dataset[i][0] for i in range(batch)]).to(self.device)
        self.batch = TrainBatch(images, None, torch.arange(batch, device=self.device), step_plan(method, cfg.seed, 0, cfg.steps))
        recorder = Recorded(SampleRNG(range(batch), self.device))
        with torch.no_grad():
            method.loss(trainer.net, self.batch, recorder)
        self.replay = Replay(recorder.draws, batch)

        self.net = copy.deepcopy(trainer.net).train()
        self.optimizer = build_optimizer(self.net, cfg)

        def bare_loss(net, batch, replay):
            replay.i = 0
            with autocast_context(self.precision, self.device):
                return method.loss(net, batch, replay).float().mean()

        self.bare_eager = bare_loss
        self.bare_loss = compile_function(bare_loss) if compile_bare else bare_loss

        resolution = trainer.config.data.resolution[0]
        torch.manual_seed(0)
        self.twin = diffusers_twin(trainer.config.model.net, resolution).to(self.device).train()
        self.twin_optimizer = build_optimizer(self.twin, cfg)
        self.images = images
        alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        self.alpha_bar = alphas.float().to(self.device)

    def bare(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.bare_loss(self.net, self.batch, self.replay)
        loss.backward()
        self.optimizer.step()
        return loss

    def diffusers_loss(self, model, x):
        """A plain diffusers training step's loss: DDPM noising, epsilon prediction, MSE."""
        from patchdiffusion.runtime import autocast_context

        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (x.shape[0],), device=x.device)
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        with autocast_context(self.precision, self.device):
            prediction = model(a.sqrt() * x + (1 - a).sqrt() * noise, t).sample
        return F.mse_loss(prediction.float(), noise)

    def diffusers(self) -> torch.Tensor:
        self.twin_optimizer.zero_grad(set_to_none=True)
        loss = self.diffusers_loss(self.twin, self.images)
        loss.backward()
        self.twin_optimizer.step()
        return loss


def timed(fn, device) -> float:
    """Wall seconds of one call (CPU seconds of it go to CPU_TIMES, see timed_both)."""
    return timed_both(fn, device)[0]


def timed_both(fn, device) -> tuple[float, float]:
    """(wall, CPU) seconds of one call. With one torch thread on a CPU shared with other jobs, the CPU
    seconds leave out the time the scheduler gave the core to someone else."""
    from patchdiffusion.runtime import synchronize

    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


# ------------------------------------------------------------------------------------------------
# measurements beside the steps


def count_flops(fn) -> tuple[float, dict]:
    """FLOPs of one call of fn (forward and backward), in total and per aten operator."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), per_op


def matmul_peak(device, side: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best GFLOP/s of a side x side fp32 matrix multiply, by wall and by CPU time (per thread in use):
    the machine's practical peak."""
    a = torch.randn(side, side, device=device)
    b = torch.randn(side, side, device=device)
    torch.mm(a, b)
    runs = [timed_both(lambda: torch.mm(a, b), device) for _ in range(repeats)]
    flop = 2 * side**3
    return flop / min(w for w, _ in runs) / 1e9, flop / (min(c for _, c in runs) / torch.get_num_threads()) / 1e9


def kind_of(name: str) -> str:
    """The kind of work a profiler event is, for "where the time goes"."""
    op = name.removeprefix("aten::").lower()
    if name.startswith(("## Call CompiledFxGraph", "CompiledFunction", "Torch-Compiled Region")) or "cpp_fused" in op \
            or op.startswith("triton"):
        return "compiled graphs (inductor's fused elementwise and norm kernels)"
    if "conv" in op:
        return "convolution"
    if op in ("addmm", "mm", "bmm", "baddbmm", "linear", "matmul") or "attention" in op:
        return "matmul / attention"
    if "norm" in op:
        return "normalization"
    if "adam" in op or op.startswith("_foreach"):
        return "optimizer, EMA, clipping (foreach)"
    if op in ("normal_", "uniform_", "random_", "randint", "randn", "rand", "flip", "stack", "where"):
        return "random draws, flips, batching"
    return "other (elementwise, copies, views, dispatch)"


def profile_table(events, steps: int, top: int = 12) -> dict:
    """Top operators by self time and self time per kind, per step, from a torch.profiler key_averages()."""
    rows = []
    for e in events:
        if e.self_cpu_time_total <= 0 or e.key.startswith("ProfilerStep"):
            continue
        rows.append((e.key, e.self_cpu_time_total / 1000 / steps, e.count // max(steps, 1)))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    return {
        "self_ms_per_step": round(total, 2),
        "top_ops": [{"op": n, "self_ms": round(ms, 2), "share": round(ms / total, 3), "calls": c} for n, ms, c in rows[:top]],
        "by_kind": {k: {"self_ms": round(v, 2), "share": round(v / total, 3)} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
    }


def profiled(fn, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
    return profile_table(prof.key_averages(), steps)


def summary(values: list[float], cpu: list[float] | None = None) -> dict:
    row = {"median_ms": round(1000 * statistics.median(values), 2), "min_ms": round(1000 * min(values), 2),
           "max_ms": round(1000 * max(values), 2), "n": len(values)}
    if cpu:
        row.update(cpu_median_ms=round(1000 * statistics.median(cpu), 2), cpu_min_ms=round(1000 * min(cpu), 2),
                   cpu_max_ms=round(1000 * max(cpu), 2))
    return row


# ------------------------------------------------------------------------------------------------
# one arm: compile off or on


def run_arm(mode: str, args, work: Path, log) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from patchdiffusion.config import RunConfig, apply_overrides
    from patchdiffusion.train import Trainer

    warmup = args.warmup if args.warmup is not None else math.ceil(args.images / 16) + 3  # the first epoch decodes
    total = warmup + args.steps + args.profile_steps
    config = apply_overrides(RunConfig(), NET + [
        f"data.source=builtin:textures?count={args.images}", f"train.compile={mode}", f"train.steps={total}",
        "train.sample_images=0", f"train.device={args.device}", f"train.checkpoint_every={total + 1}",
    ])
    messages: list[str] = []
    trainer = Trainer(config, work / f"run-{mode}", resume=False, progress=False, log=messages.append)
    steps = Steps(trainer, compile_bare=mode == "on")
    device = trainer.device
    times: dict[str, list[float]] = {"loop": [], "bare": [], "diffusers": []}
    cpu_times: dict[str, list[float]] = {"loop": [], "bare": [], "diffusers": [], "loop_in_step": []}
    first_epoch: list[float] = []
    state = {"end": None, "cpu_end": None, "in_step": 0.0, "first_loop": None, "prof": None}
    extra: dict[str, float] = {}

    def between(t) -> None:
        from patchdiffusion.runtime import synchronize

        synchronize(device)
        now, cpu_now = time.perf_counter(), time.process_time()
        loop_s = now - state["end"] if state["end"] is not None else None
        loop_cpu_s = cpu_now - state["cpu_end"] if state["cpu_end"] is not None else None
        # what metrics.jsonl's cpu_seconds counts: the step itself, without loading and logging
        in_step_s, state["in_step"] = t.step_cpu_seconds - state["in_step"], t.step_cpu_seconds
        if t.step == 1:
            state["first_loop"] = now - state["start"]
            extra["bare_first_s"] = timed(steps.bare, device)  # the bare step's compile, when compiled
            timed(steps.diffusers, device)
        elif t.step <= warmup:
            first_epoch.append(loop_s)
        elif t.step <= warmup + args.steps:
            times["loop"].append(loop_s)
            cpu_times["loop"].append(loop_cpu_s)
            cpu_times["loop_in_step"].append(in_step_s)
            for name in ("diffusers", "bare"):
                wall, cpu = timed_both(getattr(steps, name), device)
                times[name].append(wall)
                cpu_times[name].append(cpu)
            if t.step == warmup + args.steps and args.profile_steps:
                state["prof"] = profile(activities=[ProfilerActivity.CPU])
                state["prof"].__enter__()
        if t.step == total and state["prof"] is not None:
            state["prof"].__exit__(None, None, None)
        synchronize(device)
        state["end"], state["cpu_end"] = time.perf_counter(), time.process_time()

    trainer.between_steps = between
    state["start"] = time.perf_counter()
    trainer.run()
    log(f"[{mode}] " + " | ".join(m for m in messages if m.startswith(("precision", "compile"))))

    medians = {k: statistics.median(v) for k, v in times.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu_times.items()}
    arm = {
        "compile": mode, "precision": trainer.precision, "warmup_steps": warmup,
        "choices": [m for m in messages if m.startswith(("precision", "compile"))],
        "steps": {k: summary(v, cpu_times[k]) for k, v in times.items()},
        "loop_in_step_cpu": summary(cpu_times["loop_in_step"]),
        "first_epoch_loop": summary(first_epoch) if first_epoch else None,
        "loop_over_diffusers": medians["loop"] / medians["diffusers"],
        "bare_over_diffusers": medians["bare"] / medians["diffusers"],
        "loop_overhead": medians["loop"] / medians["bare"] - 1,
        "by_cpu_time": {"loop_over_diffusers": cpu_medians["loop"] / cpu_medians["diffusers"],
                        "bare_over_diffusers": cpu_medians["bare"] / cpu_medians["diffusers"],
                        "loop_overhead": cpu_medians["loop"] / cpu_medians["bare"] - 1},
    }
    if mode == "on":
        arm["compile_seconds"] = {"loop_first_step": round(state["first_loop"] - medians["loop"], 1),
                                  "bare_first_step": round(extra["bare_first_s"] - medians["bare"], 1)}
    if state["prof"] is not None:
        arm["profile_loop"] = profile_table(state["prof"].key_averages(), args.profile_steps)
        arm["profile_diffusers"] = profiled(steps.diffusers, args.profile_steps)
    arm["_steps"] = steps
    return arm


def train_check(args, work: Path, arm: dict, reference=None, reference_steps: int = 4) -> dict:
    """`patchdiff train ... train.compile=on` for 310 steps; its step time over steps 100-300 from metrics.jsonl,
    by wall time (`seconds`) and by CPU time (`cpu_seconds`, the steps alone), against the bench's loop step
    measured the same ways. The run comes after the bench's arms: if other jobs' load changed in between,
    the wall times disagree and the CPU times (one thread) still compare like with like. `reference` (the
    diffusers step, timed in this process before, during and after the run) also expresses both in
    diffusers steps of their own moment, which takes the machine's state out of the comparison."""
    from patchdiffusion.run import read_metrics

    run_dir = work / "cli-run"
    command = [sys.executable, "-m", "patchdiffusion.cli", "train", "--run", str(run_dir), "--no-progress",
               "--steps", "310", "--device", args.device, *NET, "train.compile=on", "train.sample_images=0",
               f"data.source=builtin:textures?count={args.images}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), MKL_NUM_THREADS=str(torch.get_num_threads()))
    load_before = os.getloadavg()[0]
    around = [reference() for _ in range(reference_steps)] if reference else []
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env=env)
        while process.poll() is None:  # one diffusers step every 20 s while it runs: the machine's state
            time.sleep(0.5)              # over the run's whole window (a few % of one core)
            if reference and process.poll() is None and time.monotonic() % 20 < 0.5:
                around.append(reference())
        if process.returncode != 0:
            output.seek(0)
            raise RuntimeError(f"train check failed ({process.returncode}): {output.read()[-2000:]}")
    around += [reference() for _ in range(reference_steps)] if reference else []
    rows = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    step_ms = 1000 * (rows[300]["seconds"] - rows[100]["seconds"]) / 200
    step_cpu_ms = 1000 * (rows[300]["cpu_seconds"] - rows[100]["cpu_seconds"]) / 200
    bench_ms, bench_cpu_ms = arm["steps"]["loop"]["median_ms"], arm["loop_in_step_cpu"]["median_ms"]
    result = {"command": "patchdiff train " + " ".join(command[4:]), "threads": torch.get_num_threads(),
              "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "step_ms_100_300": round(step_ms, 2), "bench_loop_ms": bench_ms, "ratio": round(step_ms / bench_ms, 3),
              "step_cpu_ms_100_300": round(step_cpu_ms, 2), "bench_loop_cpu_ms": bench_cpu_ms,
              "cpu_ratio": round(step_cpu_ms / bench_cpu_ms, 3)}
    if around:
        # both in diffusers steps: the run's steps over the diffusers step timed around it, the bench's loop
        # step over the diffusers step it alternated with
        ref_ms = 1000 * statistics.median(w for w, _ in around)
        ref_cpu_ms = 1000 * statistics.median(c for _, c in around)
        bench = arm["steps"]["loop"]["median_ms"] / arm["steps"]["diffusers"]["median_ms"]
        bench_cpu = arm["loop_in_step_cpu"]["median_ms"] / arm["steps"]["diffusers"]["cpu_median_ms"]
        result.update(reference_diffusers_ms=round(ref_ms, 2), reference_diffusers_cpu_ms=round(ref_cpu_ms, 2),
                      reference_steps=len(around),
                      ratio_in_diffusers_steps=round(step_ms / ref_ms / bench, 3),
                      cpu_ratio_in_diffusers_steps=round(step_cpu_ms / ref_cpu_ms / bench_cpu, 3))
    return result


# ------------------------------------------------------------------------------------------------


def plot(report: dict, path: str) -> None:
    """Left: each step kind over the diffusers step it alternated with (wall medians, min-max), with the
    targets; right: CPU ms per step (one thread: what other jobs' load does not stretch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    names = ["loop", "bare", "diffusers"]
    colours = {"loop": "#3a7", "bare": "#9c9", "diffusers": "#999"}
    targets = {"off": 1.0, "on": 0.8}
    width = 0.8 / len(names)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for i, arm in enumerate(arms):
        reference = arm["steps"]["diffusers"]["median_ms"]
        for j, name in enumerate(names):
            s = arm["steps"][name]
            x = i + (j - 1) * width
            mid, low, high = s["median_ms"] / reference, s["min_ms"] / reference, s["max_ms"] / reference
            left.bar(x, mid, width, color=colours[name], label=name if i == 0 else None)
            left.errorbar(x, mid, yerr=[[mid - low], [high - mid]], color="k", capsize=3, lw=1)
            if "cpu_median_ms" in s:
                right.bar(x, s["cpu_median_ms"], width, color=colours[name], label=name if i == 0 else None)
                right.errorbar(x, s["cpu_median_ms"], yerr=[[s["cpu_median_ms"] - s["cpu_min_ms"]],
                                                             [s["cpu_max_ms"] - s["cpu_median_ms"]]],
                               color="k", capsize=3, lw=1)
        target = targets[arm["compile"]]
        left.hlines(target, i - 0.45, i + 0.45, colors="r", linestyles="--", lw=1,
                    label="target (loop/diffusers)" if i == 0 else None)
        left.text(i, 1.62, f"loop/diffusers {arm['loop_over_diffusers']:.3f}\n(CPU time "
                  f"{arm['by_cpu_time']['loop_over_diffusers']:.3f})\noverhead {100 * arm['loop_overhead']:+.1f}% "
                  f"(CPU time {100 * arm['by_cpu_time']['loop_overhead']:+.1f}%)",
                  ha="center", fontsize=8)
    ticks = [f"compile {a['compile']} ({a['precision']})" for a in arms]
    left.set_xticks(range(len(arms)), ticks)
    right.set_xticks(range(len(arms)), ticks)
    left.set_ylim(0, 1.9)
    left.set_ylabel("step time / diffusers step (wall, median, min-max)")
    right.set_ylabel("CPU ms per step (median, min-max)")
    left.legend(fontsize=7, loc="lower center")
    machine = report["machine"]
    fig.suptitle(f"training step, batch 16 at 32², {report['gflop_per_step']['project']:.1f} GFLOP; "
                 f"{machine.get('torch_threads')} thread(s), load average {report['load_average_1min_before']:.1f}"
                 f"-{report['load_average_1min_after']:.1f}; matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s",
                 fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("train-speed", __doc__)
    parser.add_argument("--compile", default="off,on", help="arms to run: off, on or off,on (default off,on)")
    parser.add_argument("--steps", type=int, default=12, help="alternating steps of each kind per arm (default 12)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="loop steps before timing (default: the first epoch + 3, so images are cached)")
    parser.add_argument("--images", type=int, default=1000, help="images in the built-in texture set (default 1000)")
    parser.add_argument("--profile-steps", type=int, default=3, help="loop steps profiled per arm (default 3)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every step kind and the train check (default: torch's own, "
                             "usually the core count; 1 keeps timings steadier on a machine shared with other jobs)")
    parser.add_argument("--train-check", action="store_true",
                        help="also time `patchdiff train ... train.compile=on` from its metrics.jsonl (steps 100-300)")
    parser.add_argument("--cold-cache", action="store_true",
                        help="compile into a fresh inductor cache, so compile_seconds are a first compile's (the "
                             "train check then reuses that cache, as a second run would)")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.compile.split(",") if m.strip()]
    if not modes or any(m not in ("off", "on") for m in modes):
        parser.error("--compile takes off, on or off,on")
    if args.steps < 10:
        parser.error("--steps must be at least 10")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("patchdiff bench train-speed: error: needs diffusers (pip install 'patchdiffusion[bench]')", file=sys.stderr)
        return 2

    from patchdiffusion.nets.unet import count_parameters
    from patchdiffusion.runtime import inductor_cache, resolve_device

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load_before = os.getloadavg()[0]
    started = time.time()
    peaks = [matmul_peak(device)]
    arms = []
    with tempfile.TemporaryDirectory(prefix="bench-train-speed-") as tmp:
        if args.cold_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        cache = str(inductor_cache())
        for mode in modes:
            arms.append(run_arm(mode, args, Path(tmp), lambda line: print(line, file=sys.stderr)))
            a = arms[-1]
            print(f"compile {mode}: loop {a['steps']['loop']['median_ms']:.1f} ms, bare {a['steps']['bare']['median_ms']:.1f} ms, "
                  f"diffusers {a['steps']['diffusers']['median_ms']:.1f} ms; loop/diffusers {a['loop_over_diffusers']:.3f}, "
                  f"overhead {100 * a['loop_overhead']:+.1f}%", file=sys.stderr)
            peaks.append(matmul_peak(device))
        steps = arms[0].pop("_steps")
        for a in arms[1:]:
            a.pop("_steps")
        project_params, twin_params = count_parameters(steps.net), count_parameters(steps.twin)
        flops, flops_by_op = count_flops(lambda: steps.bare_eager(steps.net, steps.batch, steps.replay).backward())
        twin_flops, twin_by_op = count_flops(lambda: steps.diffusers_loss(steps.twin, steps.images).backward())
        check = None
        if args.train_check:
            on = next((a for a in arms if a["compile"] == "on"), None)
            if on is not None:
                check = train_check(args, Path(tmp), on, lambda: timed_both(steps.diffusers, device))
    peak, cpu_peak = max(p[0] for p in peaks), max(p[1] for p in peaks)
    threads = torch.get_num_threads()
    for a in arms:
        for name, count in (("loop", flops), ("bare", flops), ("diffusers", twin_flops)):
            row = a["steps"][name]
            gflops = count / (row["median_ms"] / 1000) / 1e9
            row["gflops"] = round(gflops, 1)
            row["fraction_of_peak"] = round(gflops / peak, 3)
            if "cpu_median_ms" in row:  # per thread's CPU second, against the matmul's
                cpu_gflops = count / (row["cpu_median_ms"] / 1000 / threads) / 1e9
                row["cpu_gflops"] = round(cpu_gflops, 1)
                row["cpu_fraction_of_peak"] = round(cpu_gflops / cpu_peak, 3)
    report = {
        "benchmark": "train-speed", "command": "patchdiff bench train-speed " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(device), "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0], "seconds": round(time.time() - started, 1),
        "network": NET, "inductor_cache": "fresh (--cold-cache)" if args.cold_cache else cache,
        "parameters": {"project": project_params, "diffusers": twin_params,
                       "relative_difference": abs(project_params - twin_params) / project_params},
        "gflop_per_step": {"project": flops / 1e9, "diffusers": twin_flops / 1e9},
        "gflop_by_op": {"project": {k: round(v / 1e9, 3) for k, v in flops_by_op.items()},
                        "diffusers": {k: round(v / 1e9, 3) for k, v in twin_by_op.items()}},
        "matmul_peak_gflops": round(peak, 1), "matmul_peak_gflops_by_cpu_time": round(cpu_peak, 1),
        "matmul_peaks": [[round(w, 1), round(c, 1)] for w, c in peaks],
        "arms": arms, "train_check": check,
    }
    if report["parameters"]["relative_difference"] > PARAMETER_TOLERANCE:
        print(f"warning: parameters differ by {100 * report['parameters']['relative_difference']:.2f}%", file=sys.stderr)
    stem = write_results(report, args.out_dir, "train_speed", device, plot)
    for a in arms:
        print(f"compile {a['compile']} ({a['precision']}): project loop step / diffusers step = {a['loop_over_diffusers']:.3f} "
              f"(loop {a['steps']['loop']['median_ms']:.1f} ms [{a['steps']['loop']['min_ms']:.1f}-{a['steps']['loop']['max_ms']:.1f}], "
              f"diffusers {a['steps']['diffusers']['median_ms']:.1f} ms); loop overhead {100 * a['loop_overhead']:+.1f}%; "
              f"{a['steps']['loop']['gflops']:.0f} GFLOP/s = {a['steps']['loop']['fraction_of_peak']:.2f} of the "
              f"{peak:.0f} GFLOP/s matmul peak" + (f"; compile {a['compile_seconds']}" if "compile_seconds" in a else ""))
        c = a["by_cpu_time"]
        print(f"    by CPU time: loop/diffusers {c['loop_over_diffusers']:.3f}, bare/diffusers {c['bare_over_diffusers']:.3f}, "
              f"overhead {100 * c['loop_overhead']:+.1f}%; {a['steps']['loop']['cpu_fraction_of_peak']:.2f} of the "
              f"{cpu_peak:.0f} GFLOP/s matmul peak")
    if check:
        print(f"train --compile on, metrics.jsonl steps 100-300: {check['step_ms_100_300']:.1f} ms/step = "
              f"{check['ratio']:.3f} x the bench's loop step (wall); {check['step_cpu_ms_100_300']:.1f} CPU ms/step = "
              f"{check['cpu_ratio']:.3f} x (CPU time); load average {check['load_average_1min']}")
        if "ratio_in_diffusers_steps" in check:
            print(f"    in diffusers steps timed around the run: {check['cpu_ratio_in_diffusers_steps']:.3f} x (CPU time; "
                  f"by wall {check['ratio_in_diffusers_steps']:.3f} x, meaningless on a busy machine: those reference "
                  f"steps share the core with the run)")
    print(f"load average {load_before:.2f} before, {report['load_average_1min_after']:.2f} after; {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

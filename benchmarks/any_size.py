"""Any size in bounded memory, for every model (issue 16): memory, seams, and a gigapixel.

Three parts, each writing its section of benchmarks/results/any_size.json (and the plot beside it):

  memory     Peak RSS (VmHWM) of `patchdiff sample` in a fresh process per canvas size, the canvas on
             disk, streamed to a tiled TIFF, the same tile batch and a tiny model (a `full` U-Net with
             256² tiles): the peak is set by the tile batch, so 16384² should stay within 1.3× of 1024².
  seams      For every method: a small model trained at 32² on builtin textures (`--train-cpu-minutes`
             each, one process per method), canvases sampled from 32² tiles with every blend window ×
             fixed/random grid at `--study-size`, and one `--size` canvas (1536x1024) with the best
             setting; seam score (eval/seam.py) at the tile period on the grid's lines and at the worst
             offset, beside real texture crops' scores; wrapped canvases (`--wrap-seeds`) scored across
             their wrap edge, beside lines elsewhere in them (`--wrap-only`: that alone, for methods
             already in the results).
             The big canvases go to docs/images/any_size_<method>.jpg (JPEG q85; scored from the PNG).
  gigapixel  `patchdiff sample --size 32768x32768 --format tiff --canvas disk` on the tiny model, killed
             with SIGKILL part way (`--kill-after`), then the same command again: it resumes and finishes.
             Wall time, MP/s, peak RSS of each process and the TIFF's size.

    python -m benchmarks.any_size memory [--sizes 1024 16384]
    python -m benchmarks.any_size seams [--train-cpu-minutes 4] [--study-size 384x256] [--size 1536x1024]
    python -m benchmarks.any_size seams --wrap-only [--wrap-seeds 8] [--methods patch_dm]
    python -m benchmarks.any_size gigapixel [--size 32768] [--steps 2] [--kill-after-checkpoint 120]

Work folders default to ./runs/any_size (models) and a temp folder (canvases), so reruns reuse models.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import bench_parser, machine_info, save_figure, write_results

RESULTS = Path("benchmarks/results")
METHODS = ("full", "patching", "patch_diffusion", "patch_ddpm", "patch_dm", "dimr")
WINDOWS = ("uniform", "linear", "cosine", "gaussian")
GRIDS = ("fixed", "random")
RSS_TARGET, SEAM_TARGET = 1.3, 1.05

# A tiny model whose native tile is 256² (the memory and gigapixel parts): a `full` U-Net that patchifies
# its input by 16 (Luhman & Luhman's reshape), so it runs at 16² inside a 256² tile with 16 channels: a few
# hundred FLOP per pixel, so these parts measure the tiling, the on-disk canvas and the streamed output,
# not the network (a 2-core machine shared with other jobs would need hours for a gigapixel of a real one).
TINY_256 = ["method=full", "data.source=builtin:textures", "data.resolution=256", "model.net.patch_size=16",
            "model.net.model_channels=16", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=1",
            "model.net.attention_resolutions=[]", "model.net.head_channels=16", "train.batch_size=4",
            "train.lr=2e-3", "train.warmup_steps=20", "train.ema_halflife_kimg=0.2", "train.ema_rampup=0.2",
            "train.sample_images=4", "train.checkpoint_every=100000", "sample.sampler=ddim"]

# Small networks of each method at 32² (about 0.2M parameters): cheap enough to sample 1.5 MP canvases.
SMALL_UNET = ["model.net.model_channels=16", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=1",
              "model.net.attention_resolutions=[]", "model.net.head_channels=16"]
SMALL = {
    "full": SMALL_UNET,
    "patching": [*SMALL_UNET, "model.net.patch_size=2", "model.net.model_channels=32"],
    "patch_diffusion": SMALL_UNET,
    "patch_ddpm": ["model.net.dim=16", "model.net.dim_mults=[1,2]", "model.net.attn_heads=2",
                   "model.net.attn_dim_head=16", "model.patch_divider=2"],
    "patch_dm": ["model.net.patch_size=16", "model.net.model_channels=16", "model.net.channel_mult=[1,2]",
                 "model.net.num_res_blocks=1", "model.net.attention_resolutions=[]", "model.net.code_dim=32",
                 "model.prediction=v", "model.grid_shift=random", "model.patch_batch=64"],
    "dimr": ["model.net.stages=[{block: transformer, dim: 64, hidden_dim: 128, num_blocks: 3, heads: 4, patch_size: 4},"
             " {block: convnext, dim: 16, hidden_dim: 32, num_blocks: 2, kernel_size: 7}]", "model.net.num_classes=0"],
}
TRAIN_32 = ["data.source=builtin:textures", "data.resolution=32", "train.batch_size=16", "train.lr=2e-3",
            "train.warmup_steps=50", "train.ema_halflife_kimg=2", "train.ema_rampup=0.2", "train.sample_images=16",
            "train.checkpoint_every=100000", "train.steps=1000000"]
SAMPLE_STEPS = {"heun": 6, "euler": 10, "ddim": 10, "ddpm": 20, "dpmpp_2m": 10}


def cli(*args: str, threads: int = 1, **kwargs) -> subprocess.CompletedProcess:
    # One thread by default: small tiles are many small ops, which several threads slow down on a shared
    # machine (measured: 12x slower with 2 threads at load 5 on 2 cores).
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, "-m", "patchdiffusion.cli", *args], text=True, env=env, **kwargs)


def train_run(run: Path, overrides: list[str], cpu_minutes: float | None = None, steps: int | None = None) -> Path:
    """Train (or finish) a run in its own process, one thread; reused when it is complete."""
    if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*")):
        return run
    budget = [f"train.max_cpu_minutes={cpu_minutes}"] if cpu_minutes else []
    budget += [f"train.steps={steps}"] if steps else []
    proc = cli("train", "--run", str(run), "--force", "--no-progress", *overrides, *budget, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training {run} failed:\n{proc.stderr[-3000:]}")
    return run


def peak_rss_of(proc: subprocess.Popen) -> int:
    """VmHWM of a running child in bytes (0 once it has gone)."""
    try:
        text = Path(f"/proc/{proc.pid}/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def run_watched(argv: list[str], kill_after: float | None = None, threads: int = 2,
                kill_after_checkpoint: tuple[Path, float] | None = None) -> dict:
    """A CLI command in a fresh process, its peak RSS sampled until it ends (or is killed).

    ``kill_after_checkpoint=(job_folder, S)``: SIGKILL it S seconds after the canvas job's first step
    checkpoint (`step-N/`, renamed into place once complete) appears, so the kill lands inside a step."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    began, peak, killed, checkpoint_seen = time.time(), 0, False, None
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "patchdiffusion.cli", *argv], stderr=err,
                                stdout=err, text=True, env=env)  # the CLI reports resumes on stdout
        while proc.poll() is None:
            peak = max(peak, peak_rss_of(proc))
            if kill_after_checkpoint is not None and checkpoint_seen is None:
                job, _ = kill_after_checkpoint
                if any(not p.name.endswith(".tmp") for p in job.glob("step-*")):
                    checkpoint_seen = time.time()
            late = checkpoint_seen is not None and time.time() - checkpoint_seen > kill_after_checkpoint[1]
            if late or (kill_after and time.time() - began > kill_after):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = True
                break
            time.sleep(0.5)
        err.seek(0)
        tail = err.read()[-2000:]
    return dict(returncode=proc.returncode, seconds=time.time() - began, peak_rss_bytes=peak, killed=killed,
                stderr_tail=tail)


def update_results(section: str, data: dict, argv: list[str], command_key: str = "command") -> Path:
    """Merge one part's figures into benchmarks/results/any_size.json and redraw the plot."""
    path = RESULTS / "any_size.json"
    report = json.loads(path.read_text()) if path.is_file() else {"benchmark": "any-size"}
    data[command_key] = "patchdiff bench any-size " + " ".join(argv)
    data["machine"] = machine_info(torch.device("cpu"))
    report[section] = data
    write_results(report, str(RESULTS), "any_size", torch.device("cpu"), plot)
    return path


# ------------------------------------------------------------------------------------------------
# memory


def part_memory(args, argv) -> int:
    work = Path(args.work)
    run = train_run(work / "tiny256_p16", TINY_256, steps=args.tiny_steps)
    out = Path(args.canvas_folder or tempfile.mkdtemp(prefix="any-size-memory-"))
    cases = []
    for size in args.sizes:
        shutil.rmtree(out / str(size), ignore_errors=True)  # measured: an earlier canvas would be kept, not made
        argv_sample = ["sample", "--run", str(run), "--size", f"{size}x{size}", "--num", "1", "--steps",
                       str(args.steps), "--format", "tiff", "--canvas", "disk", "--tile-batch", str(args.tile_batch),
                       "--overlap", str(args.overlap), "--out", str(out / str(size)), "--no-progress"]
        result = run_watched(argv_sample, threads=args.threads)
        if result["returncode"] != 0:
            raise RuntimeError(f"{size}²: {result['stderr_tail']}")
        result.update(size=size, megapixels=size * size / 1e6,
                      seconds_per_megapixel_per_step=result["seconds"] / (size * size / 1e6) / args.steps)
        cases.append(result)
        print(f"{size}²: peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, {result['seconds']:.0f} s", file=sys.stderr)
        for file in (out / str(size)).glob("*.tiff"):
            file.unlink()
    ratio = cases[-1]["peak_rss_bytes"] / cases[0]["peak_rss_bytes"]
    update_results("memory", dict(
        protocol=f"fresh `patchdiff sample` process per size: {args.steps} DDIM steps of the tiny full U-Net "
                 f"(patchified by 16, 16 channels, tile 256², overlap {args.overlap}, tile batch {args.tile_batch}, {args.threads} "
                 "threads), --canvas disk, --format tiff; peak RSS = VmHWM sampled every 0.5 s",
        cases=cases, ratio=ratio, target=RSS_TARGET, passed=ratio <= RSS_TARGET), argv)
    print(f"peak RSS {args.sizes[-1]}² / {args.sizes[0]}² = {ratio:.3f} (target ≤ {RSS_TARGET})")
    return 0


# ------------------------------------------------------------------------------------------------
# seams


def to_255(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float()


def real_profile(size: tuple[int, int], period: int, count: int) -> dict:
    """Seam profile of real texture images cut to `size` (what a seamless canvas should match: real
    images know nothing of the tile period, whatever their scale)."""
    from patchdiffusion.data import ImageDataset, open_source
    from patchdiffusion.eval.seam import seam_profile

    height, width = size
    source = open_source(f"builtin:textures?count={count}&resolution={max(size)}&seed=7",
                         resolution=(max(size), max(size)))
    dataset = ImageDataset(source, (max(size), max(size)))
    images = torch.stack([(dataset[i][0][:, :height, :width] + 1) * 127.5 for i in range(len(dataset))])
    return seam_profile(images.round(), period, step=args_step(period)).as_dict()


def args_step(period: int) -> int:
    return max(1, period // 12)  # offsets looked at: about 12 per axis


def sample_setting(run: Path, out: Path, size: tuple[int, int], window: str, grid: str, seeds: int, wrap=False,
                   steps: int | None = None, passes: tuple[int, int] = (1, 0)) -> tuple[list[Path], float]:
    height, width = size
    shutil.rmtree(out, ignore_errors=True)  # measured: canvases of an earlier run would be kept, not made
    argv = ["sample", "--run", str(run), "--size", f"{width}x{height}", "--num", str(seeds), "--window", window,
            "--grid", grid, "--tile-batch", "32", "--out", str(out), "--no-progress",
            "--passes", str(passes[0]), "--passes-last", str(passes[1])]
    if steps:
        argv += ["--steps", str(steps)]
    if wrap:
        argv.append("--wrap")
    began = time.time()
    proc = cli(*argv, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sampling {run} {window}/{grid} failed:\n{proc.stderr[-2000:]}")
    return sorted(out.glob("0*.png")), time.time() - began


def score_wrap(run: Path, folder: Path, size: tuple[int, int], window: str, grid: str, seeds: int, steps: int,
               passes: tuple[int, int]) -> dict:
    """A seamless texture: `seeds` wrapped canvases scored across their wrap edge (pooled; each alone too),
    beside lines at random places of the same canvases (`eval.seam.wrap_seam`)."""
    from patchdiffusion.eval.seam import wrap_seam

    paths, seconds = sample_setting(run, folder, size, window, grid, seeds, wrap=True, steps=steps, passes=passes)
    return {**wrap_seam(torch.cat([to_255(p) for p in paths])).as_dict(), "canvases": len(paths),
            "passes": list(passes), "seconds": seconds}


def seams_pass(canvas_profile: dict, wrap: dict) -> bool:
    """The target on the big canvas (worst offset) and across the wrap edge."""
    return canvas_profile["worst"] <= SEAM_TARGET and wrap["score"] <= SEAM_TARGET


def part_wrap_only(args, argv) -> int:
    """The wrap edge again for methods already in the results, with their chosen window, grid and passes."""
    from patchdiffusion.config import parse_size

    canvases = Path(args.canvas_folder or tempfile.mkdtemp(prefix="any-size-wrap-"))
    study = parse_size(args.study_size)
    previous = RESULTS / "any_size.json"
    report = json.loads(previous.read_text())["seams"] if previous.is_file() else {}
    for name in args.methods.split(","):
        entry = report.get("methods", {}).get(name)
        if entry is None:
            raise SystemExit(f"any-size seams --wrap-only: no results for {name} yet; run without --wrap-only first")
        window, grid = entry["best"].split(" ")[0].split("/")
        chosen = entry["settings"].get(entry["best"], {})
        passes = tuple(entry.get("canvas_passes") or (chosen.get("passes", 1), chosen.get("passes_last", 0)))
        run = Path(args.work) / f"small32-{name}"
        wrap = score_wrap(run, canvases / name / "wrap", study, window, grid, args.wrap_seeds, entry["steps"], passes)
        entry.update(wrap_seam=wrap["score"], wrap=wrap, passed=seams_pass(entry["canvas_profile"], wrap))
        print(f"{name}: wrap edge {wrap['score']:.3f} over {wrap['canvases']} canvases (each "
              f"{', '.join(f'{v:.3f}' for v in wrap['per_image'])}; lines elsewhere {wrap['elsewhere_5_95'][0]:.3f}-"
              f"{wrap['elsewhere_5_95'][1]:.3f})", file=sys.stderr)
        update_results("seams", report, argv, command_key="wrap_command")
    return 0


def part_seams(args, argv) -> int:
    from patchdiffusion.config import load_config, parse_size
    from patchdiffusion.eval.seam import seam_profile
    from patchdiffusion.registry import method_class

    work = Path(args.work)
    canvases = Path(args.canvas_folder or tempfile.mkdtemp(prefix="any-size-seams-"))
    study, big = parse_size(args.study_size), parse_size(args.size)
    methods = args.methods.split(",")
    runs = {}
    for name in methods:  # train all first: each in its own process, one thread
        config = [f"method={name}", *TRAIN_32, *SMALL[name]]
        runs[name] = train_run(work / f"small32-{name}", config, cpu_minutes=args.train_cpu_minutes)
        print(f"trained {name}: {runs[name]}", file=sys.stderr)
    report = {"study_size": list(study), "size": list(big), "methods": {}, "real": {}}
    previous = RESULTS / "any_size.json"
    if previous.is_file():
        report["methods"] = json.loads(previous.read_text()).get("seams", {}).get("methods", {})
    for name in methods:
        run = runs[name]
        config = load_config(run / "config.yaml")
        method = method_class(name)(config.model, config.data.resolution)
        sampler = config.sample.sampler or method.default_sampler
        steps = SAMPLE_STEPS.get(sampler, 10)
        default = method.default_tiling()
        tile = method.native_tile[0]
        settings = {}
        windows = WINDOWS if default.overlap != (0, 0) else ("uniform",)  # no overlap: nothing to blend
        earlier = report["methods"].get(name, {}).get("settings", {}) if args.reuse_sweep else {}
        for window in windows:
            for grid in GRIDS:
                if f"{window}/{grid}" in earlier:  # one grid per call: unchanged by the passes
                    settings[f"{window}/{grid}"] = earlier[f"{window}/{grid}"]
                    continue
                folder = canvases / name / f"{window}-{grid}"
                paths, seconds = sample_setting(run, folder, study, window, grid, args.seeds, steps=steps)
                stride = tile - (default.overlap[0] if default.overlap is not None else tile // 4)
                profile = seam_profile(torch.cat([to_255(p) for p in paths]), stride, step=args_step(stride)).as_dict()
                settings[f"{window}/{grid}"] = {**profile, "seconds": seconds, "period": stride}
                print(f"{name} {window}/{grid}: on-grid {profile['at_grid']:.3f} worst {profile['worst']:.3f}",
                      file=sys.stderr)
        best = min(settings, key=lambda k: settings[k]["worst"])
        window, grid = best.split("/")
        # When the best misses the target: the best window and grid with several grids averaged per call
        # (diffusion/tiled.py, passes), cheapest first, until one reaches it; the lowest is kept.
        chosen = best
        for k, last in args.pass_settings:
            if settings[chosen]["worst"] <= SEAM_TARGET:
                break
            key = f"{best} x{k} passes" + (f" last {last}" if last else "")
            folder = canvases / name / f"{window}-{grid}-passes{k}-{last}"
            paths, seconds = sample_setting(run, folder, study, window, grid, args.seeds, steps=steps,
                                            passes=(k, last))
            stride = settings[best]["period"]
            profile = seam_profile(torch.cat([to_255(p) for p in paths]), stride, step=args_step(stride)).as_dict()
            settings[key] = {**profile, "seconds": seconds, "period": stride, "passes": k, "passes_last": last}
            print(f"{name} {key}: on-grid {profile['at_grid']:.3f} worst {profile['worst']:.3f}", file=sys.stderr)
            if profile["worst"] < settings[chosen]["worst"]:
                chosen = key
        passes = (settings[chosen].get("passes", 1), settings[chosen].get("passes_last", 0))
        folder = canvases / name / "big"
        stride = settings[best]["period"]
        big_tries = {}
        # The big canvas with the chosen setting; while it misses the target, with the next costlier passes
        # (a small study can pass where the big canvas does not).
        order = list(args.pass_settings)  # cheapest first
        for passes in [passes] + (order[order.index(passes) + 1:] if passes in order else order):
            paths, seconds = sample_setting(run, folder / f"passes{passes[0]}-{passes[1]}", big, window, grid, 1,
                                            steps=steps, passes=passes)
            profile = seam_profile(to_255(paths[0]), stride, step=args_step(stride)).as_dict()
            big_tries[f"x{passes[0]} passes" + (f" last {passes[1]}" if passes[1] else "")] = profile["worst"]
            print(f"{name} {big[1]}x{big[0]} x{passes[0]} passes last {passes[1]}: worst {profile['worst']:.3f}",
                  file=sys.stderr)
            if profile["worst"] <= SEAM_TARGET:
                break
        image = Path("docs/images") / f"any_size_{name}.jpg"  # JPEG q85: the docs show it (scored from the PNG)
        image.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.open(paths[0]).convert("RGB").save(image, quality=85)
        wrap = score_wrap(run, canvases / name / "wrap", study, window, grid, args.wrap_seeds, steps, passes)
        if str(stride) not in report["real"]:
            report["real"][str(stride)] = real_profile(study, stride, 16)
        real = report["real"][str(stride)]
        report["methods"][name] = dict(
            sampler=sampler, steps=steps, tile=tile, period=stride, settings=settings, best=chosen, canvas=str(image),
            canvas_profile=profile, canvas_seconds=seconds, canvas_passes=list(passes), canvas_tries=big_tries,
            wrap_seam=wrap["score"], wrap=wrap, real=real, passed=seams_pass(profile, wrap))
        print(f"{name}: best {best}, {big[1]}x{big[0]} worst-offset seam {profile['worst']:.3f} (real crops "
              f"{real['worst']:.3f}), wrap edge {wrap['score']:.3f}", file=sys.stderr)
        update_results("seams", report, argv)
    return 0


# ------------------------------------------------------------------------------------------------
# gigapixel


def part_gigapixel(args, argv) -> int:
    work = Path(args.work)
    run = train_run(work / "tiny256_p16", TINY_256, steps=args.tiny_steps)
    out = Path(args.canvas_folder or "runs/any_size/gigapixel")
    out.mkdir(parents=True, exist_ok=True)
    sample = ["sample", "--run", str(run), "--size", f"{args.size}x{args.size}", "--num", "1", "--steps",
              str(args.steps), "--format", "tiff", "--canvas", "disk", "--checkpoint-every", "1",
              "--tile-batch", str(args.tile_batch), "--overlap", str(args.overlap), "--out", str(out), "--no-progress"]
    # Attempts are kept in OUT/attempts.json: a bench stopped between the kill and the resume (its own
    # kill, a full disk) continues with the resume when run again.
    record = out / "attempts.json"
    attempts = json.loads(record.read_text()) if record.is_file() and (out / ".job-000000").is_dir() else []
    if not attempts:  # a new measurement: a canvas finished by an earlier one would be kept, not made
        for finished in (out / "000000.tiff", out / ".done-000000"):
            finished.unlink(missing_ok=True)
    if not attempts and (args.kill_after or args.kill_after_checkpoint):
        job = (out / ".job-000000", args.kill_after_checkpoint) if args.kill_after_checkpoint else None
        attempts.append(run_watched(sample, kill_after=args.kill_after or None, threads=args.threads,
                                    kill_after_checkpoint=job))
        print(f"killed after {attempts[-1]['seconds']:.0f} s (peak RSS {attempts[-1]['peak_rss_bytes'] / 2**20:.0f} MiB)",
              file=sys.stderr)
        record.write_text(json.dumps(attempts))
    attempts.append(run_watched(sample, threads=args.threads))
    final = attempts[-1]
    if final["returncode"] != 0:
        raise RuntimeError(final["stderr_tail"])
    resumed = re.search(r"resumed the canvas job in .* at step (\d+)", final["stderr_tail"])
    tiff = out / "000000.tiff"
    import tifffile

    with tifffile.TiffFile(tiff) as f:
        page = f.pages[0]
        shape, tile = page.shape, page.tilewidth
        corner = page.asarray(out=None)[:8, :8] if page.shape[0] * page.shape[1] <= 1 << 26 else None
    pixels = args.size * args.size
    total = sum(a["seconds"] for a in attempts)
    update_results("gigapixel", dict(
        size=[args.size, args.size], megapixels=pixels / 1e6, steps=args.steps, tiff=str(tiff), tiff_shape=list(shape),
        tiff_tile=tile, tiff_bytes=tiff.stat().st_size, attempts=attempts, resumed_at_step=int(resumed.group(1))
        if resumed else None, wall_seconds=total, megapixels_per_second_per_step=pixels / 1e6 * args.steps / total,
        peak_rss_bytes=max(a["peak_rss_bytes"] or 0 for a in attempts), corner=None if corner is None else corner.tolist()),
        argv)
    print(f"{args.size}² in {total / 60:.1f} min ({pixels / 1e6 * args.steps / total:.2f} MP·steps/s), "
          f"resumed at step {resumed.group(1) if resumed else '-'}; {tiff} {shape}")
    return 0


# ------------------------------------------------------------------------------------------------


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), dpi=100, gridspec_kw={"width_ratios": [3, 1, 1]})
    ax = axes[0]
    seams = report.get("seams", {})
    methods = seams.get("methods", {})
    labels, at_grid, worst = [], [], []
    for name, m in methods.items():
        for key, s in m["settings"].items():
            labels.append(f"{name}\n{key}")
            at_grid.append(s["at_grid"])
            worst.append(s["worst"])
    if labels:
        xs = np.arange(len(labels))
        ax.bar(xs - 0.2, at_grid, 0.4, label="on the grid's lines")
        ax.bar(xs + 0.2, worst, 0.4, label="worst offset")
        reals = list(seams.get("real", {}).values())
        real = max(reals, key=lambda r: r["worst"]) if reals else {}
        if real:
            ax.axhline(real["worst"], color="k", ls="--", lw=1, label=f"real crops, worst offset ({real['worst']:.3f})")
        ax.axhline(SEAM_TARGET, color="r", ls=":", lw=1, label=f"target {SEAM_TARGET}")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=5, rotation=90)
        ax.set_ylabel("seam score (1 = seamless)")
        ax.set_title(f"seam score by method, window and grid ({seams.get('study_size')} canvases)", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[2]
    wrapped = {name: m["wrap"] for name, m in methods.items() if "wrap" in m}
    if wrapped:  # the wrap edge beside the spread of lines elsewhere in the same canvases
        xs = np.arange(len(wrapped))
        low = [w["elsewhere_5_95"][0] for w in wrapped.values()]
        high = [w["elsewhere_5_95"][1] for w in wrapped.values()]
        ax.bar(xs, np.subtract(high, low), 0.5, bottom=low, color="0.85", label="lines elsewhere, 5-95%")
        ax.plot(xs, [w["score"] for w in wrapped.values()], "o", color="C3", label="wrap edge")
        ax.axhline(SEAM_TARGET, color="r", ls=":", lw=1, label=f"target {SEAM_TARGET}")
        ax.set_xticks(xs)
        ax.set_xticklabels(list(wrapped), fontsize=7, rotation=45, ha="right")
        canvases = next(iter(wrapped.values())).get("canvases", "")
        ax.set_ylim(min(low + [w["score"] for w in wrapped.values()]) - 0.02, SEAM_TARGET + 0.02)
        ax.set_title(f"--wrap edge, {canvases} canvases each", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[1]
    memory = report.get("memory", {})
    if memory.get("cases"):
        sizes = [c["size"] for c in memory["cases"]]
        ax.plot(sizes, [c["peak_rss_bytes"] / 2**20 for c in memory["cases"]], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("canvas side (pixels)")
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"peak RSS, canvas on disk: ×{memory['ratio']:.2f}", fontsize=10)
    save_figure(fig, path)


def _pass_settings(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(k), int(n)) for k, n in (item.split(":") for item in text.split(",") if item)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:N[,K:N...], got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = bench_parser("any-size", __doc__)
    parser.add_argument("part", choices=("memory", "seams", "gigapixel"))
    parser.add_argument("--work", default="runs/any_size", help="where the models are trained (reused)")
    parser.add_argument("--canvas-folder", help="where canvases are written (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each sampling process")
    parser.add_argument("--tile-batch", type=int, default=8)
    parser.add_argument("--tiny-steps", type=int, default=400, help="training steps of the tiny 256² model")
    parser.add_argument("--overlap", type=int, default=32, help="memory/gigapixel: tile overlap (pixels)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 16384], help="memory: canvas sides")
    parser.add_argument("--steps", type=int, default=2, help="memory/gigapixel: DDIM steps")
    parser.add_argument("--methods", default=",".join(METHODS), help="seams: methods")
    parser.add_argument("--train-cpu-minutes", type=float, default=4.0, help="seams: CPU budget per model")
    parser.add_argument("--study-size", default="384x256", help="seams: canvas of the window × grid sweep")
    parser.add_argument("--size", default="1536x1024", help="seams: the big canvas (WxH); gigapixel: the side")
    parser.add_argument("--seeds", type=int, default=2, help="seams: canvases per setting")
    parser.add_argument("--reuse-sweep", action="store_true",
                        help="seams: keep the window x grid figures of the last results for the same models")
    parser.add_argument("--pass-settings", type=_pass_settings, default=[(4, 2), (4, 5), (4, 0)],
                        help="seams: K:N grids averaged in the last N steps (0: all), tried on the best window and "
                             "grid when it misses the target, comma-separated (default 4:2,4:5,4:0; '' for none)")
    parser.add_argument("--wrap-seeds", type=int, default=8,
                        help="seams: wrapped canvases scored across their wrap edge (pooled; one line of one canvas "
                             "is noisy, default 8)")
    parser.add_argument("--wrap-only", action="store_true",
                        help="seams: only the wrap edge again, for methods already in the results (their settings)")
    parser.add_argument("--kill-after", type=float, default=0, help="gigapixel: SIGKILL the first run after S s")
    parser.add_argument("--kill-after-checkpoint", type=float, default=0,
                        help="gigapixel: SIGKILL the first run S s after its first step checkpoint (inside a step)")
    args = parser.parse_args(argv)
    if args.part == "gigapixel":
        args.size = int(args.size) if args.size.isdigit() else 32768
    if args.part == "seams" and args.wrap_only:
        return part_wrap_only(args, argv)
    return {"memory": part_memory, "seams": part_seams, "gigapixel": part_gigapixel}[args.part](args, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`patchdiff demo`: train a patch method for a few minutes, then make one large seamless image from it.

What the toolkit is for, in one command on a laptop CPU:
  1. train the chosen method's demo recipe (`RECIPES`) on built-in textures for `minutes` of wall time,
     with a progress bar over that time budget (fed from the run's metrics.jsonl, the loop's own clock);
  2. sample small images of the training size and measure them: SWD against held-out real crops,
     beside the real-vs-real floor and uniform noise, so "good" has a scale;
  3. sample one large canvas (default 1024x1024, 1024x the training area) from tiles of the training
     size through `sample.generate_canvases` (bounded memory: the tiles are evaluated a batch at a time
     and the image is streamed out), and measure its seam score and the process's peak memory;
  4. write a labelled grid (samples beside real crops), the loss plot, report.md, a self-contained
     report.html (images embedded) and summary.json (every figure, for scripts and tests).

Everything lands in one folder; `run/` is a normal run directory that `patchdiff sample --run` reuses.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import numpy as np
import torch

from patchdiffusion.config import RunConfig, apply_overrides
from patchdiffusion.errors import ConfigError
from patchdiffusion.images import grid, save_grid, to_uint8
from patchdiffusion.process_memory import peak_rss_bytes, reset_peak_rss, status_kib
from patchdiffusion.run import read_metrics
from patchdiffusion.runtime import cpu_has_fast_bf16

# ------------------------------------------------------------------------------------------------
# recipes


@dataclass(frozen=True)
class Recipe:
    """How the demo trains and samples one method (on top of `SHARED`)."""

    overrides: tuple[str, ...]  # key=value settings of the method and its network
    sampler: str  # for the small samples and the large canvas alike
    steps: int  # sampler steps (one network evaluation per step for ddim / dpmpp_2m)
    sees: str  # what the network sees, for the report
    classes: bool = True  # the network takes class labels (model.net.num_classes): one texture per canvas


# Optimiser and bookkeeping shared by every recipe: a high learning rate with a short warm-up and an
# EMA whose half-life ramps up with the images seen, so a few minutes of CPU training give a usable
# model; one checkpoint at the end (the demo samples from it itself, so no in-training grids).
SHARED = (
    "data.resolution=32", "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=50",
    "train.ema_halflife_kimg=2", "train.ema_rampup=0.2", "train.steps=10000000", "train.log_every=5",
    "train.checkpoint_every=10000000", "train.sample_images=0",
)

# One line per method. The patching recipe is the default, by measurement (README, "The demo"): in
# `patchdiff compare` of every method on builtin:textures at 32² with 10 CPU minutes each it gave the best
# SWD (73.6, against 82.6 patch_ddpm, 85.9 patch_dm, 141 full, 178 patch_diffusion), and the cheapest per canvas
# tile (its U-Net runs at 32/P inside each tile: 4 ms a tile at P = 2, against 10-13 ms for the
# full-resolution networks). P = 2 rather than the comparison's P = 4: the same SWD within noise for the
# same CPU (53 against 47) but a finer patch lattice on the canvas (seam score 1.10 against 1.20).
RECIPES: dict[str, Recipe] = {
    "patching": Recipe(("model.net.patch_size=2", "model.net.model_channels=32"), "ddim", 12,
                       "2x2 patches stacked as channels: the U-Net runs at 16x16 (Luhman & Luhman)"),
    "patch_diffusion": Recipe((), "dpmpp_2m", 10,
                              "random 8/16/32-pixel patches with their coordinates (Wang et al.)"),
    "patch_ddpm": Recipe(("model.patch_divider=2",), "ddim", 10,
                         "a 2x2 grid of 16-pixel patches with their position and the pooled image (Arakawa et al.)",
                         classes=False),
    "patch_dm": Recipe(("data.resolution=64", "model.net.patch_size=32", "model.net.model_channels=16",
                        "model.net.channel_mult=[1,2,5]", "model.net.num_res_blocks=1",
                        "model.net.attention_resolutions=[8]", "model.net.code_dim=64", "model.prediction=v",
                        "model.grid_shift=random", "train.batch_size=8"), "ddim", 10,
                       "32-pixel patches collaged with their neighbours, plus a code per image (Ding et al.)",
                       classes=False),
    "dimr": Recipe((), "dpmpp_2m", 10, "2x2-patch transformer, then full-resolution ConvNeXt blocks (Liu et al.)"),
    "full": Recipe(("model.net.model_channels=32", "model.net.channel_mult=[1,2,2]", "model.net.num_res_blocks=2",
                    "model.net.attention_resolutions=[8]"), "dpmpp_2m", 10,
                   "the whole 32x32 image (the EDM baseline, no patches)"),
}
DEFAULT_METHOD = "patching"
DEFAULT_MINUTES = 3.5  # training wall time; with the install and sampling the demo fits in 8 minutes on 2 cores
DEFAULT_CANVAS = 1024  # side of the large canvas
DEFAULT_SAMPLES = 256  # small samples measured (SWD)
DEFAULT_CANVAS_CLASS = "green-grass"  # the texture family of the large canvas
SAMPLE_BATCH = 64  # small samples per sampler call
GRID_COLUMNS = 6  # the grids: six images a row (a row per texture family for a class-conditional model)
TILE_BATCH = 64  # tiles per network call on the canvas: fewer calls, a few MB of activations
# The canvas's last 2 steps average 4 tile grids (diffusion/tiled.py, passes): measured on the demo's own
# model at 512², 2 seeds, the worst-offset seam went from 1.050 to 1.007 (real grass 1.04) for 1.5x the
# canvas time; the vertical streaks of Luhman's 2x2 patch borders are averaged away.
CANVAS_PASSES, CANVAS_PASSES_LAST = 4, 2


def demo_config(method: str = DEFAULT_METHOD, data: str = "builtin:textures", minutes: float = DEFAULT_MINUTES,
                device: str = "auto", overrides=()) -> RunConfig:
    """The run's config: the shared settings, the method's recipe (its sampler as the run's sample settings,
    so `patchdiff sample --run` uses it too), the budget, then the caller's overrides."""
    if method not in RECIPES:
        raise ConfigError(f"the demo has no recipe for method '{method}' (choose from: {', '.join(RECIPES)})")
    config = apply_overrides(RunConfig(), [f"method={method}"])
    recipe = RECIPES[method]
    # A class-conditional model on a labelled built-in set (textures: one label per family), so that a
    # canvas can be asked for one texture: an unconditional model's tiles each pick a family of their
    # own at high noise, and the large canvas becomes a patchwork of families with edges along the tiles.
    classes = len(class_names(data)) if recipe.classes else 0
    labels = ["data.use_labels=true", f"model.net.num_classes={classes}"] if classes else []
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    precision = "bf16" if (not on_cpu or cpu_has_fast_bf16()) else "fp32"
    return apply_overrides(
        config,
        list(SHARED) + list(recipe.overrides) + labels
        + [f"sample.sampler={recipe.sampler}", f"sample.num_steps={recipe.steps}",
           f"data.source={data}", f"train.max_minutes={minutes}", f"train.device={device}",
           f"train.precision={precision}"]
        + list(overrides),
    )


# ------------------------------------------------------------------------------------------------
# progress over the time budget


class BudgetBar:
    """A bar over the training wall-time budget that shows the steps, their rate and the loss.

    It reads the run's metrics.jsonl (a row every few steps, each with the loop's own `seconds`), so
    the bar's clock is the training loop's: setting up the data and the network does not count, as it
    does not count against the budget. A thread refreshes it twice a second."""

    def __init__(self, run_dir: Path, budget_s: float, enabled: bool):
        self.path, self.budget_s, self.enabled = run_dir / "metrics.jsonl", budget_s, enabled
        self.started: float | None = None  # time.time() at the loop's start, known from the first row
        self.row: dict = {}
        self._offset, self._stop, self._thread, self.bar = 0, threading.Event(), None, None

    def __enter__(self) -> "BudgetBar":
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=round(self.budget_s), desc="train (setting up)", unit="s", file=sys.stderr,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}",
                            dynamic_ncols=True)
            self._thread = threading.Thread(target=self._refresh_loop, daemon=True)
            self._thread.start()
        return self

    def _read_rows(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        lines = data.split(b"\n")
        self._offset += len(data) - len(lines[-1])  # keep a half-written last line for the next read
        for line in lines[:-1]:
            row = json.loads(line)
            if "loss" in row:
                self.row = row
                if self.started is None:
                    self.started = time.time() - row["seconds"]

    def _refresh(self) -> None:
        self._read_rows()
        if self.started is None:
            return
        elapsed = time.time() - self.started
        self.bar.set_description_str("train", refresh=False)
        self.bar.n = min(round(elapsed), self.bar.total)
        step, seconds = self.row.get("step", 0), max(self.row.get("seconds", 0.0), 1e-9)
        self.bar.set_postfix_str(f"step {step}, {step / seconds:.1f} steps/s, loss {self.row['loss']:.4f}",
                                 refresh=False)
        self.bar.refresh()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(0.5):
            self._refresh()

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def finish(self, budget_spent: bool) -> None:
        """Stop refreshing; a run that spent its budget shows a full bar, one stopped by its step limit
        (or an error) shows where it stopped."""
        if self.bar is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._refresh()
        if budget_spent:
            self.bar.n = self.bar.total
        self.bar.refresh()
        self.bar.close()

    def __exit__(self, *exc) -> None:
        self.finish(budget_spent=False)


# ------------------------------------------------------------------------------------------------
# threads


def free_cpu_threads(load: float | None = None, cores: int | None = None, current: int | None = None) -> int:
    """Torch threads for a CPU run: the cores other programs leave free (load average over 1 minute),
    at least 1 and at most torch's current count. Small convolutions on more threads than there are free
    cores wait at every barrier for a descheduled thread: on 2 cores busy with other work the demo's
    training ran 4x slower on 2 threads than on 1 (0.3 against 1.2 steps/s)."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):  # no load average on this platform: keep torch's choice
            load = 0.0
    cores = cores or os.cpu_count() or 1
    current = current or torch.get_num_threads()
    return max(1, min(current, cores - math.floor(load + 0.5)))


def _threads(count: int) -> str:
    return f"{count} CPU thread{'s' if count != 1 else ''}"


# ------------------------------------------------------------------------------------------------
# memory


# ------------------------------------------------------------------------------------------------
# data


def class_names(spec: str) -> list[str]:
    """The class names of a built-in set (textures: its families); [] for other sources (no labels assumed)."""
    if not spec.startswith("builtin:"):
        return []
    from patchdiffusion.data import open_source

    return list(open_source(spec, resolution=8).class_names)


def held_out_spec(spec: str, count: int) -> str | None:
    """The same built-in set drawn with another seed (crops never seen in training); None for other sources."""
    if not spec.startswith("builtin:"):
        return None
    name, _, query = spec.partition("?")
    params = dict(parse_qsl(query))
    params["seed"] = str(int(params.get("seed", 0)) + 1)
    params["count"] = str(count)
    return f"{name}?{urlencode(params)}"


def _images(spec: str, resolution: tuple[int, int], count: int, labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images of a source spread over it, (count, 3, H, W) in [-1, 1], and their labels (-1: none)."""
    from patchdiffusion.data import ImageDataset, open_source

    height, width = resolution
    dataset = ImageDataset(open_source(spec, resolution=(width, height)), resolution=(width, height),
                           use_labels=labels)
    count = min(count, len(dataset))
    pairs = [dataset[i * len(dataset) // count] for i in range(count)]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def grid_rows(images: torch.Tensor, labels: torch.Tensor | None, classes: int) -> torch.Tensor:
    """Images for a 6-column grid: the first six of each class, a row per class; else the first 36."""
    if labels is None or classes == 0:
        return images[:GRID_COLUMNS * GRID_COLUMNS]
    rows = [images[labels == k][:GRID_COLUMNS] for k in range(classes)]
    return torch.cat([row for row in rows if len(row) == GRID_COLUMNS] or [images[:GRID_COLUMNS]])


def _uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, 3, H, W), rounded as saved PNGs are."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------
# pictures


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def labelled_grid(panels: list[tuple[str, torch.Tensor]], path: Path, upscale: int) -> Path:
    """Grids of images side by side, each under its label, in one PNG."""
    from PIL import Image, ImageDraw

    pictures = []
    for label, images in panels:
        picture = Image.fromarray(grid(to_uint8(images), columns=GRID_COLUMNS))
        pictures.append((label, picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)))
    font, margin, title = _font(18), 12, 32
    width = sum(p.width for _, p in pictures) + margin * (len(pictures) + 1)
    height = max(p.height for _, p in pictures) + title + 2 * margin
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    left = margin
    for label, picture in pictures:
        draw.text((left, margin), label, fill="black", font=font)
        sheet.paste(picture, (left, margin + title))
        left += picture.width + margin
    sheet.save(path)
    return path


# ------------------------------------------------------------------------------------------------
# the demo


def run_demo(
    out_dir: str | Path = "demo_out",
    minutes: float = DEFAULT_MINUTES,
    method: str = DEFAULT_METHOD,
    device: str = "auto",
    data: str = "builtin:textures",
    progress: bool = True,
    overrides=(),
    canvas_size: int = DEFAULT_CANVAS,
    canvas_class: str | None = None,
    num_samples: int = DEFAULT_SAMPLES,
    log=print,
) -> Path:
    """Train, sample, measure and report into `out_dir`; returns the path of report.md.

    canvas_class: the class (texture family) of the large canvas for a class-conditional recipe, by name
    (default DEFAULT_CANVAS_CLASS when the data has it, else the first class)."""
    from patchdiffusion.run import load_run
    from patchdiffusion.runtime import resolve_device
    from patchdiffusion.train import train

    began = time.time()
    config = demo_config(method, data, minutes, device, overrides)  # refuses an unknown method in one line
    if config.train.device == "cpu" or (config.train.device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(free_cpu_threads())
    data = config.data.source  # an override may have changed it
    if num_samples < 1:
        raise ConfigError(f"the demo needs at least one sample to measure, got {num_samples}")
    height, width = config.data.resolution
    if canvas_size < max(height, width):
        raise ConfigError(f"the large canvas ({canvas_size}) must be at least the training size {width}x{height}")
    names = class_names(data) if config.data.use_labels else []
    canvas_label = pick_class(names, canvas_class)
    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. Training, with a bar over the time budget.
    log(f"demo: training '{method}' for {minutes:g} min on {data} at {width}x{height} "
        f"({RECIPES[method].sees}), then a {canvas_size}x{canvas_size} canvas; everything goes to {out_dir}/"
        f" ({_threads(torch.get_num_threads())})")
    with BudgetBar(run_dir, minutes * 60, progress) as bar:
        result = train(config, run_dir, progress=False, log=bar.write)
        bar.finish(budget_spent=result.stopped_early)
    train_seconds = time.time() - began
    where = resolve_device(device)
    loaded = load_run(run_dir, where, use_ema=True)

    # 2. Small samples, measured against held-out real crops.
    small = measure_samples(loaded, num_samples, len(names), where, progress)
    # 3. The large canvas, and its seams beside those of real crops (of its class).
    big = make_canvas(loaded, run_dir, out_dir, canvas_size, canvas_label, where, progress, log)
    real = small["reference"] if canvas_label is None else small["reference"][small["reference_labels"] == canvas_label]
    seam_real = seam_profile_of(real, big["period"])

    # 4. Pictures and reports.
    upscale = max(1, 128 // max(height, width))
    shown = grid_rows(small["samples"], small["labels"], len(names))
    real_shown = grid_rows(small["reference"], small["reference_labels"], len(names))
    rows = f", a row per {'family' if data.startswith('builtin:textures') else 'class'}" if names else ""
    labelled_grid([(f"generated: {method}, {config.sample.num_steps} {config.sample.sampler} steps{rows}", shown),
                   ("real: held-out crops" if small["held_out"] else "real: training images", real_shown)],
                  out_dir / "samples_vs_real.png", upscale)
    save_grid(shown, out_dir / "samples.png", columns=GRID_COLUMNS, upscale=upscale)
    save_grid(real_shown, out_dir / "real.png", columns=GRID_COLUMNS, upscale=upscale)
    if (run_dir / "loss.png").is_file():
        shutil.copy(run_dir / "loss.png", out_dir / "loss.png")
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    tenth = max(1, len(losses) // 10)
    summary = {
        "method": method, "data": data, "resolution": [height, width], "sees": RECIPES[method].sees,
        "classes": names, "parameters_m": round(sum(p.numel() for p in loaded.net.parameters()) / 1e6, 3),
        "minutes_budget": minutes, "train_seconds": round(train_seconds, 1), "steps": result.step,
        "images_seen": result.images_seen, "batch_size": config.train.batch_size,
        "loss_first": sum(losses[:tenth]) / tenth if losses else None,
        "loss_last": sum(losses[-tenth:]) / tenth if losses else None,
        "sampler": config.sample.sampler, "sampler_steps": config.sample.num_steps,
        "num_samples": len(small["samples"]), "samples_seconds": small["seconds"], "swd": small["swd"],
        "held_out": small["held_out"] or "",
        "canvas": {key: value for key, value in big.items() if key != "period"},
        "seam": {"period": list(big["period"]), "canvas": big["seam"], "real": seam_real.as_dict(),
                 "real_images": len(real)},
        "total_seconds": round(time.time() - began, 1), "device": str(where), "threads": torch.get_num_threads(),
    }
    summary["canvas"]["class"] = names[canvas_label] if canvas_label is not None else ""
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = write_reports(out_dir, summary)
    for line in summary_lines(summary):
        log(line)
    log(f"demo finished in {summary['total_seconds'] / 60:.1f} min: open {out_dir / 'report.html'} in a browser")
    return report


def pick_class(names: list[str], wanted: str | None) -> int | None:
    """The canvas's class index: `wanted` by name, else DEFAULT_CANVAS_CLASS if there, else 0; None unlabelled."""
    if not names:
        if wanted is not None:
            raise ConfigError("--canvas-class needs a class-conditional recipe on a labelled built-in set")
        return None
    if wanted is None:
        return names.index(DEFAULT_CANVAS_CLASS) if DEFAULT_CANVAS_CLASS in names else 0
    if wanted not in names:
        raise ConfigError(f"unknown canvas class '{wanted}' (this data has: {', '.join(names)})")
    return names.index(wanted)


def measure_samples(loaded, num_samples: int, classes: int, device, progress: bool) -> dict:
    """`num_samples` images of the training size (balanced over the classes) and their SWD against
    held-out real crops, beside the real-vs-real floor (training crops) and uniform noise."""
    from patchdiffusion.eval.monitor import SWDMonitor
    from patchdiffusion.sample import sample_images

    config = loaded.config
    height, width = config.data.resolution
    batches = range(0, num_samples, SAMPLE_BATCH)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"sample {num_samples} images of {width}x{height}", unit="batch",
                       file=sys.stderr, dynamic_ncols=True)
    began, samples = time.time(), []
    labels = torch.arange(num_samples) % classes if classes else None  # the families in equal shares
    for start in batches:
        count = min(SAMPLE_BATCH, num_samples - start)
        samples.append(sample_images(loaded.method, loaded.net, config, count, seed0=start, device=device,
                                     labels=None if labels is None else labels[start:start + count].to(device)).cpu())
    samples = torch.cat(samples)
    seconds = time.time() - began
    held_out = held_out_spec(config.data.source, num_samples)
    reference, reference_labels = _images(held_out or config.data.source, (height, width), num_samples, classes > 0)
    training, _ = _images(config.data.source, (height, width), num_samples, False)
    monitor = SWDMonitor(reference, num_images=len(reference), seed=0)
    noise = torch.rand(len(reference), 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    swd = {"samples": monitor(samples)["swd"], "real": monitor(training)["swd"], "noise": monitor(noise)["swd"]}
    return {"samples": samples, "labels": labels, "reference": reference, "reference_labels": reference_labels,
            "held_out": held_out, "seconds": round(seconds, 1), "swd": {k: round(v, 2) for k, v in swd.items()}}


def make_canvas(loaded, run_dir: Path, out_dir: Path, side: int, label: int | None, device, progress: bool, log) -> dict:
    """One side x side canvas from tiles of the training size through `generate_canvases` (the method's
    default tiling, TILE_BATCH tiles per call, the canvas in RAM or on disk as it needs), streamed to
    out_dir/canvas.png; its time, the peak memory while it was made and its seam profile."""
    from patchdiffusion.diffusion.tiled import resolve_tiling
    from patchdiffusion.sample import generate_canvases, tiling_config

    tiling = tiling_config(loaded.method, tile_batch=TILE_BATCH, passes=CANVAS_PASSES, passes_last=CANVAS_PASSES_LAST)
    tile, overlap = resolve_tiling(tiling, loaded.method.native_tile)
    period = (tile[0] - overlap[0], tile[1] - overlap[1])  # the tile stride: where seams would repeat
    exact_peak = reset_peak_rss()
    rss_before = (status_kib("VmRSS") or 0) / 1024
    began = time.time()
    job = out_dir / "canvas_job"
    [made] = generate_canvases(run_dir, job, num=1, seed=0, height=side, width=side,
                               class_label=label, tiling=tiling, storage="auto", checkpoint_every=10**9,
                               device=str(device), progress=progress, log=log, loaded=loaded)
    seconds = time.time() - began
    peak = peak_rss_bytes() / 2**20
    path = out_dir / "canvas.png"
    os.replace(made, path)
    shutil.rmtree(job, ignore_errors=True)
    from PIL import Image

    with Image.open(path) as picture:
        canvas = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    return {"size": [side, side], "area_x": side * side / (loaded.config.data.resolution[0]
                                                            * loaded.config.data.resolution[1]),
            "tile": list(tile), "overlap": list(overlap), "window": tiling.window, "grid": tiling.grid,
            "passes": tiling.passes, "passes_last": tiling.passes_last,
            "seconds": round(seconds, 1), "peak_rss_mib": round(peak, 1), "rss_before_mib": round(rss_before, 1),
            "peak_is_canvas_only": exact_peak, "period": period,
            "seam": seam_profile_of(canvas, period, uint8=True).as_dict()}


def _passes(canvas: dict) -> str:
    """', 4 grids averaged in the last 2 steps' (or nothing for one grid)."""
    passes, last = canvas.get("passes", 1), canvas.get("passes_last", 0)
    if passes <= 1:
        return ""
    return f", {passes} grids averaged" + (f" in the last {last} steps" if last else " at every step")


def seam_profile_of(images: torch.Tensor, period, uint8: bool = False):
    """Seam profile of images in [-1, 1] (or uint8 with uint8=True) at the tile period."""
    from patchdiffusion.eval.seam import seam_profile

    return seam_profile(images if uint8 else _uint8(images), period)


# ------------------------------------------------------------------------------------------------
# reports


def summary_lines(s: dict) -> list[str]:
    """The demo's figures, a line each (printed at the end and listed in the reports)."""
    c, seam, swd = s["canvas"], s["seam"], s["swd"]
    loss = (f", loss {s['loss_first']:.3f} → {s['loss_last']:.3f}" if s["loss_first"] is not None else "")
    peak = "peak RSS while sampling it" if c["peak_is_canvas_only"] else "peak RSS of the process"
    return [
        f"training: {s['steps']} steps of batch {s['batch_size']} in {s['minutes_budget']:g} min "
        f"({s['parameters_m']:.2f}M parameters){loss}",
        f"SWD x1e3 of {s['num_samples']} samples vs {'held-out' if s['held_out'] else 'training'} real crops: "
        f"{swd['samples']:.1f} (real vs real {swd['real']:.1f}, uniform noise {swd['noise']:.1f}; lower is better)",
        f"large canvas: {c['size'][1]}x{c['size'][0]}{' of ' + c['class'] if c['class'] else ''} "
        f"({c['area_x']:.0f}x the training area) from "
        f"{c['tile'][1]}x{c['tile'][0]} tiles in {c['seconds']:.0f} s; {peak} {c['peak_rss_mib']:.0f} MiB "
        f"({c['rss_before_mib']:.0f} MiB before it)",
        f"seam score at the tile period {seam['period'][1]}: worst offset {seam['canvas']['worst']:.3f} "
        f"(real crops {seam['real']['worst']:.3f}; 1.0 = seamless)",
    ]


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_reports(out_dir: Path, s: dict) -> Path:
    """report.md (pictures beside it) and report.html (the same, pictures embedded); returns report.md."""
    c, seam, swd = s["canvas"], s["seam"], s["swd"]
    run_dir = out_dir / "run"
    title = f"patchdiffusion demo: {s['method']} on {s['data']}"
    facts = [
        ("method", f"`{s['method']}`: {s['sees']}"),
        ("data", f"`{s['data']}` at {s['resolution'][1]}x{s['resolution'][0]}"),
        ("training", f"{s['steps']} steps of batch {s['batch_size']} ({s['images_seen']} images) in "
                     f"{s['minutes_budget']:g} min of wall time; {s['parameters_m']:.2f}M parameters"),
        ("sampling", f"{s['sampler']}, {s['sampler_steps']} steps, EMA weights"),
        ("SWD x10³ (lower is better)",
         f"samples **{swd['samples']:.1f}** · real vs real {swd['real']:.1f} (the floor) · uniform noise "
         f"{swd['noise']:.1f}; {s['num_samples']} images against "
         f"{'held-out real crops `' + s['held_out'] + '`' if s['held_out'] else 'training images'}"),
        ("large canvas", f"{c['size'][1]}x{c['size'][0]}{' of ' + c['class'] if c['class'] else ''}, "
                         f"{c['area_x']:.0f}x the training area, from "
                         f"{c['tile'][1]}x{c['tile'][0]} tiles (overlap {c['overlap'][1]}, {c['window']} "
                         f"window, {c['grid']} grid{_passes(c)}) in {c['seconds']:.0f} s"),
        ("seam score (1.0 = seamless)",
         f"canvas **{seam['canvas']['worst']:.3f}** at the worst offset of the {seam['period'][1]}-pixel tile "
         f"period ({seam['canvas']['at_grid']:.3f} on the unmoved grid's lines) · {seam['real_images']} real crops"
         f"{' of ' + c['class'] if c['class'] else ''} {seam['real']['worst']:.3f} ({seam['real']['at_grid']:.3f})"),
        ("peak memory", f"{c['peak_rss_mib']:.0f} MiB RSS "
                        f"{'while sampling the canvas' if c['peak_is_canvas_only'] else 'of the whole process'}"
                        f" ({c['rss_before_mib']:.0f} MiB before it)"),
        ("time", f"{s['total_seconds'] / 60:.1f} min in all on {s['device']} ({_threads(s['threads'])})"),
    ]
    pictures = [
        ("canvas.png", f"The large canvas, {c['size'][1]}x{c['size'][0]}"
                       f"{' of ' + c['class'] if c['class'] else ''}, sampled from {c['tile'][1]}x{c['tile'][0]} tiles"),
        ("samples_vs_real.png", "Samples of the training size (left) beside real crops (right)"),
        ("loss.png", "Training loss"),
    ]
    md = [f"# {title}", ""] + [f"- **{k}**: {v}" for k, v in facts] + [""]
    for name, caption in pictures:
        if (out_dir / name).is_file():
            md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    label = f" --class {s['classes'].index(c['class'])}" if c["class"] else ""
    md += [f"Sample more with `patchdiff sample --run {run_dir} --num 64{label} --out {out_dir / 'more'}`, or another "
           f"large image with `patchdiff sample --run {run_dir} --size 2048x1024{label} --out {out_dir / 'large'}`.",
           ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(md))

    def inline(text: str) -> str:  # the markdown facts' `code` and **bold** as HTML
        parts, out = html.escape(text).split("`"), []
        for i, part in enumerate(parts):
            out.append(f"<code>{part}</code>" if i % 2 else part)
        bold = "".join(out).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(bold))

    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{inline(v)}</td></tr>" for k, v in facts)
    figures = "\n".join(
        f'<figure><img src="{_embed(out_dir / name)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in pictures if (out_dir / name).is_file()
    )
    (out_dir / "report.html").write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ text-align: left; vertical-align: top; padding: .35em .8em; border-bottom: 1px solid #ddd; }}
img {{ max-width: 100%; image-rendering: pixelated; }}
figure {{ margin: 2em 0; }} figcaption {{ color: #555; margin-top: .4em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table>
{rows}
</table>
{figures}
</body></html>
""")
    return report

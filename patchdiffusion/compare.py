"""`patchdiff compare`: several methods on one data set, with one training budget and one set of metrics.

    run_comparison(CompareSettings(methods=[...], data="builtin:textures", resolution=32, cpu_minutes=10),
                   "runs/compare")

Each entry of `methods` is a registered method name (trained here, on the network its class returns from
`Method.comparison_overrides`: networks of about one size, with the same batch, learning rate, EMA and
budget for all) or an existing run directory (evaluated as it is). Every entry runs in its own process
with one torch thread (`jobs` of them at once), in stages that each leave their result on disk, so the
same call after an interruption goes on where it stopped:

  1. training in `curve_points` segments of equal CPU time (`train.max_cpu_minutes`, which counts CPU
     time inside training steps over the whole run); after each segment the EMA weights draw
     `curve_images` samples whose SWD against held-out real images is one point of the
     quality-vs-CPU-time curve. A killed segment resumes from the run's last checkpoint (`--resume`);
  2. `images` samples of the final weights: SWD (and FID, KID, precision/recall with an Inception file)
     against as many held-out images, sampling CPU time per image, a grid of samples;
  3. peak sampling memory, each in a fresh process: `memory_batch` images at the training size, one
     canvas at `large_size` made of tiles of the training size (`sample.generate_canvases`, the
     method's default tiling), and the canvas's seam score at the tiles' period on the grid's own lines
     and at its worst offset (`eval.seam.seam_profile`), beside the same figures of real images;
  4. parameters and FLOPs (multiply-adds, DiT's convention) per image: one network evaluation, a
     training example (3 × the loss's forward: backward ≈ 2 × forward), a whole sampling run.
The results are OUT/results.json (one record per entry, every figure as {"value", "unit"}, with the
machine and the command), OUT/report.md (linking the images beside it), OUT/report.html (self-contained,
images inlined), and the
seed papers' headline claims judged from these figures by each method class (`comparison_claims`).

A record (results.json "entries" -> label -> record), what `Method.comparison_claims` reads:
    method, label, trained_here (bool), run_dir, overrides
    network:  parameters, forward_flops, train_flops, sampling_flops     (figures)
    training: steps, images_seen, cpu_seconds, wall_seconds, cpu_seconds_per_image   (figures)
    curve:    [{point, step, images_seen, cpu_seconds, swd}]             (SWD ×10³ of curve_images samples)
    quality:  swd (figure; `images` samples), swd_curve_last_change (figure), and fid, kid, precision,
              recall when an Inception file was given
    sampler:  {name, steps, guidance}
    sampling: train_size {size, batch, cpu_seconds_per_image, wall_seconds_per_image, peak_memory},
              large_size {size, cpu_seconds, wall_seconds, peak_memory}  (figures; memory: bytes above the
              loaded model's resident size)
    seams:    {period, tiling, at_grid, worst, worst_offset, real_at_grid, real_worst}
This module names no method: what is particular to one lives in its class.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import torch

from patchdiffusion.config import RunConfig, apply_overrides, load_config, parse_size
from patchdiffusion.errors import ConfigError, UserError
from patchdiffusion.process_memory import peak_rss_bytes, reset_peak_rss, status_kib

STUDY_FILE = "study.json"  # the settings a comparison folder was made with (a resume must repeat them)
RESULTS_FILE = "results.json"
EVAL_SEED0 = 10_000  # sample seeds of every evaluation: the same for every entry and every checkpoint
MEMORY_SEED0 = 20_000
LARGE_SEED = 30_000
REAL_LARGE_IMAGES = 8  # real images at the large size for the seam figures of real data
TRAIN_SHARE = 0.8  # share of an entry's progress given to training (the rest: its evaluation stages)
EVAL_STAGES = ("final", "inception", "memory", "large", "seams")

# Training settings shared by every entry trained here (the budget and the data come on top); the methods'
# CPU presets use the same: a batch of 16, a high learning rate with a short warm-up and an EMA whose
# half-life ramps up with the images seen, so that minutes of CPU already give a usable model.
COMMON_TRAIN = [
    "train.batch_size=16", "train.lr=2e-3", "train.warmup_steps=100", "train.ema_halflife_kimg=2",
    "train.ema_rampup=0.2", "train.steps=1000000000", "train.log_every=10", "train.checkpoint_every=200",
    "train.keep_checkpoints=2", "train.sample_images=0", "train.device=cpu", "data.num_workers=0",
]

__all__ = ["CompareSettings", "run_comparison", "network_cost", "held_out_source", "COMMON_TRAIN"]


def figure(value, unit: str, **extra) -> dict:
    """A figure of results.json: its value and unit (and whatever else qualifies it)."""
    return {"value": value, "unit": unit, **extra}


# ------------------------------------------------------------------------------------------------
# settings and entries


@dataclass
class CompareSettings:
    methods: list[str]                   # method names and/or run directories
    data: str = "builtin:textures"       # training data of the entries trained here
    resolution: tuple[int, int] | int | str = 32  # training size (h, w); "N" or "WxH" on the command line
    cpu_minutes: float = 10.0            # training budget per entry: CPU time inside training steps
    large_size: tuple[int, int] | int | str | None = None  # canvas for memory/time/seams; None = 4× the sides
    held_out: str | None = None          # real images to compare with; None = derived from `data` (see held_out_source)
    inception: str | None = None         # Inception weights file: adds FID, KID, precision/recall
    images: int = 256                    # samples (and held-out images) of the final evaluation
    curve_images: int = 64               # samples per point of the quality-vs-CPU-time curve
    curve_points: int = 4                # training segments, one curve point after each
    memory_batch: int = 16               # images sampled at once for the memory figure at the training size
    precision: str = "auto"              # training precision: auto = bf16 where the CPU has fast bf16, else fp32
    overrides: list[str] = field(default_factory=list)  # key=value for every entry trained here, METHOD:key=value for one

    def __post_init__(self) -> None:
        self.resolution = parse_size(self.resolution)
        h, w = self.resolution
        self.large_size = (4 * h, 4 * w) if self.large_size is None else parse_size(self.large_size)
        if self.cpu_minutes <= 0 or not math.isfinite(self.cpu_minutes):
            raise ConfigError(f"the CPU budget must be a positive number of minutes, got {self.cpu_minutes}")
        for name in ("images", "curve_images", "curve_points", "memory_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.curve_images > self.images:
            raise ConfigError(f"curve images ({self.curve_images}) cannot exceed the final images ({self.images})")
        from patchdiffusion.registry import method_names

        for item in self.overrides:
            key = item.split("=", 1)[0]
            if ":" in key and key.split(":", 1)[0] not in method_names():
                raise ConfigError(f"override '{item}': '{key.split(':', 1)[0]}' is not a method "
                                  f"({', '.join(method_names())})")
        if self.large_size[0] < h or self.large_size[1] < w:
            raise ConfigError(f"the large size {self.large_size[1]}x{self.large_size[0]} is smaller than the "
                              f"training size {w}x{h}")

    def identity(self) -> dict:
        """What a comparison folder's results depend on (the Inception file only adds metrics)."""
        values = dataclasses.asdict(self)
        values.pop("inception")
        return json.loads(json.dumps(values))


@dataclass
class Entry:
    label: str                           # folder name under OUT and the name in the report
    method: str
    run: str | None = None               # an existing run directory (None: trained by the comparison)


def resolve_entries(items: list[str]) -> list[Entry]:
    """Method names and run directories -> entries with unique labels; one line for anything else."""
    from patchdiffusion.registry import method_names

    if not items:
        raise ConfigError("--methods needs at least one method name or run directory")
    entries, labels = [], set()
    for item in items:
        item = item.strip()
        if item in method_names():
            label, method, run = item, item, None
        elif item and (Path(item) / "config.yaml").is_file():
            method, run = load_config(Path(item) / "config.yaml").method, str(Path(item).resolve())
            label = Path(item).resolve().name
        else:
            raise ConfigError(f"--methods: '{item}' is neither a method ({', '.join(method_names())}) nor a run "
                              "directory (a folder with config.yaml)")
        base, n = label, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels.add(label)
        entries.append(Entry(label, method, run))
    return entries


def held_out_source(data: str, given: str | None = None) -> tuple[str, str]:
    """(source of the real images evaluations compare with, what they are).

    A built-in set is drawn again with the next seed: crops never seen in training, from the same pictures
    (as benchmarks/patch_quality.py does). Other sources have no such twin: give `--held-out`, or the
    training images themselves are used, and the report says so."""
    if given:
        return given, f"held-out images given: {given}"
    if data.startswith("builtin:"):
        name, _, query = data.partition("?")
        options = parse_qs(query)
        options["seed"] = [str(int(options.get("seed", ["0"])[-1]) + 1)]
        options.pop("count", None)
        spec = f"{name}?{urlencode({k: v[-1] for k, v in options.items()})}"
        return spec, f"held out: {spec} (the same built-in set drawn with another seed: crops never trained on)"
    return data, "NOT held out: the training images themselves (no --held-out given)"


def load_images(spec: str, count: int, size: tuple[int, int]) -> torch.Tensor:
    """`count` images of a data source (evenly spread over it) at size (h, w), in [-1, 1]."""
    from patchdiffusion.data import ImageDataset, open_source

    h, w = size
    dataset = ImageDataset(open_source(spec, resolution=(w, h)), resolution=(w, h))
    if len(dataset) == 0:
        raise ConfigError(f"data source '{spec}' holds no images")
    return torch.stack([dataset[i * len(dataset) // count % len(dataset)][0] for i in range(count)])


def entry_config(settings: CompareSettings, method: str) -> RunConfig:
    """The RunConfig of a method trained by the comparison: the class's comparison network, the common
    training settings, the data and the budget, then the user's overrides."""
    from patchdiffusion.registry import method_class

    h, w = settings.resolution
    precision = settings.precision
    if precision == "auto":
        from patchdiffusion.runtime import cpu_has_fast_bf16

        precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    config = apply_overrides(RunConfig(), [f"method={method}"])
    return apply_overrides(config, [
        *method_class(method).comparison_overrides((h, w)), *COMMON_TRAIN,
        f"data.source={settings.data}", f"data.resolution={w}x{h}", f"train.precision={precision}",
        f"train.max_cpu_minutes={settings.cpu_minutes}", *overrides_for(method, settings.overrides),
    ])


def overrides_for(method: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to `method`: unprefixed ones, and METHOD:key=value without the prefix."""
    chosen = []
    for item in overrides:
        key, _, value = item.partition("=")
        if ":" in key:
            owner, key = key.split(":", 1)
            if owner != method:
                continue
        chosen.append(f"{key}={value}")
    return chosen


# ------------------------------------------------------------------------------------------------
# small file helpers


def _write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename), so a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return default


# ------------------------------------------------------------------------------------------------
# costs: parameters and FLOPs


def _count_macs(fn) -> float:
    """Multiply-adds of `fn()` as torch's FLOP counter sees them (it counts a multiply-add as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2


def network_cost(method, net, config: RunConfig, num_images: int, plan_draws: int = 32) -> dict:
    """Parameters and multiply-adds per image of a method's network (figures for results.json).

    forward: one network evaluation of a whole training-size image (every patch or window of it);
    train: 3 × the loss's forward per training example, averaged over the method's step plans (backward
    costs about 2 × forward; torch's counter overstates grouped convolutions' backward, so it is not
    counted directly); sampling: one image's whole sampling run (all steps, guidance included)."""
    from patchdiffusion.methods.base import TrainBatch
    from patchdiffusion.rng import SampleRNG
    from patchdiffusion.sample import sample_images

    h, w = method.resolution
    was_training = net.training
    net.eval()
    rng = SampleRNG([1, 2])
    cond = method.sampling_condition(net, rng, None, None)
    denoiser = method.denoiser(net, None)
    x = torch.randn(2, *method.canvas_shape(h, w))
    forward = _count_macs(lambda: denoiser(x, torch.ones(2), **cond)) / 2
    plans: dict = {}
    for seed in range(plan_draws):
        plan = method.plan_step(seed, 0.0)
        plans[plan] = plans.get(plan, 0) + 1
    train_macs = 0.0
    for plan, draws in plans.items():
        count = 2 * plan.multiplier
        images = torch.rand(count, 3, h, w) * 2 - 1
        batch = TrainBatch(images, None, torch.arange(count) % max(num_images, 1), plan)
        macs = _count_macs(lambda: method.loss(net, batch, SampleRNG(list(range(count)))))
        train_macs += draws / plan_draws * 3 * macs
    train = train_macs / (2 * method.average_multiplier)
    sampling = _count_macs(lambda: sample_images(method, net, config, 1, seed0=EVAL_SEED0))
    net.train(was_training)
    unit = "multiply-adds per image"
    return {
        "parameters": figure(sum(p.numel() for p in net.parameters()), "parameters"),
        "forward_flops": figure(forward, unit, what="one network evaluation at the training size"),
        "train_flops": figure(train, unit, what="one training example: 3 × the loss's forward"),
        "sampling_flops": figure(sampling, unit, what="one image's whole sampling run"),
    }


# ------------------------------------------------------------------------------------------------
# fresh-process memory probes


def probe(spec: dict) -> dict:
    """Sample in this (fresh) process and measure: peak resident memory above the loaded model's, CPU and
    wall seconds. spec: run_dir, kind (images | canvas), num, size (h, w), seed, out (canvas folder)."""
    from patchdiffusion.run import load_run
    from patchdiffusion.sample import generate_canvases, sample_images

    torch.set_num_threads(1)
    loaded = load_run(spec["run_dir"], "cpu", use_ema=True)
    h, w = spec["size"]
    if spec["kind"] == "canvas":  # measured: a canvas left by a killed probe would be kept, not made
        shutil.rmtree(spec["out"], ignore_errors=True)
    gc.collect()
    after_load = status_kib("VmRSS") * 1024
    reset = reset_peak_rss()
    cpu, wall = time.process_time(), time.perf_counter()
    if spec["kind"] == "images":
        sample_images(loaded.method, loaded.net, loaded.config, spec["num"], seed0=spec["seed"], height=h, width=w)
    else:
        generate_canvases(spec["run_dir"], spec["out"], num=spec["num"], seed=spec["seed"], height=h, width=w,
                          storage="memory", checkpoint_every=1 << 30, progress=False, log=lambda message: None,
                          loaded=loaded)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = peak_rss_bytes()
    return {"peak_working_bytes": peak - after_load, "peak_rss_bytes": peak, "after_load_bytes": after_load,
            "peak_reset": reset, "cpu_seconds": cpu, "wall_seconds": wall}


def run_probe(spec: dict) -> dict:
    """`probe(spec)` in a new interpreter, so nothing measured before can raise its peak."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "patchdiffusion.compare", "--probe", json.dumps(spec)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"memory probe {spec['kind']} failed: {lines[-1] if lines else result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# one entry, in its own process (`python -m patchdiffusion.compare --worker OUT LABEL`)


class EntryWorker:
    """Trains (when the comparison owns the entry) and evaluates one entry; every stage's result is kept
    in OUT/LABEL/state.json so that a new worker skips what is done."""

    def __init__(self, out_dir: Path, label: str):
        study = _read_json(out_dir / STUDY_FILE)
        self.settings = CompareSettings(**study["settings"])
        self.entry = Entry(**next(e for e in study["entries"] if e["label"] == label))
        self.out_dir, self.work = out_dir, out_dir / label
        self.work.mkdir(parents=True, exist_ok=True)
        self.state = _read_json(self.work / "state.json", {}) or {}
        self.run_dir = Path(self.entry.run) if self.entry.run else self.work / "run"
        self.held_out_spec = study["held_out"]["source"]
        self._held_out: torch.Tensor | None = None

    def log(self, message: str) -> None:
        print(f"[{self.entry.label}] {message}", flush=True)

    def save_state(self, stage: str | None = None) -> None:
        if stage is not None:
            self.state.setdefault("status", {})["stage"] = stage
        _write_json(self.work / "state.json", self.state)

    def held_out(self, count: int) -> torch.Tensor:
        if self._held_out is None:
            self._held_out = load_images(self.held_out_spec, self.settings.images, self.settings.resolution)
        return self._held_out[:count]

    # -- training ------------------------------------------------------------------------------
    def checkpoint_figures(self, checkpoint) -> dict:
        """Step, images seen and training CPU seconds of a checkpoint (CPU seconds: from its state, else
        from metrics.jsonl; None when neither knows)."""
        from patchdiffusion import run as runs

        state = runs.load_train_state(checkpoint)
        cpu = state.get("cpu_seconds")
        if cpu is None:
            rows = [r for r in runs.read_metrics(self.run_dir) if r.get("step") == state["step"] and "cpu_seconds" in r]
            cpu = rows[-1]["cpu_seconds"] if rows else None
        return {"step": int(state["step"]), "images_seen": int(state["images_seen"]),
                "cpu_seconds": None if cpu is None else float(cpu)}

    def train(self) -> None:
        """Training in `curve_points` segments of equal CPU time, a curve point after each but the last
        (the final evaluation makes that one)."""
        from patchdiffusion import run as runs
        from patchdiffusion.train import train

        settings, budget = self.settings, self.settings.cpu_minutes * 60
        config = entry_config(settings, self.entry.method)
        curve = self.state.setdefault("curve", [])
        points = settings.curve_points
        for point in range(1, points + 1):
            target = budget * point / points
            latest = runs.latest_checkpoint(self.run_dir)
            done = (self.checkpoint_figures(latest)["cpu_seconds"] or 0.0) if latest is not None else 0.0
            if done < target:
                self.save_state(f"training {point}/{points}")
                segment = apply_overrides(config, [f"train.max_cpu_minutes={target / 60}"])
                started = time.perf_counter()
                train(segment, self.run_dir, resume=latest is not None, progress=False, log=self.log)
                self.state["train_wall_seconds"] = self.state.get("train_wall_seconds", 0.0) + time.perf_counter() - started
                self.save_state()
            if point < points and not any(p["point"] == point for p in curve):
                self.save_state(f"curve point {point}/{points}")
                checkpoint = runs.latest_checkpoint(self.run_dir)
                curve.append({"point": point, **self.checkpoint_figures(checkpoint),
                              "swd": self.checkpoint_swd(checkpoint)})
                self.log(f"curve point {point}: step {curve[-1]['step']}, {curve[-1]['cpu_seconds']:.0f} CPU s, "
                         f"SWD {curve[-1]['swd']:.1f}")
                self.save_state()

    def existing_run_curve(self) -> None:
        """A run directory's own checkpoints (up to curve_points of them, the last included) as its curve."""
        from patchdiffusion import run as runs

        curve = self.state.setdefault("curve", [])
        checkpoints = runs.list_checkpoints(self.run_dir)
        if not checkpoints:
            raise ConfigError(f"run '{self.run_dir}' has no checkpoint to evaluate")
        wanted = self.settings.curve_points
        picked = sorted({round(i * (len(checkpoints) - 1) / max(wanted - 1, 1)) for i in range(wanted)})
        for number, index in enumerate(picked[:-1], 1):
            if any(p["point"] == number for p in curve):
                continue
            checkpoint = checkpoints[index]
            curve.append({"point": number, **self.checkpoint_figures(checkpoint), "swd": self.checkpoint_swd(checkpoint)})
            self.save_state()
        self.state["curve_final_point"] = len(picked)

    def checkpoint_swd(self, checkpoint) -> float:
        """SWD (×10³) of `curve_images` EMA samples of one checkpoint against as many held-out images."""
        from patchdiffusion import run as runs
        from patchdiffusion.eval.monitor import SWDMonitor
        from patchdiffusion.methods import build_method
        from patchdiffusion.sample import sample_images

        config = load_config(self.run_dir / "config.yaml")
        method = build_method(config.method, config.model, config.data.resolution)
        method.attach_run(self.run_dir)
        net = method.build_network()
        runs.load_into(net, runs.load_weights(checkpoint, "ema"), str(checkpoint.path))
        count = self.settings.curve_images
        samples = self.sample(method, net.eval(), config, count)
        return SWDMonitor(self.held_out(count), num_images=count, patches_per_image=128)(samples)["swd"]

    @staticmethod
    def sample(method, net, config, count: int, batch: int = 32) -> torch.Tensor:
        from patchdiffusion.sample import sample_images

        return torch.cat([sample_images(method, net, config, min(batch, count - start), seed0=EVAL_SEED0 + start)
                          for start in range(0, count, batch)])

    # -- evaluation stages -------------------------------------------------------------------------
    def final(self) -> None:
        """The final weights: `images` samples (timed), their SWD, the curve's last point, a grid."""
        from patchdiffusion import run as runs
        from patchdiffusion.eval.monitor import SWDMonitor
        from patchdiffusion.images import save_grid, save_png, to_uint8
        from patchdiffusion.run import load_run

        if "final" in self.state:
            return
        self.save_state("final samples")
        loaded = load_run(self.run_dir, "cpu", use_ema=True)
        settings = self.settings
        cpu, wall = time.process_time(), time.perf_counter()
        samples = self.sample(loaded.method, loaded.net, loaded.config, settings.images)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        folder = self.work / "samples"
        folder.mkdir(exist_ok=True)
        for i, image in enumerate(to_uint8(samples)):
            save_png(image, folder / f"{EVAL_SEED0 + i:06d}.png")
        save_grid(samples[:64], self.work / "samples.png", columns=8, upscale=max(1, 64 // samples.shape[-1]))
        swd = SWDMonitor(self.held_out(settings.images), num_images=settings.images, patches_per_image=128)(samples)
        count = settings.curve_images
        curve_swd = SWDMonitor(self.held_out(count), num_images=count, patches_per_image=128)(samples[:count])["swd"]
        checkpoint = loaded.checkpoint
        point = self.state.get("curve_final_point", settings.curve_points)
        self.state.setdefault("curve", []).append({"point": point, **self.checkpoint_figures(checkpoint),
                                                   "swd": curve_swd})
        self.state["final"] = {"swd": swd["swd"], "swd_levels": {k: v for k, v in swd.items() if k != "swd"},
                               "cpu_seconds": cpu, "wall_seconds": wall, "images": settings.images,
                               "checkpoint": checkpoint.name}
        self.log(f"final: SWD {swd['swd']:.1f} from {settings.images} samples, {cpu / settings.images:.2f} CPU s/image")
        self.save_state()

    def inception(self) -> None:
        """FID, KID, precision/recall of the final samples against held-out images (Inception file only)."""
        from patchdiffusion.eval import EvalOptions, evaluate

        path = self.settings_inception()
        if not path or self.state.get("inception", {}).get("path") == path:
            return
        self.save_state("Inception metrics")
        ref = self.held_out_spec
        if ref.startswith("builtin:") and "count=" not in ref:
            ref += ("&" if "?" in ref else "?") + f"count={self.settings.images}"
        report = evaluate(str(self.work / "samples"), ref, EvalOptions(
            metrics=("fid", "kid", "pr"), inception=path, device="cpu", progress=False,
            ref_num=self.settings.images, size=(self.settings.resolution[1], self.settings.resolution[0])))
        metrics = {m.key: {"value": m.value, "label": m.label, "images": m.num_images} for m in report.metrics}
        self.state["inception"] = {"path": path, "metrics": metrics, "skipped": report.skipped}
        self.save_state()

    def settings_inception(self) -> str | None:
        study = _read_json(self.out_dir / STUDY_FILE)
        return study.get("inception")

    def memory(self) -> None:
        """Peak sampling memory of `memory_batch` images and of one image at the training size (a fresh process
        each): the first is what sampling takes, their difference per extra image is the memory that grows
        with the images (activations), without the fixed costs (allocator, kernels' scratch) that dominate
        small models on a CPU."""
        if "memory" in self.state:
            return
        self.save_state("memory at the training size")
        config = load_config(self.run_dir / "config.yaml")
        size, batch = list(config.data.resolution), self.settings.memory_batch
        result = run_probe({"run_dir": str(self.run_dir), "kind": "images", "num": batch, "size": size,
                            "seed": MEMORY_SEED0})
        one = result if batch == 1 else run_probe({"run_dir": str(self.run_dir), "kind": "images", "num": 1,
                                                   "size": size, "seed": MEMORY_SEED0})
        per_image = None if batch == 1 else (result["peak_working_bytes"] - one["peak_working_bytes"]) / (batch - 1)
        self.state["memory"] = {**result, "size": size, "batch": batch, "peak_working_bytes_one": one["peak_working_bytes"],
                                "per_image_bytes": per_image}
        self.save_state()

    def large(self) -> None:
        """One canvas of the large size from tiles (fresh process): memory, time, the image."""
        if "large" in self.state:
            return
        self.save_state("large canvas")
        size = list(self.settings.large_size)
        folder = self.work / "large"
        result = run_probe({"run_dir": str(self.run_dir), "kind": "canvas", "num": 1, "size": size,
                            "seed": LARGE_SEED, "out": str(folder)})
        self.state["large"] = {**result, "size": size, "image": str((folder / f"{LARGE_SEED:06d}.png").relative_to(self.out_dir))}
        self.save_state()

    def seams(self) -> None:
        """Seam profile of the large canvas at the period of the tiles it was made of."""
        import numpy as np
        from PIL import Image

        from patchdiffusion.diffusion.tiled import resolve_tiling
        from patchdiffusion.eval.seam import seam_profile
        from patchdiffusion.run import load_run

        if "seams" in self.state:
            return
        self.save_state("seams")
        loaded = load_run(self.run_dir, "cpu")
        method = loaded.method
        tiling = method.default_tiling()
        tile, overlap = resolve_tiling(tiling, method.native_tile)
        factor = method.resolution[0] // method.native_tile[0]  # pixels per canvas unit (a latent method's VAE)
        period = [(tile[0] - overlap[0]) * factor, (tile[1] - overlap[1]) * factor]
        image = np.array(Image.open(self.out_dir / self.state["large"]["image"]).convert("RGB"))
        profile = seam_profile(torch.from_numpy(image).permute(2, 0, 1)[None], tuple(period))
        self.state["seams"] = {**profile.as_dict(), "tiling": {"tile": [t * factor for t in tile],
                                                             "overlap": [o * factor for o in overlap],
                                                             "window": tiling.window, "grid": tiling.grid}}
        self.save_state()

    def cost(self) -> None:
        if "cost" in self.state:
            return
        from patchdiffusion.run import load_run

        self.save_state("FLOPs")
        loaded = load_run(self.run_dir, "cpu")
        num_images = getattr(loaded.config.model.net, "num_codes", 0) or 1
        self.state["cost"] = network_cost(loaded.method, loaded.net, loaded.config, num_images)
        self.save_state()

    def run(self) -> None:
        torch.set_num_threads(1)
        if self.entry.run is None:
            self.train()
        else:
            self.existing_run_curve()
        self.final()
        self.inception()
        self.cost()
        self.memory()
        self.large()
        self.seams()
        _write_json(self.work / "record.json", self.record())
        self.save_state("done")
        self.log("done")

    # -- the record ---------------------------------------------------------------------------------
    def record(self) -> dict:
        from patchdiffusion import run as runs

        state, settings = self.state, self.settings
        config = load_config(self.run_dir / "config.yaml")
        final_checkpoint = runs.latest_checkpoint(self.run_dir)
        trained = self.checkpoint_figures(final_checkpoint)
        curve = sorted(state["curve"], key=lambda p: p["point"])
        memory, large, final = state["memory"], state["large"], state["final"]
        wall = state.get("train_wall_seconds") if self.entry.run is None else None
        cpu = trained["cpu_seconds"]
        record = {
            "label": self.entry.label, "method": self.entry.method, "trained_here": self.entry.run is None,
            "run_dir": str(self.run_dir), "inception": self.settings_inception(),
            "overrides": entry_overrides(self.entry.method, settings) if self.entry.run is None else None,
            "data": config.data.source, "resolution": list(config.data.resolution),
            "network": state["cost"],
            "training": {
                "steps": figure(trained["step"], "optimizer steps", batch=config.train.batch_size),
                "images_seen": figure(trained["images_seen"], "training images"),
                "cpu_seconds": figure(cpu, "CPU seconds in training steps, one thread"),
                "wall_seconds": figure(wall, "seconds, training segments of this comparison (shared machine)"),
                "cpu_seconds_per_image": figure(None if cpu is None else cpu / max(trained["images_seen"], 1),
                                                "CPU seconds per training image"),
            },
            "curve": curve,
            "quality": {
                "swd": figure(final["swd"], "SWD x1e3 vs held-out images", images=final["images"]),
                "swd_levels": final["swd_levels"],
                "swd_curve_last_change": figure(
                    abs(curve[-1]["swd"] - curve[-2]["swd"]) if len(curve) > 1 else None,
                    "SWD x1e3: change between the last two curve points (a noise scale)"),
            },
            "sampler": {"name": config.sample.sampler or "(method default)", "steps": config.sample.num_steps or None,
                        "guidance": config.sample.guidance},
            "sampling": {
                "train_size": {
                    "size": list(config.data.resolution), "batch": memory["batch"],
                    "cpu_seconds_per_image": figure(final["cpu_seconds"] / final["images"], "CPU seconds per image"),
                    "wall_seconds_per_image": figure(final["wall_seconds"] / final["images"], "seconds per image"),
                    "peak_memory": figure(memory["peak_working_bytes"], "bytes above the loaded model",
                                          batch=memory["batch"], peak_reset=memory["peak_reset"]),
                    "peak_memory_one_image": figure(memory["peak_working_bytes_one"], "bytes above the loaded model"),
                    "memory_per_image": figure(memory["per_image_bytes"], "bytes per extra image (peak at the batch "
                                               "minus peak at one image, over batch - 1)"),
                },
                "large_size": {
                    "size": large["size"],
                    "cpu_seconds": figure(large["cpu_seconds"], "CPU seconds per canvas"),
                    "wall_seconds": figure(large["wall_seconds"], "seconds per canvas"),
                    "peak_memory": figure(large["peak_working_bytes"], "bytes above the loaded model",
                                          peak_reset=large["peak_reset"]),
                },
            },
            "seams": {k: state["seams"][k] for k in ("period", "tiling", "worst_offset")} | {
                "at_grid": figure(state["seams"]["at_grid"], "seam score (1 = seamless)"),
                "worst": figure(state["seams"]["worst"], "seam score (1 = seamless)"),
                "mean": figure(state["seams"]["mean"], "seam score (1 = seamless)"),
            },
            "images": {"samples": f"{self.entry.label}/samples.png", "large": large["image"]},
        }
        inception = state.get("inception")
        if inception:
            units = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall"}
            for key, metric in inception["metrics"].items():
                record["quality"][key] = figure(metric["value"], units.get(key, key), images=metric["images"],
                                                label=metric["label"])
        return record


def entry_overrides(method: str, settings: CompareSettings) -> list[str]:
    from patchdiffusion.registry import method_class

    h, w = settings.resolution
    return [*method_class(method).comparison_overrides((h, w)), *overrides_for(method, settings.overrides)]


# ------------------------------------------------------------------------------------------------
# the whole comparison


def _machine() -> dict:
    import platform

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "threads_per_entry": 1}
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def prepare_study(settings: CompareSettings, out_dir: Path, command: str) -> dict:
    """Check everything that can be checked before work starts (one line each), then write or re-read
    OUT/study.json; a folder made with other settings is refused, naming the first difference."""
    entries = resolve_entries(settings.methods)
    if settings.inception and not Path(settings.inception).is_file():
        raise ConfigError(f"--inception: '{settings.inception}' is not a file")
    held_spec, held_note = held_out_source(settings.data, settings.held_out)
    if any(e.run is None for e in entries):
        load_images(settings.data, 1, settings.resolution)  # a missing or unreadable source: one line now
    load_images(held_spec, 1, settings.resolution)
    from patchdiffusion.methods import build_method

    for entry in entries:
        if entry.run is None:
            config = entry_config(settings, entry.method)  # an unknown override or a size it cannot take: one line now
        else:
            config = load_config(Path(entry.run) / "config.yaml")
            if tuple(config.data.resolution) != tuple(settings.resolution):
                raise ConfigError(f"run '{entry.run}' was trained at {config.data.resolution[1]}x"
                                  f"{config.data.resolution[0]}, the comparison is at {settings.resolution[1]}x"
                                  f"{settings.resolution[0]}")
        built = build_method(config.method, config.model, config.data.resolution)
        built.check_tiling(*settings.large_size, None)  # a large size its tiles cannot make: one line now
    study = {"settings": settings.identity(), "entries": [dataclasses.asdict(e) for e in entries],
             "held_out": {"source": held_spec, "note": held_note}, "inception": settings.inception,
             "command": command}
    path = out_dir / STUDY_FILE
    previous = _read_json(path)
    if previous is not None:
        old, new = previous["settings"], study["settings"]
        for key in new:
            if old.get(key) != new[key]:
                raise ConfigError(f"'{out_dir}' holds a comparison made with {key} = {old.get(key)!r}, not "
                                  f"{new[key]!r}; repeat its arguments to resume it, or choose another --out")
        study["command"] = previous.get("command", command)
        study["resumed_with"] = command
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(path, study)
    return study


def _entry_done(out_dir: Path, study: dict, label: str) -> bool:
    record = _read_json(out_dir / label / "record.json")
    return record is not None and record.get("inception") == study.get("inception")


def _entry_progress(out_dir: Path, label: str, settings: CompareSettings, trained_here: bool) -> tuple[float, str]:
    """(fraction done, stage) of an entry, read from what its worker left on disk."""
    if (out_dir / label / "record.json").is_file():
        return 1.0, "done"
    state = _read_json(out_dir / label / "state.json", {}) or {}
    stage = state.get("status", {}).get("stage", "waiting")
    train = 1.0
    if trained_here:
        train = _last_cpu_seconds(out_dir / label / "run" / "metrics.jsonl") / (settings.cpu_minutes * 60)
    evaluated = sum(stage_name in state for stage_name in EVAL_STAGES) / len(EVAL_STAGES)
    return TRAIN_SHARE * min(train, 1.0) + (1 - TRAIN_SHARE) * evaluated, stage


def _last_cpu_seconds(path: Path) -> float:
    """The largest cpu_seconds among the last rows of a metrics.jsonl (0 when there are none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0.0
    best = 0.0
    for line in tail:
        try:
            best = max(best, float(json.loads(line).get("cpu_seconds", 0.0)))
        except (ValueError, AttributeError):
            continue
    return best


def run_comparison(settings: CompareSettings, out_dir: str | Path, jobs: int = 1, progress: bool = True,
                   log=print, command: str = "") -> dict:
    """Train and evaluate every entry (resuming whatever an earlier call left), then write results.json,
    report.md and report.html; returns the results. Entries run `jobs` at a time, one process each."""
    out_dir = Path(out_dir)
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    study = prepare_study(settings, out_dir, command or "patchdiffusion.compare.run_comparison(...)")
    entries = [Entry(**e) for e in study["entries"]]
    pending = [e for e in entries if not _entry_done(out_dir, study, e.label)]
    done = len(entries) - len(pending)
    log(f"comparison of {len(entries)} entries in {out_dir} ({done} already done); "
        f"{settings.cpu_minutes:g} CPU minutes of training each, {jobs} at a time; logs in {out_dir}/LABEL/log.txt")
    failures = _run_workers(out_dir, entries, pending, settings, jobs, progress, log)
    if failures:
        raise UserError("; ".join(failures) + " (run the same command again to resume)")
    results = write_results(out_dir, study)
    log(f"wrote {out_dir / RESULTS_FILE}, {out_dir / 'report.md'} and {out_dir / 'report.html'}")
    return results


def _run_workers(out_dir: Path, entries: list[Entry], pending: list[Entry], settings: CompareSettings, jobs: int,
                 progress: bool, log) -> list[str]:
    """Run the pending entries' workers, `jobs` at a time, with one progress bar for the whole study."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=100 * len(entries), desc="compare", unit="%", dynamic_ncols=True, file=sys.stderr,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    waiting, running, failures = list(pending), {}, []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                entry = waiting.pop(0)
                (out_dir / entry.label).mkdir(parents=True, exist_ok=True)
                logfile = open(out_dir / entry.label / "log.txt", "a")
                process = subprocess.Popen(
                    [sys.executable, "-m", "patchdiffusion.compare", "--worker", str(out_dir), entry.label],
                    stdout=logfile, stderr=subprocess.STDOUT, env=env)
                running[entry.label] = (process, logfile)
            time.sleep(1.0)
            for label, (process, logfile) in list(running.items()):
                if process.poll() is None:
                    continue
                logfile.close()
                del running[label]
                if process.returncode != 0:
                    failures.append(f"entry '{label}' failed: {_last_line(out_dir / label / 'log.txt')}")
                    log(f"entry '{label}' failed (exit {process.returncode}); see {out_dir / label / 'log.txt'}")
            if bar is not None:
                _update_bar(bar, out_dir, entries, settings, running)
    except KeyboardInterrupt:
        for process, _ in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # a training worker writes a checkpoint before it stops
        for process, logfile in running.values():
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
            logfile.close()
        if bar is not None:
            bar.close()
        raise UserError(f"interrupted; run the same command again to resume (finished stages are kept in {out_dir})")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if bar is not None:
        _update_bar(bar, out_dir, entries, settings, running)
        bar.close()
    return failures


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _update_bar(bar, out_dir: Path, entries: list[Entry], settings: CompareSettings, running: dict) -> None:
    total, states = 0.0, []
    for entry in entries:
        fraction, stage = _entry_progress(out_dir, entry.label, settings, entry.run is None)
        total += 100 * fraction
        if entry.label in running:
            states.append(f"{entry.label}: {stage}")
    bar.n = round(total, 1)
    bar.set_postfix_str(" | ".join(states))
    bar.refresh()


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------------------------------------
# results.json and the reports


def reference_figures(out_dir: Path, study: dict, periods: list[tuple[int, int]]) -> dict:
    """Real images' figures: SWD of training vs held-out images (the floor the metric can reach), and the
    seam profile of held-out images at the large size at each tile period (cached in OUT/reference.json).

    An entry's seam figures come from one canvas, so the real figures are per image too: the median over
    REAL_LARGE_IMAGES images of each image's score on the grid and at its worst offset (the worst offset of
    a single image is the largest of many noisy scores, higher than that of a pooled set)."""
    from patchdiffusion.eval.monitor import SWDMonitor
    from patchdiffusion.eval.seam import seam_profile

    settings = CompareSettings(**study["settings"])
    path = out_dir / "reference.json"
    cached = _read_json(path, {}) or {}
    if "swd_train_vs_held_out" not in cached:
        count = settings.images
        train_images = load_images(settings.data, count, settings.resolution)
        held = load_images(study["held_out"]["source"], count, settings.resolution)
        cached["swd_train_vs_held_out"] = SWDMonitor(held, num_images=count, patches_per_image=128)(train_images)["swd"]
        cached["swd_images"] = count
        from patchdiffusion.images import save_grid

        save_grid(held[:64], out_dir / "real.png", columns=8, upscale=max(1, 64 // held.shape[-1]))
    seams = cached.setdefault("seams", {})
    real_large = None
    for period in periods:
        key = f"{period[0]}x{period[1]}"
        if "images" in seams.get(key, {}):  # (figures of an older version, pooled over the images, are redone)
            continue
        if real_large is None:
            real_large = load_images(study["held_out"]["source"], REAL_LARGE_IMAGES, settings.large_size)
            real_large = ((real_large + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        profiles = [seam_profile(image[None], period) for image in real_large]
        seams[key] = {"period": list(period), "images": len(profiles),
                      "at_grid": statistics.median(p.at_grid for p in profiles),
                      "worst": statistics.median(p.worst for p in profiles),
                      "mean": statistics.median(p.mean for p in profiles)}
    _write_json(path, cached)
    return cached


def write_results(out_dir: Path, study: dict) -> dict:
    """OUT/results.json, the plots, OUT/report.md and OUT/report.html from the entries' records."""
    from patchdiffusion.registry import method_class

    settings = CompareSettings(**study["settings"])
    records = {e["label"]: _read_json(out_dir / e["label"] / "record.json") for e in study["entries"]}
    periods = sorted({tuple(r["seams"]["period"]) for r in records.values()})
    reference = reference_figures(out_dir, study, periods)
    for record in records.values():
        real = reference["seams"][f"{record['seams']['period'][0]}x{record['seams']['period'][1]}"]
        unit = f"seam score of real images at this period (median over {real['images']} images, one each)"
        record["seams"]["real_at_grid"] = figure(real["at_grid"], unit)
        record["seams"]["real_worst"] = figure(real["worst"], unit)
    claims = []
    for method in dict.fromkeys(r["method"] for r in records.values()):
        claims += [dataclasses.asdict(c) for c in method_class(method).comparison_claims(records)]
    results = {
        "command": study["command"], "resumed_with": study.get("resumed_with"), "machine": _machine(),
        "settings": study["settings"] | {"common_train": COMMON_TRAIN}, "held_out": study["held_out"],
        "inception": study.get("inception"),
        "reference": {
            "swd_train_vs_held_out": figure(reference["swd_train_vs_held_out"], "SWD x1e3 of real images: "
                                            "training vs held-out (the floor)", images=reference["swd_images"]),
            "seams": reference["seams"],
        },
        "size_match": size_match(records),
        "entries": records, "claims": claims,
    }
    _write_json(out_dir / RESULTS_FILE, results)
    plots = make_plots(out_dir, results)
    (out_dir / "report.md").write_text(report_markdown(out_dir, results, plots))
    (out_dir / "report.html").write_text(report_html(out_dir, results, plots))
    return results


def size_match(records: dict) -> dict:
    """How close the entries' parameters and FLOPs are: max/min over the entries (those a method declares
    unmatched, and run directories the comparison did not build, left out), and the declared exceptions."""
    from patchdiffusion.registry import method_class

    from patchdiffusion.methods.base import COMPARISON_TOLERANCE

    out = {"tolerance": COMPARISON_TOLERANCE, "unmatched": {}}
    for key, name in (("parameters", "params"), ("forward_flops", "flops")):
        values = {}
        for label, record in records.items():
            unmatched = method_class(record["method"]).comparison_unmatched
            if name in unmatched:
                out["unmatched"][f"{label}: {name}"] = unmatched[name]
            elif record["trained_here"]:
                values[label] = record["network"][key]["value"]
        ratio = max(values.values()) / min(values.values()) if values else None
        out[key] = {"max_over_min": ratio, "within_tolerance": ratio is None or ratio <= COMPARISON_TOLERANCE,
                    "entries": sorted(values)}
    return out


def _value(fig):
    return None if fig is None else fig.get("value")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The main table: one row per entry."""
    header = ["entry", "params (M)", "MFLOPs/eval", "train MFLOPs/img", "steps", "images seen", "train CPU min",
              f"SWD@{results['settings']['images']}", "sampler", "sample CPU s/img",
              f"peak mem MB ({results['settings']['memory_batch']} imgs)", "MB per extra img", "large canvas CPU s",
              "peak mem MB (large)", "seam on grid", "seam worst"]
    if results.get("inception"):
        header[8:8] = ["FID", "KID", "precision", "recall"]
    rows = []
    for label, r in results["entries"].items():
        net, tr, q, smp, seams = r["network"], r["training"], r["quality"], r["sampling"], r["seams"]
        row = [label, _fmt(net["parameters"]["value"] / 1e6), _fmt(net["forward_flops"]["value"] / 1e6),
               _fmt(net["train_flops"]["value"] / 1e6), _fmt(tr["steps"]["value"]), _fmt(tr["images_seen"]["value"]),
               _fmt(None if tr["cpu_seconds"]["value"] is None else tr["cpu_seconds"]["value"] / 60),
               _fmt(q["swd"]["value"]),
               f"{r['sampler']['name']} {r['sampler']['steps'] or ''}".strip()
               + (f" ×{r['sampler']['guidance']:g}" if r["sampler"]["guidance"] != 1 else ""),
               _fmt(smp["train_size"]["cpu_seconds_per_image"]["value"]),
               _fmt(smp["train_size"]["peak_memory"]["value"] / 2**20),
               _fmt(None if smp["train_size"]["memory_per_image"]["value"] is None
                    else smp["train_size"]["memory_per_image"]["value"] / 2**20),
               _fmt(smp["large_size"]["cpu_seconds"]["value"]),
               _fmt(smp["large_size"]["peak_memory"]["value"] / 2**20),
               _fmt(seams["at_grid"]["value"]), _fmt(seams["worst"]["value"])]
        if results.get("inception"):
            row[8:8] = [_fmt(_value(q.get(k))) for k in ("fid", "kid", "precision", "recall")]
        rows.append(row)
    return header, rows


def make_plots(out_dir: Path, results: dict) -> dict[str, Path]:
    """curves.png (SWD against training CPU minutes) and costs.png (sampling time and memory bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = results["entries"]
    plots = {}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, r in entries.items():
        points = [p for p in r["curve"] if p["cpu_seconds"] is not None]
        ax.plot([p["cpu_seconds"] / 60 for p in points], [p["swd"] for p in points], "o-", label=label)
    floor = results["reference"]["swd_train_vs_held_out"]["value"]
    ax.axhline(floor, color="grey", linestyle="--", label=f"real vs real ({floor:.0f})")
    ax.set_xlabel("training CPU minutes (one thread)")
    ax.set_ylabel(f"SWD ×10³ of {results['settings']['curve_images']} samples vs held-out (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    plots["curves"] = out_dir / "curves.png"
    fig.savefig(plots["curves"], dpi=100)
    plt.close(fig)

    labels = list(entries)
    panels = [
        ("sampling CPU s per image\n(training size)", [entries[k]["sampling"]["train_size"]["cpu_seconds_per_image"]["value"] for k in labels]),
        (f"peak sampling memory MB, {results['settings']['memory_batch']} images\n(training size, above the model)",
         [entries[k]["sampling"]["train_size"]["peak_memory"]["value"] / 2**20 for k in labels]),
        ("sampling memory MB per extra image\n(training size)",
         [(entries[k]["sampling"]["train_size"]["memory_per_image"]["value"] or 0) / 2**20 for k in labels]),
        ("CPU s per large canvas\n({}x{})".format(results["settings"]["large_size"][1], results["settings"]["large_size"][0]),
         [entries[k]["sampling"]["large_size"]["cpu_seconds"]["value"] for k in labels]),
        ("peak sampling memory MB\n(large canvas, above the model)",
         [entries[k]["sampling"]["large_size"]["peak_memory"]["value"] / 2**20 for k in labels]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(range(len(labels)), values, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    plots["costs"] = out_dir / "costs.png"
    fig.savefig(plots["costs"], dpi=100)
    plt.close(fig)
    return plots


def _relative(out_dir: Path, path: Path) -> str:
    """A path inside out_dir as the markdown report links it (the report can move with its folder)."""
    return Path(path).resolve().relative_to(Path(out_dir).resolve()).as_posix()


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _report_parts(out_dir: Path, results: dict) -> dict:
    """The prose shared by both reports."""
    s = results["settings"]
    held = results["held_out"]
    match = results["size_match"]
    lines = [
        f"Data `{s['data']}` at {s['resolution'][1]}x{s['resolution'][0]}; {s['cpu_minutes']:g} CPU minutes of "
        f"training steps per entry (one thread each), batch 16, AdamW lr 2e-3; evaluation on {held['note']}.",
        f"SWD: ProGAN's sliced Wasserstein distance ×10³ (128 7×7 patches per image and pyramid level), "
        f"{s['images']} EMA samples vs {s['images']} real images; curve points use {s['curve_images']} "
        f"(same seeds at every point). Real training images vs held-out: "
        f"{results['reference']['swd_train_vs_held_out']['value']:.1f} (the floor).",
        "FLOPs are multiply-adds per image (DiT's convention): one network evaluation over the whole "
        "training-size image, and a training example (3 × the loss's forward).",
        f"Sampling time: CPU seconds per image over the {s['images']} final samples; peak memory: resident "
        f"bytes above the loaded model, fresh process, {s['memory_batch']} images at the training size (and the "
        f"growth per extra image: peak at {s['memory_batch']} minus peak at 1, over {s['memory_batch']} - 1, which "
        f"leaves out fixed costs) and one {s['large_size'][1]}x{s['large_size'][0]} canvas made of training-size "
        "tiles (each method's default tiling).",
        "Seams: seam score of the large canvas at its tiles' period, on the grid's own lines and at the worst "
        "offset (1 = seamless), beside real images' figures at the same period.",
    ]
    sizes = []
    for key, name in (("parameters", "parameters"), ("forward_flops", "FLOPs per evaluation")):
        m = match[key]
        if m["max_over_min"] is not None:
            sizes.append(f"{name} within {m['max_over_min']:.2f}× ({'within' if m['within_tolerance'] else 'OUTSIDE'} "
                         f"the {match['tolerance']}× target) over {', '.join(m['entries'])}")
    unmatched = [f"{k} — {v}" for k, v in match["unmatched"].items()]
    verdicts: dict[str, list[str]] = {}
    for claim in results["claims"]:
        verdicts.setdefault(claim["verdict"].split(" (")[0], []).append(claim["method"])
    summary = "; ".join(f"{verdict}: {', '.join(methods)}" for verdict, methods in verdicts.items())
    caveats = [
        "One training run per method (one seed): differences smaller than the change between a run's last two "
        "curve points (reported with each claim) are within noise.",
        f"SWD from {s['images']} images ({s['curve_images']} per curve point) is a cheap, biased estimate: compare "
        "entries with each other and with the real-vs-real floor, not with published numbers.",
        "Each method samples with its own sampler and step count (the table's sampler column), so sampling time "
        "and quality include that choice.",
        "CPU time is counted per process with one thread on a machine shared with other jobs; wall times are "
        "reported but depend on that load.",
    ]
    return {"setup": lines, "sizes": sizes, "unmatched": unmatched, "summary": summary, "caveats": caveats}


def report_markdown(out_dir: Path, results: dict, plots: dict) -> str:
    parts = _report_parts(out_dir, results)
    header, rows = table_rows(results)
    md = ["# patchdiff compare", ""]
    md += [f"- {line}" for line in parts["setup"]]
    md += ["", "## Results", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    md += ["", "Network sizes: " + "; ".join(parts["sizes"]) + "."]
    md += [f"- not matched: {u}" for u in parts["unmatched"]]
    md += ["", "## Claims of the seed papers at this scale", "", f"Verdicts: {parts['summary']}.", "",
           "| method | claim | how tested here | verdict | figures |", "|---|---|---|---|---|"]
    for c in results["claims"]:
        md.append(f"| {c['method']} | {c['claim']} | {c['test']} | **{c['verdict']}** | {c['evidence']} |")
    md += ["", "Caveats:", ""] + [f"- {c}" for c in parts["caveats"]]
    md += ["", "## Quality against training CPU time", "", f"![curves]({_relative(out_dir, plots['curves'])})", "",
           "## Sampling time and memory", "", f"![costs]({_relative(out_dir, plots['costs'])})", "",
           "## Samples (first 64 of the evaluation seeds) and real held-out images", ""]
    for label, r in results["entries"].items():
        md += [f"**{label}** (SWD {r['quality']['swd']['value']:.1f})", "",
               f"![{label}]({r['images']['samples']})", ""]
    md += ["**real (held out)**", "", f"![real]({'real.png'})", "",
           f"## One {results['settings']['large_size'][1]}x{results['settings']['large_size'][0]} canvas per entry", ""]
    for label, r in results["entries"].items():
        t = r["seams"]["tiling"]
        md += [f"**{label}** (tiles {t['tile'][1]}x{t['tile'][0]}, overlap {t['overlap'][1]}, {t['window']} window, "
               f"{t['grid']} grid; seam {r['seams']['at_grid']['value']:.3f} on the grid, "
               f"{r['seams']['worst']['value']:.3f} worst; real {r['seams']['real_at_grid']['value']:.3f} / "
               f"{r['seams']['real_worst']['value']:.3f})", "", f"![{label} large]({r['images']['large']})", ""]
    md += ["## How it was made", "", f"`{results['command']}`"]
    if results.get("resumed_with"):
        md += ["", f"(resumed with `{results['resumed_with']}`)"]
    md += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()), "",
           "Every figure with its unit: results.json."]
    return "\n".join(md) + "\n"


def report_html(out_dir: Path, results: dict, plots: dict) -> str:
    import html

    parts = _report_parts(out_dir, results)
    header, rows = table_rows(results)
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>patchdiff compare</title><style>",
           "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}",
           "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}",
           "th{background:#f3f3f3}img{image-rendering:pixelated;max-width:100%}.grid{display:flex;flex-wrap:wrap;gap:12px}",
           ".grid figure{margin:0}figcaption{font-size:12px;max-width:420px}</style></head><body>",
           "<h1>patchdiff compare</h1><ul>"]
    out += [f"<li>{e(line)}</li>" for line in parts["setup"]]
    out += ["</ul><h2>Results</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
    out += ["</table><p>Network sizes: " + e("; ".join(parts["sizes"])) + ".</p><ul>"]
    out += [f"<li>not matched: {e(u)}</li>" for u in parts["unmatched"]]
    out += ["</ul><h2>Claims of the seed papers at this scale</h2>", f"<p>Verdicts: {e(parts['summary'])}.</p>",
            "<table><tr><th>method</th><th>claim</th><th>how tested here</th><th>verdict</th><th>figures</th></tr>"]
    out += [f"<tr><td>{e(c['method'])}</td><td>{e(c['claim'])}</td><td>{e(c['test'])}</td><td><b>{e(c['verdict'])}</b>"
            f"</td><td>{e(c['evidence'])}</td></tr>" for c in results["claims"]]
    out += ["</table><p>Caveats:</p><ul>"] + [f"<li>{e(c)}</li>" for c in parts["caveats"]]
    out += ["</ul><h2>Quality against training CPU time</h2>", f"<img src='{_data_uri(plots['curves'])}'>",
            "<h2>Sampling time and memory</h2>", f"<img src='{_data_uri(plots['costs'])}'>",
            "<h2>Samples and real held-out images</h2><div class='grid'>"]
    for label, r in results["entries"].items():
        out.append(f"<figure><img src='{_data_uri(out_dir / r['images']['samples'])}' width='400'>"
                   f"<figcaption>{e(label)} (SWD {r['quality']['swd']['value']:.1f})</figcaption></figure>")
    out.append(f"<figure><img src='{_data_uri(out_dir / 'real.png')}' width='400'><figcaption>real (held out)"
               "</figcaption></figure></div>")
    size = results["settings"]["large_size"]
    out.append(f"<h2>One {size[1]}x{size[0]} canvas per entry</h2><div class='grid'>")
    for label, r in results["entries"].items():
        t = r["seams"]["tiling"]
        caption = (f"{label}: tiles {t['tile'][1]}x{t['tile'][0]}, overlap {t['overlap'][1]}, {t['window']} window, "
                   f"{t['grid']} grid; seam {r['seams']['at_grid']['value']:.3f} on the grid, "
                   f"{r['seams']['worst']['value']:.3f} worst (real {r['seams']['real_at_grid']['value']:.3f} / "
                   f"{r['seams']['real_worst']['value']:.3f})")
        out.append(f"<figure><img src='{_data_uri(out_dir / r['images']['large'])}' width='384'>"
                   f"<figcaption>{e(caption)}</figcaption></figure>")
    out.append("</div><h2>How it was made</h2>" + f"<p><code>{e(results['command'])}</code></p>")
    if results.get("resumed_with"):
        out.append(f"<p>(resumed with <code>{e(results['resumed_with'])}</code>)</p>")
    out.append("<p>Machine: " + e(", ".join(f"{k} {v}" for k, v in results["machine"].items())) + "</p>")
    out.append("<p>Every figure with its unit: results.json.</p></body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# internal entry points: a worker per entry, and the fresh-process probes


def _worker_main(out_dir: str, label: str) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a kill checkpoints a training segment, as Ctrl-C does
    worker = EntryWorker(Path(out_dir), label)
    try:
        worker.run()
    except KeyboardInterrupt:
        worker.log("interrupted")
        return 130
    except UserError as e:
        worker.log(f"error: {e}")
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 3:
        return _worker_main(argv[1], argv[2])
    if argv[:1] == ["--probe"] and len(argv) == 2:
        print(json.dumps(probe(json.loads(argv[1]))), flush=True)
        return 0
    print("internal entry points of `patchdiff compare` (use `patchdiff compare --help`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

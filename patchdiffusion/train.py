"""The one training loop, for every method.

What makes it exact and reproducible:
  * the data order, flips and every noise draw of example k in step s come from seeds derived from
    (seed, s, k) alone, so 1 process and N processes (torchrun) see the same global batch, and a
    resumed run continues the very same sequence;
  * data loading runs in DataLoader workers (`data.num_workers`), but which examples a step loads is
    decided in the main process, step by step, so workers change nothing but speed;
  * a checkpoint holds the net, the EMA, the optimizer, the step, the images seen and the torch RNG
    states (dropout), written atomically; `resume=True` restores all of them and says so, and keeps the
    precision and compile choices the run started with (so the resumed steps compute the same numbers).

What keeps it lean (the step is the network's forward and backward, little else):
  * no host synchronisation inside a step: losses stay on the device until a log step, a checkpoint or a
    sample grid reads them in one transfer; a NaN/inf found then stops the run before anything is saved;
  * AdamW's fused kernel (foreach where fused is unsupported), EMA with one `_foreach_lerp_`, clipping
    with foreach norms;
  * `train.compile`: the step's loss (denoiser + loss, forward and backward) compiled when the run's
    budget repays it, see `runtime.decide_compile`; `train.precision=auto`: bf16 where it is faster;
  * decoded training images are kept in memory (up to IMAGE_CACHE_BYTES per process), so epochs after
    the first do not decode or render again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from patchdiffusion import run as runs
from patchdiffusion.config import RunConfig, apply_overrides, load_config, save_config, to_dict
from patchdiffusion.errors import ConfigError, TrainingDiverged
from patchdiffusion.images import save_grid
from patchdiffusion.methods import build_method
from patchdiffusion.methods.base import TrainBatch
from patchdiffusion.rng import SampleRNG, mix_seed
from patchdiffusion.runtime import (
    CompileChoice,
    Distributed,
    autocast_context,
    choose_precision,
    compile_function,
    compile_key,
    count_ops,
    decide_compile,
    estimate_compile_seconds,
    expected_compile_gain,
    init_distributed,
    one_line,
    record_compile,
    resolve_device,
    synchronize,
)
from patchdiffusion.sample import sample_images

_DATA_STREAM, _EXAMPLE_STREAM, _PLAN_STREAM = 1, 2, 4

# What `--resume` may change: budgets, bookkeeping and where it runs, nothing that changes the maths.
RESUMABLE_KEYS = (
    "train.steps", "train.max_minutes", "train.max_cpu_minutes", "train.checkpoint_every", "train.sample_every",
    "train.log_every", "train.device", "train.keep_checkpoints", "train.sample_images", "train.metric_every",
    "train.metric_images", "train.compile", "data.num_workers",
)

__all__ = ["train", "TrainResult", "TrainingDiverged", "prepare_run", "StepBatches", "build_dataset", "plot_loss"]

IMAGE_CACHE_BYTES = 1 << 30   # decoded training images kept in memory per process (a set that fits: all of it)
MAX_PENDING_LOSSES = 64       # losses kept on the device between two checks (log steps) at most
MIN_STEPS_TO_COMPILE = 30     # auto: shorter runs never compile (the probe alone would cost ~10% of them)
PROBE_STEPS = 2               # auto: eager forward+backward passes timed before deciding (after one warm-up)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    images_seen: int
    last_loss: float
    stopped_early: bool


# ------------------------------------------------------------------------------------------------
# data order


class StepBatches:
    """Global batch of step s = the next `batch_size` entries of a stream of epoch permutations.

    Epoch e is a permutation drawn from seed (seed, e), so the order is fixed by the seed alone and a
    resumed run picks it up at any step. Process r of W takes its contiguous share of each batch.
    A step whose plan multiplies the batch (Patch Diffusion's small patches) takes `count` entries
    from stream position `position` instead (`indices_at`).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, _DATA_STREAM, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=g)
        return self._perm

    def local_positions(self, count: int | None = None) -> range:
        """Positions of this process's examples inside a global batch of `count` (default batch_size)."""
        local = self.local_batch if count is None else count // self.world_size
        start = self.rank * local
        return range(start, start + local)

    def indices(self, step: int) -> list[int]:
        return self.indices_at(step * self.batch_size, self.batch_size)

    def indices_at(self, position: int, count: int) -> list[int]:
        """This process's share of the `count` stream entries that start at `position`."""
        out = []
        for k in self.local_positions(count):
            n = position + k
            out.append(int(self._permutation(n // self.num_items)[n % self.num_items]))
        return out


class StepPlanSampler(Sampler):
    """The index lists of the steps still to run, for a DataLoader's `batch_sampler`.

    Step s loads batch_size × (its plan's multiplier) examples from the stream position reached so
    far, exactly as the loop counts them, so prefetching workers load what the loop will use."""

    def __init__(self, batches: StepBatches, method, seed: int, total_steps: int, step: int, position: int):
        self.batches, self.method, self.seed = batches, method, seed
        self.total_steps, self.step, self.position = total_steps, step, position

    def __len__(self) -> int:
        return max(0, self.total_steps - self.step)

    def __iter__(self):
        position = self.position
        for step in range(self.step, self.total_steps):
            count = self.batches.batch_size * step_plan(self.method, self.seed, step, self.total_steps).multiplier
            yield self.batches.indices_at(position, count)
            position += count


def step_plan(method, seed: int, step: int, total_steps: int):
    """Step-level draws (e.g. one patch size for the whole global batch), the same on every process."""
    return method.plan_step(mix_seed(seed, _PLAN_STREAM, step), step / max(total_steps, 1))


class IndexedImages(Dataset):
    """(image, label, data set index) of each example, what a step's TrainBatch is made of.

    Decoded images are kept in memory up to `cache_bytes` (per process: the loop's, or each DataLoader
    worker's), so a set that fits is decoded, or rendered, once instead of once per epoch. An image is a
    pure function of its index (flips are drawn later, in the loop), so the cache changes nothing but time."""

    def __init__(self, dataset, cache_bytes: int = IMAGE_CACHE_BYTES):
        self.dataset, self.cache_bytes = dataset, cache_bytes
        self.cache: dict[int, tuple] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        hit = self.cache.get(index)
        if hit is not None:
            return hit
        image, label = self.dataset[index]
        size = image.element_size() * image.numel() if isinstance(image, torch.Tensor) else 0
        if size and self.cached_bytes + size <= self.cache_bytes:
            self.cache[index] = (image, label, index)
            self.cached_bytes += size
        return image, label, index


# ------------------------------------------------------------------------------------------------
# EMA, learning rate


def ema_beta(cfg, images_seen: int, batch_size: float) -> float:
    """EDM's EMA: half-life in images, ramped up to a fraction of the images seen so far."""
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup > 0:
        halflife = min(halflife, images_seen * cfg.ema_rampup)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema ← ema + (1 − beta)(net − ema), all parameters in one foreach call (the same numbers as one
    lerp_ per tensor, without a kernel launch and Python round per tensor); buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - beta)
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)


def build_optimizer(net: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel (CUDA; CPU since torch 2.4), else its foreach kernels."""
    options = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(net.parameters(), fused=True, **options)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return torch.optim.AdamW(net.parameters(), foreach=True, **options)


def learning_rate(cfg, step: int) -> float:
    if cfg.warmup_steps > 0:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr


# ------------------------------------------------------------------------------------------------
# setting a run up


def build_dataset(config: RunConfig, run_dir: Path | None = None, resume: bool = False, write: bool = True,
                  progress: bool = False):
    """The training set of `config` and its report: unreadable or too-small images of a folder, zip or
    LMDB are left out (listed in RUN/skipped_images.txt); a resumed run keeps its recorded index."""
    from patchdiffusion.data import open_training_set

    height, width = config.data.resolution
    return open_training_set(
        config.data.source, (width, height), transform=config.data.transform, use_labels=config.data.use_labels,
        run_dir=run_dir, resume=resume, write=write, progress=progress,
    )


def prepare_run(config: RunConfig | None, run_dir: str | Path, resume: bool, overrides: list[str] | None) -> RunConfig:
    """The config of the run: given (new run) or read back from the run directory (resume).

    A resume may change budgets and bookkeeping (RESUMABLE_KEYS); restating an unchanged value (the same
    --data, say) is fine, changing anything else is refused with the key's name."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not resume:
        return config
    if not saved.is_file():
        raise ConfigError(f"cannot resume: '{run_dir}' has no config.yaml (is it a run directory?)")
    resumed = load_config(saved)
    if not overrides:
        return resumed
    changed = apply_overrides(resumed, overrides)
    before, after = _flatten(to_dict(resumed)), _flatten(to_dict(changed))
    for key in after:
        if after[key] != before.get(key) and not key.startswith("sample.") and key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"cannot change '{key}' when resuming (it is {before.get(key)!r} in this run); start a new run for that"
            )
    return changed


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ------------------------------------------------------------------------------------------------
# the loop


def train(
    config: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    log=print,
) -> TrainResult:
    """Train `config` in `run_dir` (created if needed); with resume=True continue its last checkpoint."""
    return Trainer(config, Path(run_dir), resume, progress, log).run()


class Trainer:
    """One training run: set up in __init__, then `run()` is the loop, a short sequence of named steps."""

    def __init__(self, config: RunConfig, run_dir: Path, resume: bool, progress: bool, log):
        self.config, self.cfg, self.run_dir = config, config.train, run_dir
        self.progress = progress
        self.device = resolve_device(self.cfg.device)
        self.dist: Distributed = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.say = log if self.dist.is_main else (lambda *a, **k: None)
        if self.cfg.batch_size % self.dist.world_size:
            raise ConfigError(
                f"train.batch_size {self.cfg.batch_size} is not divisible by the {self.dist.world_size} processes"
            )
        self.precision, self.precision_reason = self.agreed(choose_precision(self.cfg.precision, self.device))

        self.dataset, data_report = build_dataset(config, run_dir, resume, write=self.dist.is_main,
                                                  progress=progress and self.dist.is_main)
        self.say(data_report.summary())
        self.method = build_method(config.method, config.model, config.data.resolution, image_channels=3)
        if config.data.use_labels and self.method.num_classes == 0:
            raise ConfigError("data.use_labels is true but the model is unconditional: set model.net.num_classes")
        self.method.bind_data(len(self.dataset))  # may fill data-dependent model settings (saved with the config)

        torch.manual_seed(mix_seed(self.cfg.seed, 0))
        self.net = self.method.build_network().to(self.device)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.optimizer = build_optimizer(self.net, self.cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        # Images counted per step (images seen, EMA): the batch times the method's average multiplier.
        self.step_images = self.cfg.batch_size * self.method.average_multiplier
        self.step, self.images_seen, self.data_position = 0, 0, 0
        self.compile_choice: CompileChoice | None = None  # decided at the first step (auto) or restored
        # CPU time inside training steps (not checkpoints, samples, metrics), summed over resumes, so that
        # max_cpu_minutes, like steps, budgets the whole run.
        self.step_cpu_seconds = 0.0
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / "config.yaml")
        if resume:
            self.restore()
        self.say(self.precision_reason)
        self.amp = autocast_context(self.precision, self.device)
        self.model = self.wrap_model()
        self.compiled_loss, self.compile_settled = None, False
        self.batches = StepBatches(len(self.dataset), self.cfg.batch_size, self.cfg.seed, self.dist.rank,
                                   self.dist.world_size)
        self.writer = self.open_writer()
        self.monitor = None
        self.last_loss, self.stopped_early = float("nan"), False
        self.pending_losses: list[torch.Tensor] = []  # this step's and earlier losses, not yet checked
        self.grad_norm: torch.Tensor | None = None
        self.compile_watch = {"shapes": set(), "seconds": 0.0, "eager_s": 0.0, "steps": [], "ops": 0}
        self.between_steps = None  # called with the trainer after each step (benchmarks time the loop with it)

    # -- set-up pieces -------------------------------------------------------------------------
    def agreed(self, value):
        """Rank 0's value on every process (choices made from timings must not differ between processes)."""
        if not self.dist.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def restore(self) -> None:
        if self.dist.is_main:
            runs.remove_stale_temp_folders(self.run_dir)  # left by a process killed inside a checkpoint write
        checkpoint = runs.newest_verified_checkpoint(self.run_dir, self.say)
        if checkpoint is None:
            self.say(f"WARNING: --resume given but '{self.run_dir}' has no checkpoint yet; starting from step 0")
            return
        runs.load_into(self.net, runs.load_weights(checkpoint, "net", self.device), str(checkpoint.path))
        runs.load_into(self.ema, runs.load_weights(checkpoint, "ema", self.device), str(checkpoint.path))
        state = runs.load_train_state(checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self.data_position = int(state.get("data_position", self.step * self.cfg.batch_size))
        self.step_cpu_seconds = float(state.get("cpu_seconds", 0.0))  # absent in checkpoints of older versions
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        # auto choices are kept from the run's start: the resumed steps then compute what the uninterrupted
        # run computed (bf16 and compiled kernels round differently from fp32 eager).
        if self.cfg.precision == "auto" and state.get("precision") in ("fp32", "bf16"):
            self.precision = state["precision"]
            self.precision_reason = f"precision {self.precision} (auto, kept from this run's start)"
        if self.cfg.compile == "auto" and isinstance(state.get("compile"), bool):
            self.compile_choice = CompileChoice(
                state["compile"], f"compile {'on' if state['compile'] else 'off'} (auto, kept from this run's start)")
        self.say(f"resumed from {checkpoint.path} at step {self.step} ({self.images_seen} images seen)")

    def wrap_model(self) -> nn.Module:
        model = self.net
        if self.dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        return model

    def open_writer(self):
        if not self.dist.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        config = self.config
        self.say(
            f"training '{config.method}' on {config.data.source} ({len(self.dataset)} images, "
            f"{config.data.resolution[1]}x{config.data.resolution[0]}) on {self.device}"
            f"{f' × {self.dist.world_size} processes' if self.dist.enabled else ''}; "
            f"{sum(p.numel() for p in self.net.parameters()) / 1e6:.2f}M parameters; run dir {self.run_dir}"
        )
        return SummaryWriter(log_dir=str(self.run_dir))

    def loader(self) -> DataLoader:
        """The remaining steps' examples, loaded by `data.num_workers` worker processes (0: in this one)."""
        workers = self.config.data.num_workers
        sampler = StepPlanSampler(self.batches, self.method, self.cfg.seed, self.cfg.steps, self.step,
                                  self.data_position)
        # Its own generator: a DataLoader draws a worker base seed when iterated, and from the global RNG
        # that draw would shift dropout's random stream on every resume.
        return DataLoader(
            IndexedImages(self.dataset), batch_sampler=sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=2 if workers > 0 else None,
            generator=torch.Generator().manual_seed(mix_seed(self.cfg.seed, _DATA_STREAM, -1)),
        )

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        start_step, self.start_time = self.step, time.time()
        bar = self.progress_bar()
        self.net.train()
        try:
            for images, labels, index in self.loader():
                if self.budget_spent():
                    break
                cpu_start = time.process_time()
                batch, rng = self.training_batch(images, labels, index)
                if not self.compile_settled:
                    self.choose_compile(batch)
                self.optimizer_step(batch, rng)
                self.update_ema()
                self.step_cpu_seconds += time.process_time() - cpu_start
                self.log_step(bar)
                self.periodic_work()
                if self.between_steps is not None:
                    self.between_steps(self)
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            self.say(f"interrupted at step {self.step}; writing a checkpoint (continue with --resume)")
            self.checkpoint()
            raise
        finally:
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.flush()
                self.writer.close()
        self.check_losses()
        self.note_compile_gain()
        if self.step > start_step or runs.latest_checkpoint(self.run_dir) is None:
            self.checkpoint()
            self.sample_grid()
        self.say(f"done: step {self.step}, {self.images_seen} images seen, last loss {self.last_loss:.4f}; "
                 f"run dir {self.run_dir}")
        return TrainResult(self.run_dir, self.step, self.images_seen, self.last_loss, self.stopped_early)

    def progress_bar(self):
        if not (self.progress and self.dist.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    file=sys.stderr)

    def budget_spent(self) -> bool:
        """Wall-time and CPU-time budgets (`max_minutes`, `max_cpu_minutes`), checked before each step."""
        if self.cfg.max_minutes > 0 and time.time() - self.start_time > self.cfg.max_minutes * 60:
            self.say(f"time budget of {self.cfg.max_minutes} min reached at step {self.step}")
        elif self.cfg.max_cpu_minutes > 0 and self.step_cpu_seconds > self.cfg.max_cpu_minutes * 60:
            self.say(f"CPU-time budget of {self.cfg.max_cpu_minutes} min reached at step {self.step}")
        else:
            return False
        self.stopped_early = True
        return True

    def training_batch(self, images, labels, index) -> tuple[TrainBatch, SampleRNG]:
        """The step's examples on the device, flipped per example, with each example's random stream."""
        plan = step_plan(self.method, self.cfg.seed, self.step, self.cfg.steps)
        count = self.cfg.batch_size * plan.multiplier
        rng = SampleRNG(
            [mix_seed(self.cfg.seed, _EXAMPLE_STREAM, self.step, k) for k in self.batches.local_positions(count)],
            self.device,
        )
        images = images.to(self.device, non_blocking=True)
        if self.config.data.hflip:
            flip = (rng.rand() < 0.5).view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images)
        labels = labels.to(self.device) if self.config.data.use_labels else None
        self.data_position += count
        return TrainBatch(images, labels, index.to(self.device), plan), rng

    def step_loss(self, batch: TrainBatch, rng: SampleRNG) -> torch.Tensor:
        """The step's mean loss: the method's denoiser and loss under the run's precision (what is compiled)."""
        with autocast_context(self.precision, self.device):
            return self.method.loss(self.model, batch, rng).float().mean()

    def optimizer_step(self, batch: TrainBatch, rng: SampleRNG) -> None:
        """Loss, backward, clipping and one AdamW step, without reading anything back from the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_and_backward(batch, rng)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.pending_losses.append(loss.detach())
        self.step += 1
        self.images_seen = round(self.step * self.step_images)
        if len(self.pending_losses) >= MAX_PENDING_LOSSES:
            self.check_losses()

    def loss_and_backward(self, batch: TrainBatch, rng: SampleRNG) -> torch.Tensor:
        """Forward and backward, compiled when chosen. A step of a shape not seen yet compiles, and its extra
        time is counted; a compile that fails falls back to eager for good, redoing the step from the same
        random state."""
        if self.compiled_loss is not None:
            watch, shape = self.compile_watch, (tuple(batch.images.shape), repr(batch.plan))
            cpu_rng, example_rng, start = torch.get_rng_state(), rng.clone(), time.perf_counter()
            try:
                loss = self.backward(self.compiled_loss(batch, rng))
            except Exception as error:  # noqa: BLE001 - whatever the compiler raised, eager still works
                self.compiled_loss = None
                self.compile_choice = CompileChoice(False, f"compile failed ({one_line(error)})")
                self.say(f"compile failed, training eagerly from step {self.step}: {one_line(error)}")
                self.optimizer.zero_grad(set_to_none=True)
                torch.set_rng_state(cpu_rng)
                rng = example_rng
            else:
                if shape not in watch["shapes"]:
                    synchronize(self.device)
                    watch["shapes"].add(shape)
                    watch["seconds"] += max(0.0, time.perf_counter() - start - watch["eager_s"])
                return loss
        return self.backward(self.step_loss(batch, rng))

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss

    # -- compile or not --------------------------------------------------------------------------
    def choose_compile(self, batch: TrainBatch) -> None:
        """Decide (auto) or apply (on/off, or kept on resume) whether the step's loss is compiled, once."""
        if self.compile_choice is None:
            if self.cfg.compile != "auto":
                self.compile_choice = decide_compile(self.cfg.compile, 0.0, 0.0, 0.0)
            elif self.cfg.steps - self.step < MIN_STEPS_TO_COMPILE:
                self.compile_choice = CompileChoice(
                    False, f"compile off (auto: {self.cfg.steps - self.step} steps are too few to repay a compile)")
            else:
                self.compile_choice = self.agreed(self.measure_and_decide(batch))
        self.say(self.compile_choice.reason)
        self.note_choices()
        self.compile_settled = True
        if self.compile_choice:
            self.compiled_loss = compile_function(self.step_loss, dynamic=False)

    def compile_key(self) -> str:
        """What is compiled, for this machine's record of compile times and gains."""
        what = json.dumps([self.config.method, to_dict(self.config.model), self.precision,
                           self.cfg.batch_size // self.dist.world_size, list(self.config.data.resolution),
                           self.dist.world_size], sort_keys=True, default=str)
        return compile_key(f"train|{self.config.method}|{hashlib.sha1(what.encode()).hexdigest()[:16]}", self.device)

    def distinct_plans(self, horizon: int = 200) -> int:
        """How many step shapes (plans) the next steps use: each compiles its own graph."""
        last = min(self.cfg.steps, self.step + horizon)
        return len({repr(step_plan(self.method, self.cfg.seed, s, self.cfg.steps)) for s in range(self.step, last)})

    def measure_and_decide(self, batch: TrainBatch) -> CompileChoice:
        """auto: time the eager forward + backward on this batch (after one warm-up pass that also counts
        the operators), estimate the compile, and weigh it against the run's budget. Nothing of the run
        changes: the passes use their own random streams and the global RNG state is put back."""
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        probe_rng = SampleRNG(range(batch.images.shape[0]), self.device)

        def forward_backward():
            with autocast_context(self.precision, self.device):
                loss = self.method.loss(self.net, batch, probe_rng).float().mean()
            loss.backward()

        _, ops = count_ops(forward_backward)
        wall, cpu = [], []
        for _ in range(PROBE_STEPS):
            synchronize(self.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            forward_backward()
            synchronize(self.device)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
        self.net.zero_grad(set_to_none=True)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
        step_s, step_cpu_s = self.estimate_step_seconds(min(wall), min(cpu))
        self.compile_watch.update(eager_s=step_s, ops=ops)
        return self.decide_from_budget(step_s, step_cpu_s, ops)

    def estimate_step_seconds(self, wall_s: float, cpu_s: float) -> tuple[float, float]:
        """The eager step's (wall, CPU) seconds from the probe (a seam for tests to stub)."""
        return wall_s, cpu_s

    def decide_from_budget(self, step_s: float, step_cpu_s: float, ops: int) -> CompileChoice:
        remaining = self.cfg.steps - self.step
        budget = remaining * step_s
        if self.cfg.max_minutes > 0:
            budget = min(budget, max(0.0, self.cfg.max_minutes * 60 - (time.time() - self.start_time)))
        if self.cfg.max_cpu_minutes > 0 and step_cpu_s > 0:
            cpu_left = max(0.0, self.cfg.max_cpu_minutes * 60 - self.step_cpu_seconds)
            budget = min(budget, cpu_left / step_cpu_s * step_s)
        key = self.compile_key()
        per_shape, how = estimate_compile_seconds(key, ops)
        shapes = self.distinct_plans()
        gain, gain_how = expected_compile_gain(key)
        how = how if shapes == 1 else f"{shapes} step shapes, each {how}"
        return decide_compile("auto", budget, per_shape * shapes, gain, how=how, gain_how=gain_how)

    def note_compile_gain(self) -> None:
        """After a compiled run: keep what compiling cost and gained here, for the next run's decision."""
        watch = self.compile_watch
        if not (self.dist.is_main and self.compiled_loss is not None and watch["shapes"]):
            return
        compiled_s = statistics.median(watch["steps"]) if len(watch["steps"]) >= 5 else None
        record_compile(self.compile_key(), watch["ops"] or None, watch["seconds"] / len(watch["shapes"]),
                       watch["eager_s"] or None, compiled_s)

    def note_choices(self) -> None:
        """The run's precision and compile choices with their reasons, one JSON line per session."""
        if not self.dist.is_main:
            return
        row = {"step": self.step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(self.device),
               "precision": self.precision, "precision_reason": self.precision_reason,
               "compile": bool(self.compile_choice), "compile_reason": self.compile_choice.reason}
        with open(self.run_dir / "speed_choices.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    # -- checks, EMA, logging ----------------------------------------------------------------------
    def check_losses(self) -> None:
        """Read the losses of the steps since the last check (one transfer, averaged over processes); a
        NaN/inf stops the run here, before anything of it is saved, naming the step it appeared at."""
        if not self.pending_losses:
            return
        losses = torch.stack(self.pending_losses).float()
        if self.dist.enabled:
            torch.distributed.all_reduce(losses)
            losses /= self.dist.world_size
        values = losses.tolist()
        first = self.step - len(values)
        self.pending_losses.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                latest = runs.latest_checkpoint(self.run_dir)
                raise TrainingDiverged(
                    f"loss became {value} at step {first + offset}; stopped without saving, so the last checkpoint "
                    f"({latest.path if latest else 'none yet'}) is intact. Try a lower train.lr, train.grad_clip, "
                    "or precision=fp32."
                )
        self.last_loss = values[-1]

    def update_ema(self) -> None:
        update_ema(self.ema, self.net, ema_beta(self.cfg, self.images_seen, self.step_images))

    def log_step(self, bar) -> None:
        if bar is not None:
            bar.update(1)
        if self.step % self.cfg.log_every and self.step != self.cfg.steps:
            return
        self.check_losses()  # every process: the check averages over them
        if self.compiled_loss is not None and len(self.compile_watch["steps"]) < 64:
            self.time_compiled_steps()
        if not self.dist.is_main:
            return
        if bar is not None:
            bar.set_postfix(loss=f"{self.last_loss:.4f}")
        row = {
            "step": self.step, "images_seen": self.images_seen, "loss": self.last_loss,
            "lr": learning_rate(self.cfg, self.step - 1), "seconds": round(time.time() - self.start_time, 3),
            "cpu_seconds": round(self.step_cpu_seconds, 3),
        }
        if self.grad_norm is not None:
            row["grad_norm"] = float(self.grad_norm)
        runs.append_metrics(self.run_dir, row)
        self.writer.add_scalar("loss", self.last_loss, self.step)
        self.writer.add_scalar("lr", row["lr"], self.step)

    def time_compiled_steps(self) -> None:
        """The compiled step's time between two log steps without a compile, for note_compile_gain."""
        now, watch = time.perf_counter(), self.compile_watch
        mark = watch.get("mark")
        if mark is not None and mark[2] == len(watch["shapes"]) and self.step > mark[0]:
            watch["steps"].append((now - mark[1]) / (self.step - mark[0]))
        watch["mark"] = (self.step, now, len(watch["shapes"]))

    def periodic_work(self) -> None:
        """Checkpoints, sample grids and SWD checks every so many steps (the final ones come after the loop)."""
        cfg, step = self.cfg, self.step
        if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            self.checkpoint()
        if cfg.sample_every > 0 and step % cfg.sample_every == 0 and step < cfg.steps:
            self.sample_grid()
        if cfg.metric_every > 0 and step % cfg.metric_every == 0:
            self.measure()

    # -- periodic work ---------------------------------------------------------------------------
    def checkpoint(self) -> None:
        self.check_losses()  # a NaN never reaches a checkpoint
        if self.dist.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(), "step": self.step, "images_seen": self.images_seen,
                "data_position": self.data_position, "torch_rng": torch.get_rng_state(),
                "precision": self.precision, "cpu_seconds": self.step_cpu_seconds,
            }
            if self.compile_choice is not None:
                state["compile"] = bool(self.compile_choice)
            if self.device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            if self.scaler is not None:
                state["scaler"] = self.scaler.state_dict()
            runs.save_checkpoint(self.run_dir, self.step, self.net.state_dict(), self.ema.state_dict(), state,
                                 keep=self.cfg.keep_checkpoints)
            plot_loss(self.run_dir)
        self.dist.barrier()

    def sample_grid(self) -> None:
        self.check_losses()
        if self.dist.is_main and self.cfg.sample_images > 0:
            images = sample_images(self.method, self.ema, self.config, self.cfg.sample_images, device=self.device)
            save_grid(images, self.run_dir / "samples" / f"step-{self.step:08d}.png",
                      upscale=max(1, 128 // images.shape[-1]))
        self.dist.barrier()

    def measure(self) -> None:
        """Cheap in-training quality: SWD of EMA samples against real images (opt-in, rank 0)."""
        self.check_losses()
        if self.dist.is_main:
            if self.monitor is None:
                from patchdiffusion.eval.monitor import SWDMonitor

                count = min(self.cfg.metric_images, len(self.dataset))
                reference = torch.stack([self.dataset[i * len(self.dataset) // count][0] for i in range(count)])
                self.monitor = SWDMonitor(reference, num_images=count, seed=self.cfg.seed)
            images = torch.cat([
                sample_images(self.method, self.ema, self.config, min(64, self.monitor.num_images - start),
                              seed0=start, device=self.device)
                for start in range(0, self.monitor.num_images, 64)
            ])
            metrics = self.monitor(images)
            runs.append_metrics(self.run_dir, {"step": self.step, "images_seen": self.images_seen, **metrics})
            for name, value in metrics.items():
                self.writer.add_scalar(f"metrics/{name}", value, self.step)
        self.dist.barrier()


# ------------------------------------------------------------------------------------------------
# the loss plot


def _moving_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss(run_dir: str | Path) -> Path | None:
    """loss.png from metrics.jsonl: the loss (raw and smoothed), and the in-training SWD beside it."""
    rows = runs.read_metrics(run_dir)
    loss_rows = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    swd_rows = [r for r in rows if "swd" in r]
    if len(loss_rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if swd_rows else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in loss_rows]
    losses = [r["loss"] for r in loss_rows]
    window = max(1, len(losses) // 20)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, _moving_mean(losses, window), label=f"moving mean ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    if swd_rows:
        ax = axes[0][1]
        ax.plot([r["step"] for r in swd_rows], [r["swd"] for r in swd_rows], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("SWD x1e3 (EMA samples vs real)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(run_dir) / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path

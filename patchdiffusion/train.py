"""The one training loop, for every method.

What makes it exact and reproducible:
  * the data order, flips and every noise draw of example k in step s come from seeds derived from
    (seed, s, k) alone, so 1 process and N processes (torchrun) see the same global batch, and a
    resumed run continues the very same sequence;
  * a checkpoint holds the net, the EMA, the optimizer, the step, the images seen and the torch RNG
    states (dropout), written atomically; `resume=True` restores all of them and says so.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from patchdiffusion.config import ConfigError, RunConfig, save_config, load_config, apply_overrides
from patchdiffusion.images import save_grid
from patchdiffusion.methods import build_method
from patchdiffusion.methods.base import StepPlan
from patchdiffusion.rng import SampleRNG, mix_seed
from patchdiffusion import run as runs

_DATA_STREAM, _EXAMPLE_STREAM, _SAMPLE_STREAM, _PLAN_STREAM = 1, 2, 3, 4


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    images_seen: int
    last_loss: float
    stopped_early: bool


# ------------------------------------------------------------------------------------------------
# devices, processes, precision


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available here")
    return device


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision fp16 needs CUDA; use bf16 (or fp32) on the CPU")
        return torch.autocast("cuda", dtype=torch.float16)
    raise ConfigError(f"precision '{precision}' is not one of fp32, bf16, fp16")


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


def load_batch(dataset, indices: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in indices]
    images = torch.stack([item[0] for item in items]).to(device)
    labels = torch.tensor([int(item[1]) for item in items], dtype=torch.long, device=device)
    return images, labels


# ------------------------------------------------------------------------------------------------
# EMA, learning rate


def ema_beta(cfg, images_seen: int, batch_size: int) -> float:
    """EDM's EMA: half-life in images, ramped up to a fraction of the images seen so far."""
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup > 0:
        halflife = min(halflife, images_seen * cfg.ema_rampup)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p_net.detach(), 1 - beta)
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)


def learning_rate(cfg, step: int) -> float:
    if cfg.warmup_steps > 0:
        return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr


# ------------------------------------------------------------------------------------------------
# the loop


def build_dataset(config: RunConfig):
    from patchdiffusion.data import ImageDataset, open_source

    height, width = config.data.resolution
    source = open_source(config.data.source, resolution=(width, height))
    return ImageDataset(
        source, resolution=(width, height),
        transform=config.data.transform, use_labels=config.data.use_labels,
    )


def prepare_run(config: RunConfig, run_dir: str | Path, resume: bool, overrides: list[str] | None) -> RunConfig:
    """The config of the run: given (new run) or read back from the run directory (resume)."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if resume:
        if not saved.is_file():
            raise ConfigError(f"cannot resume: '{run_dir}' has no config.yaml (is it a run directory?)")
        resumed = load_config(saved)
        if overrides:
            for item in overrides:
                key = item.split("=", 1)[0]
                if not key.split(".")[0] in ("train", "sample") and key.split(".")[-1] not in (
                    "steps", "max_minutes", "max_cpu_minutes", "checkpoint_every", "sample_every", "log_every", "device",
                    "num_workers", "keep_checkpoints",
                ):
                    raise ConfigError(f"cannot change '{key}' when resuming; start a new run for that")
            resumed = apply_overrides(resumed, overrides)
        return resumed
    return config


def train(
    config: RunConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    log=print,
) -> TrainResult:
    """Train `config` in `run_dir` (created if needed); with resume=True continue its last checkpoint."""
    run_dir = Path(run_dir)
    cfg = config.train
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if cfg.batch_size % dist_info.world_size:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size} is not divisible by the {dist_info.world_size} processes"
        )
    say = log if dist_info.is_main else (lambda *a, **k: None)
    amp = autocast_context(cfg.precision, device)

    dataset = build_dataset(config)
    if len(dataset) == 0:
        raise ConfigError(f"data source '{config.data.source}' holds no images")
    method = build_method(config.method, config.model, config.data.resolution, image_channels=3)
    if config.data.use_labels and method.num_classes == 0:
        raise ConfigError("data.use_labels is true but the model is unconditional: set model.net.num_classes")

    method.bind_data(len(dataset))  # may fill data-dependent model settings (saved with the config below)
    torch.manual_seed(mix_seed(cfg.seed, 0))
    net = method.build_network().to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    step, images_seen, data_position = 0, 0, 0
    # Images counted per step (images seen, EMA): the batch times the method's average multiplier.
    step_images = cfg.batch_size * method.average_multiplier
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    if resume:
        checkpoint = runs.latest_checkpoint(run_dir)
        if checkpoint is None:
            say(f"WARNING: --resume given but '{run_dir}' has no checkpoint yet; starting from step 0")
        else:
            runs.load_into(net, runs.load_weights(checkpoint, "net", device), str(checkpoint.path))
            runs.load_into(ema, runs.load_weights(checkpoint, "ema", device), str(checkpoint.path))
            state = runs.load_train_state(checkpoint)
            optimizer.load_state_dict(state["optimizer"])
            step, images_seen = int(state["step"]), int(state["images_seen"])
            data_position = int(state.get("data_position", step * cfg.batch_size))
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            say(f"resumed from {checkpoint.path} at step {step} ({images_seen} images seen)")

    model = net
    if cfg.compile:
        model = torch.compile(model)
    if dist_info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    batches = StepBatches(len(dataset), cfg.batch_size, cfg.seed, dist_info.rank, dist_info.world_size)
    writer = None
    if dist_info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir))
        say(
            f"training '{config.method}' on {config.data.source} ({len(dataset)} images, "
            f"{config.data.resolution[1]}x{config.data.resolution[0]}) on {device}"
            f"{f' × {dist_info.world_size} processes' if dist_info.enabled else ''}; "
            f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters; run dir {run_dir}"
        )

    def checkpoint_now() -> None:
        if dist_info.is_main:
            state = {
                "optimizer": optimizer.state_dict(),
                "step": step,
                "images_seen": images_seen,
                "data_position": data_position,
                "torch_rng": torch.get_rng_state(),
            }
            if device.type == "cuda":
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            runs.save_checkpoint(run_dir, step, net.state_dict(), ema.state_dict(), state, keep=cfg.keep_checkpoints)
            plot_loss(run_dir)
        if dist_info.enabled:
            torch.distributed.barrier()

    def sample_grid_now() -> None:
        if dist_info.is_main and cfg.sample_images > 0:
            images = sample_with(method, ema, config, cfg.sample_images, seed0=0, device=device)
            save_grid(images, run_dir / "samples" / f"step-{step:08d}.png", upscale=max(1, 128 // images.shape[-1]))
        if dist_info.enabled:
            torch.distributed.barrier()

    monitor = None

    def measure_now() -> None:
        """Cheap in-training quality: SWD of EMA samples against real images (opt-in, rank 0)."""
        nonlocal monitor
        if dist_info.is_main:
            if monitor is None:
                from patchdiffusion.eval.monitor import SWDMonitor

                count = min(cfg.metric_images, len(dataset))
                reference = torch.stack([dataset[i * len(dataset) // count][0] for i in range(count)])
                monitor = SWDMonitor(reference, num_images=count, seed=cfg.seed)
            images = torch.cat([
                sample_with(method, ema, config, min(64, monitor.num_images - start), seed0=start, device=device)
                for start in range(0, monitor.num_images, 64)
            ])
            metrics = monitor(images)
            runs.append_metrics(run_dir, {"step": step, "images_seen": images_seen, **metrics})
            for name, value in metrics.items():
                writer.add_scalar(f"metrics/{name}", value, step)
        if dist_info.enabled:
            torch.distributed.barrier()

    start_step, start_time = step, time.time()
    step_cpu_seconds = 0.0  # this process's CPU time inside training steps (not checkpoints, samples, metrics)
    last_loss, stopped_early = float("nan"), False
    bar = None
    if progress and dist_info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    net.train()
    try:
        while step < cfg.steps:
            if cfg.max_minutes > 0 and time.time() - start_time > cfg.max_minutes * 60:
                stopped_early = True
                say(f"time budget of {cfg.max_minutes} min reached at step {step}")
                break
            if cfg.max_cpu_minutes > 0 and step_cpu_seconds > cfg.max_cpu_minutes * 60:
                stopped_early = True
                say(f"CPU-time budget of {cfg.max_cpu_minutes} min reached at step {step}")
                break
            step_cpu_start = time.process_time()
            # Step-level draws (e.g. one patch size for the whole global batch), the same on every process.
            plan = method.plan_step(mix_seed(cfg.seed, _PLAN_STREAM, step), step / cfg.steps)
            count = cfg.batch_size * plan.multiplier
            indices = batches.indices_at(data_position, count)
            images, labels = load_batch(dataset, indices, device)
            if method.needs_image_index:  # e.g. Patch-DM's per-image codes
                plan = StepPlan(plan.multiplier, {**plan.options, "image_index": torch.tensor(indices, device=device)})
            rng = SampleRNG(
                [mix_seed(cfg.seed, _EXAMPLE_STREAM, step, k) for k in batches.local_positions(count)], device
            )
            if config.data.hflip:
                flip = (rng.rand() < 0.5).view(-1, 1, 1, 1)
                images = torch.where(flip, images.flip(-1), images)
            labels = labels if config.data.use_labels else None
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)

            with amp:
                loss = method.loss(model, images, labels, rng, **plan.options).float().mean()
            loss_value = loss.detach().clone()
            if dist_info.enabled:
                torch.distributed.all_reduce(loss_value)
                loss_value /= dist_info.world_size
            last_loss = float(loss_value)
            if not math.isfinite(last_loss):
                raise TrainingDiverged(
                    f"loss became {last_loss} at step {step}; stopped without saving, so the last checkpoint "
                    f"({runs.latest_checkpoint(run_dir).path if runs.latest_checkpoint(run_dir) else 'none yet'}) "
                    "is intact. Try a lower train.lr, train.grad_clip, or precision=fp32."
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            data_position += count
            step += 1
            images_seen = round(step * step_images)
            update_ema(ema, net, ema_beta(cfg, images_seen, step_images))
            step_cpu_seconds += time.process_time() - step_cpu_start

            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}")
            if dist_info.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                row = {
                    "step": step, "images_seen": images_seen, "loss": last_loss, "lr": learning_rate(cfg, step - 1),
                    "seconds": round(time.time() - start_time, 3),
                    "cpu_seconds": round(step_cpu_seconds, 3),
                }
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                runs.append_metrics(run_dir, row)
                writer.add_scalar("loss", last_loss, step)
                writer.add_scalar("lr", row["lr"], step)
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint_now()
            if cfg.sample_every > 0 and step % cfg.sample_every == 0 and step < cfg.steps:
                sample_grid_now()
            if cfg.metric_every > 0 and step % cfg.metric_every == 0:
                measure_now()
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        say(f"interrupted at step {step}; writing a checkpoint (continue with --resume)")
        checkpoint_now()
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.flush()
            writer.close()

    if step > start_step or runs.latest_checkpoint(run_dir) is None:
        checkpoint_now()
        sample_grid_now()
    say(f"done: step {step}, {images_seen} images seen, last loss {last_loss:.4f}; run dir {run_dir}")
    return TrainResult(run_dir, step, images_seen, last_loss, stopped_early)


def sample_with(method, net, config: RunConfig, num: int, seed0: int, device, labels=None, **overrides) -> torch.Tensor:
    """Sample `num` images with seeds seed0.. using the run's sample settings (overridable)."""
    s = config.sample
    options = dict(
        sampler=s.sampler or None, steps=s.num_steps or None, guidance=s.guidance,
        S_churn=s.S_churn, S_min=s.S_min, S_max=s.S_max, S_noise=s.S_noise, eta=s.eta,
    )
    options.update({k: v for k, v in overrides.items() if v is not None})
    rng = SampleRNG([mix_seed(_SAMPLE_STREAM, seed0 + i) for i in range(num)], device)
    was_training = net.training
    net.eval()
    try:
        return method.sample(net, rng, labels=labels, **options)
    finally:
        net.train(was_training)


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

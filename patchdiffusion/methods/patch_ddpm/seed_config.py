"""The reference code's JSON configs (`configs/config_patch_divider=4.json`) as a RunConfig.

Arakawa et al.'s repository describes a run with three sections (METHODS.md §2):

    {"trainer": {train_dataset_dir, log_dir, train_batch_size, train_num_steps, save_and_sample_every,
                 ema_decay, train_lr, gradient_accumulate_every, use_amp, step_start_ema,
                 update_ema_every, num_workers, seed, wandb_*},
     "model":     {dim, dim_mults, patch_divider, image_size, init_dim, out_dim, channels,
                   resnet_block_groups, learned_variance},
     "diffusion": {timesteps, loss_type, objective}}

`load_seed_config(path)` maps each key onto this project's config (`patchdiff train --config X.json`);
a key we cannot honour is a ConfigError naming it, never silently dropped. Mappings that are not
one-to-one:
  * EMA: the reference updates ema ← decay·ema + (1 − decay)·net every `update_ema_every` steps;
    that is a half-life of update_every · ln ½ / ln decay steps, which we give in images
    (× train_batch_size) as train.ema_halflife_kimg. `step_start_ema` (the EMA copies the net before
    it) has no exact counterpart; our EMA ramp-up (train.ema_rampup) plays that part.
  * Optimiser: Adam at train_lr, no warm-up, no clipping (train.warmup_steps = 0, grad_clip = 0;
    AdamW with weight_decay 0 is Adam).
  * use_amp: true -> train.precision = bf16 (autocast that works on CPU and CUDA; the reference
    autocasts to fp16 on CUDA).
  * save_and_sample_every -> train.checkpoint_every and train.sample_every; wandb_* are ignored
    (runs log to TensorBoard and metrics.jsonl); log_dir is the run directory unless --run is given.
Everything not set keeps the reference's dataclass default, not this project's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from patchdiffusion.config import RunConfig, apply_overrides
from patchdiffusion.errors import ConfigError

SECTIONS = ("trainer", "model", "diffusion")

# The reference's dataclass defaults (METHODS.md §2), used where the file is silent.
TRAINER_DEFAULTS = dict(
    train_batch_size=32, train_num_steps=100000, save_and_sample_every=1000, ema_decay=0.995, train_lr=1e-4,
    gradient_accumulate_every=1, use_amp=False, step_start_ema=2000, update_ema_every=10, seed=1234,
)
MODEL_DEFAULTS = dict(
    dim=128, dim_mults=[1, 2, 4, 8], patch_divider=4, image_size=128, init_dim=None, out_dim=None, channels=3,
    resnet_block_groups=8, learned_variance=False,
)
DIFFUSION_DEFAULTS = dict(timesteps=1000, loss_type="l1", objective="pred_noise")
IGNORED_TRAINER_KEYS = ("wandb_enabled", "wandb_name", "wandb_project", "step_start_ema")


def _check_keys(section: str, values: dict, known: tuple[str, ...]) -> None:
    for key in values:
        if key not in known:
            raise ConfigError(f"JSON config: unknown key '{section}.{key}' (known: {', '.join(known)})")


def ema_halflife_kimg(decay: float, update_every: int, batch_size: int) -> float:
    """Half-life, in thousands of images, of an EMA with `decay` applied every `update_every` steps."""
    if not 0 < decay < 1:
        raise ConfigError(f"JSON config: trainer.ema_decay must be in (0, 1), got {decay}")
    return update_every * math.log(0.5) / math.log(decay) * batch_size / 1000


def seed_overrides(values: dict[str, Any]) -> tuple[list[str], str | None]:
    """The key=value overrides equivalent to a reference JSON config, and its log_dir (or None)."""
    if not isinstance(values, dict) or not set(values) <= set(SECTIONS):
        extra = sorted(set(values) - set(SECTIONS)) if isinstance(values, dict) else values
        raise ConfigError(f"JSON config: expected the sections {', '.join(SECTIONS)}, got {extra}")
    trainer = dict(values.get("trainer") or {})
    model = dict(values.get("model") or {})
    diffusion = dict(values.get("diffusion") or {})
    _check_keys("trainer", trainer, tuple(TRAINER_DEFAULTS) + ("train_dataset_dir", "log_dir", "num_workers")
                + IGNORED_TRAINER_KEYS)
    _check_keys("model", model, tuple(MODEL_DEFAULTS))
    _check_keys("diffusion", diffusion, tuple(DIFFUSION_DEFAULTS))
    t = {**TRAINER_DEFAULTS, **trainer}
    m = {**MODEL_DEFAULTS, **model}
    d = {**DIFFUSION_DEFAULTS, **diffusion}
    if int(t["gradient_accumulate_every"]) != 1:
        raise ConfigError("JSON config: trainer.gradient_accumulate_every > 1 is not supported; "
                          "raise train_batch_size instead (the step is the same)")
    if m["learned_variance"]:
        raise ConfigError("JSON config: model.learned_variance = true is not supported by patch_ddpm")

    batch = int(t["train_batch_size"])
    every = int(t["save_and_sample_every"])
    overrides = [
        "method=patch_ddpm",
        f"data.resolution={int(m['image_size'])}",
        f"train.batch_size={batch}",
        f"train.steps={int(t['train_num_steps'])}",
        f"train.lr={float(t['train_lr'])}",
        "train.warmup_steps=0",
        "train.grad_clip=0",
        f"train.ema_halflife_kimg={ema_halflife_kimg(float(t['ema_decay']), int(t['update_ema_every']), batch)}",
        f"train.checkpoint_every={every}",
        f"train.sample_every={every}",
        f"train.seed={int(t['seed'])}",
        f"train.precision={'bf16' if t['use_amp'] else 'fp32'}",
        f"model.patch_divider={int(m['patch_divider'])}",
        f"model.net.dim={int(m['dim'])}",
        f"model.net.dim_mults={list(m['dim_mults'])}",
        f"model.net.channels={int(m['channels'])}",
        f"model.net.resnet_block_groups={int(m['resnet_block_groups'])}",
        f"model.timesteps={int(d['timesteps'])}",
        f"model.loss_type={d['loss_type']}",
        f"model.objective={d['objective']}",
    ]
    for key in ("init_dim", "out_dim"):
        if m[key] is not None:
            overrides.append(f"model.net.{key}={int(m[key])}")
    if "train_dataset_dir" in t:
        overrides.append(f"data.source={t['train_dataset_dir']}")
    if "num_workers" in t:
        overrides.append(f"data.num_workers={int(t['num_workers'])}")
    return overrides, t.get("log_dir")


def load_seed_config(path: str | Path) -> tuple[RunConfig, Path | None]:
    """(RunConfig, run directory from log_dir or None) of a reference-style JSON config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid JSON: {e}") from None
    overrides, log_dir = seed_overrides(values)
    config = apply_overrides(RunConfig(), overrides[:1])  # method first: it picks the model config class
    config = apply_overrides(config, overrides[1:])
    return config, (Path(log_dir) if log_dir else None)

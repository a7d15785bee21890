"""Named starting configs: `patchdiff train --preset NAME` (then key=value overrides on top).

Each preset is a list of overrides applied to the defaults, so `patchdiff config --preset NAME`
shows exactly what it sets.
"""

from __future__ import annotations

from patchdiffusion.config import ConfigError, RunConfig, apply_overrides
from patchdiffusion.methods.dimr import model_override

# name -> (what it is for, overrides)
PRESETS: dict[str, tuple[str, list[str]]] = {
    "patch-diffusion-celeba64": (
        "Wang et al.'s CelebA-64 recipe (DDPM++ widths on our U-Net; batch 256, lr 2e-4, dropout 0.05, "
        "real_p 0.5; sample with Heun, 50 steps) — a GPU job; set data.source to your CelebA-64 zip",
        [
            "method=patch_diffusion", "data.resolution=64", "data.hflip=false",
            "model.net.model_channels=128", "model.net.channel_mult=[1,2,2,2]", "model.net.num_res_blocks=4",
            "model.net.attention_resolutions=[16]", "model.net.dropout=0.05", "model.real_p=0.5",
            "train.batch_size=256", "train.lr=2e-4", "train.ema_halflife_kimg=500", "train.warmup_steps=40",
            "train.steps=800000", "train.precision=bf16", "sample.sampler=heun", "sample.num_steps=50",
        ],
    ),
    "patch-diffusion-cpu": (
        "Patch Diffusion small enough for a 2-core CPU: builtin textures at 32², a ~1.7M-parameter U-Net",
        [
            "method=patch_diffusion", "data.source=builtin:textures", "data.resolution=32",
            "model.net.model_channels=32", "model.net.channel_mult=[1,2,2]", "model.net.num_res_blocks=2",
            "model.net.attention_resolutions=[8]", "model.real_p=0.5", "train.batch_size=16", "train.lr=2e-3",
            "train.warmup_steps=50", "train.ema_halflife_kimg=2", "train.ema_rampup=0.2", "train.steps=3000",
            "sample.sampler=heun", "sample.num_steps=18",
        ],
    ),
    "patch-dm-cpu": (
        "Patch-DM small enough for a CPU: builtin textures at 128² (a 4×4 grid of 32² patches), a 1.1M-parameter "
        "collage U-Net, 64-d codes (init them with `patchdiff patchdm init-codes`), v-prediction (a CPU budget; the "
        "paper: ε); DDIM 50 steps, guidance 1.5, the window grid moved each step (grid_shift=random; the paper: fixed)",
        [
            "method=patch_dm", "data.source=builtin:textures?count=50", "data.resolution=128",
            "model.net.patch_size=32", "model.net.model_channels=16", "model.net.channel_mult=[1,2,5]",
            "model.net.num_res_blocks=1", "model.net.attention_resolutions=[8]", "model.net.code_dim=64",
            "model.prediction=v", "model.grid_shift=random", "model.latent.hidden=256", "model.latent.steps=3000",
            "model.latent.batch_size=256", "model.latent.lr=1e-3", "train.batch_size=8", "train.lr=2e-3",
            "train.warmup_steps=50", "train.ema_halflife_kimg=2", "train.ema_rampup=0.2", "train.steps=5000",
            "train.checkpoint_every=250",
            "train.sample_images=16", "sample.sampler=ddim", "sample.num_steps=50", "sample.guidance=1.5",
        ],
    ),
    "dimr-tiny-digits": (
        "DiMR-tiny (1.4M) class-conditional on builtin:digits at 16² for a CPU (benchmarks/dimr_class_conditioning.py); "
        "DPM-Solver++(2M) 25 steps, guidance 6",
        [
            "method=dimr", model_override("dimr-tiny", "dimr"), "data.source=builtin:digits", "data.resolution=16",
            "data.use_labels=true", "data.hflip=false", "train.batch_size=32", "train.lr=2e-3", "train.betas=[0.9,0.99]",
            "train.weight_decay=0.03", "train.warmup_steps=50", "train.ema_halflife_kimg=2", "train.ema_rampup=0.2",
            "train.steps=2500", "train.sample_images=20", "sample.num_steps=25", "sample.guidance=6",
        ],
    ),
}


def preset_config(name: str) -> RunConfig:
    """The RunConfig of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from: {', '.join(PRESETS)})")
    overrides = PRESETS[name][1]
    config = apply_overrides(RunConfig(), [o for o in overrides if o.startswith("method=")])
    return apply_overrides(config, [o for o in overrides if not o.startswith("method=")])

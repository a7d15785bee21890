"""Generate images from a run directory (the `patchdiff sample` command, callable from Python)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from patchdiffusion import run as runs
from patchdiffusion.config import ConfigError, RunConfig, load_config
from patchdiffusion.images import save_grid, save_png, to_uint8
from patchdiffusion.methods import build_method
from patchdiffusion.train import resolve_device, sample_with


@dataclass
class LoadedRun:
    config: RunConfig
    method: object
    net: torch.nn.Module
    checkpoint: runs.Checkpoint


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedRun:
    """Rebuild a run's model from its directory alone (config.yaml + latest checkpoint)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.RunError(f"run directory '{run_dir}' does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise runs.RunError(f"'{run_dir}' has no config.yaml; is it a run directory made by `patchdiff train`?")
    config = load_config(run_dir / "config.yaml")
    checkpoint = runs.latest_checkpoint(run_dir)
    if checkpoint is None:
        raise runs.RunError(f"run '{run_dir}' has no complete checkpoint yet")
    method = build_method(config.method, config.model, config.data.resolution)
    net = method.build_network()
    runs.load_into(net, runs.load_weights(checkpoint, "ema" if use_ema else "net"), str(checkpoint.path))
    return LoadedRun(config, method, net.to(device).eval(), checkpoint)


def generate_images(
    run_dir: str | Path,
    out_dir: str | Path,
    num: int = 16,
    seed: int = 0,
    batch_size: int = 16,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    class_label: int | None = None,
    height: int | None = None,
    width: int | None = None,
    device: str = "auto",
    use_ema: bool = True,
    progress: bool = True,
    **sampler_options: float,
) -> list[Path]:
    """Write `num` PNGs (seed, seed+1, ...) and grid.png into out_dir; image i depends on its seed only.

    `sampler_options` (S_churn, S_min, S_max, S_noise, eta) override the run's sample settings."""
    if num < 1:
        raise ConfigError("--num must be at least 1")
    device = resolve_device(device)
    loaded = load_run(run_dir, device, use_ema)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, tiles = [], []
    batches = range(0, num, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="sample", unit="batch")
    for start in batches:
        count = min(batch_size, num - start)
        labels = None
        if class_label is not None:
            labels = torch.full((count,), int(class_label), dtype=torch.long)
        images = sample_with(
            loaded.method, loaded.net, loaded.config, count, seed0=seed + start, device=device, labels=labels,
            sampler=sampler, steps=steps, guidance=guidance, height=height, width=width, **sampler_options,
        )
        for i, image in enumerate(to_uint8(images)):
            paths.append(save_png(image, out_dir / f"{seed + start + i:06d}.png"))
            if len(tiles) < 64:
                tiles.append(image)
    import numpy as np

    save_grid(np.stack(tiles), out_dir / "grid.png")
    return paths

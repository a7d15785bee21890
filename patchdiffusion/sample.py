"""Generate images from a trained method (the `patchdiff sample` command, callable from Python).

`sample_images` is the one place that turns a run's sample settings plus a caller's overrides into a
call of `Method.sample`; training uses it for its sample grids and SWD checks, `generate_images`
for files. Image i depends only on its seed, whatever the batch size.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import numpy as np
import torch

from patchdiffusion.config import RunConfig
from patchdiffusion.errors import ConfigError
from patchdiffusion.images import save_grid, save_png, to_uint8
from patchdiffusion.methods.base import check_sampler_options, sampler_option_names
from patchdiffusion.rng import SampleRNG, mix_seed
from patchdiffusion.run import LoadedRun, load_run
from patchdiffusion.runtime import resolve_device

SAMPLE_STREAM = 3  # image i is drawn from seed mix_seed(SAMPLE_STREAM, i)
GRID_NAME = "grid.png"  # the overview `generate_images` writes beside the images (evaluation skips it)


def image_rng(seeds, device) -> SampleRNG:
    """One generator per image, seeded by the image's seed alone."""
    return SampleRNG([mix_seed(SAMPLE_STREAM, int(seed)) for seed in seeds], device)


def split_options(method, sampler: str, values: dict) -> tuple[dict, dict]:
    """Caller options -> (options of the sampler, options of the method); a name neither takes is one line."""
    sampler_names = sampler_option_names(sampler)
    method_names = [f.name for f in dataclasses.fields(method.SampleOptions)]
    for_sampler, for_method = {}, {}
    for key, value in values.items():
        if key in sampler_names:
            for_sampler[key] = value
        elif key in method_names:
            for_method[key] = value
        else:
            close = difflib.get_close_matches(key, sampler_names + method_names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown sampling option '{key}'{hint}: sampler '{sampler}' takes {', '.join(sampler_names) or 'none'}"
                f"; method '{method.name}' takes {', '.join(method_names) or 'none'}"
            )
    return for_sampler, for_method


def sample_images(
    method,
    net: torch.nn.Module,
    config: RunConfig,
    num: int,
    seed0: int = 0,
    device: str | torch.device = "cpu",
    labels: torch.Tensor | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    sampler_options: dict | None = None,
    options=None,
    progress: bool = False,
) -> torch.Tensor:
    """`num` images (num, C, H, W) in [-1, 1] with seeds seed0, seed0 + 1, ...

    The run's sample settings (config.sample) apply unless overridden; its sampler options apply where
    the chosen sampler takes them. `sampler_options` given here must all belong to the sampler."""
    run = config.sample
    sampler = sampler or run.sampler or method.default_sampler
    check_sampler_options(sampler, sampler_options or {})
    from_run = {name: getattr(run, name) for name in sampler_option_names(sampler) if hasattr(run, name)}
    was_training = net.training
    net.eval()
    try:
        return method.sample(
            net, image_rng(range(seed0, seed0 + num), device), height, width, labels=labels, sampler=sampler,
            steps=steps or run.num_steps or None, guidance=run.guidance if guidance is None else guidance,
            sampler_options={**from_run, **(sampler_options or {})}, options=options, progress=progress,
        )
    finally:
        net.train(was_training)


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
    use_ema: bool | None = None,
    progress: bool = True,
    loaded: LoadedRun | None = None,
    **options,
) -> list[Path]:
    """Write `num` PNGs (seed, seed+1, ...) and grid.png into out_dir; image i depends on its seed only.

    `options`: the sampler's (e.g. S_churn, eta) and the method's (e.g. patch_batch) sampling options;
    a name neither takes is an error. use_ema None = the run's sample.use_ema."""
    if num < 1:
        raise ConfigError("--num must be at least 1")
    if batch_size < 1:
        raise ConfigError("--batch must be at least 1")
    device = resolve_device(device)
    if loaded is None:
        if use_ema is None:
            from patchdiffusion.config import load_config

            config_path = Path(run_dir) / "config.yaml"
            use_ema = load_config(config_path).sample.use_ema if config_path.is_file() else True
        loaded = load_run(run_dir, device, use_ema)
    method, config = loaded.method, loaded.config
    chosen_sampler = sampler or config.sample.sampler or method.default_sampler
    sampler_options, method_options = split_options(method, chosen_sampler, options)
    method_options = method.make_options(method_options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, tiles = [], []
    batches = range(0, num, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="sample", unit="batch")
    for start in batches:
        count = min(batch_size, num - start)
        labels = None if class_label is None else torch.full((count,), int(class_label), dtype=torch.long)
        images = sample_images(
            method, loaded.net, config, count, seed0=seed + start, device=device, labels=labels, sampler=sampler,
            steps=steps, guidance=guidance, height=height, width=width, sampler_options=sampler_options,
            options=method_options,
        )
        for i, image in enumerate(to_uint8(images)):
            paths.append(save_png(image, out_dir / f"{seed + start + i:06d}.png"))
            if len(tiles) < 64:
                tiles.append(image)
    save_grid(np.stack(tiles), out_dir / GRID_NAME)
    return paths

"""Generate images from a trained method (the `patchdiff sample` command, callable from Python).

`sample_images` is the one place that turns a run's sample settings plus a caller's overrides into a
call of `Method.sample`; training uses it for its sample grids and SWD checks, `generate_images`
for files. Image i depends only on its seed, whatever the batch size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from patchdiffusion.config import RunConfig
from patchdiffusion.diffusion.tiled import TilingConfig
from patchdiffusion.errors import ConfigError, did_you_mean
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
            raise ConfigError(
                f"unknown sampling option '{key}'{did_you_mean(key, sampler_names + method_names)}: sampler "
                f"'{sampler}' takes {', '.join(sampler_names) or 'none'}; method '{method.name}' takes "
                f"{', '.join(method_names) or 'none'}"
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


# ------------------------------------------------------------------------------------------------
# any size: canvases made of tiles, out of core, streamed to disk, resumable

IMAGE_FORMATS = ("png", "tiff")


def tiling_config(method, tile=None, overlap=None, window=None, grid=None, wrap=None, tile_batch=None,
                  seed: int = 0, passes=None, passes_last=None) -> TilingConfig:
    """The method's default tiling with the caller's choices on top (None = the method's). `tile` (N, "WxH"
    or (h, w)) and `overlap` (N or (h, w)) are in image pixels; a latent method tiles its latent canvas,
    so they are divided by its VAE's factor."""
    from patchdiffusion.config import parse_size

    base = method.default_tiling()
    factor = method.resolution[0] // method.native_tile[0]
    changes = {"seed": seed}
    if tile is not None:
        h, w = parse_size(tile)
        if h % factor or w % factor:
            raise ConfigError(f"tile {w}x{h} is not divisible by the VAE's factor {factor}")
        changes["tile"] = (h // factor, w // factor)
    if overlap is not None:
        h, w = (overlap, overlap) if isinstance(overlap, int) else tuple(overlap)
        changes["overlap"] = (h // factor, w // factor)
    for name, value in (("window", window), ("grid", grid), ("wrap", wrap), ("batch", tile_batch), ("passes", passes),
                        ("passes_last", passes_last)):
        if value is not None:
            changes[name] = value
    return dataclasses.replace(base, **changes)


def _digest(value) -> str:
    """A short fingerprint of a conditioning value (a tensor's bytes, else its repr)."""
    import hashlib

    if isinstance(value, torch.Tensor):
        return hashlib.sha256(value.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return repr(value)


def _job_key(loaded: LoadedRun, parts: dict) -> str:
    """What a canvas depends on besides the sampler's parameters: the weights and the method's settings."""
    import hashlib
    import json

    from patchdiffusion.config import to_dict

    manifest = loaded.checkpoint.path / "manifest.json"
    weights = manifest.read_bytes() if manifest.is_file() else str(loaded.checkpoint.path).encode()
    blob = json.dumps({"model": to_dict(loaded.config.model), **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(weights + blob).hexdigest()


def generate_canvases(
    run_dir: str | Path,
    out_dir: str | Path,
    num: int = 1,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    class_label: int | None = None,
    tiling: TilingConfig | None = None,
    storage: str = "auto",
    image_format: str = "png",
    checkpoint_every: int = 1,
    device: str = "auto",
    use_ema: bool | None = None,
    progress: bool = True,
    log=print,
    loaded: LoadedRun | None = None,
    **options,
) -> list[Path]:
    """Write `num` canvases of width × height (canvas i from seed + i: its noise and its moving tile grid)
    made of tiles of the model's size,
    with the canvas in memory or on disk (`storage`: auto | memory | disk) and the image streamed out
    (`image_format`: png, or tiff for a tiled BigTIFF). Each canvas is a resumable job: killed and run
    again with the same arguments, it continues from its last checkpoint (every `checkpoint_every`
    steps) and gives the same image bit for bit. `tiling`: the method's default tiling when None."""
    from patchdiffusion.canvas import (job_digest, job_parameters, sample_canvas, tiled_decode, write_atomic, write_png,
                                       write_png_strips, write_tiff, write_tiff_strips)

    if num < 1:
        raise ConfigError("--num must be at least 1")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    device = resolve_device(device)
    if loaded is None:
        loaded = load_run(run_dir, device, use_ema)
    method, config, net = loaded.method, loaded.config, loaded.net
    height, width = height or config.data.resolution[0], width or config.data.resolution[1]
    sampler = sampler or config.sample.sampler or method.default_sampler
    sampler_options, method_options = split_options(method, sampler, options)
    method_options = method.make_options(method_options)
    tiling = tiling or tiling_config(method)
    method.check_tiling(height, width, tiling, net, method_options)  # one line before any work
    steps = steps or config.sample.num_steps or method.default_steps
    guidance = config.sample.guidance if guidance is None else guidance
    from_run = {name: getattr(config.sample, name) for name in sampler_option_names(sampler)
                if hasattr(config.sample, name)}
    run_options = {**from_run, **method.sampler_defaults(sampler), **sampler_options}
    sigmas = method.sampling_sigmas(steps)
    shape = (1, *method.canvas_shape(height, width))
    factor = height // shape[2]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"sampling {num} canvas{'es' if num != 1 else ''} of {width}x{height} ({steps} {sampler} steps, guidance "
        f"{guidance}, tiles {tiling.tile or method.native_tile} window {tiling.window} grid {tiling.grid}"
        f"{f' x{tiling.passes} passes' if tiling.passes > 1 else ''}"
        f"{f' in the last {tiling.passes_last} steps' if tiling.passes > 1 and tiling.passes_last else ''}"
        f"{' wrapped' if tiling.wrap else ''}, canvas storage {storage}) into {out_dir}")
    paths = []
    for i in range(num):
        image_seed = seed + i
        rng = image_rng([image_seed], device)
        labels = None if class_label is None else torch.full((1,), int(class_label), dtype=torch.long)
        cond = method.sampling_condition(net, rng, labels, method_options)
        # The moving grid's offsets are keyed by the image's own seed, like its noise: canvas i is the same
        # whatever --num, and two canvases never share their grids' lines.
        image_tiling = dataclasses.replace(tiling, seed=image_seed)
        denoiser = method.tiled_denoiser(net, method_options, guidance, image_tiling, device=device)
        path = out_dir / f"{image_seed:06d}.{image_format}"

        def save(x, path=path):
            if factor > 1:  # a latent canvas: decoded tile by tile, blended, streamed
                strips = tiled_decode(method.decode, x, factor, denoiser.tile, denoiser.overlap, device=device,
                                      wrap=tiling.wrap)
                writer = write_png_strips if image_format == "png" else write_tiff_strips
                writer(path, strips, height, width)
            else:  # to_uint8's rounding clamps to [-1, 1], as the method's decode would
                (write_png if image_format == "png" else write_tiff)(path, x)

        job_key = _job_key(loaded, {"options": repr(method_options), "cond": {k: _digest(v) for k, v in cond.items()},
                                    "guidance": guidance, "format": image_format, "size": [height, width]})
        noise_seed = mix_seed(SAMPLE_STREAM, image_seed)
        # A canvas this command already finished (a rerun after a kill part way through --num) is kept:
        # its record holds the digest of every parameter it was made with.
        finished = out_dir / f".done-{image_seed:06d}"
        digest = job_digest(job_parameters(sampler, denoiser, shape, sigmas, noise_seed, cond, run_options, job_key))
        if path.is_file() and finished.is_file() and finished.read_text().strip() == digest:
            log(f"{path.name}: already made by this command, kept (remove it to make it again)")
            paths.append(path)
            continue
        finished.unlink(missing_ok=True)
        sample_canvas(sampler, denoiser, shape, sigmas, seeds=noise_seed, extra_args=cond,
                      options=run_options, storage=storage, folder=out_dir, job=out_dir / f".job-{image_seed:06d}",
                      checkpoint_every=checkpoint_every, job_key=job_key, save=save, output_folder=out_dir,
                      progress=progress, log=log)
        write_atomic(finished, digest + "\n")
        paths.append(path)
    return paths

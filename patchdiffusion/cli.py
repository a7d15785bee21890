"""`patchdiff` command line: a thin layer over the Python API.

    patchdiff train  [--method M] [--data SRC] [--run DIR] [--resume] [key=value ...]
    patchdiff sample --run DIR --num N --seed S [--sampler heun] [--steps 18] --out DIR
    patchdiff data convert --source SRC --dest X.zip|X.lmdb|DIR [--resolution WxH] [--transform center-crop]
    patchdiff eval --images DIR|RUN --ref DATA|REF.npz [--metrics fid,kid,is,pr,swd]
    patchdiff config [--method M | --preset P | --list-presets]   every config key with its default
    patchdiff bench NAME                   speed/memory benchmarks (ratios measured side by side)
    patchdiff demo                         train a patch method for minutes, then a large seamless image + report
    patchdiff compare --methods A,B,...    several methods, one data set and budget, one report
and each method's own tools (e.g. `patchdiff train-codes`), listed by `patchdiff --help`.

The CLI knows no method by name: a method's extra options, tools, presets and architectures come
from its class (methods/base.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from pathlib import Path

from patchdiffusion.config import number_arg, positive_int, seed_int, size_arg
from patchdiffusion.errors import ConfigError, TrainingDiverged, UserError, did_you_mean

EPILOG_TRAIN = """\
Any config value can be set as key=value (or --key value): a full dotted path such as
train.lr=1e-4 or model.net.channel_mult=[1,2,2], or just the last part when it is unique
(lr=1e-4, patch_size=4). `patchdiff config --method M` prints every key with its default.

examples:
  patchdiff train --data builtin:textures --resolution 32 steps=2000
  patchdiff train --method METHOD --resolution 64 --run runs/mine lr=1e-4
  patchdiff train --preset NAME --run runs/mine        (patchdiff config --list-presets)
  patchdiff train --run runs/mine --resume steps=4000
  torchrun --standalone --nproc_per_node 2 -m patchdiffusion.cli train --run-dir runs/ddp ...
  (under torchrun write --run-dir: torchrun itself would take --run as its --run-path)
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (the usage is one `--help` away)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _split_overrides(extra: list[str]) -> list[str]:
    """key=value words and unknown `--key value` / `--key=value` flags become overrides."""
    overrides, i = [], 0
    while i < len(extra):
        word = extra[i]
        if word.startswith("--"):
            key = word[2:].replace("-", "_")
            if "=" in key:
                overrides.append(key)
            elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                overrides.append(f"{key}={extra[i + 1]}")
                i += 1
            else:
                overrides.append(f"{key}=true")
        elif "=" in word:
            overrides.append(word)
        else:
            raise ConfigError(f"unexpected argument '{word}' (config values are written key=value)")
        i += 1
    return overrides


def _refuse_extra(extra: list[str], parser: argparse.ArgumentParser) -> None:
    """One line for an argument the command does not take, with the closest flag it does take."""
    if not extra:
        return
    word = extra[0]
    flags = [s for action in parser._actions for s in action.option_strings]
    raise ConfigError(f"unknown argument '{word}'{did_you_mean(word.split('=')[0], flags)}")


# ------------------------------------------------------------------------------------------------
# flags made from option dataclasses (a method's SampleOptions) and from the samplers' signatures


def _flag_type(annotation, metadata: dict):
    """The argparse type of an option field: int/float (bounded by metadata min) or str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = args[0]
    if kind is int:
        return number_arg(int, minimum=metadata.get("min"))
    if kind is float:
        return number_arg(float, minimum=metadata.get("min"))
    return str


def _method_option_fields() -> dict[str, list[tuple[str, dataclasses.Field, typing.Any]]]:
    """Every method's sampling options by name -> [(method, field, annotation)] of the methods that take it."""
    from patchdiffusion.registry import method_classes

    fields: dict[str, list[tuple[str, dataclasses.Field, typing.Any]]] = {}
    for cls in method_classes():
        hints = typing.get_type_hints(cls.SampleOptions)
        for f in dataclasses.fields(cls.SampleOptions):
            if f.metadata.get("cli", True) is not False:
                fields.setdefault(f.name, []).append((cls.name, f, hints[f.name]))
    return fields


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (each applies to the methods named in its help)")
    for name, owners in _method_option_fields().items():
        _, first, annotation = owners[0]
        minimum = min((f.metadata.get("min", 0) for _, f, _ in owners), default=None)
        group.add_argument(
            "--" + name.replace("_", "-"), dest=f"method_option.{name}", metavar=name.upper(), default=None,
            type=_flag_type(annotation, {**first.metadata, "min": minimum}), choices=first.metadata.get("choices"),
            help="; ".join(f"{method}: {f.metadata.get('help', '')}" for method, f, _ in owners),
        )


def _add_sampler_options(parser: argparse.ArgumentParser) -> None:
    import inspect

    from patchdiffusion.diffusion.samplers import SAMPLERS
    from patchdiffusion.methods.base import sampler_option_names

    group = parser.add_argument_group("sampler options (each applies to the samplers named in its help)")
    owners: dict[str, list[str]] = {}
    for sampler in SAMPLERS:
        for name in sampler_option_names(sampler):
            owners.setdefault(name, []).append(sampler)
    for name, samplers in owners.items():
        default = inspect.signature(SAMPLERS[samplers[0]]).parameters[name].default
        kind = number_arg(float, minimum=0, maximum=SAMPLER_MAXIMA.get(name, 1e6)) if isinstance(default, float) else str
        group.add_argument(f"--{name}", dest=f"sampler_option.{name}", metavar=name.upper(), type=kind, default=None,
                           choices=SAMPLER_CHOICES.get(name), help=f"{'/'.join(samplers)} (default {default})")


def _add_tiling_options(parser: argparse.ArgumentParser) -> None:
    from patchdiffusion.diffusion.tiled import GRIDS, WINDOWS

    group = parser.add_argument_group(
        "any size: a --size other than the training size (or any flag below) makes each image a canvas of tiles "
        "of the model's size, in bounded memory, streamed to disk, resumable (see docs/any_size.md)")
    group.add_argument("--tile", type=size_arg, help="tile size N or WxH (default: the model's training size)")
    group.add_argument("--overlap", type=number_arg(int, minimum=0, maximum=1 << 20),
                       help="pixels shared by neighbouring tiles (default: the method's, a quarter of the tile)")
    group.add_argument("--window", choices=WINDOWS, help="how overlapping tiles are blended (default: the method's)")
    group.add_argument("--grid", choices=GRIDS, help="fixed tile grid, or a random offset at every step "
                                                     "(default: the method's)")
    group.add_argument("--passes", type=number_arg(int, minimum=1, maximum=64),
                       help="average K tile grids at different offsets at each step: fewer seams, K times the "
                            "tile calls (default 1)")
    group.add_argument("--passes-last", type=number_arg(int, minimum=0, maximum=1 << 20), metavar="N",
                       help="use --passes only in the last N steps, where fine detail and seams form (default 0: "
                            "every step)")
    group.add_argument("--wrap", action="store_true", help="seamless texture: tiles wrap around the canvas edges")
    group.add_argument("--tile-batch", type=number_arg(int, minimum=1, maximum=1 << 16),
                       help="tiles per network call: peak memory grows with it (default 4)")
    group.add_argument("--canvas", choices=("auto", "memory", "disk"),
                       help="keep the canvas and the sampler's state in RAM or in files (auto: by size)")
    group.add_argument("--format", choices=("png", "tiff"), help="png, or tiff for a tiled BigTIFF (huge canvases)")
    group.add_argument("--checkpoint-every", type=number_arg(int, minimum=1, maximum=1e6),
                       help="checkpoint the canvas every K steps; rerun the same command after a kill or Ctrl-C "
                            "to resume (finished canvases are kept) (default 1)")


SAMPLER_CHOICES = {"variance": ("small", "large", "learned")}  # the string-valued sampler options
SAMPLER_MAXIMA = {"eta": 1.0, "S_noise": 10.0}  # beyond these the sampler's formulas stop making sense


def _collected(args, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in vars(args).items()
            if key.startswith(prefix) and value is not None}


# ------------------------------------------------------------------------------------------------
# train


def cmd_train(args, extra: list[str]) -> int:
    from patchdiffusion.config import RunConfig, apply_overrides, load_config
    from patchdiffusion.train import prepare_run, train

    overrides = _split_overrides(extra)
    flags = []
    for value, key in ((args.method, "method"), (args.data, "data.source"), (args.resolution, "data.resolution"),
                       (args.steps, "train.steps"), (args.batch, "train.batch_size"), (args.device, "train.device"),
                       (args.minutes, "train.max_minutes"), (args.vae, "model.vae_path")):
        if value is not None:
            flags.append(f"{key}={value}")
    if args.latents:
        flags.append("model.latent=true")

    run_dir = Path(args.run) if args.run else None
    if args.resume:
        if run_dir is None:
            raise ConfigError("--resume needs --run DIR (the run to continue)")
        if args.model or args.preset or args.config:
            raise ConfigError("--model, --preset and --config set up a new run; a resumed run keeps its own")
        config = prepare_run(None, run_dir, resume=True, overrides=flags + overrides)
    else:
        if args.config and args.preset:
            raise ConfigError("give --config or --preset, not both")
        if args.preset:
            from patchdiffusion.presets import preset_config

            config = preset_config(args.preset)
        elif args.config and not args.config.lower().endswith((".yaml", ".yml")):
            from patchdiffusion.methods import read_foreign_config

            config, named_run_dir = read_foreign_config(args.config)  # a method's own format (e.g. JSON)
            run_dir = run_dir or named_run_dir
        else:
            config = load_config(args.config) if args.config else RunConfig()
        config = apply_overrides(config, [f for f in flags if f.startswith("method=")])
        if args.model:  # the architecture first, so key=value overrides can still change it
            from patchdiffusion.registry import method_class

            config = apply_overrides(config, method_class(config.method).architecture_overrides(args.model))
        config = apply_overrides(config, [f for f in flags if not f.startswith("method=")] + overrides)
        if run_dir is None:
            run_dir = Path("runs") / f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        elif (run_dir / "config.yaml").exists() and not args.force:
            raise ConfigError(f"'{run_dir}' already holds a run; add --resume to continue it or --force to restart")
    try:
        train(config, run_dir, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"stopped; continue with: patchdiff train --run {run_dir} --resume", file=sys.stderr)
        return 130
    return 0


def add_train_parser(sub) -> None:
    from patchdiffusion.registry import method_names

    p = sub.add_parser("train", help="train a model (new run or --resume)", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config file to start from: YAML, or a method's own format (e.g. "
                                    "Patch-based DDPM's JSON); defaults otherwise")
    p.add_argument("--preset", help="named starting config (see `patchdiff config --list-presets`)")
    p.add_argument("--method", choices=method_names(), help="method (default: full)")
    p.add_argument("--data", help="data source: folder, .zip, .lmdb, or builtin:textures|photos|digits")
    p.add_argument("--resolution", type=size_arg, help="training size: N or WxH")
    p.add_argument("--run", "--run-dir", dest="run", help="run directory (default: runs/METHOD-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start a new run even if --run already holds one")
    p.add_argument("--steps", type=positive_int, help="total optimizer steps (train.steps)")
    p.add_argument("--batch", type=number_arg(int, minimum=1, maximum=1e6), help="global batch size (train.batch_size)")
    p.add_argument("--minutes", type=number_arg(float, above=0, maximum=1e7),
                   help="stop after this much wall time (train.max_minutes)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--latents", action="store_true", help="train on VAE latents (methods with model.latent; needs --vae)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory (model.vae_path)")
    p.add_argument("--model", help="a named architecture of the method (" + _architecture_list() + ")")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _architecture_list() -> str:
    from patchdiffusion.registry import method_classes

    named = [f"{cls.name}: {', '.join(cls.architectures)}" for cls in method_classes() if cls.architectures]
    return "; ".join(named) or "none"


# ------------------------------------------------------------------------------------------------
# sample


def cmd_sample(args, extra: list[str]) -> int:
    from patchdiffusion.config import parse_size
    from patchdiffusion.sample import generate_canvases, generate_images, tiling_config

    _refuse_extra(extra, args.parser)
    height = width = None
    if args.size:
        height, width = parse_size(args.size)
    out = args.out or str(Path(args.run) / "generated")
    options = {**_collected(args, "sampler_option."), **_collected(args, "method_option.")}
    common = dict(num=args.num, seed=args.seed, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                  class_label=args.class_label, height=height, width=width, device=args.device,
                  use_ema=False if args.no_ema else None, progress=not args.no_progress)
    tile_flags = (args.tile, args.overlap, args.window, args.grid, args.tile_batch, args.canvas, args.format,
                  args.checkpoint_every, args.passes, args.passes_last)
    if any(flag is not None for flag in tile_flags) or args.wrap or _other_size(args.run, height, width):
        from patchdiffusion.run import load_run
        from patchdiffusion.runtime import resolve_device

        loaded = load_run(args.run, resolve_device(args.device), False if args.no_ema else None)
        tiling = tiling_config(loaded.method, args.tile, args.overlap, args.window, args.grid,
                               True if args.wrap else None, args.tile_batch, passes=args.passes,
                               passes_last=args.passes_last)
        try:
            paths = generate_canvases(args.run, out, tiling=tiling, storage=args.canvas or "auto",
                                      image_format=args.format or "png", checkpoint_every=args.checkpoint_every or 1,
                                      loaded=loaded, **common, **options)
        except KeyboardInterrupt:
            every = args.checkpoint_every or 1
            print(f"stopped; the same command continues: finished canvases in {out} are kept, the one in progress "
                  f"resumes from its last checkpoint (every {f'{every} steps' if every > 1 else 'step'})",
                  file=sys.stderr)
            return 130
        print(f"wrote {len(paths)} canvas{'es' if len(paths) != 1 else ''} to {out}")
        return 0
    paths = generate_images(args.run, out, batch_size=args.batch, **common, **options)
    print(f"wrote {len(paths)} images and grid.png to {out}")
    return 0


def _other_size(run_dir: str, height: int | None, width: int | None) -> bool:
    """Whether --size asks for something other than the run's training size (then it is made from tiles)."""
    from patchdiffusion.config import load_config

    if height is None:
        return False
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        return False  # generate_images says what is wrong with the run directory
    return (height, width) != tuple(load_config(config_path).data.resolution)


def add_sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate images from a run directory")
    p.add_argument("--run", required=True, help="run directory made by `patchdiff train`")
    p.add_argument("--num", type=number_arg(int, minimum=1, maximum=1e8), default=16, help="number of images (default 16)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the first image; image i uses seed+i")
    p.add_argument("--sampler", choices=["heun", "euler", "ddim", "ddpm", "dpmpp_2m"],
                   help="sampler (default: the run's sample.sampler, else the method's)")
    p.add_argument("--steps", type=number_arg(int, minimum=1, maximum=1e6), help="sampling steps (default: the method's)")
    p.add_argument("--guidance", "--cfg-scale", dest="guidance", type=number_arg(float, minimum=0, maximum=1e3),
                   help="classifier-free guidance scale (1 = off)")
    p.add_argument("--class", dest="class_label", type=number_arg(int, minimum=0, maximum=1 << 24),
                   help="class label to generate")
    p.add_argument("--size", type=size_arg, help="canvas size N or WxH (default: the training size)")
    p.add_argument("--batch", type=number_arg(int, minimum=1, maximum=1e6), default=16,
                   help="images per batch (memory), does not change results")
    p.add_argument("--out", help="output folder (default: RUN/generated)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--no-progress", action="store_true")
    _add_tiling_options(p)
    _add_sampler_options(p)
    _add_method_options(p)
    p.set_defaults(func=cmd_sample, parser=p)


# ------------------------------------------------------------------------------------------------
# data, config, bench, demo


def cmd_data(args, extra: list[str]) -> int:
    from patchdiffusion.config import parse_size
    from patchdiffusion.data.convert import convert_dataset

    if args.data_command != "convert":
        args.data_parser.print_help()
        return 2
    _refuse_extra(extra, args.data_parser)
    resolution = None
    if args.resolution:
        height, width = parse_size(args.resolution)
        resolution = (width, height)  # the data layer's (width, height)
    summary = convert_dataset(
        args.source, args.dest, resolution=resolution, transform=args.transform, progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(summary)
    return 0


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare data sets")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=OneLineParser)
    c = data_sub.add_parser(
        "convert", help="convert images between folder / zip / lmdb / built-in sets",
        description="Convert a data set. Bad files (unreadable, truncated, too small) are skipped and listed; "
        "grayscale, RGBA, palette and 16-bit images are converted to 8-bit RGB. The output is written "
        "under a temporary name and renamed only when complete.",
    )
    c.add_argument("--source", required=True, help="folder, .zip, .lmdb, or builtin:NAME")
    c.add_argument("--dest", required=True, help="output: X.zip, X.lmdb, or a folder")
    c.add_argument("--resolution", type=size_arg, help="output size N or WxH (default: keep each image's size)")
    c.add_argument("--transform", default="center-crop", choices=["center-crop", "resize"])
    c.add_argument("--overwrite", action="store_true", help="replace an existing --dest")
    c.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_data, data_parser=p)


def cmd_config(args, extra: list[str]) -> int:
    import yaml

    from patchdiffusion.config import RunConfig, apply_overrides, to_dict
    from patchdiffusion.presets import PRESETS, preset_config
    from patchdiffusion.registry import method_class

    if args.list_presets:
        for name, (text, _) in PRESETS.items():
            print(f"{name:26s} {text}")
        return 0
    if args.preset:
        config = apply_overrides(preset_config(args.preset), _split_overrides(extra))
    else:
        config = apply_overrides(RunConfig(), [f"method={args.method}"] + _split_overrides(extra))
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    options = dataclasses.fields(method_class(config.method).SampleOptions)
    if options:
        print(f"# sampling options of {config.method} (patchdiff sample --NAME; default: the run's model config):")
        for f in options:
            flag = f"--{f.name.replace('_', '-')}" if f.metadata.get("cli", True) else f"{f.name} (Python API)"
            print(f"#   {flag}: {f.metadata.get('help', '')}")
    return 0


def add_config_parser(sub) -> None:
    from patchdiffusion.config import RunConfig
    from patchdiffusion.registry import method_names

    p = sub.add_parser("config", help="print a method's default config (every key) as YAML")
    p.add_argument("--method", default=RunConfig.method, choices=method_names())
    p.add_argument("--preset", help="print a named preset instead of a method's defaults")
    p.add_argument("--list-presets", action="store_true", help="list the named presets")
    p.set_defaults(func=cmd_config)


def cmd_bench(args, extra: list[str]) -> int:
    from patchdiffusion.benchmarking import BENCHMARKS, run_benchmark

    if args.help and args.name:
        return run_benchmark(args.name, ["--help"])
    if args.help:
        args.bench_parser.print_help()
        return 0
    if not args.name:
        print("benchmarks:")
        for name, (_, text) in BENCHMARKS.items():
            print(f"  {name:20s} {text}")
        return 0
    return run_benchmark(args.name, extra)


def add_bench_parser(sub) -> None:
    # --help after a name belongs to that benchmark's own parser, so this one adds its -h itself
    p = sub.add_parser("bench", help="run a benchmark (no name: list them)", add_help=False)
    p.add_argument("name", nargs="?", help="benchmark name (patchdiff bench NAME --help: its options)")
    p.add_argument("-h", "--help", action="store_true", help="show this help (or NAME's) and exit")
    p.set_defaults(func=cmd_bench, bench_parser=p)


def cmd_demo(args, extra: list[str]) -> int:
    from patchdiffusion.demo import run_demo

    run_demo(
        out_dir=args.out, minutes=args.minutes, method=args.method, device=args.device, data=args.data,
        progress=not args.no_progress, overrides=_split_overrides(extra), canvas_size=args.canvas_size,
        canvas_class=args.canvas_class, num_samples=args.samples,
    )
    return 0


def add_demo_parser(sub) -> None:
    from patchdiffusion.demo import DEFAULT_CANVAS, DEFAULT_CANVAS_CLASS, DEFAULT_METHOD, DEFAULT_MINUTES
    from patchdiffusion.demo import DEFAULT_SAMPLES, RECIPES

    p = sub.add_parser(
        "demo", help="train a patch method for a few minutes, then make a large seamless image and a report",
        description=f"Train a patch-based diffusion model on built-in textures for a few minutes of wall time, "
                    f"then sample small images (SWD against held-out real crops, beside the real-vs-real floor "
                    f"and uniform noise) and one {DEFAULT_CANVAS}x{DEFAULT_CANVAS} canvas made from tiles of the "
                    f"training size in bounded memory (seam score, peak memory). Writes OUT/report.html "
                    f"(self-contained), report.md, canvas.png, samples_vs_real.png, loss.png, summary.json and "
                    f"the run directory OUT/run. Extra key=value arguments override the run's config.",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--minutes", type=number_arg(float, above=0, maximum=1e7), default=DEFAULT_MINUTES,
                   help=f"training wall-time budget in minutes (default {DEFAULT_MINUTES:g}: the whole demo, install "
                        f"included, then fits in 8 minutes on 2 idle CPU cores)")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(RECIPES),
                   help=f"which method to train (default {DEFAULT_METHOD}: the best images in the budget, see "
                        f"the README); each has a small CPU recipe")
    p.add_argument("--data", default="builtin:textures", help="data source (default builtin:textures)")
    p.add_argument("--canvas-class", default=None, metavar="NAME",
                   help=f"the class of the large canvas, for a labelled built-in set: a texture family "
                        f"(red-brick, green-grass, sand-gravel, stained-tissue, deep-field; default "
                        f"{DEFAULT_CANVAS_CLASS})")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # For tests and quick looks: a smaller large canvas and fewer measured samples.
    p.add_argument("--canvas-size", type=number_arg(int, minimum=1, maximum=1 << 20), default=DEFAULT_CANVAS,
                   help=argparse.SUPPRESS)
    p.add_argument("--samples", type=number_arg(int, minimum=1, maximum=1 << 20), default=DEFAULT_SAMPLES,
                   help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_demo)


EPILOG_COMPARE = """\
Each method trains on the network its class picks for a comparison (about the same parameters and FLOPs
for all; results.json lists each one's settings), with the same batch, learning
rate, EMA and budget, in its own process with one thread. A run directory in --methods is evaluated as
it is. Extra key=value words apply to every method trained here, METHOD:key=value to one of them.

Interrupted (Ctrl-C, a kill, a crash), the same command resumes: finished methods are not trained or
evaluated again, a half-trained one continues from its last checkpoint.

Writes OUT/results.json (every figure with its unit, the machine, the command), OUT/report.md and
OUT/report.html (self-contained), OUT/METHOD/{samples.png, large/, log.txt, run/}.

examples:
  patchdiff compare --methods {methods} \\
      --data builtin:textures --resolution 32 --cpu-minutes 10 --out runs/compare --jobs 2
  patchdiff compare --methods {first},runs/mine --data builtin:textures --resolution 32 --cpu-minutes 5 --out cmp
"""


def cmd_compare(args, extra: list[str]) -> int:
    from patchdiffusion.compare import CompareSettings, run_comparison

    settings = CompareSettings(
        methods=[m for m in args.methods.split(",") if m.strip()], data=args.data, resolution=args.resolution,
        cpu_minutes=args.cpu_minutes, large_size=args.large_size, held_out=args.held_out, inception=args.inception,
        images=args.images, curve_images=args.curve_images, curve_points=args.curve_points,
        memory_batch=args.memory_batch, overrides=_split_overrides(extra),
    )
    import shlex

    # The command as it could be typed again (every option spelled out, defaults included), for the report.
    flags = [("--methods", args.methods), ("--data", args.data), ("--resolution", args.resolution),
             ("--cpu-minutes", f"{args.cpu_minutes:g}"), ("--out", args.out), ("--large-size", args.large_size),
             ("--held-out", args.held_out), ("--inception", args.inception), ("--jobs", args.jobs),
             ("--images", args.images), ("--curve-images", args.curve_images), ("--curve-points", args.curve_points),
             ("--memory-batch", args.memory_batch)]
    words = [w for flag, value in flags if value is not None for w in (flag, str(value))] + list(extra)
    command = "patchdiff compare " + " ".join(shlex.quote(w) for w in words)
    results = run_comparison(settings, args.out, jobs=args.jobs, progress=not args.no_progress, command=command)
    for label, record in results["entries"].items():
        print(f"{label:18s} SWD {record['quality']['swd']['value']:7.1f}  "
              f"{record['sampling']['train_size']['cpu_seconds_per_image']['value']:.2f} CPU s/image  "
              f"seam {record['seams']['at_grid']['value']:.3f} on the grid, {record['seams']['worst']['value']:.3f} worst")
    for claim in results["claims"]:
        print(f"claim ({claim['method']}): {claim['claim']} -> {claim['verdict']}")
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def add_compare_parser(sub) -> None:
    from patchdiffusion.registry import method_names

    names = method_names()
    p = sub.add_parser(
        "compare", help="train and evaluate several methods on the same data, budget and metrics; one report",
        description="Train several methods on the same data and resolution with the same CPU budget, evaluate\n"
                    "them with the same metrics (SWD; FID/KID/PR with an Inception file; sampling time and memory;\n"
                    "seams of a large canvas) and write results.json, report.md and report.html.",
        epilog=EPILOG_COMPARE.replace("{methods}", ",".join(names)).replace("{first}", names[0]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", required=True, help="comma-separated method names and/or run directories")
    p.add_argument("--data", default="builtin:textures", help="training data (default builtin:textures)")
    p.add_argument("--resolution", type=size_arg, default="32", help="training size N or WxH (default 32)")
    p.add_argument("--cpu-minutes", type=number_arg(float, above=0, maximum=1e6), default=10.0,
                   help="training budget per method: CPU minutes inside training steps (default 10)")
    p.add_argument("--out", required=True, help="output folder (the same folder resumes a comparison)")
    p.add_argument("--large-size", type=size_arg, default=None,
                   help="canvas for large-image time, memory and seams, WxH (default 4× the training size)")
    p.add_argument("--held-out", default=None,
                   help="real images to evaluate against (default: a built-in set drawn with the next seed; "
                        "other data sets need this, or the training images are used and the report says so)")
    p.add_argument("--inception", default=None, help="Inception-v3 weights file: adds FID, KID, precision/recall")
    p.add_argument("--jobs", type=number_arg(int, minimum=1, maximum=256), default=1,
                   help="methods trained at once, one process and one thread each (default 1)")
    p.add_argument("--images", type=number_arg(int, minimum=2, maximum=1e6), default=256,
                   help="samples (and real images) of the final evaluation (default 256)")
    p.add_argument("--curve-images", type=number_arg(int, minimum=2, maximum=1e6), default=64,
                   help="samples per point of the quality-vs-CPU-time curve (default 64)")
    p.add_argument("--curve-points", type=number_arg(int, minimum=1, maximum=1000), default=4,
                   help="training segments of equal CPU time, an SWD point after each (default 4)")
    p.add_argument("--memory-batch", type=number_arg(int, minimum=1, maximum=1e6), default=16,
                   help="images sampled at once for the memory figure at the training size (default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)


# ------------------------------------------------------------------------------------------------
# methods' own tools


def add_method_commands(sub) -> None:
    """Each method's `commands` (methods/base.py Command); 'group name' nests under a group parser."""
    from patchdiffusion.registry import method_classes

    groups: dict[str, typing.Any] = {}
    for cls in method_classes():
        for command in cls.commands:
            words = command.name.split()
            parent = sub
            if len(words) == 2:
                if words[0] not in groups:
                    group = sub.add_parser(words[0], help=f"{cls.name} tools")
                    groups[words[0]] = group.add_subparsers(dest=f"{words[0]}_command", metavar="ACTION",
                                                            parser_class=OneLineParser)
                    group.set_defaults(func=_group_help(group))
                parent = groups[words[0]]
            p = parent.add_parser(words[-1], help=command.help, description=command.help)
            command.add_arguments(p)
            p.set_defaults(func=_run_command(command, p))


def _group_help(parser):
    def show(args, extra):
        parser.print_help()
        return 2

    return show


def _run_command(command, parser):
    def run(args, extra):
        _refuse_extra(extra, parser)
        return command.run(args)

    return run


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="patchdiff", description="Train, sample and evaluate patch-based diffusion models.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    # allow_abbrev=False: --batch must not swallow --batch_size
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_no_abbrev(OneLineParser))
    add_train_parser(sub)
    add_sample_parser(sub)
    add_data_parser(sub)
    from patchdiffusion.eval.cli import register as register_eval

    register_eval(sub)
    add_config_parser(sub)
    add_bench_parser(sub)
    add_demo_parser(sub)
    add_compare_parser(sub)
    add_method_commands(sub)
    return parser


def _no_abbrev(cls):
    class NoAbbrev(cls):
        def __init__(self, *args, **kwargs):
            kwargs["allow_abbrev"] = False
            super().__init__(*args, **kwargs)

    return NoAbbrev


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # --help, or a bad command line already reported in one line
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args, extra) or 0
    except UserError as e:  # every layer's errors meant for the user (ConfigError, DataError, RunError, ...)
        print(f"patchdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:  # a training divergence is a user-facing outcome, not a crash
        print(f"patchdiff train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (commands that can continue say how)
        print(f"patchdiff {args.command}: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

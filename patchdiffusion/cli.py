"""`patchdiff` command line: a thin layer over the Python API.

    patchdiff train  [--method M] [--data SRC] [--run DIR] [--resume] [key=value ...]
    patchdiff sample --run DIR --num N --seed S [--sampler heun] [--steps 18] --out DIR
    patchdiff patchdm init-codes --data D --clip PATH --out codes.safetensors   Patch-DM's CLIP-initialised codes
    patchdiff train-codes --run DIR        Patch-DM's latent code model
    patchdiff data convert --source SRC --dest X.zip|X.lmdb|DIR [--resolution WxH] [--transform center-crop]
    patchdiff config [--method M]          print a method's full default config as YAML
    patchdiff bench NAME                   speed/memory benchmarks (ratios measured side by side)
    patchdiff demo                         train a small model on built-in data, sample, report
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EPILOG_TRAIN = """\
Any config value can be set as key=value (or --key value): a full dotted path such as
train.lr=1e-4 or model.net.channel_mult=[1,2,2], or just the last part when it is unique
(lr=1e-4, patch_size=4). `patchdiff config --method M` prints every key with its default.

examples:
  patchdiff train --data builtin:textures --resolution 32 steps=2000
  patchdiff train --method patching --patch_size 4 --resolution 64 --run runs/luhman
  patchdiff train --run runs/luhman --resume steps=4000
  torchrun --standalone --nproc_per_node 2 -m patchdiffusion.cli train --run-dir runs/ddp ...
  (under torchrun write --run-dir: torchrun itself would take --run as its --run-path)
"""


def _user_errors():
    from patchdiffusion.config import ConfigError
    from patchdiffusion.run import RunError

    errors = [ConfigError, RunError]
    try:
        from patchdiffusion.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def _split_overrides(extra: list[str]) -> list[str]:
    """key=value words and unknown `--key value` / `--key=value` flags become overrides."""
    from patchdiffusion.config import ConfigError

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


# ------------------------------------------------------------------------------------------------


def cmd_train(args, extra: list[str]) -> int:
    from patchdiffusion.config import RunConfig, apply_overrides, load_config
    from patchdiffusion.train import prepare_run, train

    overrides = _split_overrides(extra)
    flags = []
    if args.method:
        flags.append(f"method={args.method}")
    if args.data:
        flags.append(f"data.source={args.data}")
    if args.resolution:
        flags.append(f"data.resolution={args.resolution}")
    if args.steps is not None:
        flags.append(f"train.steps={args.steps}")
    if args.batch is not None:
        flags.append(f"train.batch_size={args.batch}")
    if args.device:
        flags.append(f"train.device={args.device}")
    if args.minutes is not None:
        flags.append(f"train.max_minutes={args.minutes}")
    if args.latents:
        flags.append("model.latent=true")
    if args.vae:
        flags.append(f"model.vae_path={args.vae}")

    run_dir = Path(args.run) if args.run else None
    if args.resume:
        if run_dir is None:
            from patchdiffusion.config import ConfigError

            raise ConfigError("--resume needs --run DIR (the run to continue)")
        if args.model:
            from patchdiffusion.config import ConfigError

            raise ConfigError("--model sets the architecture of a new run; a resumed run keeps its own")
        config = prepare_run(None, run_dir, resume=True, overrides=flags + overrides)
    else:
        if args.config and args.preset:
            from patchdiffusion.config import ConfigError

            raise ConfigError("give --config or --preset, not both")
        if args.preset:
            from patchdiffusion.presets import preset_config

            config = preset_config(args.preset)
        elif args.config and args.config.lower().endswith(".json"):  # Patch-based DDPM's reference JSON style
            from patchdiffusion.methods.patch_ddpm_json import load_seed_config

            config, json_run_dir = load_seed_config(args.config)
            run_dir = run_dir or json_run_dir
        else:
            config = load_config(args.config) if args.config else RunConfig()
        method_flags = [f for f in flags if f.startswith("method=")]
        config = apply_overrides(config, method_flags)
        if args.model:  # the architecture first, so key=value overrides can still change it
            from patchdiffusion.methods.dimr import model_override

            config = apply_overrides(config, [model_override(args.model, config.method)])
        config = apply_overrides(config, [f for f in flags if not f.startswith("method=")] + overrides)
        if run_dir is None:
            run_dir = Path("runs") / f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        elif (run_dir / "config.yaml").exists() and not args.force:
            from patchdiffusion.config import ConfigError

            raise ConfigError(f"'{run_dir}' already holds a run; add --resume to continue it or --force to restart")
    try:
        train(config, run_dir, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"stopped; continue with: patchdiff train --run {run_dir} --resume", file=sys.stderr)
        return 130
    return 0


def cmd_sample(args, extra: list[str]) -> int:
    from patchdiffusion.config import parse_resolution
    from patchdiffusion.sample import generate_images

    if extra:
        from patchdiffusion.config import ConfigError

        raise ConfigError(f"unexpected arguments: {' '.join(extra)}")
    height = width = None
    if args.size:
        height, width = parse_resolution(args.size)
    out = args.out or str(Path(args.run) / "generated")
    if _run_method(args.run) == "patch_dm":  # canvases of any size, memory-bounded (patchdiffusion/tiling.py)
        from patchdiffusion.tiling import generate_canvases

        paths = generate_canvases(
            args.run, out, num=args.num, seed=args.seed, height=height, width=width, sampler=args.sampler,
            steps=args.steps, guidance=args.guidance, eta=args.eta, code_from=args.code_from, storage=args.canvas,
            patch_batch=args.patch_batch, npy=args.npy, device=args.device, use_ema=not args.no_ema,
            grid_shift=args.grid_shift, positions=args.positions,
            progress=not args.no_progress,
        )
        print(f"wrote {len(paths)} files to {out}")
        return 0
    for flag, value in (("--code-from", args.code_from), ("--grid-shift", args.grid_shift),
                        ("--positions", args.positions)):
        if value is not None:
            from patchdiffusion.config import ConfigError

            raise ConfigError(f"{flag} is for patch_dm runs (their semantic codes and window grid)")
    paths = generate_images(
        args.run, out, num=args.num, seed=args.seed, batch_size=args.batch, sampler=args.sampler,
        steps=args.steps, guidance=args.guidance, class_label=args.class_label, height=height, width=width,
        device=args.device, use_ema=not args.no_ema, progress=not args.no_progress,
        S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise, eta=args.eta,
        patch_batch=args.patch_batch,
    )
    print(f"wrote {len(paths)} images and grid.png to {out}")
    return 0


def _run_method(run_dir: str) -> str | None:
    """The method of a run directory (None when it has no readable config; generate_images then says why)."""
    from patchdiffusion.config import load_config

    try:
        return load_config(Path(run_dir) / "config.yaml").method
    except (_user_errors()):
        return None


def cmd_patchdm(args, extra: list[str]) -> int:
    from patchdiffusion.codes import init_codes
    from patchdiffusion.config import ConfigError, parse_resolution

    if args.patchdm_command != "init-codes":
        args.patchdm_parser.print_help()
        return 2
    if extra:
        raise ConfigError(f"unexpected arguments: {' '.join(extra)}")
    resolution = None
    if args.resolution:
        h, w = parse_resolution(args.resolution)
        resolution = (w, h)
    codes = init_codes(args.data, args.clip, args.out, resolution=resolution, batch_size=args.batch,
                       device=args.device, progress=not args.no_progress)
    print(f"wrote {codes.shape[0]} codes of width {codes.shape[1]} to {args.out} "
          f"(train with model.codes_path={args.out} model.net.code_dim={codes.shape[1]})")
    return 0


def cmd_train_codes(args, extra: list[str]) -> int:
    from patchdiffusion.codes import train_codes_for_run

    report = train_codes_for_run(args.run, _split_overrides(extra), device=args.device, num_eval=args.num_eval,
                                 progress=not args.no_progress)
    print(f"Fréchet distance to the code table: sampled codes {report['fd_sampled']:.4g}, "
          f"N(0, I) noise {report['fd_gaussian_noise']:.4g}")
    return 0


def cmd_data(args, extra: list[str]) -> int:
    from patchdiffusion.config import parse_resolution
    from patchdiffusion.data.convert import convert_dataset

    if args.data_command != "convert":
        args.data_parser.print_help()
        return 2
    resolution = None
    if args.resolution:
        h, w = parse_resolution(args.resolution)
        resolution = (w, h)
    summary = convert_dataset(
        args.source, args.dest, resolution=resolution, transform=args.transform, progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(summary)
    return 0


def cmd_config(args, extra: list[str]) -> int:
    import yaml

    from patchdiffusion.config import RunConfig, apply_overrides, to_dict

    from patchdiffusion.presets import PRESETS, preset_config

    if args.list_presets:
        for name, (text, _) in PRESETS.items():
            print(f"{name:26s} {text}")
        return 0
    if args.preset:
        config = apply_overrides(preset_config(args.preset), _split_overrides(extra))
    else:
        config = apply_overrides(RunConfig(), [f"method={args.method}"] + _split_overrides(extra))
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return 0


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


def cmd_demo(args, extra: list[str]) -> int:
    from patchdiffusion.demo import run_demo

    report = run_demo(
        out_dir=args.out, minutes=args.minutes, device=args.device, data=args.data, progress=not args.no_progress,
        overrides=_split_overrides(extra),
    )
    print(f"demo finished: see {report}")
    return 0


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from patchdiffusion.methods import method_names

    parser = argparse.ArgumentParser(
        prog="patchdiff", description="Train, sample and evaluate patch-based diffusion models.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, allow_abbrev=False, **k)  # --batch must not swallow --batch_size

    p = sub.add_parser(
        "train", help="train a model (new run or --resume)", epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file to start from (defaults otherwise)")
    p.add_argument("--preset", help="named starting config (see `patchdiff config --list-presets`)")
    p.add_argument("--method", choices=method_names(), help="method (default: full)")
    p.add_argument("--data", help="data source: folder, .zip, .lmdb, or builtin:textures|photos|digits")
    p.add_argument("--resolution", help="training size: N or WxH")
    p.add_argument("--run", "--run-dir", dest="run", help="run directory (default: runs/METHOD-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start a new run even if --run already holds one")
    p.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
    p.add_argument("--batch", type=int, help="global batch size (train.batch_size)")
    p.add_argument("--minutes", type=float, help="stop after this much wall time (train.max_minutes)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--latents", action="store_true", help="train on VAE latents (patch_diffusion; needs --vae)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory (model.vae_path)")
    p.add_argument("--model", help="DiMR architecture: dimr-tiny | dimr-xl-2r | dimr-g-2r (method dimr; sets model.net)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images from a run directory")
    p.add_argument("--run", required=True, help="run directory made by `patchdiff train`")
    p.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    p.add_argument("--sampler", help="heun | euler | ddim | ddpm | dpmpp_2m (default: the method's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the method's)")
    p.add_argument("--guidance", "--cfg-scale", dest="guidance", type=float,
                   help="classifier-free guidance scale (class-conditional models; 1 = off)")
    p.add_argument("--S_churn", type=float, help="EDM stochasticity (heun/euler), e.g. 40")
    p.add_argument("--S_min", type=float, help="churn only for sigma >= S_min")
    p.add_argument("--S_max", type=float, help="churn only for sigma <= S_max")
    p.add_argument("--S_noise", type=float, help="noise inflation of the churn, e.g. 1.003")
    p.add_argument("--eta", type=float, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--patch-batch", type=int, help="patch_ddpm: grid cells per network call (memory vs speed; 0 = all); patch_dm: encoder patches per call")
    p.add_argument("--class", dest="class_label", type=int, help="class label to generate")
    p.add_argument("--size", help="canvas size N or WxH (default: the training size)")
    p.add_argument("--batch", type=int, default=16, help="images per batch (memory), does not change results")
    p.add_argument("--out", help="output folder (default: RUN/generated)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--code-from", type=int, help="patch_dm: use this training image's semantic code (style reuse)")
    p.add_argument("--canvas", default="auto", choices=["auto", "memory", "disk"],
                   help="patch_dm: keep the canvas in host memory or memory-mapped on disk (auto: disk above 4M pixels)")
    p.add_argument("--npy", action="store_true", help="patch_dm: also write each canvas as float32 .npy")
    p.add_argument("--grid-shift", choices=["fixed", "random"],
                   help="patch_dm: fixed = decode windows on the canvas's own patch grid every step (the paper); "
                        "random = move the window grid by a random offset each step, which keeps per-window errors "
                        "from stacking into seams (default: the run's model.grid_shift)")
    p.add_argument("--positions", choices=["auto", "grid", "none"],
                   help="patch_dm: grid = the patches' cell coordinates (the paper), none = the position-free branch, "
                        "auto = grid while the canvas fits the training images' grid (default: the run's model.positions)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("patchdm", help="Patch-DM tools: init-codes (CLIP embeddings of the training images)")
    pdm_sub = p.add_subparsers(dest="patchdm_command", metavar="ACTION")
    c = pdm_sub.add_parser("init-codes", help="initial semantic codes: the CLIP image embedding of every training image")
    c.add_argument("--data", required=True, help="the training data source (folder, .zip, .lmdb, builtin:NAME)")
    c.add_argument("--clip", required=True, help="local CLIPVisionModelWithProjection directory (save_pretrained)")
    c.add_argument("--out", required=True, help="output .safetensors (key 'codes', one row per image)")
    c.add_argument("--resolution", help="the training resolution N or WxH the images are read at (as data.resolution)")
    c.add_argument("--batch", type=int, default=128, help="images per CLIP batch (default 128, the reference's)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_patchdm, patchdm_parser=p)

    p = sub.add_parser("train-codes", help="patch_dm: train the latent code model on a run's learned codes")
    p.add_argument("--run", required=True, help="a patch_dm run directory; the model goes to RUN/codes_model/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-eval", type=int, default=0, help="codes sampled for the Fréchet report (default max(2N, 256))")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_codes)

    p = sub.add_parser("data", help="prepare data sets")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    c = data_sub.add_parser(
        "convert", help="convert images between folder / zip / lmdb / built-in sets",
        description="Convert a data set. Bad files (unreadable, truncated, too small) are skipped and listed; "
        "grayscale, RGBA, palette and 16-bit images are converted to 8-bit RGB. The output is written "
        "under a temporary name and renamed only when complete.",
    )
    c.add_argument("--source", required=True, help="folder, .zip, .lmdb, or builtin:NAME")
    c.add_argument("--dest", required=True, help="output: X.zip, X.lmdb, or a folder")
    c.add_argument("--resolution", help="output size N or WxH (default: keep each image's size)")
    c.add_argument("--transform", default="center-crop", choices=["center-crop", "resize"])
    c.add_argument("--overwrite", action="store_true", help="replace an existing --dest")
    c.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_data, data_parser=p)

    from patchdiffusion.eval.cli import register as register_eval

    register_eval(sub)

    p = sub.add_parser("config", help="print a method's default config (every key) as YAML")
    p.add_argument("--method", default="full", choices=method_names())
    p.add_argument("--preset", help="print a named preset instead of a method's defaults")
    p.add_argument("--list-presets", action="store_true", help="list the named presets")
    p.set_defaults(func=cmd_config)

    # --help after a name belongs to that benchmark's own parser, so this one adds its -h itself
    p = sub.add_parser("bench", help="run a benchmark (no name: list them)", add_help=False)
    p.add_argument("name", nargs="?", help="benchmark name (patchdiff bench NAME --help: its options)")
    p.add_argument("-h", "--help", action="store_true", help="show this help (or NAME's) and exit")
    p.set_defaults(func=cmd_bench, bench_parser=p)

    p = sub.add_parser("demo", help="train a small model on built-in data for a few minutes, then sample and report")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")
    p.add_argument("--data", default="builtin:textures", help="data source (default builtin:textures)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args, extra) or 0
    except _user_errors() as e:
        print(f"patchdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a training divergence is a user-facing outcome, not a crash
        from patchdiffusion.train import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"patchdiff train: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

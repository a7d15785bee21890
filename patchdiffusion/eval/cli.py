"""`patchdiff eval`: a thin layer over `evaluate` and `make_reference`.

    patchdiff eval --images DIR|ZIP|LMDB|builtin:NAME|RUN --ref DATA|REF.npz [--metrics fid,kid,is,pr,swd]
                   [--num N] [--tile N] [--inception PATH] [--json OUT.json]
    patchdiff eval ref --data DIR|ZIP|LMDB|builtin:NAME --dest REF.npz [--num N] [--inception PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from patchdiffusion.config import number_arg, seed_int

from .errors import EvalError
from .evaluate import DEFAULT_SWD_MAX_IMAGES

EPILOG = """\
metrics: fid, kid, is, pr (precision/recall), swd, seam, wrap, or all. fid/kid/is/pr need the 2015-12-05
Inception weights (--inception PATH, or PATCHDIFF_INCEPTION, or ~/.cache/patchdiffusion/); without
them they are skipped with a note, and swd/seam/wrap still run. seam needs --tile. wrap: for textures
made with `patchdiff sample --wrap`, the seam score across each image's wrap edge beside the spread of
lines elsewhere in the same images (an edge inside that spread tiles seamlessly).

examples:
  export PATCHDIFF_INCEPTION=~/weights/pt_inception-2015-12-05-6726825d.pth
  patchdiff eval ref --data datasets/celeba-64.zip --dest refs/celeba-64.npz
  patchdiff eval --images runs/luhman --num 10000 --ref refs/celeba-64.npz --metrics fid,kid,is
  patchdiff eval --images samples/ --ref builtin:photos --metrics swd,seam --tile 16
  patchdiff eval --images textures/ --metrics wrap
"""


def _size(text: str) -> tuple[int, int]:
    """'64' or 'WxH' -> (W, H), as the data layer reads sizes."""
    from patchdiffusion.data import width_height

    return width_height(text)


def _height_width(text: str, what: str, minimum: int) -> tuple[int, int]:
    """'16' -> (16, 16); '16x32' -> (16, 32): rows first, as tiles and offsets are written."""
    try:
        values = tuple(int(part) for part in text.lower().replace("×", "x").split("x"))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < minimum:
        raise EvalError(f"{what} '{text}' is not understood; give N or HxW (integers >= {minimum})")
    return values


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception",
                        help="Inception weights file (default: $PATCHDIFF_INCEPTION or ~/.cache/patchdiffusion/)")
    parser.add_argument("--batch", type=number_arg(int, minimum=1, maximum=1e5), default=64, help="images per Inception batch (default 64)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--resolution", help="bring every image to N or WxH (default: the evaluated images' size)")
    parser.add_argument("--transform", default="center-crop", choices=["center-crop", "resize"],
                        help="how images of another size are fitted (default center-crop)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed of subsets, generation, KID subsets, SWD patches")
    parser.add_argument("--workers", type=number_arg(int, minimum=0, maximum=256), default=0, help="DataLoader processes decoding images (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub) -> None:
    """Add `eval` (and `eval ref`) to the `patchdiff` subcommands."""
    parser = sub.add_parser(
        "eval", help="evaluate images: FID, KID, IS, precision/recall, SWD, seam score, wrap seam",
        description="Evaluate generated images against a reference data set or reference statistics.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", help="images to evaluate: folder, .zip, .lmdb, builtin:NAME, or a run directory")
    parser.add_argument("--ref", help="reference: a data set (folder, .zip, .lmdb, builtin:NAME) or REF.npz")
    parser.add_argument("--metrics", default="fid,kid,is,pr,swd",
                        help="comma-separated: fid, kid, is, pr, swd, seam, wrap, all (default fid,kid,is,pr,swd)")
    parser.add_argument("--num", type=number_arg(int, minimum=1, maximum=1e9), help="images to evaluate (a seeded subset), or to generate from a run")
    parser.add_argument("--ref-num", type=number_arg(int, minimum=1, maximum=1e9), help="reference images to use (a seeded subset; default all)")
    parser.add_argument("--tile", help="seam score tile size: N or HxW (pixels)")
    parser.add_argument("--tile-offset", default="0", help="position of the first tile boundary: N or HxW (default 0)")
    parser.add_argument("--swd-images", type=number_arg(int, minimum=2, maximum=1e9), default=DEFAULT_SWD_MAX_IMAGES,
                        help=f"SWD uses at most this many images per set (default {DEFAULT_SWD_MAX_IMAGES})")
    parser.add_argument("--json", help="write results here (default: RUN/eval.json for a run, else eval.json)")
    parser.add_argument("--samples", help="for a run: keep the generated images in this folder (default: temporary)")
    parser.add_argument("--sampler", help="for a run: sampler (default: the method's)")
    parser.add_argument("--steps", type=number_arg(int, minimum=1, maximum=1e6), help="for a run: sampling steps (default: the method's)")
    parser.add_argument("--no-ema", action="store_true", help="for a run: sample the raw weights instead of the EMA")
    _common_options(parser)
    parser.set_defaults(func=cmd_eval, eval_parser=parser)

    actions = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    ref = actions.add_parser(
        "ref", help="precompute reference statistics (.npz: mu, sigma, features) of a data set",
        description="Compute Inception statistics of a data set once, for `patchdiff eval --ref REF.npz`. "
        "The file holds EDM's mu/sigma (so EDM's fid.py reads it) plus the features KID and precision/recall need.",
    )
    ref.add_argument("--data", required=True, help="folder, .zip, .lmdb or builtin:NAME")
    ref.add_argument("--dest", required=True, help="output .npz")
    ref.add_argument("--num", type=number_arg(int, minimum=1, maximum=1e9), help="use a seeded subset of this many images (default all)")
    ref.add_argument("--stats-only", action="store_true",
                     help="store mu and sigma only (enough for FID; not for KID or precision/recall)")
    _common_options(ref)
    ref.set_defaults(func=cmd_eval_ref)


def cmd_eval(args, extra: list[str]) -> int:
    from .evaluate import EvalOptions, evaluate, parse_metrics
    from .inputs import is_run_directory

    _reject(extra)
    if not args.images:
        raise EvalError("--images is required (a folder, .zip, .lmdb, builtin:NAME or a run directory)")
    options = EvalOptions(
        metrics=parse_metrics(args.metrics), num=args.num, ref_num=args.ref_num, seed=args.seed,
        batch_size=args.batch, device=args.device, inception=args.inception,
        size=_size(args.resolution) if args.resolution else None, transform=args.transform,
        tile=_height_width(args.tile, "--tile", 2) if args.tile else None,
        tile_offset=_height_width(args.tile_offset, "--tile-offset", 0),
        swd_max_images=args.swd_images, workers=args.workers, progress=not args.no_progress,
        samples_dir=args.samples, sampler=args.sampler, steps=args.steps, use_ema=not args.no_ema,
    )
    report = evaluate(args.images, args.ref, options)
    print(report.table())
    for note in report.notes:
        if note.startswith("WARNING"):  # also on stderr, where it is not lost in a redirected table
            print(f"patchdiff eval: {note}", file=sys.stderr)
    if args.json:
        destination = Path(args.json)
    elif is_run_directory(args.images):
        destination = Path(args.images) / "eval.json"
    else:
        destination = Path("eval.json")
    print(f"wrote {report.write_json(destination)}")
    return 0


def cmd_eval_ref(args, extra: list[str]) -> int:
    from .evaluate import make_reference

    _reject(extra)
    path, count, detector = make_reference(
        args.data, args.dest, num=args.num, seed=args.seed, size=_size(args.resolution) if args.resolution else None,
        transform=args.transform, batch_size=args.batch, device=args.device, inception=args.inception,
        keep_features=not args.stats_only, workers=args.workers, progress=not args.no_progress,
    )
    print(f"Inception pipeline: {detector.pipeline}")
    if detector.warning:
        print(detector.warning)
        print(f"patchdiff eval ref: {detector.warning}", file=sys.stderr)
    print(f"wrote statistics of {count} images from {args.data} to {path}")
    return 0


def _reject(extra: list[str]) -> None:
    if extra:
        raise EvalError(f"unexpected arguments: {' '.join(extra)}")

"""Patch-DM's own command-line tools, registered through `PatchDMMethod.commands`:

    patchdiff patchdm init-codes --data D --clip PATH --out codes.safetensors   CLIP-initialised semantic codes
    patchdiff train-codes --run DIR                                             the latent code model of a run
"""

from __future__ import annotations

from patchdiffusion.config import parse_size
from patchdiffusion.methods.base import Command


def _init_codes_arguments(p) -> None:
    p.add_argument("--data", required=True, help="the training data source (folder, .zip, .lmdb, builtin:NAME)")
    p.add_argument("--clip", required=True, help="local CLIPVisionModelWithProjection directory (save_pretrained)")
    p.add_argument("--out", required=True, help="output .safetensors (key 'codes', one row per image)")
    p.add_argument("--resolution", help="the training resolution N or WxH the images are read at (as data.resolution)")
    p.add_argument("--batch", type=int, default=128, help="images per CLIP batch (default 128, the reference's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")


def _init_codes(args) -> int:
    from patchdiffusion.methods.patch_dm.codes import init_codes

    resolution = None
    if args.resolution:
        height, width = parse_size(args.resolution)
        resolution = (width, height)  # the data layer's (width, height)
    codes = init_codes(args.data, args.clip, args.out, resolution=resolution, batch_size=args.batch,
                       device=args.device, progress=not args.no_progress)
    print(f"wrote {codes.shape[0]} codes of width {codes.shape[1]} to {args.out} "
          f"(train with model.codes_path={args.out} model.net.code_dim={codes.shape[1]})")
    return 0


def _train_codes_arguments(p) -> None:
    p.add_argument("--run", required=True, help="a patch_dm run directory; the model goes to RUN/codes_model/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-eval", type=int, default=0, help="codes sampled for the Fréchet report (default max(2N, 256))")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="latent code model settings as key=value (e.g. steps=3000 lr=1e-3)")


def _train_codes(args) -> int:
    from patchdiffusion.methods.patch_dm.codes import train_codes_for_run

    report = train_codes_for_run(args.run, list(args.overrides), device=args.device, num_eval=args.num_eval,
                                 progress=not args.no_progress)
    print(f"Fréchet distance to the code table: sampled codes {report['fd_sampled']:.4g}, "
          f"N(0, I) noise {report['fd_gaussian_noise']:.4g}")
    return 0


COMMANDS = (
    Command("patchdm init-codes", "Patch-DM: initial semantic codes, the CLIP image embedding of every training image",
            _init_codes_arguments, _init_codes),
    Command("train-codes", "Patch-DM: train the latent code model on a run's learned codes",
            _train_codes_arguments, _train_codes),
)

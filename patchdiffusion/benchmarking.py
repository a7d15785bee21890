"""`patchdiff bench NAME`: benchmarks live in the source tree's `benchmarks/` folder."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from patchdiffusion.config import ConfigError

# name -> (module under benchmarks/, one-line description)
BENCHMARKS = {
    "unet-patching": ("unet_patching", "U-Net forward+backward time: patch_size 4 at 256² vs 1 at 64² (Luhman)"),
    "feature-extraction": ("feature_extraction", "evaluation throughput: Inception features and SWD/seam, images/s"),
    "patch-training": ("patch_training", "training throughput: Patch Diffusion (real_p=0.5) vs full-image, 64²"),
    "patch-quality": ("patch_quality", "SWD per training CPU time and on a 5% subset: Patch Diffusion vs full-image, 32²"),
    "patch-ddpm-memory": ("patch_ddpm_memory", "Patch-based DDPM: peak working memory of sampling for N = 1, 2, 4, 8"),
    "patch-ddpm-quality": ("patch_ddpm_quality", "Patch-based DDPM in miniature: SWD and seam score, N = 1, 2, 4 ± GCC"),
    "dimr-comparison": ("dimr_comparison", "DiMR-tiny vs a U-Net of similar FLOPs, same recipe and CPU budget: SWD on digits"),
    "dimr-class-conditioning": ("dimr_class_conditioning", "DiMR-tiny on digits: samples classified as the requested digit, ± guidance"),
    "patch-dm-memory": ("patch_dm_memory", "Patch-DM: peak memory of 256², 1024², 4096² canvases, in RAM and memmapped"),
    "patch-dm-seams": ("patch_dm_seams", "Patch-DM: seam score of 4×-larger canvases with and without collage; codes FD"),
    "any-size": ("any_size", "any size, every method: peak RSS vs canvas size, seams per window and grid, a gigapixel"),
    "data-loading": ("data_loading", "training steps/s with 0 vs 2 DataLoader workers on a folder of 256² PNGs"),
    "train-speed": ("train_speed", "training step as `train` runs it vs diffusers UNet2DModel, compile off/on; FLOP/s, profile"),
}


def _benchmarks_package():
    try:
        return importlib.import_module("benchmarks")
    except ImportError:
        root = Path(__file__).resolve().parent.parent
        if (root / "benchmarks").is_dir():
            sys.path.insert(0, str(root))
            return importlib.import_module("benchmarks")
        raise ConfigError("benchmarks need a source checkout of patchdiffusion (the benchmarks/ folder)") from None


def run_benchmark(name: str, argv: list[str]) -> int:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark '{name}' (choose from: {', '.join(BENCHMARKS)})")
    _benchmarks_package()
    module = importlib.import_module(f"benchmarks.{BENCHMARKS[name][0]}")
    return module.main(argv) or 0

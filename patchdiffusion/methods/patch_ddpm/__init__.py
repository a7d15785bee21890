"""Patch-based DDPM (Arakawa et al., CVPRW 2023): `method.py`; the reference's JSON configs: `seed_config.py`."""

from patchdiffusion.methods.patch_ddpm.method import (  # noqa: F401
    METHOD,
    PatchDDPMConfig,
    PatchDDPMMethod,
    PatchDDPMSampleOptions,
    PatchDividedUNet,
    global_content,
    merge_patches,
    patch_side,
    position_one_hot,
    split_patches,
)

"""Patch-DM (Ding et al., ICLR 2024): the method (`method.py`), its collage tiles (`tiles.py`), its
semantic codes and latent code model (`codes.py`) and its command-line tools (`commands.py`)."""

from patchdiffusion.methods.patch_dm.method import (  # noqa: F401
    METHOD,
    PatchDMConfig,
    PatchDMMethod,
    PatchDMSampleOptions,
)
from patchdiffusion.methods.patch_dm.tiles import (  # noqa: F401
    PatchPredictor,
    Tile,
    packed_jobs,
    plan_tiles,
    read_region,
    shift_margins,
    tile_shape,
)

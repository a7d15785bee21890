"""Networks: building blocks (layers.py) and the patched ADM-family U-Net (unet.py)."""

from .layers import patchify, sinusoidal_position_map, timestep_embedding, unpatchify
from .unet import UNET_PRESETS, UNet, UNetConfig, build_unet, count_parameters

__all__ = [
    "UNET_PRESETS",
    "UNet",
    "UNetConfig",
    "build_unet",
    "count_parameters",
    "patchify",
    "sinusoidal_position_map",
    "timestep_embedding",
    "unpatchify",
]

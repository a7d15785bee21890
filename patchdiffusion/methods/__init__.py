"""Method registry: the name used on the CLI (`--method`) -> the Method class."""

from __future__ import annotations

from patchdiffusion.methods.base import Method

_METHOD_MODULES = {
    "full": "patchdiffusion.methods.full",
    "patching": "patchdiffusion.methods.patching",
    "patch_diffusion": "patchdiffusion.methods.patch_diffusion",
    "dimr": "patchdiffusion.methods.dimr",
    "patch_ddpm": "patchdiffusion.methods.patch_ddpm",
    "patch_dm": "patchdiffusion.methods.patch_dm",
}


def method_names() -> list[str]:
    return list(_METHOD_MODULES)


def get_method_class(name: str) -> type[Method]:
    import importlib

    if name not in _METHOD_MODULES:
        raise KeyError(f"unknown method '{name}' (choose from: {', '.join(_METHOD_MODULES)})")
    module = importlib.import_module(_METHOD_MODULES[name])
    return module.METHOD


def build_method(name: str, config, resolution: tuple[int, int], image_channels: int = 3) -> Method:
    return get_method_class(name)(config, resolution, image_channels)


__all__ = ["Method", "method_names", "get_method_class", "build_method"]

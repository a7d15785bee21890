"""The method registry: the name used on the command line (`--method`) -> the module that defines it.

Adding a method is one folder (or module) under `methods/` and one line here. Modules are imported
on first use, so the configuration layer can look a method up without importing every method.
"""

from __future__ import annotations

import importlib

METHOD_MODULES = {
    "full": "patchdiffusion.methods.full",
    "patching": "patchdiffusion.methods.patching",
    "patch_diffusion": "patchdiffusion.methods.patch_diffusion",
    "patch_ddpm": "patchdiffusion.methods.patch_ddpm",
    "patch_dm": "patchdiffusion.methods.patch_dm",
    "dimr": "patchdiffusion.methods.dimr",
}


def method_names() -> list[str]:
    return list(METHOD_MODULES)


def method_class(name: str):
    """The Method subclass registered as `name` (each method module exports it as `METHOD`)."""
    if name not in METHOD_MODULES:
        raise KeyError(f"unknown method '{name}' (choose from: {', '.join(METHOD_MODULES)})")
    return importlib.import_module(METHOD_MODULES[name]).METHOD


def method_classes() -> list:
    """Every registered Method subclass, in registry order (for per-method options, presets and tools)."""
    return [method_class(name) for name in METHOD_MODULES]

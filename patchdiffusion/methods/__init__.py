"""The methods: one module or package each, registered by name in `patchdiffusion/registry.py`."""

from __future__ import annotations

from pathlib import Path

from patchdiffusion.errors import ConfigError
from patchdiffusion.methods.base import Method
from patchdiffusion.registry import method_class, method_classes, method_names


def get_method_class(name: str) -> type[Method]:
    return method_class(name)


def build_method(name: str, config, resolution: tuple[int, int], image_channels: int = 3) -> Method:
    return method_class(name)(config, resolution, image_channels)


def all_presets() -> dict[str, tuple[str, list[str]]]:
    """Every method's named starting configs, name -> (what it is for, overrides)."""
    presets: dict[str, tuple[str, list[str]]] = {}
    for cls in method_classes():
        for name, (text, overrides) in cls.presets.items():
            presets[name] = (text, [f"method={cls.name}", *overrides])
    return presets


def read_foreign_config(path: str | Path):
    """(RunConfig, run dir or None) from a config file in a method's own format (by suffix)."""
    path = Path(path)
    for cls in method_classes():
        if path.suffix.lower() in cls.config_suffixes:
            return cls.read_config_file(path)
    raise ConfigError(f"config file '{path}' has an unknown suffix (use .yaml)")


__all__ = ["Method", "method_names", "get_method_class", "build_method", "all_presets", "read_foreign_config"]

"""Named starting configs: `patchdiff train --preset NAME` (then key=value overrides on top).

Each method declares its own presets (`Method.presets`), a list of overrides applied to the defaults,
so `patchdiff config --preset NAME` shows exactly what one sets. An entry `--model=NAME` picks one of
the method's named architectures first (as `patchdiff train --model NAME` does).
"""

from __future__ import annotations

from patchdiffusion.config import RunConfig, apply_overrides
from patchdiffusion.errors import ConfigError
from patchdiffusion.methods import all_presets
from patchdiffusion.registry import method_class

# name -> (what it is for, overrides); the first override names the method
PRESETS: dict[str, tuple[str, list[str]]] = all_presets()


def preset_config(name: str) -> RunConfig:
    """The RunConfig of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (choose from: {', '.join(PRESETS)})")
    overrides = PRESETS[name][1]
    config = apply_overrides(RunConfig(), [o for o in overrides if o.startswith("method=")])
    for item in overrides:
        if item.startswith("--model="):
            config = apply_overrides(config, method_class(config.method).architecture_overrides(item.split("=", 1)[1]))
    return apply_overrides(config, [o for o in overrides if not o.startswith(("method=", "--model="))])

"""The one error type of the evaluation room.

`EvalError` is a `ConfigError`, so `patchdiff eval` prints it as one line (see `cli.main`): a missing
weights file, a reference that lacks what a metric needs, too few images for the asked count.
"""

from __future__ import annotations

from patchdiffusion.errors import ConfigError


class EvalError(ConfigError):
    """An evaluation that cannot run as asked; the message says what was given and what would work."""

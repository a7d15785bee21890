"""The error types every layer raises for problems a user can fix.

Each carries one sentence meant for the user; `patchdiff` prints it as one line and exits with 2
instead of showing a traceback. They live at the bottom of the import graph so that any module can
raise them without importing the layer above it.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix (a bad value, path, file or combination); the message says which and how."""


class ConfigError(UserError):
    """A configuration, option or size that cannot be used."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (the run stops; its last checkpoint is intact)."""


def did_you_mean(name: str, known) -> str:
    """" (did you mean 'x'?)" for the known name closest to a misspelt `name`, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""

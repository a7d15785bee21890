"""Errors raised by the data layer.

Every problem a user can cause (a wrong path, an unknown spec, an empty data set, a file that is not
an image) surfaces as a `DataError`, so the CLI can print one clear sentence instead of a traceback.
"""

from __future__ import annotations

from patchdiffusion.errors import UserError


class DataError(UserError):
    """A data set, path or spec that cannot be used; the message says what was given and what is accepted."""


class UnreadableImageError(DataError):
    """One image that cannot be decoded (corrupt, truncated, not an image at all).

    Kept apart from other DataErrors so that conversion can skip the one file and name it in its
    summary, while a bad spec still stops everything.
    """

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name!r}: {reason}")
        self.name = name
        self.reason = reason

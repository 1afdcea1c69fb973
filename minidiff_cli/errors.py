"""Errors a user can fix, and the helpers that word them.

The CLI prints a MinidiffError as one line and exits with code 2. The helpers below are
shared by every reader of user input (flags, files, prompt files, PNG parameters), so a
bad value is described the same way wherever it comes from.
"""

import math
from typing import Any


class MinidiffError(Exception):
    """Base class: something the user can fix; the message says what and how."""


class PluginError(MinidiffError):
    """A plugin could not be loaded, clashed with another, or broke its contract."""


class UnknownNameError(MinidiffError, KeyError):
    """A schedule, sampler, conditioner, data set or model name that does not exist."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelFileError(MinidiffError):
    """A model or checkpoint file that is missing, corrupt, foreign or inconsistent."""


class ImageMetadataError(MinidiffError):
    """A PNG without readable minidiff parameters."""


def first_line(exc: BaseException | str, limit: int = 300, empty: str = "") -> str:
    """The first non-empty line of an error's text, at most ``limit`` characters: deep library errors
    (torch's carry kilobytes of C++ stack after their first line) stay one readable line. ``empty``
    stands in for an error without text (callers pass the exception's type name)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return empty


def shown(value: Any, limit: int = 40) -> str:
    """``value`` as an error message quotes it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_int(value: Any) -> bool:
    """A whole number as JSON, TOML or Python gives it; True and False are not numbers here."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """A whole number >= 0."""
    return is_int(value) and value >= 0


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float: an int too large for a float is not."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False

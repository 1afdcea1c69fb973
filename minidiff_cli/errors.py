"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


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


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error's text, at most ``limit`` characters: deep library errors
    (torch's carry kilobytes of C++ stack after their first line) stay one readable line."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""

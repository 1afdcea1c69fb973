"""Other programs' ``parameters`` text (AUTOMATIC1111, stable-diffusion.cpp), read as untrusted input.

Their PNGs carry one text chunk, ``parameters``::

    a red circle
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 12345, Size: 512x512, Model: v1-5

The prompt may span lines, ``Negative prompt:`` starts the negative one, and the last
line holds ``Key: value`` settings if it has at least three of them (AUTOMATIC1111's own
rule; otherwise it is part of the prompt). A value may be a JSON string in double quotes.

The text comes from a stranger: it is bounded in size before it is looked at, read by a
single left-to-right scan (no regular expression that could backtrack, nothing evaluated),
and every value that is carried over is checked. Whatever is wrong is one
ImageMetadataError line naming the file.

``generate --from`` carries over what has a counterpart here (prompt, negative prompt,
steps, CFG scale, seed, and the samplers in ``SAMPLERS``); it names what it drops in one
note and refuses a sampler or schedule it cannot map.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minidiff_cli.errors import ImageMetadataError, shown
from minidiff_cli.files.png_parameters import JSON_KEY, TEXT_KEY, parameters_from_texts, read_texts

MAX_INFOTEXT_CHARS = 64 * 1024  # AUTOMATIC1111 writes well under 10 KB even with long prompts
MIN_SETTINGS = 3  # fewer "Key: value" pairs on the last line: it is prompt text (AUTOMATIC1111's rule)
MAX_STEPS = 100_000  # minidiff's largest schedule; the model's own T is checked later
NEGATIVE = "Negative prompt:"

# Sampler names (lower case, without a trailing "karras") -> minidiff's sampler.
SAMPLERS = {
    "ddim": "ddim", "ddim_trailing": "ddim",  # sd.cpp's ddim_trailing is minidiff's default spacing
    "ddpm": "ddpm",
    "euler a": "euler-ancestral", "euler_a": "euler-ancestral", "k_euler_a": "euler-ancestral",
    "euler-ancestral": "euler-ancestral",
    "euler": "euler", "k_euler": "euler",
    "heun": "heun", "k_heun": "heun",
    "dpm++ 2m": "dpmpp-2m", "dpm++2m": "dpmpp-2m", "dpmpp_2m": "dpmpp-2m", "k_dpmpp_2m": "dpmpp-2m",
    "dpmpp-2m": "dpmpp-2m",
}
KARRAS_SAMPLERS = ("dpmpp-2m", "euler", "heun", "euler-ancestral")  # minidiff-solvers' `karras` option
# Schedule settings ("Schedule type" in AUTOMATIC1111 1.9+, "Schedule" in stable-diffusion.cpp).
SCHEDULE_KEYS = ("Schedule type", "Schedule", "Scheduler")
PLAIN_SCHEDULES = ("automatic", "uniform", "discrete", "default")
MAPPED_KEYS = ("Steps", "CFG scale", "Seed", "Sampler", *SCHEDULE_KEYS)


@dataclass
class Infotext:
    """The ``parameters`` text, split: prompts, and the settings line as ordered key -> value."""

    prompt: str
    negative_prompt: str = ""
    settings: dict[str, str] = field(default_factory=dict)


def parse(text: str, path: str | os.PathLike) -> Infotext:
    """Split a ``parameters`` text; only its size can make it fail."""
    if len(text) > MAX_INFOTEXT_CHARS:
        raise ImageMetadataError(f"'{path}' has a 'parameters' text of {len(text):,} characters, more than "
                                 f"{MAX_INFOTEXT_CHARS:,}; refusing it")
    lines = text.replace("\r\n", "\n").split("\n")
    settings = _settings(lines[-1])
    if settings is not None and len(settings) >= MIN_SETTINGS:
        lines = lines[:-1]
    else:
        settings = {}
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE) and not negative:
            negative.append(line[len(NEGATIVE):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return Infotext("\n".join(prompt).strip(), "\n".join(negative).strip(), settings)


def _settings(line: str) -> dict[str, str] | None:
    """``Key: value, Key: "quoted, value", ...`` in one pass; None if the line is not of that shape."""
    out: dict[str, str] = {}
    pos, n = 0, len(line)
    while pos < n:
        colon = line.find(":", pos)
        if colon < 0:
            return None
        key = line[pos:colon].strip()
        if not _is_key(key):
            return None
        pos = colon + 1
        while pos < n and line[pos] == " ":
            pos += 1
        if pos < n and line[pos] == '"':
            end = _closing_quote(line, pos)
            if end < 0:
                return None
            value = _unquote(line[pos:end + 1])
            pos = end + 1
            while pos < n and line[pos] == " ":
                pos += 1
            if pos < n and line[pos] != ",":
                return None
        else:
            end = line.find(",", pos)
            end = n if end < 0 else end
            value = line[pos:end].strip()
            pos = end
        out[key] = value
        pos += 1  # past the comma
    return out


def _is_key(key: str) -> bool:
    """What AUTOMATIC1111 writes as a key: a word character, then words, spaces, '-' and '/'."""
    return (0 < len(key) <= 100 and (key[0].isalnum() or key[0] == "_")
            and all(c.isalnum() or c in "_ -/" for c in key))


def _closing_quote(line: str, start: int) -> int:
    pos = start + 1
    while pos < len(line):
        if line[pos] == "\\":
            pos += 2
            continue
        if line[pos] == '"':
            return pos
        pos += 1
    return -1


def _unquote(quoted: str) -> str:
    try:
        value = json.loads(quoted)  # a JSON string literal: json parses data, it never runs anything
    except ValueError:
        return quoted[1:-1]
    return value if isinstance(value, str) else quoted[1:-1]


# -- generate --from ----------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """(minidiff's parameters, None) from its JSON chunk, else (None, another program's `parameters` text).

    A PNG with neither is the one-line "has no minidiff parameters" error.
    """
    path = Path(path)
    texts = read_texts(path)
    if JSON_KEY in texts or TEXT_KEY not in texts:
        return parameters_from_texts(path, texts), None
    return None, texts[TEXT_KEY]


def read_for_repeat(path: str | os.PathLike, *, sampler_given: bool = False) -> tuple[dict[str, Any], str | None]:
    """The parameters ``generate --from`` repeats, and a one-line note on what was left behind.

    minidiff's own JSON chunk wins when present (no note). Otherwise the ``parameters`` text
    is mapped; a sampler without a counterpart is refused unless --sampler replaces it.
    """
    path = Path(path)
    own, text = read_image(path)
    if own is not None:
        return own, None
    info = parse(text, path)
    if not info.settings:
        raise ImageMetadataError(f"'{path}' has no minidiff parameters, and its 'parameters' text has no settings "
                                 "line (Steps: .., Sampler: ..) to carry over")
    params = to_minidiff(info, path, sampler_given=sampler_given)
    return params, _note(path, info, sampler_given)


def to_minidiff(info: Infotext, path: str | os.PathLike, *, sampler_given: bool = False) -> dict[str, Any]:
    """The minidiff parameters that the text's settings map to, every value checked."""
    from minidiff_cli.inference.pipeline import MAX_CFG, MAX_SEED

    s = info.settings
    params: dict[str, Any] = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    if "Steps" in s:
        params["steps"] = _whole(s["Steps"], "Steps", 1, MAX_STEPS, path)
    if "CFG scale" in s:
        params["cfg"] = _real(s["CFG scale"], "CFG scale", 0.0, MAX_CFG, path)
    if "Seed" in s:
        params["seed"] = _whole(s["Seed"], "Seed", 0, MAX_SEED, path)
    if not sampler_given and "Sampler" in s:
        params["sampler"], karras = map_sampler(s["Sampler"], _schedule(s), path)
        if karras:
            params["sampler_options"] = {"karras": True}
    return params


def map_sampler(name: str, schedule: str | None, path: str | os.PathLike) -> tuple[str, bool]:
    """(minidiff sampler, Karras sigmas?) for a sampler name such as 'DPM++ 2M Karras'."""
    base = " ".join(name.lower().split())
    karras = base.endswith(" karras")
    if karras:
        base = base[:-len(" karras")]
    if base not in SAMPLERS:
        raise ImageMetadataError(f"'{path}' was made with the sampler {shown(name)}, which has no counterpart in "
                                 "minidiff; pass --sampler NAME (ddim, dpmpp-2m, euler, heun, euler-ancestral)")
    if schedule is not None:
        kind = schedule.strip().lower()
        if kind == "karras":
            karras = True
        elif kind not in PLAIN_SCHEDULES:
            raise ImageMetadataError(f"'{path}' was made with the schedule type {shown(schedule)}, which has no "
                                     "counterpart in minidiff; pass --sampler NAME to choose one")
    sampler = SAMPLERS[base]
    if karras and sampler not in KARRAS_SAMPLERS:
        raise ImageMetadataError(f"'{path}' was made with {shown(name)} and Karras sigmas, which minidiff's "
                                 f"{sampler} does not take; pass --sampler NAME")
    return sampler, karras


def _schedule(settings: dict[str, str]) -> str | None:
    return next((settings[k] for k in SCHEDULE_KEYS if k in settings), None)


def _whole(text: str, key: str, low: int, high: int, path) -> int:
    try:
        value = int(text.strip()) if len(text) <= 40 else None
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ImageMetadataError(f"'{path}' has an invalid {key} in its 'parameters' text: {shown(text)} "
                                 f"(a whole number from {low} to {high} is needed)")
    return value


def _real(text: str, key: str, low: float, high: float, path) -> float:
    try:
        value = float(text.strip()) if len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):  # NaN fails both comparisons
        raise ImageMetadataError(f"'{path}' has an invalid {key} in its 'parameters' text: {shown(text)} "
                                 f"(a number from {low:g} to {high:g} is needed)")
    return value


def _note(path: Path, info: Infotext, sampler_given: bool) -> str:
    """One line: where the parameters came from, and the settings that were not carried over."""
    dropped = [f"{key}: {value}" for key, value in info.settings.items()
               if key not in MAPPED_KEYS or (sampler_given and key in ("Sampler", *SCHEDULE_KEYS))]
    shown = ", ".join(printable(_cut(item, 60)) for item in dropped[:12])
    if len(dropped) > 12:
        shown += f" and {len(dropped) - 12} more"
    left = f"; not carried over: {shown} (minidiff draws with its own model and image size)" if dropped else ""
    return (f"'{path}' was not made by minidiff; carried over its prompt, negative prompt, steps, CFG scale, seed "
            f"and sampler{left}")


# -- display ------------------------------------------------------------------------------------
def printable(text: str) -> str:
    """``text`` with control and formatting characters (terminal escapes, bidi overrides) shown as escapes."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co")
                   else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text)


def json_printable(text: str) -> str:
    """JSON text with the same characters escaped as JSON escapes (``\\uXXXX``), so it stays valid JSON."""
    def escape(c: str) -> str:
        if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co") or c in "\n\t":
            return c
        units = c.encode("utf-16-le", "surrogatepass")
        return "".join(f"\\u{int.from_bytes(units[i:i + 2], 'little'):04x}" for i in range(0, len(units), 2))
    return "".join(escape(c) for c in text)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."

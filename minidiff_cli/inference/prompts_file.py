"""A prompts file for ``generate --prompts FILE``: its lines, what each asks for, and the batches.

A line is a prompt, or a JSON object with a ``prompt`` and any of ``negative``, ``seed``,
``steps``, ``cfg`` and ``n`` (a line starting with ``{`` is read as JSON; blank lines are
skipped)::

    a red circle
    {"prompt": "a blue square", "seed": 7, "n": 4, "cfg": 2}

Every line is checked before anything is sampled, and a bad one is a one-line error with
its line number. Line L's image k has the seed ``(line's seed or --seed) + k`` and is named
``line-LLLLL-KK.png``: it depends on the line alone, so which process draws a line, and
what else is in its batch, changes nothing (see ``batches``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minidiff_cli.errors import MinidiffError, first_line, is_finite_number, is_int, shown

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_LINES = 10_000  # prompts; the images of the whole file are bounded like -n (MAX_IMAGES)
MAX_LINE_CHARS = 64 * 1024
MAX_STEPS = 100_000  # the largest schedule; the model's own T is checked once it is loaded
# JSON key -> Generation field
OVERRIDES = {"negative": "negative_prompt", "seed": "seed", "steps": "steps", "cfg": "cfg"}
KEYS = ("prompt", *OVERRIDES, "n")


@dataclass(frozen=True)
class PromptLine:
    """One non-blank line: its number in the file (from 1), its prompt and the overrides it gives."""

    number: int
    prompt: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class LineJob:
    """A line resolved against the command's settings: its Generation and how many images."""

    line: int
    gen: Any  # pipeline.Generation (imported lazily: torch)
    count: int


@dataclass(frozen=True)
class Batch:
    """Images sampled together: rows of (job, k), all sharing every setting but prompt and seed."""

    rows: tuple[tuple[LineJob, int], ...]

    @property
    def gen(self):
        return self.rows[0][0].gen

    @property
    def prompts(self) -> list[str]:
        return [job.gen.prompt for job, _ in self.rows]

    @property
    def seeds(self) -> list[int]:
        return [job.gen.seed + k for job, k in self.rows]


def read_prompts(path: str | os.PathLike) -> list[PromptLine]:
    """Every line of the file, checked; a bad one is a MinidiffError naming the file and line."""
    data = _read_bytes(Path(path))
    path = shown_name(path)
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = _decode(raw, path, number).strip()
        if not line:
            continue
        if len(lines) == MAX_LINES:
            raise MinidiffError(f"'{path}' has more than {MAX_LINES:,} prompts; split it into several files")
        lines.append(_parse_line(line, path, number))
    if not lines:
        raise MinidiffError(f"'{path}' holds no prompts (one a line, or JSON objects with a \"prompt\")")
    return lines


def parse_line(line: str, where: str, number: int) -> PromptLine:
    """One line of the format (a prompt, or a JSON object), checked as a file's line is: a bad one is a
    MinidiffError naming ``where`` and ``number`` (training's ``--sample-prompts`` keeps its lines as text)."""
    return _parse_line(line.strip(), where, number)


def shown_name(path: str | os.PathLike) -> str:
    """How errors name the prompts: the path, or "standard input" for ``-``."""
    return "standard input" if os.fspath(path) == "-" else os.fspath(path)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, at most MAX_FILE_BYTES: a regular file, standard input (``-``) or a pipe
    such as ``<(...)``; a stream is read only up to the bound, never to its end."""
    import stat
    import sys

    name = "standard input" if str(path) == "-" else f"prompts file '{path}'"
    try:
        if str(path) == "-":
            data = _read_bounded(sys.stdin.buffer, name)
        else:
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode):
                raise MinidiffError(f"{name} is a folder, not a file")
            if stat.S_ISREG(mode) and os.stat(path).st_size > MAX_FILE_BYTES:
                raise MinidiffError(f"{name} is larger than {MAX_FILE_BYTES >> 20} MiB; split it")
            with open(path, "rb") as stream:  # a regular file, or a pipe, FIFO or device: bounded
                data = _read_bounded(stream, name)
    except FileNotFoundError:
        raise MinidiffError(f"{name} does not exist") from None
    except OSError as exc:
        raise MinidiffError(f"{name} could not be read: {exc.strerror or exc}") from None
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # a UTF-8 byte order mark


def _read_bounded(stream, name: str) -> bytes:
    chunks, size = [], 0
    while size <= MAX_FILE_BYTES:
        chunk = stream.read(MAX_FILE_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_FILE_BYTES:
        raise MinidiffError(f"{name} is larger than {MAX_FILE_BYTES >> 20} MiB; split it")
    return b"".join(chunks)


def _decode(raw: bytes, path: str, number: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        raise MinidiffError(f"{path}, line {number}: not valid UTF-8 text") from None


def _parse_line(line: str, path: str, number: int) -> PromptLine:
    where = f"{path}, line {number}"
    if len(line) > MAX_LINE_CHARS:
        raise MinidiffError(f"{where}: longer than {MAX_LINE_CHARS:,} characters")
    if not line.startswith("{"):
        _check_prompt(line, where, "prompt")
        return PromptLine(number, line)
    try:
        obj = json.loads(line, parse_constant=_not_a_number)
    except (ValueError, RecursionError) as exc:  # bad JSON, NaN/Infinity, too deep, 4300+ digit integers
        raise MinidiffError(f"{where}: not a valid JSON object ({first_line(exc, 200, empty=type(exc).__name__)})") from None
    if not isinstance(obj, dict):
        raise MinidiffError(f"{where}: a line starting with '{{' must be one JSON object")
    unknown = [k for k in obj if k not in KEYS]
    if unknown:
        raise MinidiffError(f"{where}: unknown key {shown(unknown[0])}; a line may set {', '.join(KEYS)}")
    if "prompt" not in obj:
        raise MinidiffError(f"{where}: no \"prompt\"")
    _check_prompt(obj["prompt"], where, "prompt")
    overrides = {field: _checked(key, obj[key], where) for key, field in OVERRIDES.items() if key in obj}
    if "n" in obj:
        overrides["n"] = _checked("n", obj["n"], where)
    return PromptLine(number, obj["prompt"], overrides)


def _checked(key: str, value: Any, where: str) -> Any:
    from minidiff_cli.inference.pipeline import MAX_CFG, MAX_IMAGES, MAX_SEED

    if key == "negative":
        _check_prompt(value, where, "negative")
        return value
    if key == "cfg":
        if not (is_finite_number(value) and 0 <= value <= MAX_CFG):
            raise MinidiffError(f"{where}: \"cfg\" must be a number from 0 to {MAX_CFG:g} (got {shown(value)})")
        return float(value)
    low, high = {"seed": (0, MAX_SEED), "steps": (1, MAX_STEPS), "n": (1, MAX_IMAGES)}[key]
    if not (is_int(value) and low <= value <= high):
        raise MinidiffError(f"{where}: \"{key}\" must be a whole number from {low} to {high} (got {shown(value)})")
    return value


def _check_prompt(text: Any, where: str, what: str) -> None:
    from minidiff_cli.inference.pipeline import check_text

    if not isinstance(text, str):
        raise MinidiffError(f"{where}: \"{what}\" must be text (got {shown(text)})")
    try:
        check_text(what, text)
    except MinidiffError as exc:
        raise MinidiffError(f"{where}: {exc}") from None


# -- what the lines ask for ---------------------------------------------------------------------
def jobs(lines: list[PromptLine], base, default_count: int, path: str | os.PathLike) -> list[LineJob]:
    """Each line's Generation: its own values over ``base`` (the flags, --from and defaults)."""
    from minidiff_cli.inference.pipeline import MAX_IMAGES, MAX_SEED

    out, total = [], 0
    for line in lines:
        values = {k: v for k, v in line.overrides.items() if k != "n"}
        gen = dataclasses.replace(base, prompt=line.prompt, **values)
        count = line.overrides.get("n", default_count)
        if gen.seed + count - 1 > MAX_SEED:
            raise MinidiffError(f"{path}, line {line.number}: seed {gen.seed} + {count} images passes {MAX_SEED}")
        total += count
        out.append(LineJob(line.number, gen, count))
    if total > MAX_IMAGES:
        raise MinidiffError(f"'{path}' asks for {total:,} images, more than {MAX_IMAGES:,} at once; split it")
    return out


def batches(line_jobs: list[LineJob], size: int) -> list[Batch]:
    """Consecutive images with the same settings (all but prompt and seed), ``size`` at most a batch.

    Computed from the file alone, never from the number of processes: every image is then
    sampled in the same batch, with the same float rounding, however the batches are shared.
    """
    out: list[Batch] = []
    rows: list[tuple[LineJob, int]] = []
    for job in line_jobs:
        for k in range(job.count):
            if rows and (len(rows) == size or _settings(rows[0][0].gen) != _settings(job.gen)):
                out.append(Batch(tuple(rows)))
                rows = []
            rows.append((job, k))
    if rows:
        out.append(Batch(tuple(rows)))
    return out


def share(all_batches: list[Batch], rank: int, world: int) -> list[Batch]:
    """This process's batches: every world-th one, from its rank (round robin keeps shares even)."""
    return all_batches[rank::world]


def _settings(gen) -> tuple:
    return (gen.negative_prompt, gen.steps, gen.cfg, gen.sampler, gen.eta,
            json.dumps(gen.sampler_options, sort_keys=True))


def image_names(line_jobs: list[LineJob], folder: Path) -> dict[tuple[int, int], Path]:
    """(line, k) -> folder/line-LLLLL-KK.png; K is as wide as the largest count needs."""
    width = max(2, len(str(max(job.count for job in line_jobs) - 1)))
    return {(job.line, k): folder / f"line-{job.line:05d}-{k:0{width}d}.png"
            for job in line_jobs for k in range(job.count)}


def _not_a_number(name: str):
    raise ValueError(f"{name} is not a number")

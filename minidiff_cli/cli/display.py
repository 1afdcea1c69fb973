"""Terminal output shared by commands: progress bars on stderr, images as half-blocks."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import typer


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def progress_columns(label: str, *fields: str) -> list:
    """The columns of every minidiff progress bar: label, bar, n/total, ``fields``, elapsed time, ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return [TextColumn(label), BarColumn(), MofNCompleteColumn(), *(TextColumn(f) for f in fields),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]


@contextmanager
def step_progress(total: int, description: str, quiet: bool = False) -> Iterator:
    """A rich progress bar on stderr (steps/s, ETA); yields ``advance(n=1)``.

    The bar appears at the first step: an error found before any sampling (an unknown sampler, a
    bad sampler option) is then the only line on stderr, not one under a "0/50" bar."""
    if quiet:
        yield lambda n=1: None
        return
    from rich.progress import Progress

    columns = progress_columns("{task.description}", "[progress.data.speed]{task.fields[rate]}")
    progress = Progress(*columns, console=stderr_console(), transient=False)
    task = progress.add_task(description, total=total, rate="")
    shown = []

    def advance(n: int = 1) -> None:
        if not shown:
            progress.start()
            shown.append(True)
        progress.advance(task, n)
        speed = progress.tasks[0].speed
        if speed:
            progress.update(task, rate=f"{speed:.1f} steps/s")

    try:
        yield advance
    finally:
        if shown:
            progress.stop()


def image_to_text(image, max_width: int = 64):
    """A rich Text drawing ``image`` with coloured upper-half blocks: two pixel rows per line."""
    from rich.text import Text

    img = image.convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, max(2, round(img.height * max_width / img.width))))
    if img.height % 2:
        from PIL import Image

        padded = Image.new("RGB", (img.width, img.height + 1))
        padded.paste(img)
        img = padded
    px = img.load()
    text = Text()
    for y in range(0, img.height, 2):
        for x in range(img.width):
            top, bottom = px[x, y], px[x, y + 1]
            text.append("\u2580", style=f"rgb({top[0]},{top[1]},{top[2]}) on rgb({bottom[0]},{bottom[1]},{bottom[2]})")
        text.append("\n")
    return text


def can_preview() -> bool:
    """Whether a colour picture belongs on stdout: a terminal, colour allowed (no-color.org), not dumb.

    Without colour the half-blocks would be rows of identical characters, so no picture is better.
    """
    import os

    return (sys.stdout.isatty() and not os.environ.get("NO_COLOR")
            and os.environ.get("TERM", "").lower() != "dumb")


GAP = 2  # pixels (columns) between tiles; one text line between rows of tiles


def preview_layout(count: int, side: int, width: int, height: int) -> tuple[int, int, int]:
    """(tile side in pixels, tiles per row, tiles shown) for ``count`` square images in a
    terminal of ``width`` columns and ``height`` lines: as many whole rows as fit, at least one."""
    side = max(2, min(side, width))
    per_row = max(1, min(count, (width + GAP) // (side + GAP)))
    lines_per_row = -(-side // 2) + 1
    rows = max(1, (height - 2) // lines_per_row)  # two lines kept for the prompt and the note
    return side, per_row, min(count, per_row * rows)


def show_images(images) -> None:
    """Draw images tiled in a grid that fits the terminal, when stdout is a colour terminal;
    a last line says how many did not fit (they are in the files printed above)."""
    if not images or not can_preview():
        return
    from PIL import Image
    from rich.console import Console

    console = Console()
    side, per_row, shown = preview_layout(len(images), max(images[0].size), console.width, console.height)
    tiles = [img.convert("RGB").resize((side, side)) if max(img.size) != side else img.convert("RGB")
             for img in images[:shown]]
    for start in range(0, shown, per_row):
        row = tiles[start:start + per_row]
        sheet = Image.new("RGB", (len(row) * (side + GAP) - GAP, side), (0, 0, 0))
        for i, tile in enumerate(row):
            sheet.paste(tile, (i * (side + GAP), 0))
        console.print(image_to_text(sheet, max_width=sheet.width))  # its newline is the gap between rows
    if shown < len(images):
        console.print(f"{len(images) - shown} more image(s) not shown; the terminal fits {shown}", highlight=False)


@contextmanager
def loss_progress(total: int, quiet: bool, label: str = "clip",
                  log_every: int = 0) -> Iterator[Callable[[dict], None]]:
    """A rich progress bar on stderr (step, mean loss of the last 50 steps, it/s, ETA); yields the
    training callback. Quiet: a log line every ``log_every`` steps (none when 0). Off a terminal (a
    log file, a pipe, CI) a bar would only write escape codes, so lines come instead: every
    ``log_every`` steps, or a twentieth of the run when that is 0."""
    if quiet or not sys.stderr.isatty():
        every = log_every or (0 if quiet else max(1, total // 20))

        def log(info: dict) -> None:
            if every and info["step"] % every == 0:
                typer.echo(f"{label}: step {info['step']} loss {info['smoothed']:.4f}", err=True)
        yield log
        return
    from rich.progress import Progress

    columns = progress_columns(label, "loss {task.fields[loss]}", "{task.fields[rate]}")
    with Progress(*columns, console=stderr_console()) as progress:
        task = progress.add_task(label, total=total, loss="-", rate="")

        def report(info: dict) -> None:
            # 4 places, as the summary: the summary's figure is stored rounded to 4, and 3 places of
            # both would disagree in the last digit after double rounding (1.54949 -> 1.549 / 1.550)
            progress.update(task, completed=info["step"], loss=f"{info['smoothed']:.4f}")
            speed = progress.tasks[0].speed
            if speed:
                progress.update(task, rate=f"{speed:.1f} it/s")

        yield report

"""Terminal output shared by commands: progress bars on stderr, images as half-blocks."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def step_progress(total: int, description: str, quiet: bool = False) -> Iterator:
    """A rich progress bar on stderr (steps/s, ETA); yields ``advance(n=1)``."""
    if quiet:
        yield lambda n=1: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[progress.data.speed]{task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=stderr_console(), transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            speed = progress.tasks[0].speed
            if speed:
                progress.update(task, rate=f"{speed:.1f} steps/s")

        yield advance


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


def show_images(images, max_width: int = 64) -> None:
    """Draw images side by side in the terminal when stdout is one."""
    if not sys.stdout.isatty() or not images:
        return
    from PIL import Image
    from rich.console import Console

    gap = 2
    w, h = images[0].width, images[0].height
    per_row = max(1, min(len(images), max_width // (w + gap)))
    for start in range(0, len(images), per_row):
        row = images[start:start + per_row]
        sheet = Image.new("RGB", (len(row) * (w + gap) - gap, h), (0, 0, 0))
        for i, img in enumerate(row):
            sheet.paste(img.convert("RGB"), (i * (w + gap), 0))
        Console().print(image_to_text(sheet, max_width=max(max_width, sheet.width)), end="")

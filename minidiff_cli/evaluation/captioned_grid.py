"""A grid of generated images with their captions under them: the picture of what a model draws.

Small models draw small images (16 or 32 pixels), so each one is enlarged by whole
pixels (nearest neighbour: no smoothing that the model did not draw) before its caption
is written beneath it, wrapped to the cell's width. Held-out captions (never seen in
training) are marked with an asterisk.
"""

from __future__ import annotations

import textwrap

CELL = 96  # pixels of each enlarged image
LINES = 3  # caption lines per cell


def captioned_grid(images: list, captions: list[str], *, columns: int = 8, heldout=frozenset()):
    """A PIL image: ``images`` (PIL, any size) in rows of ``columns``, each above its caption."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    line_h, pad = 13, 4
    cell_h = CELL + pad + LINES * line_h + pad
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (CELL + pad) + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    chars = max(8, CELL // 6)
    for k, (image, caption) in enumerate(zip(images, captions)):
        x, y = pad + (k % columns) * (CELL + pad), pad + (k // columns) * cell_h
        scale = max(1, CELL // max(image.size))
        big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
        sheet.paste(big, (x + (CELL - big.width) // 2, y + (CELL - big.height) // 2))
        text = caption + (" *" if caption in heldout else "")
        for n, line in enumerate(textwrap.wrap(text, chars)[:LINES]):
            draw.text((x, y + CELL + pad + n * line_h), line, fill=(20, 20, 20), font=font)
    return sheet

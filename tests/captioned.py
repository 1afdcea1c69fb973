"""A tiny captioned folder (imagefolder layout) made in a test: distinct pictures, distinct captions."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "bar")


def captioned_folder(root: Path, size: int = 20) -> Path:
    """12 RGBA pictures "images/{colour}-{shape}.png" captioned "{colour} {shape}", with metadata.jsonl."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
            draw = ImageDraw.Draw(image)
            box = (size // 6, size // 6, size - size // 6, size - size // 6)
            if shape == "circle":
                draw.ellipse(box, fill=rgb)
            elif shape == "square":
                draw.rectangle(box, fill=rgb)
            else:
                draw.rectangle((1, size // 2 - 2, size - 2, size // 2 + 2), fill=rgb)
            name = f"images/{colour}-{shape}.png"
            image.save(root / name)
            lines.append(json.dumps({"file_name": name, "text": f"{colour} {shape}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


TINY_CLIP_TABLE = """
[train.clip]
width = 16
heads = 2
layers = 1
embed_dim = 16
context_length = 12
vision_width = 8
batch_size = 8
"""

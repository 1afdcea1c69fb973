"""Generation parameters inside PNG files.

Two text chunks:

- ``parameters``: the human-readable layout used by AUTOMATIC1111's web UI and
  stable-diffusion.cpp, so other tools show our images' settings::

      a red circle
      Negative prompt: blurry
      Steps: 50, Sampler: ddim, CFG scale: 3.0, Seed: 7, Size: 32x32, Model: shapes-clip, Model hash: 0123456789

- ``minidiff``: the exact parameters as JSON, which ``info`` and ``--from`` read.

PNGs from strangers may be hostile: Pillow's decompression-bomb and text-chunk
limits stay on, and every failure becomes one line naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from minidiff_cli.errors import ImageMetadataError
from minidiff_cli.fileio import atomic_write

JSON_KEY = "minidiff"
TEXT_KEY = "parameters"
MAX_JSON_CHARS = 64 * 1024  # far more than any real parameter set


def format_parameters(p: dict[str, Any]) -> str:
    """The AUTOMATIC1111-style text for a parameter dict."""
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", p.get("steps")), ("Sampler", p.get("sampler")), ("CFG scale", p.get("cfg")),
              ("Seed", p.get("seed")), ("Size", f"{p.get('width')}x{p.get('height')}"),
              ("Model", p.get("model")), ("Model hash", p.get("model_hash"))]
    if p.get("eta") is not None:
        fields.append(("Eta", p["eta"]))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def save_png(image, path: str | os.PathLike, params: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``image`` with its parameters, atomically, never replacing a file unless asked."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(TEXT_KEY, format_parameters(params))
    info.add_text(JSON_KEY, json.dumps(params, ensure_ascii=False))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite=overwrite)


def read_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The minidiff parameters stored in a PNG; a one-line error when there are none."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageMetadataError(f"image '{path}' does not exist")
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ImageMetadataError(f"'{path}' is a {image.format} image; minidiff parameters live in PNGs")
            text = dict(getattr(image, "text", {}) or {})
    except ImageMetadataError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ImageMetadataError(f"'{path}' is not a readable image") from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for broken chunks
        raise ImageMetadataError(f"'{path}' could not be read: {exc}") from None
    raw = text.get(JSON_KEY)
    if raw is None:
        raise ImageMetadataError(f"'{path}' has no minidiff parameters (it was not made by minidiff generate)")
    if len(raw) > MAX_JSON_CHARS:
        raise ImageMetadataError(f"'{path}' has a parameter chunk of {len(raw)} characters; refusing it")
    try:
        params = json.loads(raw)
    except json.JSONDecodeError:
        raise ImageMetadataError(f"'{path}' has garbled minidiff parameters (not JSON)") from None
    if not isinstance(params, dict) or not isinstance(params.get("prompt", ""), str):
        raise ImageMetadataError(f"'{path}' has garbled minidiff parameters (not a parameter object)")
    return params

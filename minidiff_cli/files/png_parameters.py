"""Generation parameters inside PNG files.

Two text chunks:

- ``parameters``: the human-readable layout used by AUTOMATIC1111's web UI and
  stable-diffusion.cpp, so other tools show our images' settings::

      a red circle
      Negative prompt: blurry
      Steps: 50, Sampler: ddim, CFG scale: 3.0, Seed: 7, Size: 32x32, Model: shapes-clip, Model hash: 0123456789

- ``minidiff``: the exact parameters as JSON, which ``info`` and ``--from`` read.
  A PNG with only ``parameters`` (made by another program) is read by
  ``inference/infotext.py``, from the text that ``read_texts`` returns after the checks below.

PNGs from strangers may be hostile. Before Pillow parses anything, the chunk
headers up to the image data are walked by hand (8 bytes read per chunk): the
pixel count in IHDR must be within Pillow's ``Image.MAX_IMAGE_PIXELS`` and no text
chunk may be larger than ``PngImagePlugin.MAX_TEXT_CHUNK``. Pillow then reads the
same chunks with its own limits on (decompression bombs, ``MAX_TEXT_CHUNK`` for
zTXt/iTXt inflation, ``MAX_TEXT_MEMORY`` in all). Only the text chunks before the
image data are read (where minidiff, Pillow and AUTOMATIC1111 write them), so pixel
data is never decoded to read parameters. Every failure is one line naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

from minidiff_cli.errors import ImageMetadataError, first_line
from minidiff_cli.files.atomic import atomic_write

JSON_KEY = "minidiff"
TEXT_KEY = "parameters"
MAX_JSON_CHARS = 64 * 1024  # far more than any real parameter set
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
MAX_CHUNKS = 10_000  # chunks before the image data; real files have a dozen


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
    # Image-to-image: "Denoising strength" is AUTOMATIC1111's name for it; the hashes are minidiff's.
    fields += [("Denoising strength", p.get("strength")), ("Init image hash", p.get("init_image_hash")),
               ("Mask hash", p.get("mask_hash")), ("Resample", p.get("resample") or None)]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None))
    return "\n".join(lines)


def save_png(image, path: str | os.PathLike, params: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``image`` with its parameters, atomically, never replacing a file unless asked."""
    return atomic_write(path, png_writer(image, params), overwrite=overwrite)


def png_writer(image, params: dict[str, Any]):
    """``write(path)``: ``image`` as a PNG with its parameters (for fileio's atomic writers)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(TEXT_KEY, format_parameters(params))
    info.add_text(JSON_KEY, json.dumps(params, ensure_ascii=False))
    return lambda tmp: image.save(tmp, format="PNG", pnginfo=info)


def read_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The minidiff parameters stored in a PNG; a one-line ImageMetadataError otherwise.

    Returns a dict with a string ``prompt`` whose values came from JSON; the caller
    checks the types of the keys it uses.
    """
    path = Path(path)
    return parameters_from_texts(path, read_texts(path))


def read_texts(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks before a PNG's image data, after the chunk walk; one ImageMetadataError line otherwise."""
    path = Path(path)
    try:
        if not path.exists():
            raise ImageMetadataError(f"image '{path}' does not exist")
        if not path.is_file():
            raise ImageMetadataError(f"'{path}' is not a file")
        with open(path, "rb") as fh:
            signature = fh.read(8)
            if signature != PNG_SIGNATURE:
                raise ImageMetadataError(_not_png(path, signature))
            _check_chunks(path, fh)
        return _pillow_text(path)
    except ImageMetadataError:
        raise
    except (OSError, ValueError) as exc:  # unreadable file, or a name the system refuses
        raise ImageMetadataError(f"'{path}' could not be read: {first_line(exc, empty=type(exc).__name__)}") from None


def parameters_from_texts(path: Path, texts: dict[str, str]) -> dict[str, Any]:
    """minidiff's own parameters from the JSON chunk of ``texts`` (as ``read_texts`` returns them)."""
    return _parse(path, texts.get(JSON_KEY))


def _not_png(path: Path, signature: bytes) -> str:
    """Why a file that lacks the PNG signature cannot hold parameters, naming its format if Pillow knows it."""
    if not signature:
        return f"'{path}' is empty, not a PNG image"
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # only the format is wanted; nothing is decoded
            with Image.open(path) as image:
                kind = image.format
    except Exception:  # any failure means: not an image Pillow knows
        kind = None
    if kind:
        return f"'{path}' is a {kind} image; minidiff parameters live in PNGs"
    return f"'{path}' is not a PNG image"


def _check_chunks(path: Path, fh) -> None:
    """Walk the chunk headers before the image data, checking sizes before Pillow reads anything."""
    from PIL import Image, PngImagePlugin

    size = os.fstat(fh.fileno()).st_size
    position = len(PNG_SIGNATURE)
    for index in range(MAX_CHUNKS):
        fh.seek(position)
        head = fh.read(8)
        if len(head) < 8:
            raise ImageMetadataError(f"'{path}' is truncated: it ends before its image data")
        length, kind = struct.unpack(">I4s", head)
        if length > 2**31 - 1 or position + 12 + length > size:
            raise ImageMetadataError(f"'{path}' is truncated or corrupt: a {_chunk_name(kind)} chunk of "
                                     f"{length} bytes does not fit the file")
        if index == 0:
            if kind != b"IHDR" or length != 13:
                raise ImageMetadataError(f"'{path}' is corrupt: it does not start with an IHDR chunk")
            width, height = struct.unpack(">II", fh.read(8))
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and width * height > limit:
                raise ImageMetadataError(f"'{path}' claims {width}x{height} pixels, more than Pillow's limit of "
                                         f"{limit} (a decompression bomb?); refusing it")
        if kind in TEXT_CHUNKS and length > PngImagePlugin.MAX_TEXT_CHUNK:
            raise ImageMetadataError(f"'{path}' has a {kind.decode()} chunk of {length} bytes, more than Pillow's "
                                     f"limit of {PngImagePlugin.MAX_TEXT_CHUNK}; refusing it")
        if kind in (b"IDAT", b"IEND"):
            return
        position += 12 + length
    raise ImageMetadataError(f"'{path}' has more than {MAX_CHUNKS} chunks before its image data; refusing it")


def _chunk_name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else repr(kind)


def _pillow_text(path: Path) -> dict[str, str]:
    """The text chunks before the image data, as Pillow reads them (header only, limits on)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; here it is an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=["PNG"]) as image:
                info = dict(image.info)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageMetadataError(f"'{path}' has more pixels than Pillow's limit (a decompression bomb?); "
                                 "refusing it") from None
    except UnidentifiedImageError:
        raise ImageMetadataError(f"'{path}' is not a readable PNG image") from None
    except ValueError as exc:  # Pillow's text limits: MAX_TEXT_CHUNK (inflated zTXt/iTXt), MAX_TEXT_MEMORY
        raise ImageMetadataError(f"'{path}' has text chunks beyond Pillow's limits ({first_line(exc, empty=type(exc).__name__)}); "
                                 "refusing it") from None
    except (OSError, SyntaxError, struct.error, EOFError) as exc:  # Pillow's errors for broken chunks
        raise ImageMetadataError(f"'{path}' is a broken PNG: {first_line(exc, empty=type(exc).__name__)}") from None
    return {k: v for k, v in info.items() if isinstance(k, str) and isinstance(v, str)}


def _parse(path: Path, raw: str | None) -> dict[str, Any]:
    if raw is None:
        raise ImageMetadataError(f"'{path}' has no minidiff parameters (it was not made by minidiff generate)")
    if len(raw) > MAX_JSON_CHARS:
        raise ImageMetadataError(f"'{path}' has a parameter chunk of {len(raw)} characters; refusing it")
    try:
        params = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # not JSON, NaN/Infinity, too deep, or an integer of 4300+ digits
        raise ImageMetadataError(f"'{path}' has garbled minidiff parameters (not JSON)") from None
    if not isinstance(params, dict) or not isinstance(params.get("prompt", ""), str):
        raise ImageMetadataError(f"'{path}' has garbled minidiff parameters (not a parameter object)")
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):  # 1e999 parses as infinity
            raise ImageMetadataError(f"'{path}' has garbled minidiff parameters ('{key}' is not finite)")
    return params


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number minidiff stores")

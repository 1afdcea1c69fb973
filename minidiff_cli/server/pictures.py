"""Pictures from clients (base64, with or without a ``data:`` prefix), bounded before decoding.

The order matters: the text's length is checked before it is decoded, the decoded bytes are
opened by Pillow only as PNG, JPEG or WebP, and the size in the header is checked
(``data.images.check_picture``, and this server's own pixel bound) before a pixel is decoded. A
decompression bomb, a truncated file or text that is not base64 is one 422 line. Nothing is
written to disk.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from minidiff_cli.data.images import check_picture
from minidiff_cli.errors import MinidiffError, first_line
from minidiff_cli.server import limits

FORMATS = ("PNG", "JPEG", "WEBP")


def decode_bytes(text, what: str) -> bytes:
    """The bytes of a base64 picture (``data:image/png;base64,...`` or bare)."""
    if not isinstance(text, str):
        raise MinidiffError(f"{what} must be a base64 string")
    if len(text) > limits.MAX_BASE64_CHARS:
        raise MinidiffError(f"{what} is {len(text):,} base64 characters, more than {limits.MAX_BASE64_CHARS:,}")
    if text.startswith("data:"):
        head, comma, text = text.partition(",")
        if not comma or not head.endswith(";base64"):
            raise MinidiffError(f"{what} is a data: URL that is not base64")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MinidiffError(f"{what} is not valid base64") from None


def open_picture(text, what: str):
    """A loaded PIL image from a client's base64 text, its size bounded before decoding."""
    from PIL import Image, UnidentifiedImageError

    data = decode_bytes(text, what)
    if not data:
        raise MinidiffError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
            width, height = image.size
            if width * height > limits.MAX_PICTURE_PIXELS:
                raise MinidiffError(f"{what} is {width}x{height} pixels, more than the {limits.MAX_PICTURE_PIXELS:,} "
                                    "this server decodes")
            check_picture(image.size, what)
            image.load()
            return image
    except UnidentifiedImageError:
        raise MinidiffError(f"{what} is not a PNG, JPEG or WebP picture") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MinidiffError(f"{what} has more pixels than Pillow's limit (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise MinidiffError(f"{what} cannot be read: {first_line(exc, 200, type(exc).__name__)}") from None


def png_texts(text) -> dict[str, str]:
    """The text chunks of a client's PNG (for png-info), without decoding its pixels."""
    from PIL import Image, UnidentifiedImageError

    data = decode_bytes(text, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:  # Pillow's text-chunk limits apply
                return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    except UnidentifiedImageError:
        raise MinidiffError("image is not a PNG picture") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MinidiffError("image has more pixels than Pillow's limit (a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MinidiffError(f"image cannot be read: {first_line(exc, 200, type(exc).__name__)}") from None

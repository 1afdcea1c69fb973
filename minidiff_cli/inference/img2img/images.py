"""Init images and masks: read from strangers' files safely, then fitted to the model.

Reading follows the rules for every picture minidiff opens (SECURITY.md): a PNG's chunk headers
are walked by hand first (``files.png_parameters.read_texts``: pixel count within Pillow's
``MAX_IMAGE_PIXELS``, text chunks within its limits); every format is then bounded by the size in
its header (``data.images.check_picture``: pixel count, sides at most 32 to one), before any pixel
is decoded. Only PNG, JPEG and WebP are opened, the formats of ``train --data DIR``.

Fitting brings an image to the model's size and channels as training data is brought
(``data.images.to_rgb``: EXIF rotation, transparency onto white; ``data.images.resize_center_crop``) and says
what it did in one line. A mask must have the init image's size (upright, after EXIF) and is
read as grey levels: white (1) repaints, black (0) keeps, grey blends.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from minidiff_cli.data.images import check_picture
from minidiff_cli.errors import MinidiffError

FORMATS = ("PNG", "JPEG", "WEBP")
EXIF_ORIENTATION = 0x0112
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
OPAQUE = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "P"}  # a mode less its alpha
MODE_WORDS = {"RGB": "RGB", "L": "grey", "P": "palette", "1": "black-and-white"}


def open_image(source, what: str):
    """``source`` (a path, or a PIL image given through the API) as a loaded PIL image."""
    from PIL import Image

    if isinstance(source, Image.Image):
        check_picture(source.size, what)
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise MinidiffError(f"the {what} must be a file path or a PIL image (got {type(source).__name__})")
    return _read(Path(source), what)


def _read(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    from minidiff_cli.files.png_parameters import PNG_SIGNATURE, read_texts

    try:
        if not path.is_file():
            raise MinidiffError(f"{what} '{path}' {'is not a file' if path.exists() else 'does not exist'}")
        with open(path, "rb") as fh:
            if fh.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE:
                read_texts(path)  # the hand walk of the chunk headers, before Pillow decodes anything
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=list(FORMATS)) as image:
                check_picture(image.size, f"{what} '{path}'")
                image.load()
                return image
    except UnidentifiedImageError:
        raise MinidiffError(f"{what} '{path}' is not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MinidiffError(f"{what} '{path}' has more pixels than Pillow's limit (a decompression bomb?); "
                            "refusing it") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise MinidiffError(f"cannot read {what} '{path}': {str(exc).strip() or type(exc).__name__}") from None


def upright(image):
    """``image`` turned as its EXIF orientation says (as it is shown)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)


def pixel_hash(image) -> str:
    """10 hex digits of the SHA-256 of the upright pixels, mode and size: the same picture gives the
    same hash, whatever file or API call it came through."""
    image = upright(image)
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:10]


def fit_image(image, size: int, channels: int, what: str = "the init image"):
    """(float32 tensor [channels, size, size] in [-1, 1], what was done or None) for an init image (or
    another picture, named by ``what`` in errors: ``vae reconstruct``'s)."""
    from minidiff_cli.data.images import check_fit, pil_to_tensor, resize_center_crop, to_rgb

    if channels not in (1, 3):
        raise MinidiffError(f"init images need a model with 1 or 3 channels; this one has {channels}")
    check_fit(image.size, size, what)  # before any conversion or resize: a thin strip is refused here
    target = "L" if channels == 1 else "RGB"
    done = []
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        done.append("turned upright by its EXIF orientation")
    if image.mode in TRANSPARENT_MODES or (image.mode == "P" and "transparency" in image.info):
        done.append("transparency flattened onto white")
    base = OPAQUE.get(image.mode, image.mode)
    if base != target:
        done.append(f"{MODE_WORDS.get(base, base)} converted to {MODE_WORDS[target]}")
    fitted = to_rgb(image).convert(target)
    if fitted.size != (size, size):
        cut = "" if fitted.width == fitted.height else " and centre-cropped"
        done.append(f"{fitted.width}x{fitted.height} scaled{cut} to {size}x{size}")
        fitted = resize_center_crop(fitted, size, what)
    return pil_to_tensor(fitted), ", ".join(done) or None


def fit_mask(mask, image_size: tuple[int, int], size: int):
    """float32 tensor [1, size, size] in [0, 1] (1 = repaint) for a mask of the init image's upright size."""
    from minidiff_cli.data.images import check_fit, pil_to_uint8, resize_center_crop, to_rgb

    width, height = upright(mask).size
    if (width, height) != tuple(image_size):
        raise MinidiffError(f"the mask is {width}x{height} but the init image is {image_size[0]}x{image_size[1]}; "
                            "they must be the same size")
    check_fit(mask.size, size, "the mask")
    grey = to_rgb(mask).convert("L")  # transparency counts as white: repainted
    return pil_to_uint8(resize_center_crop(grey, size, "the mask")).float() / 255.0

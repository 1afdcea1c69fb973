"""Pictures as minidiff reads and writes them: RGB, square, tensors in [-1, 1], and grids of them.

Every picture a user gives (init images and masks, ``noise``, ``vae reconstruct``, training
folders) is fitted to a square by ``resize_center_crop``: its shorter side scaled to the size
asked for, then the centre cut out. A tiny file can claim a huge, thin picture (an 89,000,000 x 1
PNG is 259 KB): scaling its short side to 64 would make a picture of billions of pixels. So a
picture's size is checked from its header, before any pixel is decoded (``check_picture``: the
pixel count within Pillow's ``MAX_IMAGE_PIXELS``, the sides at most MAX_ASPECT to one), and the
size after fitting before anything is resized (``check_fit``); ``resize_center_crop`` checks
both itself, so every caller is covered.

PIL and torch are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from minidiff_cli.errors import MinidiffError, is_int

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_ASPECT = 32  # the longer side at most 32 times the shorter: panoramas are 2:1 to 10:1
MAX_FITTED_PIXELS = 1 << 26  # the picture scaled for the crop (67 M pixels, 200 MB as RGB bytes)


def check_picture(size: tuple[int, int], what: str) -> None:
    """Refuse, from the size in a picture's header, one minidiff will not decode or fit: more pixels
    than Pillow's ``MAX_IMAGE_PIXELS`` (where Pillow itself only warns), no pixels, or sides more
    than MAX_ASPECT to one. ``what`` names the picture in the message ("init image 'a.png'")."""
    from PIL import Image

    width, height = size
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise MinidiffError(f"{what} claims {width}x{height} pixels, more than Pillow's limit of {limit} "
                            "(a decompression bomb?); refusing it")
    if min(width, height) < 1:
        raise MinidiffError(f"{what} is {width}x{height} pixels: it has no pixels to read")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise MinidiffError(f"{what} is {width}x{height} pixels, more than {MAX_ASPECT} times as long as it is "
                            f"wide; minidiff fits pictures to a square and refuses strips this thin")


def fitted_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """The size ``resize_center_crop`` scales a picture of ``size`` to before cutting the square."""
    width, height = size
    scale = side / min(width, height)
    return max(side, round(width * scale)), max(side, round(height * scale))


def check_fit(size: tuple[int, int], side: int, what: str) -> None:
    """Refuse, before anything is resized, fitting a picture of ``size`` to ``side`` x ``side`` when
    that would first scale it to more than MAX_FITTED_PIXELS pixels (or ``side`` is not a size)."""
    if not is_int(side) or side < 1:
        raise MinidiffError(f"cannot fit {what} to {side!r:.40} pixels: the size must be a whole number from 1")
    check_picture(size, what)
    new_w, new_h = fitted_size(size, side)
    if new_w * new_h > MAX_FITTED_PIXELS:
        raise MinidiffError(f"fitting {what} ({size[0]}x{size[1]}) to {side}x{side} would scale it to "
                            f"{new_w}x{new_h} pixels, more than the {MAX_FITTED_PIXELS:,} minidiff allows; refusing it")


def to_rgb(image):
    """``image`` as an RGB PIL image; transparent parts become white, EXIF rotation is applied."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def resize_center_crop(image, size: int, what: str = "the picture"):
    """Scale so that the shorter side is ``size``, then cut the centred ``size`` x ``size`` square.

    A picture too thin or too large to fit (``check_fit``) is a MinidiffError naming ``what``,
    raised before anything is resized."""
    from PIL import Image

    check_fit(image.size, size, what)
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = fitted_size(image.size, size)
    if (new_w, new_h) != (width, height):
        # LANCZOS for shrinking (no aliasing); BICUBIC for enlarging (no ringing halos).
        method = Image.LANCZOS if scale < 1 else Image.BICUBIC
        image = image.resize((new_w, new_h), method)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(image):
    """A PIL image as a float32 tensor [C, H, W] in [-1, 1] (C = 1 for "L", else 3)."""
    return pil_to_uint8(image).float() / 127.5 - 1.0


def pil_to_uint8(image):
    """A PIL image as a uint8 tensor [C, H, W] (C = 1 for "L", else 3)."""
    import numpy as np
    import torch

    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    array = np.array(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_pil(tensor):
    """The inverse of ``pil_to_tensor``: [C, H, W] in [-1, 1] (C = 1 or 3) to a PIL image."""
    from PIL import Image

    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor [C, H, W] with C = 1 or 3, got {tuple(tensor.shape)}")
    array = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    array = array.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    return Image.fromarray(array, mode="RGB")


def make_grid(images: list, columns: int | None = None, gap: int = 2):
    """Images in a near-square grid with a small gap."""
    import math

    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * (w + gap) - gap, rows * (h + gap) - gap), (255, 255, 255))
    for i, img in enumerate(images):
        sheet.paste(img.convert("RGB"), ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return sheet

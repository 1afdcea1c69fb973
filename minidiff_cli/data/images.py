"""Pictures as minidiff reads and writes them: RGB, square, tensors in [-1, 1], and grids of them.

PIL and torch are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


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


def resize_center_crop(image, size: int):
    """Scale so that the shorter side is ``size``, then cut the centred ``size`` x ``size`` square."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
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

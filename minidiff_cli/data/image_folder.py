"""The ``imagefolder`` dataset: your own pictures, from a folder.

Every ``.png``, ``.jpg``, ``.jpeg`` and ``.webp`` file under the folder (searched
recursively; hidden files and folders are ignored) becomes one item, converted
to RGB (transparency on white), its shorter side scaled to ``image_size`` and
centre-cropped to a square.

Captions (``data.captions``): a ``metadata.jsonl`` or a ``metadata.csv`` in the
folder (the Hugging Face ``imagefolder`` layouts: ``file_name`` relative to the
folder, and ``text``), and/or a ``.txt`` file with the same stem next to the image
(kohya / ComfyUI); where two of them caption one image they must agree. Else the
empty caption, or with ``require_captions=True`` an error naming the image.

Classes: when every image lies in a first-level subfolder, and there are at least
two of them, the subfolder names (sorted) are the classes, as in ``cat/1.png``, ``dog/2.png``. With
``require_classes=True`` a folder without them is an error.

Each file is checked up front (``PIL.Image.verify``, which reads headers and
checksums without decoding, and the size in its header: at most Pillow's
``MAX_IMAGE_PIXELS``, sides at most 32 to one, fitting to ``image_size`` bounded:
``data.images.check_fit``), so that a broken or absurd file is skipped now, with a
warning and a count in ``skipped``, instead of stopping training hours later.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from minidiff_cli.data.captions import folder_captions
from minidiff_cli.data.images import IMAGE_EXTENSIONS, check_fit, pil_to_uint8, resize_center_crop, to_rgb
from minidiff_cli.errors import MinidiffError, first_line

CACHE_BYTES = 1 << 30  # keep decoded images of folders up to 1 GiB at the training size


class ImageFolderDataset(Dataset):
    """Images (and captions, and classes) from a folder; see the module docstring."""

    def __init__(self, root, image_size: int, *, require_classes: bool = False, require_captions: bool = False):
        if root is None or str(root) == "":
            raise MinidiffError("the imagefolder dataset needs a folder; pass it with --data")
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise MinidiffError(f"image folder '{self.root}' does not exist")
        if not self.root.is_dir():
            raise MinidiffError(f"'{self.root}' is not a folder; pass the folder that holds the images")
        if int(image_size) < 1:
            raise MinidiffError(f"image size must be positive, got {image_size}")
        self.image_size, self.channels = int(image_size), 3

        files = _find_images(self.root)
        if not files:
            raise MinidiffError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in '{self.root}'")
        readable, broken = _check_readable(files, self.image_size)
        self.skipped = len(broken)
        example = f"e.g. '{broken[0][0].relative_to(self.root)}' ({broken[0][1]})" if broken else ""
        if not readable:
            raise MinidiffError(f"none of the {len(files)} images in '{self.root}' could be read, {example}")
        if broken:
            print(f"minidiff: warning: skipped {len(broken)} unreadable image(s) in '{self.root}', {example}",
                  file=sys.stderr)
        self.files = readable
        self.captions = folder_captions(self.root, readable, require=require_captions)
        self.class_names, self.labels = _classes(readable, self.root)
        # Decoded, resized images are kept (as bytes) when they fit in CACHE_BYTES: a small folder
        # is read once per run instead of once per epoch, and decoding is most of a CPU step's data time.
        fits = len(readable) * 3 * self.image_size ** 2 <= CACHE_BYTES
        self._cache: list | None = [None] * len(readable) if fits else None
        if require_classes and not self.class_names:
            raise MinidiffError(f"class conditioning needs the images of '{self.root}' in one subfolder per "
                                "class (e.g. cat/1.png, dog/2.png); every image must be in one")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        cached = self._cache[index] if self._cache is not None else None
        if cached is None:
            cached = self._read(index)
            if self._cache is not None:
                self._cache[index] = cached
        tensor = cached.float() / 127.5 - 1.0
        return {"image": tensor, "caption": self.captions[index], "label": self.labels[index]}

    def _read(self, index: int):
        """The image as uint8 [3, H, W] at the data set's size."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                check_fit(image.size, self.image_size, f"image '{path}'")  # changed since the check?
                image = to_rgb(image)
        except (OSError, UnidentifiedImageError) as exc:  # damaged after the check, or truncated data
            raise MinidiffError(f"cannot read image '{path}': {exc}") from exc
        return pil_to_uint8(resize_center_crop(image, self.image_size, f"image '{path}'"))

    def all_captions(self) -> list[str]:
        return sorted(set(self.captions))

    def captions_of_class(self, label: int) -> list[str]:
        return sorted({c for c, l in zip(self.captions, self.labels) if l == label})


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _find_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not _is_hidden(p, root))


def _check_readable(files: list[Path], size: int) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(the files to use, (file, why not) for the others): headers, checksums and sizes, nothing decoded."""
    readable, broken = [], []
    for path in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below
                with Image.open(path) as image:
                    check_fit(image.size, size, "it")  # a thin strip or a decompression bomb
                    image.verify()  # headers and checksums, without decoding: cheap
            readable.append(path)
        except MinidiffError as exc:
            broken.append((path, first_line(exc)))
        except Exception as exc:  # PIL raises many kinds here (OSError, SyntaxError, ValueError, ...)
            broken.append((path, first_line(exc, 120, empty=type(exc).__name__)))
    return readable, broken


def _classes(files: list[Path], root: Path) -> tuple[list[str], list[int]]:
    """Class names from first-level subfolders, when every image is in one and there are at least two;
    else none (labels -1). One subfolder is a layout (``images/`` beside metadata.jsonl), not classes."""
    parts = [path.relative_to(root).parts for path in files]
    if any(len(p) < 2 for p in parts):
        return [], [-1] * len(files)
    names = sorted({p[0] for p in parts})
    if len(names) < 2:
        return [], [-1] * len(files)
    index = {name: k for k, name in enumerate(names)}
    return names, [index[p[0]] for p in parts]


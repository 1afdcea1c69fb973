"""The built-in data sets, registered like any plugin's: ``shapes`` and ``imagefolder``.

Each factory keeps the contract in ``minidiff_cli.data.dataset``. The dataset classes
(and torch) are imported inside the factories, so loading this plugin is free.
"""

from __future__ import annotations

from minidiff_cli.errors import MinidiffError
from minidiff_cli.plugins import hookimpl


def make_shapes(source=None, *, image_size: int = 32, seed: int = 0, holdout=(), length: int = 100_000,
           colours=None, shapes=None, **opts):
    """Coloured circles, squares and triangles, drawn on the fly; ``source`` is ignored.

    Options: ``length`` (virtual number of items), ``colours`` and ``shapes``
    (subsets, or "star" added, as lists or comma-separated text).
    """
    from minidiff_cli.data.holdout import parse_holdout
    from minidiff_cli.data.shapes import ShapesDataset

    _no_unknown("shapes", opts, ("length", "colours", "shapes"))
    return ShapesDataset(_int("image_size", image_size), seed=_int("seed", seed),
                         holdout=parse_holdout(holdout), length=_int("length", length),
                         colours=colours, shapes=shapes)


def make_imagefolder(source, *, image_size: int, seed: int = 0, holdout=(), require_classes=False,
                     require_captions=False, **opts):
    """Your images from folder ``source``; captions from metadata.jsonl, metadata.csv or .txt files
    (``data/captions.py``), classes from subfolders.

    Options: ``require_classes`` (an error when the folder has no class subfolders),
    ``require_captions`` (an error naming an image without a caption).
    """
    from minidiff_cli.data.image_folder import ImageFolderDataset

    _no_unknown("imagefolder", opts, ("require_classes", "require_captions"))
    if holdout:
        raise MinidiffError("the imagefolder dataset cannot hold out colour/shape pairs; "
                            "hold out a share of its captions instead, e.g. --holdout 5%")
    return ImageFolderDataset(source, _int("image_size", image_size),
                              require_classes=_bool("require_classes", require_classes),
                              require_captions=_bool("require_captions", require_captions))


@hookimpl
def register_datasets(register):
    register("shapes", make_shapes)
    register("imagefolder", make_imagefolder)


# Options may arrive as text from the command line ("length=5000").
def _no_unknown(dataset: str, opts: dict, known: tuple[str, ...]) -> None:
    if opts:
        raise MinidiffError(f"unknown option '{next(iter(opts))}' for dataset '{dataset}'; "
                            f"options: {', '.join(known)}")


def _int(name: str, value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).replace("_", ""))
    except ValueError:
        raise MinidiffError(f"{name} must be a whole number, got '{value}'") from None


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise MinidiffError(f"{name} must be true or false, got '{value}'")

"""``--data NAME|DIR`` and ``--holdout``: from what a user typed to the data set to train on.

One function, ``open_dataset``, used by ``minidiff train``, ``minidiff clip train``,
``minidiff vae train`` and ``minidiff eval --data``, so they read the same data the same way:

- ``--data`` is a registered data set name (``shapes``) or a folder (``imagefolder``).
- ``--holdout`` is read by ``data.holdout``: colour-shape pairs the data set leaves out,
  or a share of the captions that ``CaptionHoldout`` hides.
- A folder's captions come from its metadata.jsonl, metadata.csv or .txt files
  (``data.captions``, which also says which wins); ``require_captions=True`` (the commands
  that learn or judge captions pass it) makes an image without one an error, and
  ``require_classes=True`` a folder without class subfolders. Other data sets ignore both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from minidiff_cli.data.holdout import CaptionHoldout, holdout_fraction
from minidiff_cli.errors import MinidiffError


def resolve(data: str) -> tuple[str, Optional[str]]:
    """(registered data set name, source): ``shapes`` -> (shapes, None), a folder -> (imagefolder, folder)."""
    from minidiff_cli import plugins

    names = plugins.registry().names("datasets")
    if data in names:
        return data, None
    if not Path(data).expanduser().exists():
        raise MinidiffError(f"--data '{data}' is neither a folder nor a dataset name ({', '.join(names)})")
    return "imagefolder", data


def open_dataset(data: str, *, image_size: int, seed: int = 0, holdout: Optional[str] = "", **opts):
    """The data set ``data`` names, at ``image_size``, with ``holdout`` applied (see the module doc)."""
    from minidiff_cli import plugins
    from minidiff_cli.data.holdout import parse_holdout

    name, source = resolve(data)
    fraction = holdout_fraction(holdout)
    pairs = [] if fraction else parse_holdout(holdout)
    if name != "imagefolder":
        opts.pop("require_classes", None)
        opts.pop("require_captions", None)
    dataset = plugins.get_dataset(name)(source, image_size=image_size, seed=seed, holdout=pairs, **opts)
    if len(dataset) == 0:
        raise MinidiffError(f"the data set '{data}' is empty")
    return CaptionHoldout(dataset, fraction) if fraction else dataset

"""``--data NAME|DIR`` and ``--holdout``: from what a user typed to the data set to train on.

One function, ``open_dataset``, used by ``minidiff train``, ``minidiff clip train``
and ``minidiff eval --data``, so the three read the same data the same way:

- ``--data`` is a registered data set name (``shapes``) or a folder (``imagefolder``).
- ``--holdout`` comes in two kinds:
  * ``"purple triangle, orange square"``: colour-shape pairs, which the data set
    itself leaves out (the ``shapes`` world; see ``data.parse_holdout``);
  * ``"5%"``: a fixed share of the *captions*, for any data set with a finite set of
    captions (a captioned folder). Whether a caption is held out depends on the
    caption alone (a hash), not on a seed or on the other captions, so the CLIP stage,
    the diffusion stage and ``eval`` of one folder agree on it without being told.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

from minidiff_cli.errors import MinidiffError

_FRACTION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def holdout_fraction(text: Optional[str]) -> Optional[float]:
    """``"5%"`` -> 0.05; None for any other form (pairs, or nothing)."""
    if not isinstance(text, str):
        return None
    match = _FRACTION.match(text)
    if not match:
        return None
    value = float(match.group(1)) / 100
    if not 0 < value < 1:
        raise MinidiffError(f"--holdout {text.strip()} must be a share above 0% and below 100%")
    return value


def is_heldout(caption: str, fraction: float) -> bool:
    """True for about ``fraction`` of all captions, decided by the caption's own hash."""
    digest = hashlib.sha256(caption.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_captions(captions, fraction: Optional[float]) -> tuple[list[str], list[str]]:
    """(seen, held-out) captions, each sorted; everything is seen without a fraction."""
    unique = sorted(set(captions))
    if not fraction:
        return unique, []
    held = [c for c in unique if is_heldout(c, fraction)]
    held_set = set(held)
    return [c for c in unique if c not in held_set], held


class CaptionHoldout:
    """The items of ``dataset`` whose caption is not held out; every other attribute passes through.

    ``heldout_captions`` lists what was left out (for evaluation), and ``all_captions()``
    lists what training sees, so that the trainer never embeds a held-out caption.
    """

    def __init__(self, dataset, fraction: float):
        captions = item_captions(dataset)
        self.dataset, self.fraction = dataset, fraction
        self.seen_captions, self.heldout_captions = split_captions(captions, fraction)
        held = set(self.heldout_captions)
        self.indices = [i for i, c in enumerate(captions) if c not in held]
        if not self.indices:
            raise MinidiffError(f"--holdout {fraction:.0%} leaves no image to train on")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    def __getattr__(self, name: str):  # class_names, channels, image_size, ...
        if name == "dataset":  # not set yet (during unpickling or a failed __init__)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def all_captions(self) -> list[str]:
        return list(self.seen_captions)

    @property
    def captions(self) -> list[str]:
        inner = item_captions(self.dataset)
        return [inner[i] for i in self.indices]


def item_captions(dataset) -> list[str]:
    """The caption of every item, in order; read from a ``captions`` list where the data set has one."""
    captions = getattr(dataset, "captions", None)
    if isinstance(captions, list) and len(captions) == len(dataset):
        return [str(c) for c in captions]
    if len(dataset) > 100_000:
        raise MinidiffError("a caption holdout needs a data set with a finite list of captions "
                            "(a captioned folder); for shapes, hold out colour-shape pairs")
    return [dataset[i]["caption"] for i in range(len(dataset))]


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
    from minidiff_cli.data.dataset import parse_holdout

    name, source = resolve(data)
    fraction = holdout_fraction(holdout)
    pairs = [] if fraction else parse_holdout(holdout)
    if name != "imagefolder":
        opts.pop("require_classes", None)
    dataset = plugins.get_dataset(name)(source, image_size=image_size, seed=seed, holdout=pairs, **opts)
    if len(dataset) == 0:
        raise MinidiffError(f"the data set '{data}' is empty")
    return CaptionHoldout(dataset, fraction) if fraction else dataset

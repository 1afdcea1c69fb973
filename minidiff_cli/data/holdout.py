"""``--holdout``: what a run keeps out of training, so that evaluation can ask about it.

Two kinds:
  * ``"purple triangle, orange square"``: colour-shape pairs, which the data set itself
    leaves out (the ``shapes`` world: ``parse_holdout``);
  * ``"5%"``: a fixed share of the *captions*, for any data set with a finite set of
    captions. Whether a caption is held out depends on the caption alone (a hash), not on
    a seed or on the other captions, so the CLIP stage, the diffusion stage, VAE training
    and ``eval`` of one folder agree on it without being told.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Optional

from minidiff_cli.errors import MinidiffError


def split_items(dataset, fraction: float | None) -> tuple[list[int], list[int]]:
    """(training, held-out) item indices. A captioned folder holds out the images of a share of its
    captions (the same captions ``train --holdout`` holds out); other data sets a share of their
    items, by the hash of the item's position. Nothing is held out without a fraction."""
    if not fraction:
        return list(range(len(dataset))), []
    captions = getattr(dataset, "captions", None)
    keys = captions if isinstance(captions, list) and len(captions) == len(dataset) else \
        [f"item {i}" for i in range(len(dataset))]
    held = [is_heldout(str(key), fraction) for key in keys]
    train = [i for i, h in enumerate(held) if not h]
    if not train:
        raise MinidiffError(f"--holdout {fraction:.0%} leaves no image to train on")
    return train, [i for i, h in enumerate(held) if h]


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


def parse_holdout(text: str | Iterable | None) -> list[tuple[str, str]]:
    """``"purple triangle, red square"`` -> ``[("purple", "triangle"), ("red", "square")]``.

    Items are separated by commas or semicolons; colour and shape by a space,
    ``-``, ``_``, ``:`` or ``/``. Already-parsed pairs pass through. Only the
    form is checked here; the dataset checks the names against its palette.
    """
    if text is None:
        return []
    if not isinstance(text, str):
        items = [item if isinstance(item, str) else " ".join(item) for item in text]
    else:
        items = re.split(r"[,;]", text)
    pairs = []
    for item in items:
        words = [w for w in re.split(r"[\s\-_:/]+", item.strip().lower()) if w]
        if not words:
            continue
        if len(words) != 2:
            raise MinidiffError(f"cannot read holdout item '{item.strip()}'; write 'colour shape' pairs "
                                "separated by commas, e.g. 'purple triangle, red square'")
        pairs.append((words[0], words[1]))
    return list(dict.fromkeys(pairs))  # drop repeats, keep order


def item_captions(dataset) -> list[str]:
    """The caption of every item, in order; read from a ``captions`` list where the data set has one."""
    captions = getattr(dataset, "captions", None)
    if isinstance(captions, list) and len(captions) == len(dataset):
        return [str(c) for c in captions]
    if len(dataset) > 100_000:
        raise MinidiffError("a caption holdout needs a data set with a finite list of captions "
                            "(a captioned folder); for shapes, hold out colour-shape pairs")
    return [dataset[i]["caption"] for i in range(len(dataset))]

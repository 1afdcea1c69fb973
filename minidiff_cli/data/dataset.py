"""The dataset contract, and the helpers that datasets share.

A dataset plugin registers a *factory*::

    factory(source, *, image_size, seed=0, holdout=(), **opts) -> dataset

- ``source``: what to read (a folder for ``imagefolder``; ignored by procedural
  data such as ``shapes``, which may receive ``None``).
- ``image_size``: the side of the square images the items must have.
- ``seed``: makes procedural data reproducible; a dataset read from files may
  ignore it.
- ``holdout``: ``(colour, shape)`` pairs to leave out of training, to test
  whether a model composes what it never saw (see ``parse_holdout``). Held-out
  classes are never drawn but stay in ``class_names``, so a label means the same
  with or without a holdout. A dataset that cannot hold anything out raises
  ``MinidiffError`` when given some.
- ``**opts``: dataset-specific options; an unknown option is a ``MinidiffError``.

The returned *dataset* is a ``torch.utils.data.Dataset`` whose items are dicts::

    {"image": float32 tensor [C, H, W] in [-1, 1],   # H == W == image_size
     "caption": str,                                 # "" when there is none
     "label": int}                                   # index into class_names; -1 without classes

with these attributes:

- ``class_names: list[str]``: may be empty (then every label is -1);
- ``channels: int`` and ``image_size: int``;
- when the set of captions is finite, ``all_captions() -> list[str]`` and/or
  ``captions_of_class(label) -> list[str]``: the trainer embeds each caption
  once and caches it. ``caption_set(dataset)`` asks whichever is there.

Items must not depend on the order they are asked for, so that any worker or
rank can produce any index. ``check_dataset`` checks all this on one item, for
plugin authors and for the trainer's first step.

torch is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

from typing import Any

from minidiff_cli.errors import MinidiffError

# -- images <-> tensors ------------------------------------------------------------


# -- holdout -----------------------------------------------------------------------


# -- checking the contract ---------------------------------------------------------
def caption_set(dataset) -> list[str] | None:
    """Every caption ``dataset`` can produce (sorted, unique), or None when that set is not finite."""
    if hasattr(dataset, "all_captions"):
        return sorted(set(dataset.all_captions()))
    if hasattr(dataset, "captions_of_class") and getattr(dataset, "class_names", None):
        captions: set[str] = set()
        for label in range(len(dataset.class_names)):
            captions.update(dataset.captions_of_class(label))
        return sorted(captions)
    return None


def check_dataset(dataset, name: str = "dataset") -> dict[str, Any]:
    """Check that ``dataset`` keeps the contract above (on its first item); return that item.

    Raises ``MinidiffError`` saying what is wrong, in one line.
    """
    import torch

    def fail(problem: str):
        raise MinidiffError(f"{name} breaks the dataset contract: {problem}")

    for attr, kind in (("class_names", list), ("channels", int), ("image_size", int)):
        if not isinstance(getattr(dataset, attr, None), kind):
            fail(f"attribute '{attr}' must be a {kind.__name__}")
    if len(dataset) == 0:
        fail("it has no items")
    item = dataset[0]
    if not isinstance(item, dict) or not {"image", "caption", "label"} <= set(item):
        fail("items must be dicts with keys 'image', 'caption' and 'label'")
    image, size, channels = item["image"], dataset.image_size, dataset.channels
    if not isinstance(image, torch.Tensor) or image.dtype != torch.float32:
        fail("'image' must be a float32 tensor")
    if tuple(image.shape) != (channels, size, size):
        fail(f"'image' has shape {tuple(image.shape)}, expected {(channels, size, size)}")
    if image.min() < -1.0001 or image.max() > 1.0001:
        fail("'image' values must lie in [-1, 1]")
    if not isinstance(item["caption"], str):
        fail("'caption' must be a str")
    label = item["label"]
    if not isinstance(label, int) or not -1 <= label < max(len(dataset.class_names), 0) or \
            (label == -1) != (not dataset.class_names):
        fail(f"'label' {label!r} must be an int index into class_names (-1 only when there are no classes)")
    return item


class EpochShuffle:
    """Which items step ``s`` of a run trains on: a fresh permutation per epoch, seeded by
    (seed, epoch), walked ``size`` positions a step. Stateless: step s gives the same items in
    every run, which is what makes a resumed run equal an uninterrupted one."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = int(n), int(seed)
        self._cache: tuple[int, Any] | None = None

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> list[int]:
        """This rank's share (every world-th row from rank) of the global batch of ``step``."""
        out = []
        for i in range(rank, size, world):
            epoch, offset = divmod(step * size + i, self.n)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def _permutation(self, epoch: int):
        import torch

        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g))
        return self._cache[1]

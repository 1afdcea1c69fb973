"""A run's encoded captions (a frozen text conditioner's output), the same bits whatever the run's history.

A text encoder's output for a caption depends, in its last bits, on the batch it is encoded in:
matrix kernels choose their blocking, and with it the order of their sums, by the size of the
batch. Measured with the shipped emoji CLIP on a CPU: a caption encoded alone or with one other
differs by up to about 1e-7 from the same caption in a batch of three or more. The trainer used
to encode, at each step, the captions it had not seen yet as one batch, so a caption's row
depended on which captions happened to be new with it. A resumed run has another history (the
captions of the steps before the stop are not new to it in the same groups), so its conditioning
differed in the last bits and so did every weight after it: after a stop at step 21 of 40, 128 of
the 161 tensors of a clip run's model file differed from the uninterrupted run's (the class
conditioner, which encodes nothing, resumed bit for bit).

Now a caption's row depends on the data set alone:

- when the data set's captions are a finite set (``caption_set``), they are cut, sorted, into
  fixed chunks of CHUNK; the first time a caption is needed its whole chunk is encoded, as one
  batch: always the same batches, encoded only where the run goes;
- a caption outside that set (or of a data set without one) is encoded alone, a batch of one.

The conditioner's own cache of encoded prompts (the clip conditioner keeps the last 256) is
bypassed: what it holds was encoded with other prompts, the sample grid's among them. The null
condition is likewise encoded on its own. Rows live in one table on the training device, so a
batch's conditioning is one gather (exact), not a concatenation per caption.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.errors import is_int
from minidiff_cli.runtime.devices import to_device

CHUNK = 32  # captions per batch when the caption set is known: three or more take the batched kernels


class CaptionTable:
    """Encoded captions of a frozen conditioner, each computed the same way in every run of a data set."""

    def __init__(self, conditioner: Any, device: torch.device, captions: list[str] | None):
        self.conditioner, self.device = conditioner, device
        self.known = list(captions) if captions is not None else []  # sorted and unique: caption_set's
        self.chunk_of = {caption: k // CHUNK for k, caption in enumerate(self.known)}
        self.rows: dict[str, int] = {}  # caption -> its row in table
        self.table: Conditioning | None = None
        self._null: Conditioning | None = None

    def encode(self, captions: list[str]) -> Conditioning:
        """The rows of ``captions``, encoding (in their fixed batches) those not in the table yet."""
        for caption in sorted(set(captions)):
            if caption in self.rows:
                continue  # already there, or came with an earlier caption's chunk
            chunk = self.chunk_of.get(caption)
            self._append([caption] if chunk is None else self.known[chunk * CHUNK:(chunk + 1) * CHUNK])
        index = to_device(torch.tensor([self.rows[c] for c in captions]), self.device)  # queued, not waited for
        return self.table[index]

    def null(self) -> Conditioning:
        """The conditioner's null condition, one row, encoded on its own."""
        if self._null is None:
            self._null = _fresh(self.conditioner, lambda: self.conditioner.null(1)).to(self.device)
        return self._null

    def _append(self, group: list[str]) -> None:
        encoded = _fresh(self.conditioner, lambda: self.conditioner.encode(group)).to(self.device)
        first = len(self.rows)
        self.rows.update((caption, first + k) for k, caption in enumerate(group))
        self.table = encoded if self.table is None else Conditioning.cat(self.table, encoded)


def _fresh(conditioner: Any, encode: Callable[[], Conditioning]) -> Conditioning:
    """``encode()`` without gradients and with the conditioner's own prompt cache off."""
    with torch.no_grad(), _cache_off(conditioner):
        return encode()


@contextmanager
def _cache_off(conditioner: Any) -> Iterator[None]:
    """The clip conditioner's ``cache_size`` at 0 for a while (it then neither reads nor fills its cache);
    a conditioner without a cache is left alone."""
    size = getattr(conditioner, "cache_size", None)
    if not is_int(size) or size <= 0:
        yield
        return
    conditioner.cache_size = 0
    try:
        yield
    finally:
        conditioner.cache_size = size

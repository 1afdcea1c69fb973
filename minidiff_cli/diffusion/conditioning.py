"""What a U-Net is conditioned on, and the Conditioner protocol that produces it.

A conditioner turns prompts (or class labels) into a ``Conditioning``: a sequence
of token vectors for cross-attention (``context``, [B, L, D]) and/or one vector
per image added to the time embedding (``pooled``, [B, D]). Either may be None;
both None means "unconditional".

Two operations drive classifier-free guidance (Ho & Salimans 2022):

- training drops the condition for a random fraction of rows:
  ``cond.where(keep, conditioner.null(B))``;
- sampling runs the conditional and unconditional halves as one batch:
  ``Conditioning.cat(cond, conditioner.null(B))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """A batch of conditions: ``context`` [B, L, D] and/or ``pooled`` [B, D]."""

    context: Optional[Tensor] = None
    pooled: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.context is not None and self.context.dim() != 3:
            raise ValueError(f"context must be [B, L, D], got shape {tuple(self.context.shape)}")
        if self.pooled is not None and self.pooled.dim() != 2:
            raise ValueError(f"pooled must be [B, D], got shape {tuple(self.pooled.shape)}")
        if self.context is not None and self.pooled is not None and len(self.context) != len(self.pooled):
            raise ValueError(f"context and pooled disagree on the batch size "
                             f"({len(self.context)} and {len(self.pooled)})")

    # -- what it holds ------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        """True for an unconditional input (neither context nor pooled)."""
        return self.context is None and self.pooled is None

    @property
    def batch_size(self) -> Optional[int]:
        """Rows in the batch, or None when empty (an empty conditioning fits any batch)."""
        for t in self._tensors():
            return len(t)
        return None

    def _tensors(self) -> list[Tensor]:
        return [t for t in (self.context, self.pooled) if t is not None]

    def _map(self, fn) -> "Conditioning":
        return Conditioning(None if self.context is None else fn(self.context),
                            None if self.pooled is None else fn(self.pooled))

    # -- batch operations ---------------------------------------------------------
    @classmethod
    def cat(cls, *parts: "Conditioning") -> "Conditioning":
        """Concatenate along the batch: ``cat(cond, uncond)`` is the 2B batch of guidance."""
        if not parts:
            raise ValueError("Conditioning.cat needs at least one conditioning")
        for field in ("context", "pooled"):
            present = [getattr(p, field) is not None for p in parts]
            if any(present) and not all(present):
                raise ValueError(f"cannot concatenate conditionings where only some have '{field}'")
        first = parts[0]
        return cls(None if first.context is None else torch.cat([p.context for p in parts]),
                   None if first.pooled is None else torch.cat([p.pooled for p in parts]))

    def where(self, mask: Tensor, other: "Conditioning") -> "Conditioning":
        """Row i from ``self`` where ``mask[i]`` is True, else from ``other`` (like torch.where).

        ``other`` may have batch size 1, e.g. a single null row for the whole batch.
        This is condition dropout: ``cond.where(keep, conditioner.null(B))``.
        """
        mask = mask.to(torch.bool).flatten()

        def pick(mine: Optional[Tensor], theirs: Optional[Tensor]) -> Optional[Tensor]:
            if mine is None and theirs is None:
                return None
            if mine is None or theirs is None:
                raise ValueError("cannot mix a conditioning with and without the same field")
            m = mask.to(mine.device).view(-1, *([1] * (mine.dim() - 1)))
            return torch.where(m, mine, theirs.to(device=mine.device, dtype=mine.dtype))

        return Conditioning(pick(self.context, other.context), pick(self.pooled, other.pooled))

    def repeat_interleave(self, n: int) -> "Conditioning":
        """Each row ``n`` times in a row: [a, b] -> [a, a, b, b] (n images per prompt)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def expand(self, batch: int) -> "Conditioning":
        """A batch-1 conditioning broadcast to ``batch`` rows (a view, no copy)."""
        size = self.batch_size
        if size not in (None, 1, batch):
            raise ValueError(f"cannot expand a batch of {size} to {batch}")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def __getitem__(self, index: Any) -> "Conditioning":
        """Select rows: ``cond[2:4]``, ``cond[mask]``, ``cond[indices]``; the batch dim is kept."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda t: t[index])

    # -- placement ----------------------------------------------------------------
    def to(self, device: Any = None, dtype: Optional[torch.dtype] = None) -> "Conditioning":
        """Move to ``device``; floating tensors are also cast to ``dtype`` if given."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def detach(self) -> "Conditioning":
        return self._map(lambda t: t.detach())


@runtime_checkable
class Conditioner(Protocol):
    """The contract every conditioner meets; it is also a ``torch.nn.Module``.

    Class attributes:
        name:          the registered name (``"clip"``), stored in the model file.
    Attributes:
        context_dim:   D of ``context`` [B, L, D], or None if it gives no context.
        pooled_dim:    D of ``pooled`` [B, D], or None if it gives no pooled vector.
        trainable:     True if trained jointly with the U-Net; False if frozen (the
                       trainer leaves its parameters out of the optimizer).
        storage_dtype: optional; ``"float16"`` asks the model file to store its
                       floating tensors in half precision (they load back into
                       float32 parameters).

    Building:
        ``from_options(**opts)``  a new conditioner for training; each documents its
                                  options (the trainer passes them from the CLI).
        ``from_config(config)``   an untrained module of the same shape as the one
                                  whose ``config()`` this is; the model file's tensors
                                  are then loaded with ``load_state_dict(strict=True)``.
        ``config()``              a JSON-able dict, enough for ``from_config``.

    Using:
        ``encode(prompts) -> Conditioning``  one row per prompt, on the module's device.
        ``null(batch) -> Conditioning``      the unconditional input, ``batch`` rows.
    """

    name: ClassVar[str]
    context_dim: Optional[int]
    pooled_dim: Optional[int]
    trainable: bool

    def encode(self, prompts: list[str]) -> Conditioning: ...

    def null(self, batch: int) -> Conditioning: ...

    def config(self) -> dict[str, Any]: ...

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Conditioner": ...

    @classmethod
    def from_options(cls, **opts: Any) -> "Conditioner": ...

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]: ...


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU if it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")

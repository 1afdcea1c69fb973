"""Low-rank adapters (LoRA, Hu et al. 2021) on a network's Linear and Conv2d layers.

A layer with weight W becomes W + (alpha / rank) * up @ down, with ``down`` [rank, in(, k, k)]
and ``up`` [out, rank] the only trainable tensors; ``up`` starts at zero, so an adapted network
starts as the network itself. LCM-LoRA (Luo et al. 2023) ships a few-step student this way: the
adapter is a small file beside its teacher, and merging it into the teacher's weights once at
load time makes the student as fast as the teacher per step.

For a convolution, ``down`` is a convolution of the layer's kernel size and stride to ``rank``
channels and ``up`` a 1x1 convolution back, so the product is again a k x k kernel.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from minidiff_cli.errors import MinidiffError, is_int

MAX_RANK = 256  # far beyond what a small network needs; a file asking for more is refused
TENSORS = ("down", "up")  # each adapted layer's tensors in a file: "<layer>.down", "<layer>.up"


class LoRA(nn.Module):
    """``base(x) + scale * up(down(x))`` around a frozen Linear or Conv2d ``base``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.enabled = True  # off: the base layer alone (the teacher, during distillation)
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)  # as nn.Linear initialises
        nn.init.zeros_(self.up.weight)
        self.to(base.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that asks a layer for its dtype or device keeps working)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + self.scale * self.up(self.down(x))

    def delta(self) -> torch.Tensor:
        """What the adapter adds to the base layer's weight, in its shape."""
        return self.scale * weight_delta(self.down.weight, self.up.weight)


def weight_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up @ down as a weight: [out, in] for a Linear, [out, in, k, k] for a Conv2d."""
    if down.dim() == 2:
        return up @ down
    return torch.einsum("or,rikl->oikl", up.flatten(1), down)


def adaptable(net: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``net`` an adapter may change, by name: every Linear, every ungrouped Conv2d."""
    return {name: module for name, module in net.named_modules()
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)}


def add_adapters(net: nn.Module, rank: int, alpha: float) -> dict[str, LoRA]:
    """Wrap every adaptable layer of ``net`` in a LoRA, in place; the base weights are frozen."""
    check_rank(rank, alpha)
    for p in net.parameters():
        p.requires_grad_(False)
    adapters = {}
    for name, layer in adaptable(net).items():
        parent, _, attr = name.rpartition(".")
        adapters[name] = LoRA(layer, rank, alpha)
        setattr(net.get_submodule(parent) if parent else net, attr, adapters[name])
    return adapters


def adapter_tensors(adapters: dict[str, LoRA]) -> dict[str, torch.Tensor]:
    """The adapters' trainable tensors, named "<layer>.down" and "<layer>.up"."""
    out = {}
    for name, lora in adapters.items():
        out[f"{name}.down"] = lora.down.weight.detach()
        out[f"{name}.up"] = lora.up.weight.detach()
    return out


def merge(net: nn.Module, tensors: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
    """Add the adapter in ``tensors`` to ``net``'s weights, in place (the layers stay plain layers).

    Every name must be an adaptable layer of ``net`` with both tensors in the shapes that layer
    and ``rank`` imply; anything else is a MinidiffError naming the tensor.
    """
    check_rank(rank, alpha)
    layers = adaptable(net)
    names = {key.rpartition(".")[0] for key in tensors}
    for key in tensors:
        layer, _, part = key.rpartition(".")
        if part not in TENSORS or layer not in layers:
            raise MinidiffError(f"adapter tensor '{key[:100]}' names no adaptable layer of the teacher's U-Net")
    with torch.no_grad():
        for name in sorted(names):
            base = layers[name]
            down, up = tensors.get(f"{name}.down"), tensors.get(f"{name}.up")
            if down is None or up is None:
                raise MinidiffError(f"adapter layer '{name[:100]}' lacks its down or up tensor")
            _check_shapes(name, base, down, up, rank)
            base.weight += (alpha / rank) * weight_delta(down.to(base.weight), up.to(base.weight))


def check_rank(rank, alpha) -> None:
    if not is_int(rank) or not 1 <= rank <= MAX_RANK:
        raise MinidiffError(f"adapter rank must be a whole number from 1 to {MAX_RANK} (got {rank!r:.40})")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= 4 * MAX_RANK:
        raise MinidiffError(f"adapter alpha must be a number above 0, at most {4 * MAX_RANK} (got {alpha!r:.40})")


def _check_shapes(name: str, base: nn.Module, down: torch.Tensor, up: torch.Tensor, rank: int) -> None:
    weight = base.weight
    if isinstance(base, nn.Linear):
        want_down, want_up = (rank, weight.shape[1]), (weight.shape[0], rank)
    else:
        want_down, want_up = (rank, *weight.shape[1:]), (weight.shape[0], rank, 1, 1)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise MinidiffError(f"adapter layer '{name[:100]}' has shapes {tuple(down.shape)} and {tuple(up.shape)}, "
                            f"the teacher's layer needs {want_down} and {want_up}")


def trainable(adapters: dict[str, LoRA]) -> Iterator[nn.Parameter]:
    for lora in adapters.values():
        yield lora.down.weight
        yield lora.up.weight


@contextmanager
def disabled(adapters: dict[str, LoRA]) -> Iterator[None]:
    """The adapted network as it was before the adapters: the teacher inside its student."""
    for lora in adapters.values():
        lora.enabled = False
    try:
        yield
    finally:
        for lora in adapters.values():
            lora.enabled = True

"""The optimiser and its schedule: fused AdamW, linear warm-up then cosine decay, and the EMA update."""

from __future__ import annotations

import math

import torch

from minidiff_cli.training.config import TrainConfig


def ema_update(ema: list[torch.Tensor], net: list[torch.Tensor], decay: float) -> None:
    """ema <- ema + (1 - decay) (net - ema), over matching lists of parameters, in one op.

    One multi-tensor op for the ~300 tensors instead of one op each: on a GPU that is one
    launch instead of hundreds, which for a small U-Net cost more than the arithmetic. The
    lists are built once by the caller: walking the modules for them costs ~1 ms a step.
    """
    with torch.no_grad():
        torch._foreach_lerp_(ema, net, 1 - decay)


def adamw(params: list[torch.Tensor], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors) where this torch has that for the device.

    For the shipped U-Net on a 2-core CPU the optimizer step took 7.4 ms unfused and 1.4 ms
    fused; on a GPU it is one launch instead of several per tensor.
    """
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    except RuntimeError:  # a torch without fused AdamW for this device (CPU before 2.4)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of a diffusion (or VAE) run at ``step``: its decay runs to lr_decay_steps, else max_steps."""
    horizon = cfg.lr_decay_steps or cfg.max_steps
    return warmup_cosine(step, cfg.lr, effective_warmup(cfg.warmup, horizon), horizon)


SHORT_RUN_WARMUP = 10  # a run no longer than its --warmup warms up over 1/10 of itself


def effective_warmup(warmup: int, horizon: int) -> int:
    """``warmup``, or a tenth of the schedule's ``horizon`` when the warm-up would not end before it
    (150 steps against the default 500 would never reach the peak rate and draw noise)."""
    return warmup if warmup < horizon else horizon // SHORT_RUN_WARMUP


def warmup_note(cfg: TrainConfig) -> str | None:
    """The one-line note a run whose warm-up was shortened prints; None for the others."""
    horizon = cfg.lr_decay_steps or cfg.max_steps
    if cfg.warmup < horizon or not cfg.warmup:
        return None
    return (f"--warmup {cfg.warmup} is not shorter than the learning-rate schedule ({horizon} steps): "
            f"warming up over {effective_warmup(cfg.warmup, horizon)} steps instead; a run this short "
            "may still draw mostly noise")


def warmup_cosine(step: int, peak: float, warmup: int, horizon: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``peak`` at ``horizon``, then flat."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

"""Classifier-free guidance (Ho & Salimans 2022), folded into a plain denoiser.

Samplers know nothing of prompts: they call ``denoiser(x_t, t) -> eps``. This
module builds that callable from a model and two conditionings. The conditional
and unconditional halves run as one batch of 2B, which is cheaper than two calls.
At cfg 1 (plain conditioning) and cfg 0 (unconditional) one half has no effect on
the result, so only the other one runs: a batch of B.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.errors import MinidiffError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """eps = eps_u + w (eps_c - eps_u): w = 0 is unconditional, w = 1 conditional."""
    return eps_uncond + cfg * (eps_cond - eps_uncond)


def guided_denoiser(model, cond: Conditioning, uncond: Conditioning | None, cfg: float,
                    clip_x0: float | None = 1.0) -> Denoiser:
    """A denoiser for the sampler; ``uncond=None`` means the model has no condition."""
    if not (isinstance(cfg, numbers.Real) and math.isfinite(float(cfg))):
        raise MinidiffError(f"the guidance scale must be a finite number (got {cfg!r:.40})")
    if clip_x0 is not None and not (isinstance(clip_x0, numbers.Real) and 0 < float(clip_x0) < math.inf):
        raise MinidiffError(f"clip_x0 must be a positive finite number or None (got {clip_x0!r:.40})")
    if uncond is None or cfg == 1:
        # cfg 1 is plain conditioning, eps_u + 1 (eps_c - eps_u) = eps_c: the unconditional half
        # of the batch would be computed only to cancel out, so it is not computed at all.
        def raw(x, t):
            return model.predict_eps(x, t, cond)
    elif cfg == 0:
        def raw(x, t):  # eps_u alone: the conditional half would be multiplied by zero
            return model.predict_eps(x, t, uncond)
    else:
        both = Conditioning.cat(cond, uncond)

        def raw(x, t):
            eps = model.predict_eps(torch.cat([x, x]), torch.cat([t, t]), both)
            eps_cond, eps_uncond = eps.chunk(2)
            return combine(eps_cond, eps_uncond, cfg)

    if clip_x0 is None:
        return raw
    return clipped(raw, model.schedule, clip_x0)


def clipped(denoiser: Denoiser, schedule, limit: float) -> Denoiser:
    """Clamp the implied x0 to [-limit, limit] and return the matching eps.

    Images live in [-1, 1]; a small model's x0 estimate early in sampling often
    overshoots, and guidance amplifies that. Clamping here, rather than inside a
    sampler, works for every sampler, plugins included.
    """
    abar = schedule.alphas_cumprod
    on_device = {}  # one copy per device: copying the table every step would stall a GPU each step

    def denoiser_(x, t):
        eps = denoiser(x, t)
        if x.device not in on_device:
            on_device[x.device] = abar.to(x.device)
        a = on_device[x.device][t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-limit, limit)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return denoiser_

"""SDEdit and RePaint's jumps over any ``PartialSampler``: the loop of an image-to-image run.

SDEdit (Meng et al. 2022, sec. 3): x_0 is diffused to the level of the grid's first step taken,
x = sqrt(abar) x_0 + sqrt(1 - abar) eps (Ho et al. 2020, eq. 4), and the sampler runs from there
to clean data. With a mask the denoiser is pinned (``inpaint``). RePaint's resampling
(Lugmayr et al. 2022, Algorithm 1, jump length one step): after a step from level i to i + 1,
x is diffused back to level i and the step taken again, ``resample`` times, except on the last
step (RePaint's t > 1). A multistep sampler starts its history afresh at each such step.
Noise comes from ``noise_like`` with the per-image generators, so image k is still the image of
seed + k alone.
"""

from __future__ import annotations

import math

import torch

from minidiff_cli.diffusion.sampling import noise_like, supports_partial
from minidiff_cli.errors import MinidiffError, PluginError
from minidiff_cli.inference.img2img.inpaint import keep, pinned_denoiser


def require_partial(sampler, who: str) -> None:
    """A one-line refusal of a sampler that cannot start part way (``who`` names it and its plugin)."""
    if not supports_partial(sampler):
        raise PluginError(f"{who} cannot start from a partly noised image, so it cannot do --init-image or "
                          "--mask: it needs noise_levels() and sample(start=, stop=) (see docs/plugins.md, "
                          "'Starting part way'); use another sampler")


def diffuse(x: torch.Tensor, abar_from: float, abar_to: float, generators) -> torch.Tensor:
    """A draw of x at level ``abar_to`` given x at ``abar_from`` >= it: sqrt(a) x + sqrt(1 - a) eps,
    a = abar_to / abar_from (1 is clean data)."""
    a = abar_to / abar_from
    return a ** 0.5 * x + (1 - a) ** 0.5 * noise_like(x, generators)


def sample_from(start, sampler, who: str, denoiser, like: torch.Tensor, schedule, steps: int, generators,
                opts: dict, run_sampler) -> torch.Tensor:
    """x_0 for a batch shaped like ``like`` that starts from ``start`` (an ``ImageStart``).

    ``run_sampler(denoiser, x, opts)`` calls the sampler (the pipeline's checked call); ``opts``
    are the sampler's options, to which ``start`` and ``stop`` are added here.
    """
    x0 = start.image.to(like).expand_as(like)
    first = start.first_step(steps)
    if first == steps:  # strength 0: nothing is redrawn
        return x0.clone()
    levels = noise_levels(sampler, who, schedule, steps, opts)
    mask = None
    if start.mask is not None:
        mask = start.mask.to(like).expand_as(like[:, :1])  # [1, H, W] over the batch, one for all channels
        denoiser = pinned_denoiser(denoiser, x0, mask, schedule)

    def segment(x, i, j):
        return run_sampler(denoiser, x, {**opts, "start": i, "stop": j})

    x = diffuse(x0, 1.0, levels[first], generators)
    if start.resample == 0:
        x = segment(x, first, steps)
    else:
        for i in range(first, steps):
            for jump in range(start.resample + 1 if i < steps - 1 else 1):
                if jump:
                    x = diffuse(x, levels[i + 1], levels[i], generators)
                x = segment(x, i, i + 1)
    return x if mask is None else keep(x, x0, mask)


def noise_levels(sampler, who: str, schedule, steps: int, opts: dict) -> list[float]:
    """The sampler's ``noise_levels``, checked: steps + 1 levels in (0, 1], not decreasing, ending at 1."""
    try:
        levels = sampler.noise_levels(schedule, steps, **opts)
    except MinidiffError:
        raise
    except Exception as exc:
        raise PluginError(f"{who} failed in noise_levels: {type(exc).__name__}: {exc}") from exc
    try:
        levels = [float(level) for level in levels]
    except (TypeError, ValueError):
        raise PluginError(f"{who}: noise_levels must give numbers (alpha_bar per step)") from None
    ok = (len(levels) == steps + 1 and all(0 < a <= 1 for a in levels)
          and all(a <= b for a, b in zip(levels, levels[1:])) and math.isclose(levels[-1], 1.0))
    if not ok:
        raise PluginError(f"{who}: noise_levels must give {steps + 1} alpha_bar values in (0, 1], from the noisiest "
                          "to 1 (clean)")
    return levels

"""RePaint's pinning of the kept pixels (Lugmayr et al. 2022, eq. 8), folded into the denoiser.

RePaint replaces, after every step, the kept part of x_{t-1} with the original noised to that
level. Here the same holds by the denoiser's answer instead, so that every sampler inpaints
without knowing of masks (as guidance is folded in, docs/design.md): where the mask keeps a
pixel, the denoiser returns the noise that x_t holds *given the original* x_0,

    eps_kept = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t),

so the sampler's x_0 prediction there is the original itself. A DDIM or Euler step then moves
the kept pixels along sqrt(abar) x_0 + sqrt(1 - abar) eps with eps fixed, and an ancestral step
(DDPM, Euler ancestral) draws them from q(x_{t-1} | x_t, x_0): at every level they are the
original noised to that level, as in RePaint, and the network sees them so. A grey mask value m
blends the two answers, m eps + (1 - m) eps_kept. Since every sampler's last step lands on its
x_0 prediction, the kept pixels come out as the original up to float rounding; ``keep`` then
puts the original's exact values back where the mask is 0.

For solvers on Karras sigmas between the schedule's levels the network is asked about the
nearest level t (``minidiff_solvers.sigmas``), and eps_kept uses that level's abar too: a small
error that the last model call, on the schedule's own sigma_min, does not have.
"""

from __future__ import annotations

import torch


def pinned_denoiser(denoiser, x0: torch.Tensor, mask: torch.Tensor, schedule):
    """``denoiser`` whose answer, where ``mask`` is below 1, pins x_0 to ``x0`` (same shape as x_t)."""
    abar_all = schedule.alphas_cumprod.to(x0.device)  # once per run, not a host copy per step

    def pinned(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = denoiser(x_t, t)
        abar = abar_all[t].view(-1, *([1] * (x_t.dim() - 1)))
        kept = ((x_t - abar.sqrt() * x0) / (1 - abar).sqrt()).to(eps.dtype)
        return mask * eps + (1 - mask) * kept

    return pinned


def keep(x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with the original's exact values where the mask keeps the pixel (mask == 0)."""
    return torch.where(mask == 0, x0, x)

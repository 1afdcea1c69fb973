"""The latent space a latent model's U-Net lives in: a VAE plus the shift and scale of its latents.

The diffusion schedules assume data of roughly unit variance: their last step is
sqrt(abar_T) x0 + sqrt(1 - abar_T) eps with the noise dominating. A KL-regularised VAE's latents
have whatever spread training gave them (SD's had a standard deviation near 5.5, hence its
0.18215), so the spread is measured on the training data and the latents are normalised:

    z = (latent - shift) * scale,   latent = z / scale + shift

with ``shift`` the mean and ``scale`` 1 / the standard deviation of posterior samples over the
measured images (SD3 and Flux store a shift as well as a scale). Both live in the model file.

A model file can say anything, so both are bounded to what a measurement can give
(``check_normalisation``): the spread 1 / scale from 1e-6 to 1e6, and the mean at most
MAX_SHIFT_SPREADS spreads from zero. Beyond that float32 keeps no digits for the spread itself
(latent = z / scale + shift rounds z away: the decoder sees a constant), and a finite but huge
shift (1e308) overflows the decoder into NaN, which was written as an all-black picture.
``measure`` refuses to produce values outside these bounds, so minidiff never writes a file it
would refuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from minidiff_cli.errors import MinidiffError, is_finite_number
from minidiff_cli.vae.autoencoder import Autoencoder

MEASURE_IMAGES = 512  # enough images for a mean and spread to three digits
MIN_SCALE, MAX_SCALE = 1e-6, 1e6  # 1 / the latents' spread
MAX_SHIFT_SPREADS = 1e4  # |shift| * scale: float32 then still resolves z to 1e-3 of a spread


@dataclass
class LatentSpace:
    autoencoder: Autoencoder
    shift: float = 0.0
    scale: float = 1.0

    @property
    def factor(self) -> int:
        return self.autoencoder.config.factor

    @property
    def channels(self) -> int:
        return self.autoencoder.config.latent_channels

    @property
    def image_channels(self) -> int:
        return self.autoencoder.config.in_channels

    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised latents of pictures in [-1, 1]: a posterior sample with ``noise``, else its mean."""
        posterior = self.autoencoder.encode(images)
        return self.normalise(posterior.mean if noise is None else posterior.sample(noise))

    def normalise(self, latent: torch.Tensor) -> torch.Tensor:
        """The VAE's latents as the U-Net sees them: (latent - shift) * scale."""
        return (latent - self.shift) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pictures in [-1, 1] (clamped) from normalised latents."""
        return self.autoencoder.decode(z / self.scale + self.shift).clamp(-1, 1)

    def entry(self, vae_hash: str = "", name: str = "") -> dict[str, Any]:
        """What a model file's config says about its latent space (the tensors are stored beside it)."""
        return {"config": self.autoencoder.config.to_dict(), "shift": self.shift, "scale": self.scale,
                "hash": vae_hash, "name": name}


def check_normalisation(entry: dict[str, Any]) -> tuple[float, float]:
    """(shift, scale) of a model file's vae entry, checked against what a measured latent space can be:
    finite, scale from 1e-6 to 1e6, the shift at most MAX_SHIFT_SPREADS spreads (1 / scale) from zero."""
    shift, scale = entry.get("shift"), entry.get("scale")
    for name, value in (("shift", shift), ("scale", scale)):
        if not is_finite_number(value):
            raise MinidiffError(f"vae.{name} must be a finite number (got {value!r:.40})")
    shift, scale = float(shift), float(scale)
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise MinidiffError(f"vae.scale must be between {MIN_SCALE:g} and {MAX_SCALE:g} (got {scale!r:.40})")
    if abs(shift) > MAX_SHIFT_SPREADS / scale:
        raise MinidiffError(f"vae.shift {shift:.6g} lies more than {MAX_SHIFT_SPREADS:g} spreads of the latents "
                            f"(1 / vae.scale = {1 / scale:.6g}) from zero, where no measured latent space lies "
                            "(float32 would keep nothing of the latents but the shift)")
    return shift, scale


@torch.no_grad()
def measure(autoencoder: Autoencoder, images: Callable[[int, int], torch.Tensor], count: int,
            batch_size: int = 64, seed: int = 0) -> tuple[float, float, int]:
    """(shift, scale, images used) from posterior samples of the first ``min(count, MEASURE_IMAGES)``
    images; ``images(start, stop)`` returns that slice of them in [-1, 1] on the VAE's device."""
    n = min(count, MEASURE_IMAGES)
    if n < 1:
        raise MinidiffError("no images to measure the latent scale on")
    g = torch.Generator().manual_seed(seed)
    total, total_sq, values = 0.0, 0.0, 0
    for start in range(0, n, batch_size):
        x = images(start, min(n, start + batch_size))
        posterior = autoencoder.encode(x)
        noise = torch.randn(posterior.mean.shape, generator=g).to(posterior.mean)
        latent = posterior.sample(noise).double()
        total += latent.sum().item()
        total_sq += latent.square().sum().item()
        values += latent.numel()
    mean = total / values
    std = math.sqrt(max(total_sq / values - mean * mean, 0.0))
    if not std > 1e-8:
        raise MinidiffError("the VAE's latents of these images do not vary; it cannot have been trained on them")
    try:  # what a model file may hold: a measurement outside it would make a file minidiff refuses
        check_normalisation({"shift": mean, "scale": 1.0 / std})
    except MinidiffError as exc:
        raise MinidiffError(f"the VAE's latents of these images are not usable for diffusion: {exc}") from None
    return mean, 1.0 / std, n

"""How faithfully an autoencoder gives pictures back: PSNR and SSIM, via torchmetrics.

Both are computed per image on pixel values in [0, 1] and averaged over the images:
PSNR = 10 log10(1 / MSE) in decibels (higher is better; 8-bit rounding alone caps it near
59 dB), SSIM (Wang et al. 2004) with torchmetrics' defaults (Gaussian window 11, sigma 1.5),
1 for identical pictures. Images of 11 pixels or fewer per side are too small for the window;
SSIM is then None.
"""

from __future__ import annotations

import torch

SSIM_WINDOW = 11


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Pictures in [-1, 1] as [0, 1], clamped (what a saved PNG would hold, before rounding)."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, [B], of pictures in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(to_unit(reconstructed), to_unit(original), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3))


def ssim(reconstructed: torch.Tensor, original: torch.Tensor) -> torch.Tensor | None:
    """Per-image SSIM, [B], of pictures in [-1, 1]; None below the window size."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if min(original.shape[-2:]) <= SSIM_WINDOW:
        return None
    return structural_similarity_index_measure(to_unit(reconstructed), to_unit(original), data_range=1.0,
                                               reduction="none")


def bytes_per_image(latent_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> dict[str, float]:
    """What one picture costs as a latent (float16 and float32) against 8-bit pixels."""
    latent_values, pixels = _count(latent_shape), _count(image_shape)
    return {"pixels_uint8": pixels, "latent_float16": 2 * latent_values, "latent_float32": 4 * latent_values,
            "compression": pixels / latent_values}


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= int(dim)
    return n

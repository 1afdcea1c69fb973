"""How well a VAE gives pictures back: reconstructions, their PSNR / SSIM, a grid to look at."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from minidiff_cli.vae.autoencoder import Autoencoder

BATCH = 64  # pictures per batch, fewer where their activations would pass VAEConfig.batch_within's budget
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as Pillow's convert("L")


def _batch(autoencoder: Autoencoder, side: int, batch_size: int | None) -> int:
    return batch_size or autoencoder.config.batch_within(side, BATCH)


@torch.no_grad()
def encode_means(autoencoder: Autoencoder, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """The posterior means of pictures in [-1, 1], in batches: each picture's deterministic latent."""
    n = _batch(autoencoder, images.shape[-1], batch_size)
    return torch.cat([autoencoder.encode(images[k:k + n]).mean for k in range(0, len(images), n)])


@torch.no_grad()
def decode_means(autoencoder: Autoencoder, means: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Pictures from latents, clamped to [-1, 1], in batches."""
    n = _batch(autoencoder, means.shape[-1] * autoencoder.config.factor, batch_size)
    return torch.cat([autoencoder.decode(means[k:k + n]).clamp(-1, 1) for k in range(0, len(means), n)])


def reconstruct(autoencoder: Autoencoder, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """decode(mean of encode(x)) for pictures in [-1, 1], clamped to [-1, 1]: the deterministic round trip."""
    return decode_means(autoencoder, encode_means(autoencoder, images, batch_size), batch_size)


def check_picture_channels(autoencoder: Autoencoder) -> int:
    """The VAE's picture channels, when they are grey (1) or RGB (3), the pictures minidiff fits; a
    one-line MinidiffError for others (a config may say 2 or 4, which no picture is fitted to)."""
    from minidiff_cli.errors import MinidiffError

    channels = autoencoder.config.in_channels
    if channels not in (1, 3):
        raise MinidiffError(f"this VAE takes {channels}-channel pictures; minidiff fits pictures to grey (1 channel) "
                            "or RGB (3) only, so it cannot measure or reconstruct them")
    return channels


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB pictures [B, 3, H, W] in [-1, 1] with ``channels`` channels: as they are (3), or grey (1)."""
    if channels == images.shape[1]:
        return images
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def summarise(reconstructed: torch.Tensor, original: torch.Tensor) -> dict[str, Any]:
    """Mean and spread (standard deviation over the images) of PSNR and SSIM; SSIM None when too small."""
    from minidiff_cli.evaluation.reconstruction import psnr, ssim

    report: dict[str, Any] = {"images": int(original.shape[0])}
    for name, values in (("psnr", psnr(reconstructed, original)), ("ssim", ssim(reconstructed, original))):
        if values is None:
            report[name] = report[f"{name}_std"] = None
            continue
        values = [float(v) for v in values.cpu()]
        report[name] = statistics.fmean(values)
        report[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return report


def reconstruction_grid(original: torch.Tensor, reconstructed: torch.Tensor, path: Path) -> Path:
    """A PNG with the originals in the top row and their reconstructions below, written atomically."""
    from torchvision.utils import make_grid

    from minidiff_cli.data.images import tensor_to_pil
    from minidiff_cli.files.atomic import atomic_write

    grid = make_grid(torch.cat([original, reconstructed]).cpu().float(), nrow=original.shape[0], padding=1,
                     pad_value=1.0)
    image = tensor_to_pil(grid)
    return atomic_write(path, lambda p: image.save(p, format="PNG"))


def latent_channels_image(latent: torch.Tensor, upscale: int = 1):
    """A learner's view of one latent [c, h, w]: its channels side by side as grey pictures, each
    stretched to its own min..max (so every channel shows its structure), scaled up ``upscale`` times."""
    from PIL import Image

    c, h, w = latent.shape
    lo = latent.amin(dim=(1, 2), keepdim=True)
    hi = latent.amax(dim=(1, 2), keepdim=True)
    unit = (latent - lo) / (hi - lo).clamp(min=1e-8)
    strip = torch.ones(h, c * (w + 1) - 1)
    for k in range(c):
        strip[:, k * (w + 1):k * (w + 1) + w] = unit[k]
    array = (strip * 255).round().byte().numpy()
    image = Image.fromarray(array, mode="L")
    return image.resize((image.width * upscale, image.height * upscale), Image.NEAREST) if upscale > 1 else image


def evaluate_data(autoencoder: Autoencoder, data: str, image_size: int, holdout: str, limit: int) -> dict[str, Any]:
    """PSNR / SSIM of the round trip on the held-out images of ``data`` (the split of ``vae train``),
    at most ``limit`` of them; bytes per image and seconds per image beside them."""
    import time

    from minidiff_cli.data.holdout import holdout_fraction, split_items
    from minidiff_cli.data.sources import open_dataset
    from minidiff_cli.errors import MinidiffError
    from minidiff_cli.evaluation.reconstruction import bytes_per_image

    channels = check_picture_channels(autoencoder)
    autoencoder.check_size(image_size)
    fraction = holdout_fraction(holdout)
    if holdout and fraction is None:
        raise MinidiffError(f"--holdout is a share of the images, such as 5% (got {holdout!r:.40})")
    if limit < 1:
        raise MinidiffError(f"--limit must be at least 1 (got {limit})")
    dataset = open_dataset(data, image_size=image_size, holdout="")
    train, held = split_items(dataset, fraction)
    items = (held if fraction else train)[:limit]
    if not items:
        raise MinidiffError(f"--holdout {holdout} holds out no image of {data}; use a larger share or ''")
    device = next(autoencoder.parameters()).device
    x = to_channels(torch.stack([dataset[i]["image"] for i in items]).to(device), channels)
    start = time.perf_counter()
    recon = reconstruct(autoencoder, x)
    seconds = time.perf_counter() - start
    report = summarise(recon, x)
    f, c = autoencoder.config.factor, autoencoder.config.latent_channels
    report.update({"on": "held-out" if fraction else "all", "image_size": image_size,
                   "latent_shape": [c, image_size // f, image_size // f],
                   "bytes_per_image": bytes_per_image((c, image_size // f, image_size // f),
                                                      (channels, image_size, image_size)),
                   "seconds_per_image": seconds / len(items)})
    return report

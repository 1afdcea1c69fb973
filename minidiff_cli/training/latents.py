"""A latent run's data: the VAE's latent space measured on the training images, and each batch's latents.

``train --vae FILE`` trains the U-Net on latents instead of pixels. The latent space's shift
and scale are measured once on the first 512 images of the run's shuffle; each batch's
latents are posterior samples with their own generator, so a pixel model's stream of
timesteps and noise is the same with or without this code. Where every item's posterior
fits in memory and the run sees each item at least twice, the posteriors are encoded once
for the run (``posterior_table``) instead of at every step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from minidiff_cli.data.dataset import EpochShuffle
from minidiff_cli.errors import MinidiffError
from minidiff_cli.runtime.devices import to_device

POSTERIOR_CACHE_BYTES = 512 * 1024**2  # a latent model's posteriors of every item, kept if they fit


def open_latent_space(cfg, dataset, device: torch.device, log: Callable[[str], None] | None,
                      resumed_from: Path | None = None):
    """(LatentSpace of ``cfg.vae`` with its shift and scale measured on ``dataset``, its config entry).

    ``resumed_from``: the model file of the run being resumed, whose VAE this one must be.
    """
    from minidiff_cli.vae.latent_space import LatentSpace, measure
    from minidiff_cli.vae.vae_file import load_vae

    vae = load_vae(cfg.vae, device)
    check_same_vae(resumed_from, cfg.vae, vae.hash)
    vae.autoencoder.check_size(cfg.image_size)
    if vae.config.in_channels != dataset.channels:
        raise MinidiffError(f"the VAE takes {vae.config.in_channels}-channel pictures but the data has "
                            f"{dataset.channels} channels")
    order = EpochShuffle(len(dataset), cfg.seed).batch(0, min(len(dataset), 512))

    def images(start: int, stop: int) -> torch.Tensor:
        return torch.stack([dataset[i]["image"] for i in order[start:stop]]).to(device)

    shift, scale, count = measure(vae.autoencoder, images, len(order), seed=cfg.seed)
    latent = LatentSpace(vae.autoencoder, shift, scale)
    if log is not None:
        log(f"latent space of {cfg.vae}: {latent.channels} channels at 1/{latent.factor} of the side; "
            f"shift {shift:.4f}, scale {scale:.4f} (1 / std), measured on {count} training images")
    return latent, latent.entry(vae.hash, str(vae.meta.get("name", "")))


def check_same_vae(model_file: Path | None, vae_path: str, vae_hash: str) -> None:
    """A latent run resumes only with the VAE it started with: another one with the same shapes
    would load without complaint and make the U-Net's latents mean something else."""
    if model_file is None or not model_file.is_file():
        return
    from minidiff_cli.files.model_file import read_config

    before = (read_config(model_file).get("vae") or {}).get("hash")
    if before and before != vae_hash:
        raise MinidiffError(f"--vae {vae_path} is not the VAE this run started with (hash {vae_hash}, "
                            f"the run's is {before}); restore that file, or start a new run")


def posterior_table(latent, dataset, latent_shape, cfg, device: torch.device,
                    log: Callable[[str], None] | None):
    """Every item's posterior (mean, log-variance), encoded once per run in fixed batches, where that
    pays: the run sees each item at least twice (over its fixed decay horizon) and the latents fit in
    POSTERIOR_CACHE_BYTES. None otherwise: each batch is encoded at its step."""
    n, (c, h, w) = len(dataset), latent_shape
    if n * c * h * w * 8 > POSTERIOR_CACHE_BYTES or 2 * n > cfg.lr_decay_steps * cfg.batch_size:
        return None
    from minidiff_cli.vae.autoencoder import Posterior

    if log is not None:
        log(f"encoding the {n:,} training images into latents once for the run")
    means, logvars = [], []
    with torch.no_grad():
        for start in range(0, n, 64):
            x = torch.stack([dataset[i]["image"] for i in range(start, min(n, start + 64))]).to(device)
            posterior = latent.autoencoder.encode(x)
            means.append(posterior.mean)
            logvars.append(posterior.logvar)
    return Posterior(torch.cat(means), torch.cat(logvars))


def draw_latents(latent, table, indices: list[int], images: torch.Tensor | None, *, seed: int, step: int,
                 rank: int) -> torch.Tensor:
    """Posterior samples of the batch's latents, normalised: from ``table`` where there is one, else by
    encoding ``images``. Their noise has its own generator, seeded by (seed, step, rank)."""
    from minidiff_cli.vae.autoencoder import Posterior

    with torch.no_grad():
        if table is not None:  # the rows and the noise are queued to a GPU, not waited for (to_device)
            rows = to_device(torch.tensor(indices), table.mean.device)
            posterior = Posterior(table.mean[rows], table.logvar[rows])
        else:
            posterior = latent.autoencoder.encode(images)
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_013 + rank + 7)
        noise = to_device(torch.randn(posterior.mean.shape, generator=g), posterior.mean.device).to(posterior.mean)
        return latent.normalise(posterior.sample(noise))

"""Image-to-image and inpainting on a latent model: the start moved into latent space and back.

The init image is encoded to its posterior mean (normalised as the model's latents are), and the
mask is max-pooled by the VAE's factor: a latent value is redrawn if any pixel it covers is, so
nothing the user marked is kept by accident. After decoding, the pixels the mask keeps (mask 0)
are copied back from the init image exactly, as on a pixel model. What the latent space cannot
keep is the rest of the kept region's detail inside the latent cells that touch the hole: those
cells are redrawn, and the seam lies within one cell (factor pixels) of the mask's edge.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from minidiff_cli.inference.img2img.inpaint import keep


def to_latents(start, model):
    """``start`` (an ImageStart at the model's pixel size) as the model's sampler sees it."""
    if model.latent is None:
        return start
    device = next(model.latent.autoencoder.parameters()).device
    z = model.encode(start.image[None].to(device, torch.float32))[0]
    mask = None
    if start.mask is not None:
        mask = F.max_pool2d(start.mask[None].to(device, torch.float32), model.latent.factor)[0]
    return dataclasses.replace(start, image=z, mask=mask)


def from_latents(x: torch.Tensor, start, model) -> torch.Tensor:
    """What the sampler returned, as pictures: decoded (a latent model), kept pixels exactly the init image's."""
    if model.latent is None:
        return x
    pictures = model.decode(x)
    if start.mask is None:
        return pictures
    image, mask = start.image.to(pictures), start.mask.to(pictures)
    return keep(pictures, image.expand_as(pictures), mask.expand_as(pictures[:, :1]))

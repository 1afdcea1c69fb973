"""The optional adversarial term of VAE training: a small PatchGAN (Isola et al. 2017).

An L1 loss alone averages over the plausible pictures and blurs edges; a discriminator that
judges overlapping patches as real or reconstructed pushes the decoder towards sharp ones
(latent diffusion's autoencoders use one, with a perceptual loss that cannot be downloaded here).
Hinge losses, as in Esser et al. 2021: the discriminator minimises relu(1 - D(x)) + relu(1 + D(x^)),
the decoder adds -D(x^) times ``disc_weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """Three strided 4x4 convolutions: one real/fake score per patch of about 22 pixels."""

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 4, stride=1, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean())

"""A small KL-regularised autoencoder: pictures <-> latents a factor 2^(levels - 1) smaller per side.

The layout follows the autoencoder of latent diffusion (Rombach et al. 2022, appendix G),
scaled down for a CPU: convolutional residual blocks at each level, a strided convolution
between levels on the way down and nearest-neighbour upsampling plus a convolution on the way
up. The encoder outputs a diagonal Gaussian (mean and log-variance per latent value); the KL
term of training pulls it towards N(0, 1) just enough to keep the latent space smooth.
No attention: the pictures minidiff trains on are small, and convolutions see enough of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minidiff_cli.errors import MinidiffError, is_int

# Bounds a config must keep, checked before any module is built (a VAE file can be hostile).
MAX_CHANNELS = 512
MAX_MULT = 8
MAX_LEVELS = 4  # downsampling factor 8
MAX_RES_BLOCKS = 8
MAX_LATENT_CHANNELS = 64
# Bounds on what a VAE is run on, checked before any picture is fitted or any activation allocated.
MAX_IMAGE_SIZE = 1024  # pixels a side: the U-Net's bound for pixel models (vae train goes to 512)
MAX_ACTIVATION_BYTES = 64 << 30  # as the U-Net's: feature maps of a forward pass at the batch run
BATCH_BYTES = 8 << 30  # evaluation runs pictures in batches whose activations stay about this small


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # three levels: factor 4
    num_res_blocks: int = 1
    latent_channels: int = 4

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        self.validate()

    @property
    def factor(self) -> int:
        """How many pixels per side one latent value covers."""
        return 2 ** (len(self.channel_mult) - 1)

    def widths(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]

    def validate(self) -> None:
        def count(name: str, value: Any, low: int, high: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise MinidiffError(f"VAE {name} must be a whole number from {low} to {high} (got {value!r:.40})")

        count("in_channels", self.in_channels, 1, 4)
        count("base_channels", self.base_channels, 8, MAX_CHANNELS)
        if self.base_channels % 8:
            raise MinidiffError(f"VAE base_channels must be a multiple of 8 (got {self.base_channels})")
        if not 2 <= len(self.channel_mult) <= MAX_LEVELS:
            raise MinidiffError(f"VAE channel_mult needs 2 to {MAX_LEVELS} levels (factor 2 to "
                                f"{2 ** (MAX_LEVELS - 1)}), got {len(self.channel_mult)}")
        for m in self.channel_mult:
            count("channel_mult entry", m, 1, MAX_MULT)
        if max(self.widths()) > MAX_CHANNELS:
            raise MinidiffError(f"VAE widths reach {max(self.widths())} channels, more than {MAX_CHANNELS}")
        count("num_res_blocks", self.num_res_blocks, 1, MAX_RES_BLOCKS)
        count("latent_channels", self.latent_channels, 1, MAX_LATENT_CHANNELS)

    def activation_bytes(self, size: int, batch: int = 1) -> int:
        """About the float32 activation memory of a training pass (encoder and decoder) over ``batch``
        pictures of ``size`` x ``size``: the feature maps autograd keeps; no allocation. A pass without
        gradients needs less (a third to a quarter of it at 256 to 512 px, measured)."""
        widths, nrb = self.widths(), self.num_res_blocks
        values = 4 * widths[0] * size * size  # the full-size ends: conv_in, and the decoder's norm and conv_out
        for level, width in enumerate(widths):
            pixels = (size >> level) ** 2
            values += (12 * nrb + 4) * width * pixels  # residual blocks of encoder and decoder, down and up convs
            if level:
                values += 8 * width * pixels  # the decoder's upsampling: its input enlarged 4x, then convolved
        values += 12 * widths[-1] * (size >> (len(widths) - 1)) ** 2  # the two middle blocks
        return 4 * batch * values

    def check_size(self, size: Any, batch: int = 1, what: str = "image size") -> None:
        """Refuse, before any picture is fitted or any module run, a size this VAE cannot take: not a
        whole number from 1 to MAX_IMAGE_SIZE, not a multiple of its factor, or activations at ``batch``
        pictures beyond MAX_ACTIVATION_BYTES (a 111 KB file saying 4096 px made ``vae reconstruct``
        take 8.6 GB and die)."""
        if not is_int(size) or not 1 <= size <= MAX_IMAGE_SIZE:
            raise MinidiffError(f"{what} {size!r:.40} is not a size minidiff handles: a whole number of pixels "
                                f"from 1 to {MAX_IMAGE_SIZE}")
        if size % self.factor:
            raise MinidiffError(f"{what} {size} is not a multiple of the VAE's factor {self.factor}; "
                                f"use {max(self.factor, size // self.factor * self.factor)}")
        need = self.activation_bytes(size, batch)
        if need > MAX_ACTIVATION_BYTES:
            per = f"{batch} pictures" if batch > 1 else "one picture"
            raise MinidiffError(f"this VAE would need about {need / 2**30:,.0f} GiB of activations for {per} of "
                                f"{size}x{size}, more than the {MAX_ACTIVATION_BYTES >> 30} GiB allowed; use a "
                                "smaller size or batch, or a narrower VAE")

    def batch_within(self, size: int, most: int, budget: int = BATCH_BYTES) -> int:
        """The largest batch, at most ``most``, whose activations at ``size`` stay within ``budget`` (at least 1)."""
        return max(1, min(most, budget // max(1, self.activation_bytes(size))))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channel_mult"] = list(self.channel_mult)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "VAEConfig":
        if not isinstance(data, dict):
            raise MinidiffError("the VAE config must be a JSON object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise MinidiffError(f"unknown VAE config key '{unknown[0]!s:.40}'")
        mult = data.get("channel_mult", cls.channel_mult)
        if not isinstance(mult, (list, tuple)) or len(mult) > MAX_LEVELS:
            raise MinidiffError(f"VAE channel_mult must be a list of at most {MAX_LEVELS} numbers")
        return cls(**{**data, "channel_mult": tuple(mult)})


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a skip (a 1x1 convolution where the width changes)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.widths()
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, width))
                ch = width
            if level < len(widths) - 1:  # halve the size; padding 1 keeps even sizes exact
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        layers.append(ResBlock(ch, ch))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.widths()
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(ch, ch)]
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, widths[level]))
                ch = widths[level]
            if level > 0:
                layers.append(Upsample(ch))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(8, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


@dataclass
class Posterior:
    """The encoder's diagonal Gaussian over latents: mean and log-variance, [B, C, h, w] each."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """mean + sigma * noise, for noise ~ N(0, 1) drawn by the caller (who owns the generator)."""
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, 1)) per image, summed over the latent values: [B]."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1 - self.logvar).sum(dim=(1, 2, 3))


class Autoencoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def check_size(self, size: Any, batch: int = 1, what: str = "image size") -> None:
        """``VAEConfig.check_size``: a size (and batch) this VAE can be run at, or a one-line MinidiffError."""
        self.config.check_size(size, batch, what)

    def encode(self, x: torch.Tensor) -> Posterior:
        """Pictures in [-1, 1], [B, C, H, W] -> the Gaussian over their latents [B, c, H/f, W/f]."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(-30.0, 20.0))  # as latent diffusion: exp() stays finite

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> pictures (roughly [-1, 1]; not clamped, so that the loss sees overshoot)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, Posterior]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(noise)), posterior

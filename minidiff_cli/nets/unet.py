"""The U-Net that predicts the noise: one config dataclass, then the modules in data-flow order.

The architecture is DDPM's (Ho et al. 2020, appendix B) with the refinements of Improved DDPM /
ADM (Nichol & Dhariwal 2021): residual blocks whose GroupNorm is modulated by the timestep
embedding (scale-shift, "FiLM"), multi-head self-attention at chosen feature-map sizes, and the
output conv of every residual branch initialised to zero, so that the untrained network is the
identity plus a zero prediction and training starts fast and stable. Text conditioning follows
Stable Diffusion (Rombach et al. 2022): cross-attention from the pixels to the conditioner's
token context [B, L, D]; a pooled embedding [B, D] (a sentence or class embedding) is projected
and added to the timestep embedding, as in ADM's class conditioning and SDXL's pooled text.

    x [B, in, H, W] --conv_in--> down levels (ResBlock [+Attention]) x num_res_blocks, Downsample
        --> middle (ResBlock, Attention, ResBlock)
        --> up levels (concat skip, ResBlock [+Attention]) x (num_res_blocks + 1), Upsample
        --> GroupNorm, SiLU, conv_out --> [B, out, H, W]

The network is fully convolutional: it runs on any H, W divisible by 2**(levels-1). On a CPU it
runs channels-last inside (NHWC, oneDNN's own layout for convolutions: no reorder around each
conv, and the attention blocks reshape to tokens without a copy), whatever layout its input and
weights have: forward passes about 1.2x faster than NCHW, training steps more (benchmarks/). The
output comes back in the caller's layout. Elsewhere it keeps the layout it is given, and after
`model.to(memory_format=torch.channels_last)` it runs channels-last on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from minidiff_cli.errors import MinidiffError, is_int

MAX_IMAGE_SIZE = 1024
MAX_PARAMETERS = 500_000_000
MAX_RES_BLOCKS = 32  # per level; real U-Nets use 1 to 4. Bounds the module count, which parameters do not
MAX_ACTIVATION_BYTES = 64 << 30  # feature maps plus the largest attention matrix, at the batch sampled or trained


@dataclass
class UNetConfig:
    """The shape of a U-Net: sizes, channels per level, attention levels and condition widths.

    A model file stores it as JSON and a hostile file can put anything there, so ``validate()``
    bounds every field and ``check_activations(batch)`` refuses a configuration whose
    activations would not fit in memory, before any tensor is allocated.
    """

    image_size: int = 32  # the training size; H and W of the input
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64  # channels of the first level; the time MLP is 4x this wide
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per level; each level but the last halves H, W
    num_res_blocks: int = 2  # per level on the way down (the way up has one more)
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sizes that get self-attention
    cross_attention_resolutions: tuple[int, ...] = (8,)  # sizes that attend to the context
    mid_attention: bool = True  # attention in the middle block (cross too when context_dim is set)
    context_dim: int | None = None  # D of the conditioner's token context [B, L, D]
    pooled_dim: int | None = None  # D of a pooled embedding [B, D], added to the time embedding
    head_dim: int = 32  # channels per attention head: heads = channels // head_dim at each level
    dropout: float = 0.0
    norm_groups: int = 8

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """The inverse of to_dict, validated; missing keys take their defaults."""
        if not isinstance(d, dict):
            raise MinidiffError(f"U-Net config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MinidiffError(
                f"unknown U-Net config key(s): {', '.join(map(str, unknown))} "
                f"(known: {', '.join(sorted(known))})"
            )
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d).validate()

    @property
    def resolutions(self) -> list[int]:
        """Feature-map size at each level, e.g. [32, 16, 8]."""
        return [self.image_size >> i for i in range(len(self.channel_mult))]

    def validate(self) -> "UNetConfig":
        """Raise MinidiffError (one line, in the user's words) unless this config can be built.

        Cheap and allocation-free: an absurd size is refused here, before any tensor exists.
        """
        for name in ("image_size", "in_channels", "out_channels", "base_channels",
                     "num_res_blocks", "head_dim", "norm_groups"):
            _check_positive_int(name, getattr(self, name))
        for name in ("context_dim", "pooled_dim"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        for name in ("channel_mult", "attention_resolutions", "cross_attention_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(is_int(v) and v > 0 for v in value):
                raise MinidiffError(f"{name} must be a list of positive integers, got {value!r}")
        if not self.channel_mult:
            raise MinidiffError("channel_mult needs at least one level, e.g. [1, 2, 2]")
        if not isinstance(self.mid_attention, bool):
            raise MinidiffError(f"mid_attention must be true or false, got {self.mid_attention!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
                and 0 <= self.dropout < 1):
            raise MinidiffError(f"dropout must be a number in [0, 1), got {self.dropout!r}")

        size, levels = self.image_size, len(self.channel_mult)
        if size > MAX_IMAGE_SIZE:
            raise MinidiffError(f"image_size {size} is too large: at most {MAX_IMAGE_SIZE} pixels")
        if levels > size.bit_length() or size % (1 << (levels - 1)):
            factor = 1 << (levels - 1)
            hint = f"; try {max(factor, round(size / factor) * factor)}" if factor <= MAX_IMAGE_SIZE else ""
            raise MinidiffError(
                f"image_size {size} must be divisible by {factor}, since {levels} channel_mult "
                f"levels halve it {levels - 1} times{hint}"
            )
        for mult in self.channel_mult:
            ch = self.base_channels * mult
            if ch % self.norm_groups:
                raise MinidiffError(
                    f"{ch} channels (base_channels {self.base_channels} x {mult}) cannot be split "
                    f"into norm_groups {self.norm_groups}; use multiples of {self.norm_groups}"
                )
        self._check_attention_sizes()
        n = self.num_parameters()
        if n > MAX_PARAMETERS:
            raise MinidiffError(
                f"this U-Net would have {n / 1e6:,.0f}M parameters, more than the "
                f"{MAX_PARAMETERS // 1_000_000}M allowed; lower base_channels, channel_mult or "
                f"num_res_blocks"
            )
        if self.num_res_blocks > MAX_RES_BLOCKS:
            raise MinidiffError(f"num_res_blocks {self.num_res_blocks} is more than the {MAX_RES_BLOCKS} "
                                "per level minidiff allows")
        self.check_activations(1)
        return self

    def _check_attention_sizes(self):
        sizes = self.resolutions
        wanted = [("attention_resolutions", self.attention_resolutions)]
        if self.context_dim is not None:  # cross-attention sizes only matter with a context
            wanted.append(("cross_attention_resolutions", self.cross_attention_resolutions))
        for name, res in wanted:
            missing = [r for r in res if r not in sizes]
            if missing:
                raise MinidiffError(
                    f"{name} asks for {', '.join(map(str, missing))} but at image_size "
                    f"{self.image_size} the feature maps are {', '.join(map(str, sizes))}"
                )
        attended = [(s, self.base_channels * m) for s, m in zip(sizes, self.channel_mult)
                    if self._self_attn(s) or self._cross_attn(s)]
        if self.mid_attention:
            attended.append((sizes[-1], self.base_channels * self.channel_mult[-1]))
        for s, ch in attended:
            if ch % self.head_dim:
                raise MinidiffError(
                    f"{ch} channels at {s}x{s} cannot be split into attention heads of "
                    f"head_dim {self.head_dim}; pick a head_dim that divides {ch}"
                )

    def activation_bytes(self, batch: int) -> int:
        """About the float32 activation memory of a forward pass over ``batch`` images; no allocation.

        The feature maps every block keeps for the skips and the backward pass, plus the largest
        self-attention matrix (heads x N^2 for N = H*W pixels, as the unfused kernel makes it).
        """
        features = attention = 0
        for s, mult in zip(self.resolutions, self.channel_mult):
            ch, pixels = self.base_channels * mult, s * s
            features += (3 * self.num_res_blocks + 2) * ch * pixels
            if self._self_attn(s) or (self.mid_attention and s == self.resolutions[-1]):
                attention = max(attention, ch // self.head_dim * pixels * pixels)
        return 4 * batch * (features + attention)

    def check_activations(self, batch: int) -> None:
        """Refuse, before anything is built, a batch whose activations alone would exceed the cap."""
        need = self.activation_bytes(batch)
        if need > MAX_ACTIVATION_BYTES:
            per = f"{batch} images" if batch > 1 else "one image"
            raise MinidiffError(f"this U-Net would need about {need / 2**30:,.0f} GiB of activations for {per}, "
                                f"more than the {MAX_ACTIVATION_BYTES >> 30} GiB allowed; use a smaller batch, "
                                "fewer attention resolutions or fewer channels")

    def _self_attn(self, size: int) -> bool:
        return size in self.attention_resolutions

    def _cross_attn(self, size: int) -> bool:
        return self.context_dim is not None and size in self.cross_attention_resolutions

    def num_parameters(self) -> int:
        """The exact parameter count of UNet(self), from formulas: nothing is allocated.

        Mirrors UNet.__init__ level by level (a test checks that they agree); repeated identical
        blocks are multiplied rather than looped so that absurd configs are cheap to refuse.
        """
        base, E = self.base_channels, 4 * self.base_channels
        conv = lambda i, o, k=3: i * o * k * k + o  # noqa: E731
        linear = lambda i, o: i * o + o  # noqa: E731

        def res(i, o):
            return 2 * i + conv(i, o) + linear(E, 2 * o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)

        def attn(ch, self_attn, cross):
            n = 2 * ch + linear(ch, 3 * ch) + linear(ch, ch) if self_attn else 0
            return n + (2 * ch + linear(ch, ch) + linear(self.context_dim, 2 * ch) + linear(ch, ch) if cross else 0)

        n = linear(base, E) + linear(E, E) + (linear(self.pooled_dim, E) if self.pooled_dim else 0)
        n += conv(self.in_channels, base)
        nb, chans, sizes = self.num_res_blocks, [base * m for m in self.channel_mult], self.resolutions
        ch, last = base, len(chans) - 1
        for level, (out, s) in enumerate(zip(chans, sizes)):
            a = attn(out, self._self_attn(s), self._cross_attn(s))
            n += res(ch, out) + (nb - 1) * res(out, out) + nb * a
            n += conv(out, out) if level < last else 0  # Downsample
            ch = out
        a = attn(ch, True, self.context_dim is not None) if self.mid_attention else 0
        n += 2 * res(ch, ch) + a
        for level in reversed(range(len(chans))):
            out, s = chans[level], sizes[level]
            skip_last = chans[level - 1] if level > 0 else base  # the skip pushed before this level
            a = attn(out, self._self_attn(s), self._cross_attn(s))
            n += res(ch + out, out) + (nb - 1) * res(2 * out, out) + res(out + skip_last, out)
            n += (nb + 1) * a
            n += conv(out, out) if level > 0 else 0  # Upsample
            ch = out
        return n + 2 * ch + conv(ch, self.out_channels)


def _check_positive_int(name, value):
    if not is_int(value) or value <= 0:
        raise MinidiffError(f"{name} must be a positive integer, got {value!r}")


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a residual branch's last layer: the branch starts as a no-op (ADM, sec. 3)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, Transformer-style: [B] -> [B, dim].

    Frequencies 10000**(-i/half) for i < half, as in Vaswani et al. 2017 and DDPM. Computed in
    float32 whatever the model's dtype, since t can reach 1000 and half precision would blur it.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    args = t.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, 2*half]
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the second norm modulated by the embedding, plus a skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # -> per-channel scale and shift
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x [B, cin, H, W], emb [B, E] already through SiLU (done once for all blocks)
        h = self.conv1(F.silu(self.norm1(x)))  # [B, cout, H, W]
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # [B, cout, 1, 1] each
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # norm * (1 + scale) + shift, one pass
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Pre-norm multi-head attention over the H*W pixels of a feature map, as residuals:
    self-attention (pixels to pixels) and/or cross-attention (pixels to the context tokens)."""

    def __init__(self, ch: int, head_dim: int, self_attn: bool, context_dim: int | None):
        super().__init__()
        self.heads = ch // head_dim
        self.self_attn = self_attn
        if self_attn:
            self.norm1 = nn.LayerNorm(ch)
            self.qkv = nn.Linear(ch, 3 * ch)
            self.out1 = zero_init(nn.Linear(ch, ch))
        self.cross_attn = context_dim is not None
        if self.cross_attn:
            self.norm2 = nn.LayerNorm(ch)
            self.q = nn.Linear(ch, ch)
            self.kv = nn.Linear(context_dim, 2 * ch)
            self.out2 = zero_init(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        B, C, H, W = x.shape
        nh = self.heads
        h = x.permute(0, 2, 3, 1).reshape(B, H * W, C)  # [B, N, C] tokens; a view if channels-last
        if self.self_attn:
            q, k, v = self.qkv(self.norm1(h)).view(B, H * W, 3, nh, C // nh).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v)  # [B, nh, N, C/nh]
            h = h + self.out1(a.transpose(1, 2).reshape(B, H * W, C))
        if self.cross_attn:
            L = context.shape[1]
            q = self.q(self.norm2(h)).view(B, H * W, nh, C // nh).transpose(1, 2)  # [B, nh, N, C/nh]
            k, v = self.kv(context).view(B, L, 2, nh, C // nh).permute(2, 0, 3, 1, 4)  # [B, nh, L, C/nh]
            a = F.scaled_dot_product_attention(q, k, v)  # [B, nh, N, C/nh]
            h = h + self.out2(a.transpose(1, 2).reshape(B, H * W, C))
        out = h.view(B, H, W, C).permute(0, 3, 1, 2)  # [B, C, H, W] with channels-last strides
        # Hand back the memory format we were given: mixing formats makes convs convert.
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


class Block(nn.Module):
    """One step of a level: a ResBlock, then attention where the config asks for it."""

    def __init__(self, cin, cout, cfg: UNetConfig, self_attn: bool, cross_attn: bool):
        super().__init__()
        self.res = ResBlock(cin, cout, 4 * cfg.base_channels, cfg.norm_groups, cfg.dropout)
        wants = self_attn or cross_attn
        self.attn = Attention(cout, cfg.head_dim, self_attn, cfg.context_dim if cross_attn else None) if wants else None

    def forward(self, x, emb, context):
        h = self.res(x, emb)
        return self.attn(h, context) if self.attn is not None else h


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 conv (learned, unlike pooling)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then a 3x3 conv (no checkerboard, unlike transposed conv)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class Level(nn.Module):
    """The blocks at one resolution, and the resampling that leaves it (None at the end)."""

    def __init__(self, blocks: list[Block], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class UNet(nn.Module):
    """Predicts the noise (or whatever the trainer asks) of x_t at timestep t, given conditioning."""

    # Layout of the activations: None is channels-last on a CPU or for a channels-last model, and
    # the input's own layout otherwise; set torch.contiguous_format (or channels_last) to force one.
    memory_format: torch.memory_format | None = None

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config.validate()
        base, nb = cfg.base_channels, cfg.num_res_blocks
        chans, sizes = [base * m for m in cfg.channel_mult], cfg.resolutions
        emb_dim = 4 * base

        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_proj = nn.Linear(cfg.pooled_dim, emb_dim) if cfg.pooled_dim else None
        self.conv_in = nn.Conv2d(cfg.in_channels, base, 3, padding=1)

        # Way down: every block's output, and every downsample's, is kept as a skip.
        self.down = nn.ModuleList()
        skip_chans, ch = [base], base
        for level, (out, s) in enumerate(zip(chans, sizes)):
            blocks = []
            for _ in range(nb):
                blocks.append(Block(ch, out, cfg, cfg._self_attn(s), cfg._cross_attn(s)))
                ch = out
                skip_chans.append(ch)
            down = Downsample(ch) if level < len(chans) - 1 else None
            if down is not None:
                skip_chans.append(ch)
            self.down.append(Level(blocks, down))

        self.mid1 = ResBlock(ch, ch, emb_dim, cfg.norm_groups, cfg.dropout)
        self.mid_attn = Attention(ch, cfg.head_dim, True, cfg.context_dim) if cfg.mid_attention else None
        self.mid2 = ResBlock(ch, ch, emb_dim, cfg.norm_groups, cfg.dropout)

        # Way up: one block more than down per level, each eating one skip, so all are used.
        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            out, s = chans[level], sizes[level]
            blocks = []
            for _ in range(nb + 1):
                blocks.append(Block(ch + skip_chans.pop(), out, cfg, cfg._self_attn(s), cfg._cross_attn(s)))
                ch = out
            self.up.append(Level(blocks, Upsample(ch) if level > 0 else None))

        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int | float,
        context: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x [B, in, H, W]; t [B] or a scalar (int or float); context [B, L, D]; pooled [B, D]
        B = x.shape[0]
        self._check_inputs(x, context, pooled)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim <= 1 else t

        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype))  # [B, E]
        if self.pooled_proj is not None:
            emb = emb + self.pooled_proj(pooled)
        emb = F.silu(emb)  # every ResBlock's projection starts with SiLU: do it once here

        layout = self._layout(x)
        caller_cl = x.is_contiguous(memory_format=torch.channels_last) or self._channels_last_weights()
        if layout is not None:
            x = x.contiguous(memory_format=layout)
        h = self.conv_in(x)  # [B, base, H, W]
        skips = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, emb, context)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # [B, C, H/2, W/2]
                skips.append(h)

        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h, context)
        h = self.mid2(h, emb)

        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # [B, C + C_skip, H, W] in
            if level.resample is not None:
                h = level.resample(h)  # [B, C, 2H, 2W]

        out = self.conv_out(F.silu(self.norm_out(h)))  # [B, out, H, W]
        return out if caller_cl or layout is None else out.contiguous()  # in the caller's layout

    def _channels_last_weights(self) -> bool:
        return self.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    def _layout(self, x: torch.Tensor) -> torch.memory_format | None:
        """The memory format to run in, or None to keep x's."""
        if self.memory_format is not None:
            return self.memory_format
        if x.device.type == "cpu" or self._channels_last_weights():
            return torch.channels_last
        return None

    def _check_inputs(self, x, context, pooled):
        """Clear messages for the mistakes torch would report cryptically, or not at all."""
        cfg, factor = self.config, 1 << (len(self.config.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, H, W], got {list(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be divisible by {factor}, got {list(x.shape[2:])}")
        for name, value, dim, ndim in (("context", context, cfg.context_dim, 3), ("pooled", pooled, cfg.pooled_dim, 2)):
            if dim is None and value is not None:
                raise ValueError(f"this U-Net has no {name}_dim, so it cannot take a {name}")
            if dim is not None and (value is None or value.ndim != ndim or value.shape[-1] != dim
                                    or value.shape[0] != x.shape[0]):
                shape = "[B, L, %d]" % dim if ndim == 3 else "[B, %d]" % dim
                got = None if value is None else list(value.shape)
                raise ValueError(f"{name} must be {shape} with B = {x.shape[0]}, got {got}")

"""The built-in noise schedules, registered like any plugin's.

Each is ``fn(num_timesteps, **options) -> betas`` (float64, length T). Torch is
imported inside the functions so that loading this plugin costs nothing.
"""

from __future__ import annotations

import math
import operator

from minidiff_cli.errors import MinidiffError
from minidiff_cli.plugins import hookimpl


def linear(num_timesteps: int, **opts):
    """Betas evenly spaced from 1e-4 to 0.02 (Ho et al. 2020, sec. 4), as published for T = 1000."""
    import torch

    T, o = _options("linear", num_timesteps, opts, beta_start=1e-4, beta_end=0.02)
    return torch.linspace(o["beta_start"], o["beta_end"], T, dtype=torch.float64)


def cosine(num_timesteps: int, **opts):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2) (Nichol & Dhariwal 2021, eq. 17).

    Betas come from ratios of consecutive alpha_bar, beta_t = 1 - alpha_bar_t / alpha_bar_{t-1},
    clipped at 0.999 so the last steps near t = T do not divide by zero. The small offset s
    keeps beta tiny near t = 0, where pixels need a noise level finer than one 8-bit step.
    """
    import torch

    T, o = _options("cosine", num_timesteps, opts, s=0.008, max_beta=0.999)
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + o["s"]) / (1 + o["s"]) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=o["max_beta"])


def scaled_linear(num_timesteps: int, **opts):
    """Stable Diffusion's schedule: sqrt(beta) evenly spaced from sqrt(0.00085) to sqrt(0.012), squared."""
    import torch

    T, o = _options("scaled-linear", num_timesteps, opts, beta_start=0.00085, beta_end=0.012)
    return torch.linspace(o["beta_start"] ** 0.5, o["beta_end"] ** 0.5, T, dtype=torch.float64) ** 2


def sigmoid(num_timesteps: int, **opts):
    """GeoDiff's schedule (Xu et al. 2022): sigmoid(linspace(-6, 6, T)) scaled into [beta_start, beta_end].

    Betas grow slowly at both ends and fast in the middle. The bounds default to the linear
    schedule's, so the two are comparable at T = 1000.
    """
    import torch

    T, o = _options("sigmoid", num_timesteps, opts, beta_start=1e-4, beta_end=0.02)
    x = torch.linspace(-6, 6, T, dtype=torch.float64)
    return torch.sigmoid(x) * (o["beta_end"] - o["beta_start"]) + o["beta_start"]


def flow(num_timesteps: int, **opts):
    """Rectified flow's path x = (1 - t) x0 + t eps as a VP schedule (Esser et al. 2024, "SD3").

    Index i is flow time t_i = shift(u) with u = (i + 1) / T, and shift(u) = s u / (1 + (s - 1) u),
    SD3's and Flux's timestep shift (their eq. 23; s = 1 is none, s > 1 spends more steps at high
    noise). Scaled by 1 / sqrt((1 - t)^2 + t^2) the path is variance preserving with alpha_bar(t) =
    (1 - t)^2 / ((1 - t)^2 + t^2). At t = 1 alpha_bar is 0, which no sampler's eps view can hold;
    the last beta is capped at 0.999 as the cosine schedule's is (t = 1 - 3e-5 at T = 1000).
    """
    import torch

    T, o = _options("flow", num_timesteps, opts, shift=1.0)
    if not 0 < o["shift"] <= MAX_SHIFT:
        raise MinidiffError(f"schedule 'flow': shift must be in (0, {MAX_SHIFT}] (got {o['shift']})")
    t = shifted(torch.arange(1, T + 1, dtype=torch.float64) / T, o["shift"])
    abar = (1 - t) ** 2 / ((1 - t) ** 2 + t ** 2)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return (1 - abar / previous).clamp(min=1e-12, max=0.999)


MAX_SHIFT = 100.0  # SD3 samples 1024 px at 3, Flux's resolution-dependent shift stays below 10


def shifted(u, shift: float):
    """SD3's timestep shift: s u / (1 + (s - 1) u), which maps [0, 1] onto itself."""
    return shift * u / (1 + (shift - 1) * u)


def _options(name: str, num_timesteps, opts: dict, **defaults: float) -> tuple[int, dict]:
    """Check T and the options against the defaults; return T and the options with defaults filled in."""
    try:
        T = operator.index(num_timesteps)  # any integer type, but not 2.5 or "10"
    except TypeError:
        T = None
    if T is None or isinstance(num_timesteps, bool) or T < 2:
        raise MinidiffError(f"schedule '{name}': timesteps must be at least 2 (got {num_timesteps!r})")
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise MinidiffError(f"schedule '{name}' has no option {', '.join(map(repr, unknown))}; "
                            f"its options are: {', '.join(defaults)}")
    out = dict(defaults)
    for key, value in opts.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise MinidiffError(f"schedule '{name}': option {key} must be a number (got {value!r})") from None
    return T, out


@hookimpl
def register_schedules(register):
    register("linear", linear)
    register("cosine", cosine)
    register("scaled-linear", scaled_linear)
    register("sigmoid", sigmoid)
    register("flow", flow)

"""Sampling: the Sampler protocol, the helpers samplers share, and the public ``sample()``.

A sampler turns pure noise x_T into data x_0 with a ``denoiser(x_t, t) -> eps``.
It knows nothing of prompts or guidance: the caller folds those into the
denoiser (see ``minidiff_cli.diffusion.guidance``). The built-in samplers live in
``minidiff_cli.builtin.samplers``; a plugin registers its own the same way.

Reproducibility: every random number comes from ``noise_like``, which can draw
row k of a batch from its own CPU generator. ``sample()`` seeds generator k with
``seed + k``, so image k of a batch is the image a batch of one with seed ``seed + k``
gives, on any device.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from minidiff_cli.diffusion.schedule import NoiseSchedule
from minidiff_cli.errors import MinidiffError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]

SPACINGS = ("trailing", "leading", "linspace")


@runtime_checkable
class Sampler(Protocol):
    """What ``register_samplers`` registers.

    ``sample`` starts from ``x`` (noise at t = T - 1), takes ``steps`` denoising steps and
    returns x_0. ``denoiser(x_t, t)`` returns the predicted noise eps, with t an int64
    tensor [B] in [0, T). All randomness must come from ``noise_like(x, generator)``.
    After each step it calls ``callback({"i", "steps", "t", "x", "x0"})`` if given.
    Options it does not know are a MinidiffError.
    """

    name: str
    default_steps: int

    def sample(self, denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, steps: int, *,
               generator=None, callback: Callback | None = None, **opts: Any) -> torch.Tensor: ...


@runtime_checkable
class PartialSampler(Sampler, Protocol):
    """A sampler that can run part of the way: what image-to-image and inpainting need.

    ``noise_levels(schedule, steps, **opts)`` gives the ``steps + 1`` noise levels of the grid
    that ``sample(..., steps, **opts)`` walks, as alpha_bar: entry i is the level of x before
    step i, the last one the level after the final step (1.0: clean data).

    ``sample(..., start=i, stop=j)`` takes x to be x_t at level ``noise_levels[i]``
    (sqrt(abar) x_0 + sqrt(1 - abar) eps, the same scaling as a whole run's x), takes steps
    i to j - 1 of that same grid, and returns x at level ``noise_levels[j]``. The defaults,
    ``start=0`` and ``stop=None`` (= steps), are the whole run, which must not change.
    Callbacks keep the whole grid's step index ``i`` and ``steps``. A multistep method
    starts its history afresh at ``start``. ``supports_partial`` tells which samplers do.
    """

    def noise_levels(self, schedule: NoiseSchedule, steps: int, **opts: Any) -> list[float]: ...


def supports_partial(sampler) -> bool:
    """Whether ``sampler`` follows ``PartialSampler``: a ``noise_levels`` method, and ``start``
    and ``stop`` named in its ``sample`` (a ``**opts`` catch-all does not count)."""
    import inspect

    if not callable(getattr(sampler, "noise_levels", None)):
        return False
    try:
        params = inspect.signature(sampler.sample).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return all(name in params and params[name].kind in (params[name].KEYWORD_ONLY, params[name].POSITIONAL_OR_KEYWORD)
               for name in ("start", "stop"))


def step_range(start: int, stop: int | None, steps: int) -> range:
    """The steps ``start`` .. ``stop - 1`` of a ``steps``-step grid, checked (``stop=None`` is ``steps``)."""
    stop = steps if stop is None else stop
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= steps):
        raise MinidiffError(f"a partial run needs 0 <= start < stop <= steps={steps} (got start={start!r:.20}, "
                            f"stop={stop!r:.20})")
    return range(start, stop)


def grid_levels(schedule: NoiseSchedule, ts: torch.Tensor) -> list[float]:
    """alpha_bar at the timesteps ``ts``, then 1.0 (clean): ``noise_levels`` of a grid of timesteps."""
    return schedule.alphas_cumprod[ts].tolist() + [1.0]


def timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """The ``steps`` timesteps a sampler visits, descending, as a LongTensor.

    Spacings (examples for T = 1000, steps = 10):

    - ``"trailing"`` (the default): 999, 899, ..., 99. Counts back from the last timestep,
      so sampling starts at the noisiest t, where training put x_T (Lin et al. 2023, "Common
      Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.3 and table 2).
    - ``"leading"``: 900, 800, ..., 0. Multiples of T // steps, as in the DDIM paper and
      diffusers; starts short of T - 1, so the first step sees less noise than x holds.
    - ``"linspace"``: 999, 888, ..., 0. Evenly from T - 1 down to 0, rounded.
    """
    if not 1 <= steps <= num_timesteps:
        raise MinidiffError(f"steps must be between 1 and T={num_timesteps} (got {steps})")
    if spacing == "trailing":
        # round(T - i * T / steps) - 1 for i = 0..steps-1, as in Lin et al.'s table 2.
        ts = (num_timesteps - torch.arange(steps, dtype=torch.float64) * num_timesteps / steps).round() - 1
    elif spacing == "leading":
        ts = torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (num_timesteps // steps)
    elif spacing == "linspace":
        ts = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round()
    else:
        raise MinidiffError(f"unknown spacing '{spacing}'; choose one of: {', '.join(SPACINGS)}")
    return ts.long()


def sampler_grid(sampler: str, num_timesteps: int, steps: int, spacing: str = "trailing",
                 custom: Any = None) -> torch.Tensor:
    """The timesteps a sampler visits: its ``timesteps`` option where given, else ``spacing``'s grid.

    ``custom`` is a list of whole numbers or a comma-separated string ("999,499", as ``-O
    timesteps=999,499`` arrives), one per step, strictly descending, each in [0, T - 1]: a grid
    chosen by hand, like diffusers' ``timesteps=`` argument (e.g. a few-step student started
    below the noisiest level; see benchmarks/RESULTS.md). It replaces ``spacing``.
    """
    if custom is None:
        return timesteps(num_timesteps, steps, spacing)
    values = custom.split(",") if isinstance(custom, str) else custom
    if not isinstance(values, (list, tuple)) or not all(_whole(v) for v in values):
        raise MinidiffError(f"sampler '{sampler}': timesteps must be whole numbers separated by commas, "
                            f"e.g. 999,499 (got {custom!r:.60})")
    ts = [int(v) for v in values]
    if len(ts) != steps:
        raise MinidiffError(f"sampler '{sampler}': {len(ts)} timesteps given for {steps} steps; "
                            f"give one a step or pass --steps {len(ts)}")
    if any(not 0 <= t < num_timesteps for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise MinidiffError(f"sampler '{sampler}': timesteps must descend strictly from at most "
                            f"{num_timesteps - 1} to at least 0 (got {','.join(map(str, ts)):.60})")
    return torch.tensor(ts, dtype=torch.long)


def _whole(value: Any) -> bool:
    if isinstance(value, str):  # ASCII digits only: str.isdigit() also takes "²", which int() refuses;
        digits = value.strip()  # and few enough for int(), which limits them
        return digits.isascii() and digits.isdigit() and len(digits) <= 18
    return isinstance(value, int) and not isinstance(value, bool)


def noise_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """Standard normal noise shaped like x, in x's dtype and on x's device.

    ``generator`` is None (torch's global generator), one torch.Generator (drawn on its own
    device), or a list of CPU generators, one per row of x: row k is drawn from generator k
    on the CPU, then moved, so that it does not depend on the batch or the device.
    Draws are float32 (float64 for float64 x), so half precision gets the same numbers rounded.
    """
    draw = torch.float64 if x.dtype == torch.float64 else torch.float32
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=draw).to(x.dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=draw).to(x)
    if len(generator) != x.shape[0]:
        raise MinidiffError(f"need one generator per row of the batch: got {len(generator)} for {x.shape[0]} rows")
    rows = [torch.randn(x.shape[1:], generator=g, device="cpu", dtype=draw) for g in generator]
    return torch.stack(rows).to(x)


def alpha_bars(schedule: NoiseSchedule, ts: torch.Tensor, i: int) -> tuple[float, float]:
    """(alpha_bar at ts[i], alpha_bar at the step after it), as Python floats (float64).

    After the last step the sampler lands on clean data, so alpha_bar_prev is 1 there.
    ("prev" is the paper's t - 1: the next step in sampling order.)
    """
    abar = schedule.alphas_cumprod
    abar_t = abar[ts[i]].item()
    abar_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
    return abar_t, abar_prev


def batch_t(t: int, x: torch.Tensor) -> torch.Tensor:
    """The timestep t for every row of x, as the denoiser wants it: int64 [B] on x's device."""
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def gaussian_denoiser(schedule: NoiseSchedule, mu: float = 0.5, s: float = 0.5) -> Denoiser:
    """The exact noise predictor for data x0 ~ N(mu, s^2): a sampler test with a known answer.

    x_t is then Gaussian too, and E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) /
    (abar_t s^2 + 1 - abar_t). A correct sampler driven by it gives back N(mu, s^2), up to its
    discretisation error (docs/plugins.md, "Testing a sampler on Gaussian data").
    """
    abar_all = schedule.alphas_cumprod

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = abar_all[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * s * s + 1 - abar)

    return denoiser


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # velocity(x on the flow path, t) -> eps - x0


def flow_denoiser(velocity: Velocity, schedule: NoiseSchedule) -> Denoiser:
    """A flow network's ``velocity(x, t)`` as the eps denoiser samplers take, by the schedule's rescaling.

    The same conversion as ``DiffusionModel.predict_eps`` for a flow model: x_t goes onto the flow
    path (``NoiseSchedule.to_flow``) and the velocity comes back as eps (``eps_from_flow``).
    """
    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return schedule.eps_from_flow(x, velocity(schedule.to_flow(x, t), t), t)

    return denoiser


def gaussian_velocity(schedule: NoiseSchedule, mu: float = 0.5, s: float = 0.5) -> Velocity:
    """The exact flow velocity for data x0 ~ N(mu, s^2): ``gaussian_denoiser``'s counterpart.

    On the path x = (1 - t) x0 + t eps, x is Gaussian with mean (1 - t) mu and variance
    V = (1 - t)^2 s^2 + t^2, and u = eps - x0 is jointly Gaussian with it, Cov(u, x) = t - (1 - t) s^2;
    so E[u | x] = -mu + (t - (1 - t) s^2) (x - (1 - t) mu) / V, with t the flow time of the index.
    """
    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = schedule.flow_time(t).to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        var = (1 - tau) ** 2 * s * s + tau ** 2
        return -mu + (tau - (1 - tau) * s * s) * (x - (1 - tau) * mu) / var

    return velocity


def sample(denoiser: Denoiser, shape: Sequence[int], *, schedule: str | NoiseSchedule = "cosine",
           sampler: str | Sampler = "ddim", steps: int | None = None, seed: int = 0,
           num_timesteps: int = 1000, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
           callback: Callback | None = None, **sampler_opts: Any) -> torch.Tensor:
    """Draw samples of ``shape`` [B, ...] with ``denoiser(x_t, t) -> eps``; returns x_0.

    ``schedule`` and ``sampler`` are registered names or objects; a named schedule is built
    over ``num_timesteps`` steps (an object keeps its own). ``steps`` defaults to the
    sampler's ``default_steps`` (at most T). Row k of the result is what ``seed + k`` gives
    alone. Extra keyword options go to the sampler, e.g. ``eta=1.0`` for DDIM.

    Example::

        x0 = sample(lambda x, t: model(x, t), (4, 3, 32, 32), sampler="ddim", steps=50, seed=1)
    """
    from minidiff_cli import plugins
    from minidiff_cli.diffusion.schedule import get_schedule

    if isinstance(schedule, str):
        schedule = get_schedule(schedule, num_timesteps)
    if isinstance(sampler, str):
        sampler = plugins.get_sampler(sampler)
    if steps is None:
        steps = min(sampler.default_steps, schedule.num_timesteps)
    shape = tuple(shape)
    if len(shape) < 1 or shape[0] < 1:
        raise MinidiffError(f"shape must start with a batch size of at least 1 (got {shape})")
    generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(shape[0])]
    x = noise_like(torch.empty(shape, device=device, dtype=dtype), generators)
    with torch.no_grad():
        return sampler.sample(denoiser, x, schedule, steps, generator=generators, callback=callback,
                              **sampler_opts)

"""The built-in samplers: DDPM (ancestral), DDIM and LCM (for distilled students), registered like any plugin's.

Each step's math is a small function over plain numbers and tensors, written
next to the paper's equation; the sampler classes are the loops around them.
Notation: abar_t is alpha_bar at the current timestep, abar_prev at the next one
in sampling order (the paper's t - 1), and 1 after the last step.
Torch is imported inside the functions so that loading this plugin costs nothing.
"""

from __future__ import annotations

from minidiff_cli.errors import MinidiffError
from minidiff_cli.plugins import hookimpl


# -- one step of each, as in the papers ------------------------------------------------
def x0_from_eps(x_t, eps, abar_t: float):
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al. 2020, eq. 4 solved for x_0)."""
    return (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5


def eps_from_x0(x_t, x0, abar_t: float):
    """The eps that, with x0, gives back x_t: eq. 4 solved for eps."""
    return (x_t - abar_t ** 0.5 * x0) / (1 - abar_t) ** 0.5


def ddpm_step(x_t, x0, abar_t: float, abar_prev: float, noise=None, variance: str = "beta-tilde"):
    """A draw from q(x_prev | x_t, x_0), with x_0 predicted (Ho et al. 2020, eqs. 6-7).

    When steps skip timesteps (respacing, Nichol & Dhariwal 2021 sec. 4) the step's own
    beta is 1 - abar_t / abar_prev, which is beta_t itself when no step is skipped.
    ``noise=None`` gives the mean, as on the last step.
    """
    alpha = abar_t / abar_prev
    beta = 1 - alpha
    mean = (abar_prev ** 0.5 * beta / (1 - abar_t)) * x0 + (alpha ** 0.5 * (1 - abar_prev) / (1 - abar_t)) * x_t
    if noise is None:
        return mean
    # beta-tilde (eq. 7) is the true posterior variance; beta is the upper bound Ho et al. also tried.
    var = beta * (1 - abar_prev) / (1 - abar_t) if variance == "beta-tilde" else beta
    return mean + var ** 0.5 * noise


def ddim_sigma(abar_t: float, abar_prev: float, eta: float) -> float:
    """sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (Song et al. 2021, eq. 16).

    eta = 0 is the deterministic DDIM; eta = 1 is DDPM's posterior (beta-tilde) standard deviation.
    """
    return eta * ((1 - abar_prev) / (1 - abar_t)) ** 0.5 * (1 - abar_t / abar_prev) ** 0.5


def ddim_step(x0, eps, abar_prev: float, sigma: float, noise=None):
    """x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z (Song et al. 2021, eq. 12)."""
    # max(0, .) only absorbs rounding: for eta <= 1, sigma^2 <= 1 - abar_prev exactly.
    x = abar_prev ** 0.5 * x0 + max(0.0, 1 - abar_prev - sigma ** 2) ** 0.5 * eps
    return x if noise is None else x + sigma * noise


# -- the samplers --------------------------------------------------------------------
class DDPM:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), at any number of steps.

    Options: ``variance`` "beta-tilde" (default) or "beta"; ``spacing`` of the timesteps
    (see ``minidiff_cli.diffusion.sampling.timesteps``) or ``timesteps``, a grid given by hand
    (``sampler_grid``); ``clip_x0`` clamps the predicted x_0 to
    [-clip_x0, clip_x0] (default None: no clamp). ``start`` / ``stop`` run part of the grid
    (``minidiff_cli.diffusion.sampling.PartialSampler``).
    """

    name = "ddpm"
    default_steps = 1000
    options = ("variance", "spacing", "timesteps", "clip_x0")

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, start=0, stop=None,
               variance="beta-tilde", spacing="trailing", timesteps=None, clip_x0=None, **unknown):
        from minidiff_cli.diffusion.sampling import alpha_bars, batch_t, noise_like, sampler_grid, step_range

        _no_unknown(self.name, unknown, self.options)
        if variance not in ("beta-tilde", "beta"):
            raise MinidiffError(f"sampler 'ddpm': variance must be 'beta-tilde' or 'beta' (got {variance!r})")
        clip = _clip_value(self.name, clip_x0)
        ts = sampler_grid(self.name, schedule.num_timesteps, steps, spacing, timesteps)
        for i in step_range(start, stop, len(ts)):
            t = int(ts[i])
            abar_t, abar_prev = alpha_bars(schedule, ts, i)
            x0 = x0_from_eps(x, denoiser(x, batch_t(t, x)), abar_t)
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
            last = i == len(ts) - 1  # no noise on the way to x_0 (Algorithm 2: z = 0 when t = 1)
            x = ddpm_step(x, x0, abar_t, abar_prev, None if last else noise_like(x, generator), variance)
            if callback is not None:
                callback({"i": i, "steps": len(ts), "t": t, "x": x, "x0": x0})
        return x

    def noise_levels(self, schedule, steps, *, spacing="trailing", timesteps=None, **others):
        return _grid_levels(self, schedule, steps, spacing, timesteps, others)


class DDIM:
    """Denoising diffusion implicit models (Song et al. 2021), deterministic at eta = 0.

    Options: ``eta`` in [0, 1] (default 0) scales the fresh noise per step, eta = 1 being
    DDPM; ``spacing``, ``timesteps``, ``clip_x0``, ``start`` and ``stop`` as for DDPM.
    """

    name = "ddim"
    default_steps = 50
    options = ("eta", "spacing", "timesteps", "clip_x0")

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, start=0, stop=None,
               eta=0.0, spacing="trailing", timesteps=None, clip_x0=None, **unknown):
        from minidiff_cli.diffusion.sampling import alpha_bars, batch_t, noise_like, sampler_grid, step_range

        _no_unknown(self.name, unknown, self.options)
        eta = _number(self.name, "eta", eta)
        if not 0 <= eta <= 1:
            raise MinidiffError(f"sampler 'ddim': eta must be between 0 and 1 (got {eta:g})")
        clip = _clip_value(self.name, clip_x0)
        ts = sampler_grid(self.name, schedule.num_timesteps, steps, spacing, timesteps)
        for i in step_range(start, stop, len(ts)):
            t = int(ts[i])
            abar_t, abar_prev = alpha_bars(schedule, ts, i)
            eps = denoiser(x, batch_t(t, x))
            x0 = x0_from_eps(x, eps, abar_t)
            if clip is not None:
                # Re-derive eps from the clamped x0 so that eq. 12 still interpolates
                # between x0 and a noise consistent with x_t.
                x0 = x0.clamp(-clip, clip)
                eps = eps_from_x0(x, x0, abar_t)
            sigma = ddim_sigma(abar_t, abar_prev, eta)
            x = ddim_step(x0, eps, abar_prev, sigma, noise_like(x, generator) if sigma > 0 else None)
            if callback is not None:
                callback({"i": i, "steps": len(ts), "t": t, "x": x, "x0": x0})
        return x

    def noise_levels(self, schedule, steps, *, spacing="trailing", timesteps=None, **others):
        return _grid_levels(self, schedule, steps, spacing, timesteps, others)


class LCM:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM, Luo et al. 2023): for a
    student distilled by ``minidiff distill``, which maps any x_t straight to its x_0.

    Each step predicts x_0 and, except the last, noises it afresh to the next level on the grid:
    x_next = sqrt(abar_next) x_0 + sqrt(1 - abar_next) z. With one step it is a one-shot
    generator. On an ordinary model it is a poor sampler (its x_0 guesses are blurry until t is
    small). Options: ``spacing``, ``timesteps`` (as for DDIM), ``clip_x0``, ``start`` / ``stop``.
    """

    name = "lcm"
    default_steps = 4
    options = ("spacing", "timesteps", "clip_x0")

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, start=0, stop=None,
               spacing="trailing", timesteps=None, clip_x0=None, **unknown):
        from minidiff_cli.diffusion.sampling import alpha_bars, batch_t, noise_like, sampler_grid, step_range

        _no_unknown(self.name, unknown, self.options)
        clip = _clip_value(self.name, clip_x0)
        ts = sampler_grid(self.name, schedule.num_timesteps, steps, spacing, timesteps)
        for i in step_range(start, stop, len(ts)):
            t = int(ts[i])
            abar_t, abar_next = alpha_bars(schedule, ts, i)
            x0 = x0_from_eps(x, denoiser(x, batch_t(t, x)), abar_t)
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
            last = i == len(ts) - 1
            x = x0 if last else abar_next ** 0.5 * x0 + (1 - abar_next) ** 0.5 * noise_like(x, generator)
            if callback is not None:
                callback({"i": i, "steps": len(ts), "t": t, "x": x, "x0": x0})
        return x

    def noise_levels(self, schedule, steps, *, spacing="trailing", timesteps=None, **others):
        return _grid_levels(self, schedule, steps, spacing, timesteps, others)


def _grid_levels(sampler, schedule, steps, spacing, custom, others) -> list[float]:
    """alpha_bar along the sampler's timesteps; its other options do not move the grid but must be its own."""
    from minidiff_cli.diffusion.sampling import grid_levels, sampler_grid

    _no_unknown(sampler.name, {k: v for k, v in others.items() if k not in sampler.options}, sampler.options)
    return grid_levels(schedule, sampler_grid(sampler.name, schedule.num_timesteps, steps, spacing, custom))


# -- option checks ---------------------------------------------------------------------
def _no_unknown(sampler: str, unknown: dict, known: tuple[str, ...]) -> None:
    if unknown:
        names = ", ".join(sorted(unknown))
        raise MinidiffError(f"sampler '{sampler}' has no option {names}; its options are: {', '.join(known)}")


def _number(sampler: str, option: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MinidiffError(f"sampler '{sampler}': {option} must be a number (got {value!r})") from None


def _clip_value(sampler: str, clip_x0) -> float | None:
    if clip_x0 is None:
        return None
    clip = _number(sampler, "clip_x0", clip_x0)
    if not clip > 0:
        raise MinidiffError(f"sampler '{sampler}': clip_x0 must be above 0, or None for no clamp (got {clip:g})")
    return clip


@hookimpl
def register_samplers(register):
    register(DDPM())
    register(DDIM())
    register(LCM())

"""The four samplers as minidiff sees them: option checks, the sigma grid, the callback.

Each ``sample`` follows ``minidiff_cli.diffusion.sampling.Sampler``: it takes minidiff's x (N(0, I)
noise at the first timestep), a ``denoiser(x_t, t) -> eps`` and the model's schedule, runs
one of the solver loops in the sigma view, and returns x_0. Options:

- ``karras`` (bool, default False): Karras et al.'s rho = 7 sigmas between the schedule's
  sigma_min and sigma_max instead of the schedule's own levels (on a schedule whose top level
  is capped, such as cosine, the curve starts at sigma = 80 after a first step from the top:
  ``minidiff_solvers.sigmas.karras_grid``);
- ``spacing``: which of the schedule's timesteps make the grid when karras is off
  ("trailing", the default, "linspace" or "leading"; see ``minidiff_cli.diffusion.sampling.timesteps``);
- ``eta`` (euler-ancestral only, in [0, 1], default 1): the share of fresh noise per step.

``start`` / ``stop`` run steps start..stop-1 of the grid (``minidiff_cli.diffusion.sampling.PartialSampler``),
from minidiff's x_t at the level ``noise_levels`` gives for ``start``; DPM-Solver++(2M) then
begins its history afresh (first order on its first step).

After each step the callback gets ``{"i", "steps", "t", "x", "x0", "sigma"}``: x is minidiff's
x_t after the step, t the timestep the model was asked about, x0 the model's prediction.
"""

from __future__ import annotations

from minidiff_cli.errors import MinidiffError
from minidiff_solvers import dpm_solver
from minidiff_solvers import karras as karras_solvers
from minidiff_solvers.sigmas import SigmaDenoiser, check_karras, check_options, sigma_grid, to_sigma_view, to_vp

GRID_OPTIONS = ("karras", "spacing")


def prepare(name, denoiser, x, schedule, steps, karras, spacing, callback, start=0, stop=None):
    """(model, x, sigmas, report, run) for a solver loop: the sigma-view denoiser, minidiff's x moved
    to the sigma view (at the grid's level ``start``), the grid of noise levels, a callback in
    minidiff's terms, and the range of steps to take.

    The loop's x is float32 (float64 if x is): at sigma_max = 20291 (cosine) it is x_t times
    20291, which overflows float16 and keeps two digits in bfloat16. The network still runs
    in x's dtype, and what the sampler returns or reports is in x's dtype too.
    """
    import torch

    karras, spacing = check_karras(name, karras, spacing)
    sigmas = sigma_grid(schedule, steps, karras, spacing)
    model = SigmaDenoiser(denoiser, schedule, x.dtype)
    report = None
    if callback is not None:
        def report(info):
            callback({"i": info["i"], "steps": steps, "t": model.timestep(info["sigma"]),
                      "x": to_vp(info["x"], info["sigma_next"]).to(x.dtype), "x0": info["denoised"].to(x.dtype),
                      "sigma": info["sigma"]})
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    run = step_range(start, stop, steps)
    return model, to_sigma_view(x.to(work), sigmas[start]), sigmas, report, run


def step_range(start, stop, steps):
    """minidiff's checked range of steps (imported here: minidiff_cli.diffusion.sampling imports torch)."""
    from minidiff_cli.diffusion.sampling import step_range as checked

    return checked(start, stop, steps)


def finish(x_sigma, sigmas, stop, like):
    """The loop's sigma-view x back in minidiff's terms at level ``stop``, in ``like``'s dtype.

    A whole run ends at sigma = 0, where the sigma view's x is x_0 itself."""
    return to_vp(x_sigma, sigmas[len(sigmas) - 1 if stop is None else stop]).to(like.dtype)


class GridLevels:
    """``noise_levels`` for the solvers: alpha_bar = 1 / (1 + sigma^2) along the sigma grid."""

    def noise_levels(self, schedule, steps, *, karras=False, spacing=None, **others):
        check_options(self.name, {k: v for k, v in others.items() if k not in self.options}, self.options)
        karras, spacing = check_karras(self.name, karras, spacing)
        return [1.0 / (1.0 + sigma ** 2) for sigma in sigma_grid(schedule, steps, karras, spacing)]


class DPMSolverPP2M(GridLevels):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR, one model call per step."""

    name = "dpmpp-2m"
    default_steps = 20
    options = GRID_OPTIONS

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, start=0, stop=None,
               karras=False, spacing=None, **unknown):
        check_options(self.name, unknown, GRID_OPTIONS)
        model, x_sigma, sigmas, report, run = prepare(self.name, denoiser, x, schedule, steps, karras, spacing,
                                                      callback, start, stop)
        x_sigma = dpm_solver.sample_dpmpp_2m(model, x_sigma, sigmas, callback=report, steps=run)
        return finish(x_sigma, sigmas, stop, x)


class Euler(GridLevels):
    """Euler's method on the probability-flow ODE (Karras et al. 2022), one model call per step."""

    name = "euler"
    default_steps = 50
    options = GRID_OPTIONS

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, start=0, stop=None,
               karras=False, spacing=None, **unknown):
        check_options(self.name, unknown, GRID_OPTIONS)
        model, x_sigma, sigmas, report, run = prepare(self.name, denoiser, x, schedule, steps, karras, spacing,
                                                      callback, start, stop)
        x_sigma = karras_solvers.sample_euler(model, x_sigma, sigmas, callback=report, steps=run)
        return finish(x_sigma, sigmas, stop, x)


class Heun(GridLevels):
    """Heun's method (Karras et al. 2022, Algorithm 2): 2 * steps - 2 model calls."""

    name = "heun"
    default_steps = 25
    options = GRID_OPTIONS

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, start=0, stop=None,
               karras=False, spacing=None, **unknown):
        check_options(self.name, unknown, GRID_OPTIONS)
        model, x_sigma, sigmas, report, run = prepare(self.name, denoiser, x, schedule, steps, karras, spacing,
                                                      callback, start, stop)
        x_sigma = karras_solvers.sample_heun(model, x_sigma, sigmas, callback=report, steps=run)
        return finish(x_sigma, sigmas, stop, x)


class EulerAncestral(GridLevels):
    """Euler steps with fresh noise (ancestral sampling in the sigma view); eta = 0 is Euler."""

    name = "euler-ancestral"
    default_steps = 50
    options = GRID_OPTIONS + ("eta",)

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, start=0, stop=None,
               karras=False, spacing=None, eta=1.0, **unknown):
        from minidiff_cli.diffusion.sampling import noise_like

        check_options(self.name, unknown, GRID_OPTIONS + ("eta",))
        try:
            eta = float(eta)
        except (TypeError, ValueError):
            raise MinidiffError(f"sampler '{self.name}': eta must be a number (got {eta!r})") from None
        if not 0 <= eta <= 1:
            raise MinidiffError(f"sampler '{self.name}': eta must be between 0 and 1 (got {eta:g})")
        model, x_sigma, sigmas, report, run = prepare(self.name, denoiser, x, schedule, steps, karras, spacing,
                                                      callback, start, stop)
        # noise_like draws float32 for any x below float64, so x's dtype does not change the noise.
        noise = lambda like: noise_like(like, generator)  # noqa: E731
        x_sigma = karras_solvers.sample_euler_ancestral(model, x_sigma, sigmas, noise, eta, callback=report, steps=run)
        return finish(x_sigma, sigmas, stop, x)


SAMPLERS = (DPMSolverPP2M, Euler, Heun, EulerAncestral)

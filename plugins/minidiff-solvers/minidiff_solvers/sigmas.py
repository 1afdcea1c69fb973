"""The sigma view of a minidiff schedule, and the sigma grids the solvers step along.

minidiff's models are variance-preserving (VP): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
with a noise predictor ``denoiser(x_t, t) -> eps`` over integer t in [0, T). Karras et al. 2022
("Elucidating the Design Space of Diffusion-Based Generative Models", sec. 2 and table 1) write
the same process in the variance-exploding form

    x = x_t / sqrt(abar_t) = x_0 + sigma_t eps,      sigma_t = sqrt((1 - abar_t) / abar_t),

where the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma (their eq. 3 with
sigma(t) = t) and D(x; sigma) = x - sigma eps is the denoiser. Going back is
x_t = x / sqrt(1 + sigma^2), since 1 / abar = 1 + sigma^2.

minidiff's initial x is N(0, I) at t = T - 1, i.e. the VP x_t there; in the sigma view it is
x * sqrt(1 + sigma_max^2), whose variance 1 + sigma_max^2 is sigma_max^2 plus the unit data
variance the VP schedule assumes. Every solver here starts from exactly that.

torch is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import math

from minidiff_cli.errors import MinidiffError

RHO = 7.0  # Karras et al. 2022, eq. 5 and table 1: rho = 7
CAPPED_SIGMA_MAX = 80.0  # Karras et al. 2022, table 1: sigma_max = 80; the Karras curve's top on capped schedules


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = RHO) -> list[float]:
    """n noise levels from sigma_max down to sigma_min, then 0 (Karras et al. 2022, eq. 5).

    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i < n, and sigma_n = 0: evenly spaced in sigma^(1/rho), which puts short steps near the data.
    """
    if n == 1:
        return [float(sigma_max), 0.0]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    inner = [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(1, n - 1)]
    return [float(sigma_max), *inner, float(sigma_min), 0.0]  # the ends exactly, not re-rounded


def discrete_sigmas(schedule, steps: int, spacing: str) -> list[float]:
    """sigma_t at minidiff's timesteps (``minidiff_cli.diffusion.sampling.timesteps``), then 0."""
    from minidiff_cli.diffusion.sampling import timesteps

    ts = timesteps(schedule.num_timesteps, steps, spacing)
    return schedule.sigmas[ts].tolist() + [0.0]


def karras_grid(schedule, steps: int) -> list[float]:
    """The ``karras=True`` grid: Karras et al.'s curve (``karras_sigmas``) from ``curve_sigma_max``
    down to the schedule's sigma_min, whose first level is then moved up to the schedule's top level,
    where minidiff's noise is; then 0.

    On a schedule whose top level is on its own curve (linear, scaled-linear, sigmoid) the curve
    starts there and this is the grid k-diffusion's ``get_sigmas_karras`` and diffusers'
    ``use_karras_sigmas`` give. On a capped one (cosine, flow) it starts lower, and the first step
    goes from the capped level straight to the curve's second level (see ``curve_sigma_max``).
    """
    sigmas = schedule.sigmas
    grid = karras_sigmas(sigmas[0].item(), curve_sigma_max(schedule), steps)
    grid[0] = sigmas[-1].item()
    return grid


def curve_sigma_max(schedule) -> float:
    """Where the Karras curve starts: the schedule's top level, unless that level is capped.

    A schedule whose last beta sits at minidiff's cap (``MAX_BETA`` = 0.999: the cosine and flow
    schedules, whose alpha_bar reaches 0 at t = T) has its top level far above the rest: 20291
    for cosine at T = 1000, where the level below is 642. A rho = 7 curve from there puts 5 of
    20 levels above 3000, where data of std s = 0.5 are invisible (s / sigma < 0.0002), and too
    few where they take shape. There the curve starts at EDM's sigma_max = 80 (Karras et al.
    2022, table 1, for data of std 0.5), or at the level below the capped one if that is lower
    (32 for cosine at T = 50). Above the curve the denoiser is the data mean to within s^2 / sigma,
    so the one step from the capped level onto the curve loses next to nothing.
    """
    from minidiff_cli.diffusion.schedule import MAX_BETA

    sigmas = schedule.sigmas
    if schedule.betas[-1].item() < MAX_BETA:
        return sigmas[-1].item()
    return min(CAPPED_SIGMA_MAX, sigmas[-2].item())


def sigma_grid(schedule, steps: int, karras: bool, spacing: str) -> list[float]:
    """The ``steps + 1`` noise levels a solver visits: ``steps`` levels of the schedule's range, then 0."""
    if karras:
        from minidiff_cli.diffusion.sampling import timesteps

        timesteps(schedule.num_timesteps, steps)  # the same bounds on steps as every sampler
        return karras_grid(schedule, steps)
    return discrete_sigmas(schedule, steps, spacing)


class SigmaDenoiser:
    """A minidiff noise predictor seen as Karras's denoiser D(x; sigma), for x in the sigma view.

    eps = denoiser(x / sqrt(1 + sigma^2), t) and D = x - sigma eps (Karras et al. 2022, table 1,
    VP column: c_in = 1 / sqrt(1 + sigma^2), c_skip = 1, c_out = -sigma). The network only knows
    the schedule's own T levels, so a sigma between them (Karras spacing) is asked about at the
    nearest level t in log sigma. The input keeps the scaling of the exact sigma: the network
    always sees unit-variance x_t, and where the levels are sparse (the cosine schedule jumps from
    sigma = 641 at t = 998 to 20291 at t = 999) its eps stays on scale. On the default grid sigma
    is one of the levels and nothing is approximated.
    """

    def __init__(self, denoiser, schedule, dtype=None):
        self.denoiser = denoiser
        self.dtype = dtype  # the network's input dtype; None keeps x's
        self.log_sigmas = schedule.sigmas.log()  # float64, ascending with t

    def timestep(self, sigma: float) -> int:
        """The timestep whose sigma is nearest to ``sigma`` in log sigma."""
        return int((self.log_sigmas - math.log(sigma)).abs().argmin())

    def __call__(self, x, sigma: float):
        """(D(x; sigma), d) with d = (x - D) / sigma the ODE's slope, which is the predicted eps itself."""
        import torch

        t = torch.full((x.shape[0],), self.timestep(sigma), dtype=torch.long, device=x.device)
        eps = self.denoiser(to_vp(x, sigma).to(self.dtype or x.dtype), t).to(x.dtype)
        return x - sigma * eps, eps


def to_vp(x, sigma: float):
    """x_t = x / sqrt(1 + sigma^2): back from the sigma view to minidiff's x_t (x itself at sigma = 0)."""
    return x / math.sqrt(1.0 + sigma ** 2)


def to_sigma_view(x, sigma: float):
    """x * sqrt(1 + sigma^2): minidiff's x_t at noise level sigma, in the sigma view."""
    return x * math.sqrt(1.0 + sigma ** 2)


# -- options -------------------------------------------------------------------------
def check_options(sampler: str, unknown: dict, known: tuple[str, ...]) -> None:
    """An option the sampler does not take is a MinidiffError that lists the ones it does."""
    if unknown:
        names = ", ".join(sorted(unknown))
        raise MinidiffError(f"sampler '{sampler}' has no option {names}; its options are: {', '.join(known)}")


def check_karras(sampler: str, karras, spacing) -> tuple[bool, str]:
    """Validate ``karras`` against ``spacing``; return both as the grid wants them.

    ``karras`` is a bool, or the words minidiff takes for one elsewhere ("true", "1", "yes",
    "on" and "false", "0", "no", "off"), for options that arrive as text.
    """
    if not isinstance(karras, bool):
        word = str(karras).strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise MinidiffError(f"sampler '{sampler}': karras must be true or false (got {karras!r})")
        karras = word in TRUE_WORDS
    if karras and spacing is not None:
        raise MinidiffError(f"sampler '{sampler}': karras=True sets its own sigmas; leave out spacing "
                            f"(got spacing={spacing!r})")
    return karras, spacing or DEFAULT_SPACING


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

# Like minidiff's own samplers, the default grid is the "trailing" timesteps (Lin et al. 2023):
# it starts at t = T - 1, where minidiff's noise is, and its last step is the jump from
# t = T / steps - 1 to sigma = 0. "linspace" and "leading" end at t = 0 instead.
DEFAULT_SPACING = "trailing"

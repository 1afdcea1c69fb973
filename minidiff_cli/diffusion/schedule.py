"""The noise schedule: betas -> alpha_bar, and the closed forms built on it.

Notation follows Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"):
beta_t is the variance of the noise added at step t, alpha_t = 1 - beta_t, and
alpha_bar_t = prod_{s<=t} alpha_s (their eq. 4). Timesteps are 0-based here:
index t is the paper's t + 1, so alphas_cumprod[0] = 1 - betas[0] is already a
little noisy and alphas_cumprod[T - 1] is the noisiest.

Every coefficient is computed in float64 and cast to the data's dtype at the
end: sqrt(1 - alpha_bar) near t = 0 is too small for float16 and loses digits
in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from minidiff_cli.errors import MinidiffError, PluginError
from minidiff_cli.runtime.devices import to_device

MAX_BETA = 0.999  # beyond this alpha_bar collapses to 0 and x0 can no longer be recovered from x_t


@dataclass(eq=False)
class NoiseSchedule:
    """A discrete noise schedule over ``num_timesteps`` steps, with q(x_t | x_0) in closed form."""

    name: str | None
    betas: torch.Tensor  # float64 [T]
    alphas: torch.Tensor = field(init=False)  # float64 [T], 1 - beta_t
    alphas_cumprod: torch.Tensor = field(init=False)  # float64 [T], alpha_bar_t

    def __post_init__(self) -> None:
        self.betas = _validated(self.betas, self.name)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @classmethod
    def from_betas(cls, betas, name: str | None = None) -> "NoiseSchedule":
        """A schedule from a 1-D sequence of T >= 2 betas in (0, 0.999]; MinidiffError otherwise."""
        return cls(name=name, betas=betas)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, num_timesteps={self.num_timesteps})"

    # -- the forward process -------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, a sample of q(x_t | x_0) (Ho et al. eq. 4)."""
        abar = self._at(self.alphas_cumprod, t)
        return _bcast(abar.sqrt(), x0) * x0 + _bcast((1 - abar).sqrt(), x0) * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t): eq. 4 solved for x_0."""
        abar = self._at(self.alphas_cumprod, t)
        return (x_t - _bcast((1 - abar).sqrt(), x_t) * eps) / _bcast(abar.sqrt(), x_t)

    # -- v-prediction (Salimans & Ho 2022, "Progressive Distillation", sec. 4) -------
    # With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar) and alpha^2 + sigma^2 = 1,
    # v = alpha eps - sigma x0, and the pair (x_t, v) is a rotation of (x0, eps).
    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0, the target of a v-prediction model."""
        abar = self._at(self.alphas_cumprod, t)
        return _bcast(abar.sqrt(), x0) * noise - _bcast((1 - abar).sqrt(), x0) * x0

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
        """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v, the rotation undone."""
        abar = self._at(self.alphas_cumprod, t)
        return _bcast((1 - abar).sqrt(), x_t) * x_t + _bcast(abar.sqrt(), x_t) * v

    # -- rectified flow (Liu et al. 2022; Lipman et al. 2022; Esser et al. 2024, "SD3") -----
    # The flow path x = (1 - t) x0 + t eps is Gaussian, so it is this VP path rescaled: with
    # alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), x_t = (alpha + sigma) x and
    # t = sigma / (alpha + sigma). A flow network sees x and predicts the velocity u = eps - x0;
    # these three turn its world into the eps view every sampler works in, at any schedule.
    def flow_time(self, t) -> torch.Tensor:
        """The flow time in [0, 1) of timestep index t: sigma / (alpha + sigma), float64 on the CPU."""
        alpha, sigma = self._alpha_sigma(t)
        return sigma / (alpha + sigma)

    def to_flow(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The flow model's input x = x_t / (alpha + sigma) = (1 - t) x0 + t eps, from the VP x_t."""
        alpha, sigma = self._alpha_sigma(t)
        return x_t / _bcast(alpha + sigma, x_t)

    def eps_from_flow(self, x_t: torch.Tensor, u: torch.Tensor, t) -> torch.Tensor:
        """eps = x + (1 - t) u with x = to_flow(x_t): x = (1 - t) x0 + t eps and u = eps - x0 solved for eps."""
        alpha, sigma = self._alpha_sigma(t)
        return x_t / _bcast(alpha + sigma, x_t) + _bcast(alpha / (alpha + sigma), x_t) * u

    def flow_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """u = eps - x0, with x0 from eq. 4: what a flow model predicts where an eps model says ``eps``."""
        return eps - self.predict_x0(x_t, eps, t)

    def _alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self._at(self.alphas_cumprod, t)
        return abar.sqrt(), (1 - abar).sqrt()

    # -- zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules ... are Flawed") --
    def with_zero_terminal_snr(self) -> "NoiseSchedule":
        """This schedule rescaled so that its last step holds (almost) no signal; see ``zero_terminal_snr``."""
        return NoiseSchedule(name=self.name, betas=zero_terminal_snr(self.betas))

    # -- signal-to-noise ratio ----------------------------------------------------
    def snr(self, t=None) -> torch.Tensor:
        """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021), float64 on the CPU; all T if t is None."""
        abar = self.alphas_cumprod if t is None else self._at(self.alphas_cumprod, t)
        return abar / (1 - abar)

    def log_snr(self, t=None) -> torch.Tensor:
        """log SNR(t), via log1p so it stays accurate where alpha_bar_t is close to 1."""
        abar = self.alphas_cumprod if t is None else self._at(self.alphas_cumprod, t)
        return abar.log() - torch.log1p(-abar)

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level of x_t / sqrt(alpha_bar_t).

        This is the variance-exploding view used by k-diffusion style solvers (Karras et al. 2022):
        x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps. Float64, ascending with t.
        """
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def _at(self, values: torch.Tensor, t) -> torch.Tensor:
        """values[t] in float64 on the CPU, for an int or an integer tensor t of any shape and device."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise MinidiffError(f"timesteps must be integers (got a {t.dtype} tensor)")
        t = t.detach().cpu().long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_timesteps):
            raise MinidiffError(f"timesteps must lie in [0, {self.num_timesteps - 1}] "
                                f"(got {t.min().item()}..{t.max().item()})")
        return values[t]


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so it runs from its first value to 0.

    The exact zero would need beta_{T-1} = 1, where no sampler can recover x0 from eps (x0 =
    (x_t - eps) / 0): the last beta is capped at MAX_BETA instead, like the cosine schedule's, so
    alpha_bar_{T-1} = 0.001 alpha_bar_{T-2} (about 1e-12 for linear at T = 1000: the signal is far
    below 8-bit resolution). Training and sampling use this same capped schedule. A v or flow
    model learns there to predict x0 from pure noise, which is the point; an eps model cannot.
    """
    root = torch.cumprod(1.0 - betas.to(torch.float64), dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).clamp(max=MAX_BETA)


def _bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row coefficient [B] (or a scalar) shaped [B, 1, 1, ...] to broadcast over x, in x's dtype and device.

    The coefficients are computed on the CPU; cast there and queued to a GPU without a blocking
    copy (``to_device``), so that a training step or a sampler on CUDA does not wait for the GPU here.
    """
    return to_device(coef.reshape(-1, *([1] * (x.dim() - 1))).to(dtype=x.dtype), x.device)


def _validated(betas, name: str | None) -> torch.Tensor:
    who = f"schedule '{name}': " if name else ""
    try:
        betas = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MinidiffError(f"{who}betas must be a 1-D sequence of numbers ({exc})") from None
    if betas.dim() != 1:
        raise MinidiffError(f"{who}betas must be 1-D (got shape {tuple(betas.shape)})")
    if betas.shape[0] < 2:
        raise MinidiffError(f"{who}a schedule needs at least 2 timesteps (got {betas.shape[0]})")
    if not torch.isfinite(betas).all():
        raise MinidiffError(f"{who}betas must be finite (got NaN or infinity)")
    bad = (betas <= 0) | (betas > MAX_BETA)
    if bad.any():
        t = int(bad.nonzero()[0])
        raise MinidiffError(f"{who}every beta must lie in (0, {MAX_BETA}] (got {betas[t].item():g} at t={t})")
    return betas


MAX_TIMESTEPS = 100_000  # far beyond any real schedule


def get_schedule(name: str, num_timesteps: int = 1000, **opts: Any):
    """The NoiseSchedule built by schedule ``name`` over ``num_timesteps`` steps.

    What the plugin's function returns is checked (T finite betas in (0, 0.999]); a
    function that fails or returns anything else is a PluginError naming the plugin.
    """
    from minidiff_cli.plugins.registry import failure_line, registry

    reg = registry()
    fn = reg.get("schedules", name)  # an unknown name fails before torch is imported
    T = num_timesteps
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise MinidiffError(f"timesteps must be at least 2, a whole number (got {T!r:.40})")
    if T > MAX_TIMESTEPS:
        raise MinidiffError(f"{T} timesteps is more than the {MAX_TIMESTEPS} minidiff allows")
    who = f"schedule '{name}' (plugin '{reg.owner('schedules', name)}')"
    try:
        betas = fn(T, **opts)
    except MinidiffError:  # the plugin's own words, e.g. an unknown option
        raise
    except Exception as exc:
        raise PluginError(f"{who} failed: {failure_line(exc)}") from exc
    try:
        schedule = NoiseSchedule.from_betas(betas)
    except MinidiffError as exc:
        raise PluginError(f"{who} returned unusable betas: {exc}") from None
    if schedule.num_timesteps != T:
        raise PluginError(f"{who} returned {schedule.num_timesteps} betas for {T} timesteps")
    schedule.name = name
    return schedule

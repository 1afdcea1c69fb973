"""minidiff-solvers on data whose exact denoiser is known, and as an installed plugin.

For 1-D Gaussian data x0 ~ N(mu, s^2) the best noise prediction is
E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar), and a correct
sampler must give back N(mu, s^2) up to its discretisation error. With that predictor every
deterministic sampler here is an affine map of its input noise, so its exact output law is
read off two runs, from x = 0 and x = 1; the random runs (20000 samples) check the same thing
the way a user would.

Run from the repository root (CI does): python -m pytest -q plugins/minidiff-solvers/tests
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from minidiff_cli.errors import MinidiffError
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.plugins import get_sampler
from minidiff_cli.diffusion.sampling import Sampler, gaussian_denoiser, sample, timesteps
from minidiff_solvers.sigmas import karras_grid, karras_sigmas

MU, S, N = 0.5, 0.5, 20_000
SOLVERS = ("dpmpp-2m", "euler", "heun", "euler-ancestral")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(sampler, schedule_name, steps, seed=0, n=N, dtype=torch.float32, **opts):
    schedule = get_schedule(schedule_name, 1000)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=dtype)
    return get_sampler(sampler).sample(gaussian_denoiser(schedule, MU, S), x, schedule, steps, generator=g, **opts)


def output_law(sampler, schedule_name, steps, **opts):
    """(mean, std) of a deterministic sampler's output for x ~ N(0, 1): it is affine, a x + b."""
    schedule = get_schedule(schedule_name, 1000)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    b, ab = get_sampler(sampler).sample(gaussian_denoiser(schedule, MU, S), x, schedule, steps, **opts).tolist()
    return b, abs(ab - b)


# -- the Gaussian check -----------------------------------------------------------------
# The steps each needs for 5% on both schedules (see the README's table for all numbers).
# The linear schedule needs more: its trailing grid's last level, t = T / steps - 1, still
# hides noise of sigma ~ 0.23 at 15 steps, and the final jump to sigma = 0 returns the
# denoiser's mean, whose spread is s / sqrt(s^2 + sigma^2) of the data's (-9%). On the Karras
# grid (rho = 7) every solver overshoots or undershoots more at few steps: 25 for the second-order
# ones, 100 for Euler, 200 for Euler ancestral. On the cosine schedule that holds since its Karras
# curve starts at sigma = 80 (karras_grid); from its capped sigma_max = 20291 all four were off
# by 6 to 20% at these step counts.
@pytest.mark.parametrize("sampler, schedule, steps, opts", [
    ("dpmpp-2m", "cosine", 15, {}),
    ("dpmpp-2m", "linear", 25, {}),
    ("dpmpp-2m", "linear", 25, {"karras": True}),
    ("dpmpp-2m", "cosine", 25, {"karras": True}),
    ("heun", "cosine", 10, {}),
    ("heun", "linear", 25, {}),
    ("heun", "linear", 15, {"spacing": "linspace"}),
    ("heun", "linear", 25, {"karras": True}),
    ("heun", "cosine", 25, {"karras": True}),
    ("euler", "cosine", 50, {}),
    ("euler", "linear", 100, {}),
    ("euler", "cosine", 100, {"karras": True}),
    ("euler-ancestral", "cosine", 100, {}),
    ("euler-ancestral", "linear", 200, {}),
    ("euler-ancestral", "cosine", 200, {"karras": True}),
])
def test_solvers_recover_the_gaussian_within_5_percent(sampler, schedule, steps, opts):
    x = run(sampler, schedule, steps, **opts)
    assert x.mean().item() == pytest.approx(MU, rel=0.05)
    assert x.std().item() == pytest.approx(S, rel=0.05)


@pytest.mark.parametrize("sampler, steps", [("dpmpp-2m", 15), ("heun", 10), ("euler", 50)])
def test_samples_follow_the_samplers_exact_output_law(sampler, steps):
    mean, std = output_law(sampler, "cosine", steps)
    x = run(sampler, "cosine", steps, seed=4)
    assert abs(x.mean().item() - mean) < 4 * std / math.sqrt(N)
    assert abs(x.std().item() - std) < 4 * std / math.sqrt(2 * N)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler, order", [("dpmpp-2m", 2), ("heun", 2), ("euler", 1)])
def test_doubling_the_steps_divides_the_error_by_two_to_the_order(sampler, order, schedule):
    # On the Karras grid the last level is sigma_min (0.01, 0.0064), so the final jump adds nothing
    # and the error is the solver's own: about C / steps^order. (From the cosine schedule's capped
    # sigma_max, dpmpp-2m's error went from 12.0% to 4.4%: 2.7, not 4.)
    errors = [abs(output_law(sampler, schedule, n, karras=True)[1] - S) for n in (25, 50)]
    assert errors[0] / errors[1] == pytest.approx(2 ** order, rel=0.3)


# -- the same samplers in other words -------------------------------------------------------
def test_euler_on_the_schedules_timesteps_is_ddim():
    # In the sigma view a DDIM step is an Euler step (Song et al. 2021, eq. 14; Karras et al. 2022, sec. 3).
    for spacing in ("trailing", "linspace"):
        euler = run("euler", "cosine", 30, n=256, dtype=torch.float64, spacing=spacing)
        ddim = run("ddim", "cosine", 30, n=256, dtype=torch.float64, spacing=spacing)
        assert torch.allclose(euler, ddim, atol=1e-9)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_euler_ancestral_is_ddim_with_the_same_eta_and_noise(eta):
    # sigma_up, mapped back to x_t, is DDIM's sigma_t (Song et al. eq. 16), and the Euler step to
    # sigma_down is eq. 12's deterministic part: the same noise gives the same samples.
    ancestral = run("euler-ancestral", "linear", 40, seed=2, n=256, dtype=torch.float64, eta=eta)
    ddim = run("ddim", "linear", 40, seed=2, n=256, dtype=torch.float64, eta=eta)
    assert torch.allclose(ancestral, ddim, atol=1e-9)


def test_euler_ancestral_with_eta_1_is_ddpm():
    ancestral = run("euler-ancestral", "cosine", 100, seed=5, n=256, dtype=torch.float64)
    ddpm = run("ddpm", "cosine", 100, seed=5, n=256, dtype=torch.float64)
    assert torch.allclose(ancestral, ddpm, atol=1e-9)


# -- equal to the references ----------------------------------------------------------------
# k-diffusion 0.1.1.post1 (sample_dpmpp_2m, get_sigmas_karras) and diffusers 0.42.1
# (DPMSolverMultistepScheduler: dpmsolver++, solver_order=2, use_karras_sigmas=True, the schedule's
# betas as trained_betas), measured on the same Gaussian data with the same exact noise predictor
# (k-diffusion through SigmaDenoiser, diffusers at its rounded timesteps): the std of the output
# law for x ~ N(0, 1). Their Karras grid is karras_sigmas(sigma_min, sigma_max, steps), with
# sigma_max the schedule's top level. minidiff made the step landing on sigma_min first order below
# 15 steps (Lu et al.'s lower_order_final): std 0.2856 on cosine at 10 steps, 0.4875 and 0.5235 on
# linear at 10 and 14; the references take it second order.
REFERENCE_DPMPP_2M_KARRAS = {("cosine", 10): 0.4779, ("cosine", 20): 0.5596, ("linear", 10): 0.5528,
                             ("linear", 14): 0.5457}


def references_karras_grid(schedule, steps, karras, spacing):
    """k-diffusion's and diffusers' Karras grid, from the schedule's top level: a stand-in for sigma_grid."""
    return karras_sigmas(schedule.sigmas[0].item(), schedule.sigmas[-1].item(), steps)


@pytest.mark.parametrize("schedule_name, steps", sorted(REFERENCE_DPMPP_2M_KARRAS))
def test_dpmpp_2m_equals_k_diffusion_and_diffusers_on_their_karras_grid(monkeypatch, schedule_name, steps):
    from minidiff_solvers import samplers

    reference = REFERENCE_DPMPP_2M_KARRAS[schedule_name, steps]
    if schedule_name == "linear":  # an uncapped schedule: the sampler's own karras grid is theirs
        assert output_law("dpmpp-2m", schedule_name, steps, karras=True)[1] == pytest.approx(reference, abs=1e-3)
    monkeypatch.setattr(samplers, "sigma_grid", references_karras_grid)
    assert output_law("dpmpp-2m", schedule_name, steps, karras=True)[1] == pytest.approx(reference, abs=1e-3)


def test_dpmpp_2m_first_and_last_steps_are_first_order_that_is_ddim():
    # The first step has no earlier x0, and the last jumps to sigma = 0 (lambda = +inf): both are
    # DPM-Solver++(1), which is DDIM (Lu et al. 2022, sec. 4.1). Two steps are nothing else.
    assert torch.allclose(run("dpmpp-2m", "cosine", 2, n=64, dtype=torch.float64),
                          run("ddim", "cosine", 2, n=64, dtype=torch.float64), atol=1e-9)


# -- randomness -----------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, opts", [("euler-ancestral", {}), ("euler-ancestral", {"eta": 0.5}),
                                           ("euler-ancestral", {"karras": True}), ("dpmpp-2m", {})])
def test_row_k_of_a_batch_is_the_single_run_with_seed_plus_k(sampler, opts):
    schedule = get_schedule("cosine", 1000)
    kwargs = dict(schedule=schedule, sampler=sampler, steps=12, **opts)
    batch = sample(gaussian_denoiser(schedule, MU, S), (3, 2, 4, 4), seed=7, **kwargs)
    for k in range(3):
        alone = sample(gaussian_denoiser(schedule, MU, S), (1, 2, 4, 4), seed=7 + k, **kwargs)
        assert torch.allclose(batch[k], alone[0], atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("sampler, opts", [("dpmpp-2m", {}), ("euler", {}), ("heun", {}),
                                           ("euler-ancestral", {"eta": 0.0})])
def test_deterministic_samplers_draw_no_noise(sampler, opts):
    schedule = get_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x = torch.randn(100, generator=torch.Generator().manual_seed(1))
    get_sampler(sampler).sample(gaussian_denoiser(schedule, MU, S), x, schedule, 10, generator=g, **opts)
    assert torch.equal(g.get_state(), state)


def test_euler_ancestral_at_eta_0_is_euler():
    assert torch.equal(run("euler-ancestral", "linear", 20, n=64, eta=0.0), run("euler", "linear", 20, n=64))


# -- the sigma grid ----------------------------------------------------------------------------
def test_karras_sigmas_follow_the_rho_formula_between_sigma_max_and_sigma_min():
    sigmas = karras_sigmas(0.01, 157.4, 10)
    assert len(sigmas) == 11 and sigmas[0] == 157.4 and sigmas[9] == 0.01 and sigmas[10] == 0.0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    # Karras et al. 2022, eq. 5: sigma_i^(1/rho) is linear in i, rho = 7.
    roots = [s ** (1 / 7) for s in sigmas[:10]]
    steps = [a - b for a, b in zip(roots, roots[1:])]
    assert steps == pytest.approx([(157.4 ** (1 / 7) - 0.01 ** (1 / 7)) / 9] * 9, rel=1e-9)
    assert sigmas[4] == pytest.approx((157.4 ** (1 / 7) + 4 / 9 * (0.01 ** (1 / 7) - 157.4 ** (1 / 7))) ** 7)
    assert karras_sigmas(0.01, 157.4, 1) == [157.4, 0.0]


def test_karras_takes_the_words_minidiff_takes_for_a_bool():
    on = run("euler", "linear", 8, n=16, karras=True)
    off = run("euler", "linear", 8, n=16)
    assert torch.equal(run("euler", "linear", 8, n=16, karras="true"), on)
    assert torch.equal(run("euler", "linear", 8, n=16, karras="off"), off) and not torch.equal(on, off)


def test_karras_option_steps_through_the_schedules_sigma_range():
    schedule = get_schedule("linear", 1000)
    seen = []
    get_sampler("euler").sample(gaussian_denoiser(schedule, MU, S), torch.randn(8), schedule, 12,
                                karras=True, callback=seen.append)
    sigma_min, sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
    assert [s["sigma"] for s in seen] == karras_sigmas(sigma_min, sigma_max, 12)[:-1]
    assert seen[0]["t"] == 999 and seen[-1]["t"] == 0
    assert all(a >= b for a, b in zip([s["t"] for s in seen], [s["t"] for s in seen][1:]))


@pytest.mark.parametrize("schedule_name, curve_top", [("cosine", 80.0), ("flow", 80.0)])
def test_on_a_capped_schedule_the_karras_curve_starts_at_80_after_a_step_from_the_top(schedule_name, curve_top):
    # The cosine schedule's last beta is capped at 0.999: its top level is 20291, the one below 642.
    schedule = get_schedule(schedule_name, 1000)
    sigma_min, top = schedule.sigmas[0].item(), schedule.sigmas[-1].item()
    grid = karras_grid(schedule, 20)
    assert grid[0] == top and grid[1:] == karras_sigmas(sigma_min, curve_top, 20)[1:]
    assert [sigma for sigma in grid if sigma > 80] == [top]
    if schedule_name == "cosine":  # the capped grid: 5 levels above 3000 besides the top
        assert sum(sigma > 3000 for sigma in karras_sigmas(sigma_min, top, 20)) == 1 + 5
    seen = []
    get_sampler("euler").sample(gaussian_denoiser(schedule, MU, S), torch.randn(8), schedule, 20,
                                karras=True, callback=seen.append)
    assert [s["sigma"] for s in seen] == grid[:-1] and seen[0]["t"] == 999
    assert get_sampler("euler").noise_levels(schedule, 20, karras=True) == [1 / (1 + s ** 2) for s in grid]
    # Below 80 when the level under the cap is lower (cosine at T = 50: 32.07); one step is [top, 0].
    small = get_schedule("cosine", 50)
    assert karras_grid(small, 5)[1:] == karras_sigmas(small.sigmas[0].item(), small.sigmas[-2].item(), 5)[1:]
    assert karras_grid(schedule, 1) == [top, 0.0] and karras_grid(schedule, 2) == [top, sigma_min, 0.0]


@pytest.mark.parametrize("schedule_name", ["linear", "scaled-linear", "sigmoid"])
def test_on_an_uncapped_schedule_the_karras_grid_is_the_references(schedule_name):
    # k-diffusion's get_sigmas_karras(steps, sigma_min, sigma_max) and diffusers' use_karras_sigmas.
    schedule = get_schedule(schedule_name, 1000)
    sigmas = schedule.sigmas
    assert karras_grid(schedule, 12) == karras_sigmas(sigmas[0].item(), sigmas[-1].item(), 12)


# The std of the output law on the cosine schedule at 10 and 20 steps (S = 0.5): the capped grid
# (sigma_max = 20291, the references' grid: k-diffusion's solvers give the same figures on it, and
# diffusers' DPM-Solver++(2M) too) and karras_grid (curve from 80; k-diffusion's sample_dpmpp_2m and
# sample_euler give the same figures on it too). Closer to 0.5 everywhere but dpmpp-2m at 10 steps,
# where the capped grid's errors happen to cancel: its error is -4.4%, +0.3%, +11.9%, +12.0%, +4.4%
# at 10, 15, 20, 25, 50 steps, where karras_grid's falls as a second-order method's should
# (+12.0%, +7.5%, +4.2%, +2.6%, +0.6%). euler-ancestral: 20000 samples, seed 0.
CAPPED_VS_CURVE_FROM_80 = [
    ("dpmpp-2m", 10, 0.4779, 0.5601), ("dpmpp-2m", 20, 0.5596, 0.5210),
    ("heun", 10, 1.5365, 0.5968), ("heun", 20, 0.6630, 0.5193),
    ("euler", 10, 0.2728, 0.3703), ("euler", 20, 0.3462, 0.4337),
    ("euler-ancestral", 10, 0.2481, 0.3048), ("euler-ancestral", 20, 0.2827, 0.3827),
]


@pytest.mark.parametrize("sampler, steps, capped_std, curve_std", CAPPED_VS_CURVE_FROM_80)
def test_the_cosine_karras_grid_lands_closer_to_the_data_than_the_capped_grid(monkeypatch, sampler, steps,
                                                                             capped_std, curve_std):
    from minidiff_solvers import samplers

    def std():
        if sampler == "euler-ancestral":
            return run(sampler, "cosine", steps, dtype=torch.float64, karras=True).std().item()
        return output_law(sampler, "cosine", steps, karras=True)[1]

    assert std() == pytest.approx(curve_std, abs=2e-3)
    monkeypatch.setattr(samplers, "sigma_grid", references_karras_grid)
    assert std() == pytest.approx(capped_std, abs=2e-3)
    closer = abs(curve_std - S) < abs(capped_std - S)
    assert closer == ((sampler, steps) != ("dpmpp-2m", 10))


@pytest.mark.parametrize("sampler", SOLVERS)
def test_callback_reports_every_step_on_the_trailing_timesteps(sampler):
    schedule = get_schedule("cosine", 1000)
    seen = []
    out = get_sampler(sampler).sample(gaussian_denoiser(schedule, MU, S), torch.randn(8), schedule, 5,
                                      generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2, 3, 4] and {s["steps"] for s in seen} == {5}
    assert [s["t"] for s in seen] == timesteps(1000, 5).tolist() and isinstance(seen[0]["t"], int)
    assert [s["sigma"] for s in seen] == schedule.sigmas[timesteps(1000, 5)].tolist()
    assert torch.equal(seen[-1]["x"], out) and seen[-1]["x0"].shape == out.shape


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", SOLVERS)
def test_the_first_model_call_sees_minidiffs_noise_at_the_last_timestep(sampler, schedule_name):
    # x ~ N(0, I) is x_t at t = T - 1; the sigma view scales it by sqrt(1 + sigma_max^2) and the
    # model gets it back divided by the same: unchanged. On the cosine schedule the Karras grid
    # starts there too, though its curve starts at sigma = 80.
    schedule = get_schedule(schedule_name, 1000)
    calls = []
    den = gaussian_denoiser(schedule, MU, S)
    x = torch.randn(6, dtype=torch.float64)
    for opts in ({}, {"karras": True}):
        calls.clear()
        get_sampler(sampler).sample(lambda x_t, t: calls.append((x_t, t)) or den(x_t, t), x, schedule, 4,
                                    generator=torch.Generator(), **opts)
        assert torch.allclose(calls[0][0], x, rtol=1e-12) and calls[0][1].tolist() == [999] * 6
        assert calls[0][1].dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", SOLVERS)
def test_half_precision_input_keeps_a_float32_state_and_gives_its_dtype_back(sampler, dtype):
    # In the sigma view, x at sigma_max = 20291 (cosine) is x_t * 20291: past float16's 65504,
    # and 80 units per bfloat16 step. The model runs in the input's dtype; the solver does not.
    schedule = get_schedule("cosine", 1000)
    den = gaussian_denoiser(schedule, MU, S)
    seen = set()
    x = torch.randn(512, generator=torch.Generator().manual_seed(0))
    half = get_sampler(sampler).sample(lambda x_t, t: seen.add(x_t.dtype) or den(x_t, t), x.to(dtype), schedule,
                                       15, generator=torch.Generator().manual_seed(1))
    full = get_sampler(sampler).sample(den, x.to(dtype).float(), schedule, 15,
                                       generator=torch.Generator().manual_seed(1))
    assert half.dtype == dtype and seen == {dtype} and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.05


def test_heun_calls_the_model_twice_per_step_but_the_first_and_last():
    schedule = get_schedule("cosine", 1000)
    calls = []
    den = gaussian_denoiser(schedule, MU, S)
    get_sampler("heun").sample(lambda x, t: calls.append(t) or den(x, t), torch.randn(4), schedule, 10)
    assert len(calls) == 2 * 10 - 2


@pytest.mark.parametrize("opts", [{"karras": True}, {"spacing": "linspace"}])
def test_dpmpp_2m_takes_the_step_onto_the_last_level_second_order(opts):
    # No lower-order final step, as in k-diffusion and diffusers (whose lower_order_final only
    # touches the step to sigma = 0, first order anyway): on a 10-step grid ending at t = 0, step 8
    # lands on sigma_min with step 7's x0 in its history. A run restarted at 8 has none: first order.
    schedule = get_schedule("linear", 1000)
    sampler, denoiser = get_sampler("dpmpp-2m"), gaussian_denoiser(schedule, MU, S)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64)
    whole = sampler.sample(denoiser, x, schedule, 10, **opts)
    restarted = sampler.sample(denoiser, sampler.sample(denoiser, x, schedule, 10, stop=8, **opts), schedule, 10,
                               start=8, **opts)
    assert sampler.noise_levels(schedule, 10, **opts)[9] == pytest.approx(schedule.alphas_cumprod[0].item())
    assert (whole - restarted).abs().max() > 0.01


# -- options and the protocol -----------------------------------------------------------------
@pytest.mark.parametrize("sampler, option, message", [
    ("dpmpp-2m", {"eta": 0.5}, "sampler 'dpmpp-2m' has no option eta; its options are: karras, spacing"),
    ("euler", {"rho": 7}, "sampler 'euler' has no option rho; its options are: karras, spacing"),
    ("heun", {"churn": 1}, "sampler 'heun' has no option churn; its options are: karras, spacing"),
    ("euler-ancestral", {"etta": 1}, "sampler 'euler-ancestral' has no option etta; its options are: "
                                     "karras, spacing, eta"),
    ("euler-ancestral", {"eta": 1.5}, "eta must be between 0 and 1"),
    ("euler-ancestral", {"eta": "lots"}, "eta must be a number"),
    ("euler", {"karras": "maybe"}, "karras must be true or false"),
    ("heun", {"karras": True, "spacing": "linspace"}, "leave out spacing"),
    ("dpmpp-2m", {"spacing": "odd"}, "unknown spacing 'odd'"),
])
def test_bad_options_are_refused(sampler, option, message):
    schedule = get_schedule("cosine", 10)
    with pytest.raises(MinidiffError, match=message):
        get_sampler(sampler).sample(gaussian_denoiser(schedule, MU, S), torch.zeros(2), schedule, 5, **option)


@pytest.mark.parametrize("karras", [False, True])
def test_steps_beyond_the_schedule_are_refused(karras):
    schedule = get_schedule("cosine", 10)
    with pytest.raises(MinidiffError, match="steps must be between 1 and T=10"):
        get_sampler("euler").sample(gaussian_denoiser(schedule, MU, S), torch.zeros(2), schedule, 11, karras=karras)


def test_solvers_follow_the_sampler_protocol():
    for name, steps in (("dpmpp-2m", 20), ("euler", 50), ("heun", 25), ("euler-ancestral", 50)):
        sampler = get_sampler(name)
        assert isinstance(sampler, Sampler) and sampler.name == name and sampler.default_steps == steps


# -- as an installed plugin ---------------------------------------------------------------------
def minidiff(*args):
    exe = shutil.which("minidiff")
    cmd = [exe] if exe else [sys.executable, "-m", "minidiff_cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=300)


def test_minidiff_plugins_lists_the_distribution_and_its_samplers():
    result = minidiff("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert "solvers" in listed, "install it with: pip install -e plugins/minidiff-solvers"
    plugin = listed["solvers"]
    assert plugin["distribution"] == "minidiff-solvers" and plugin["status"] == "ok"
    assert plugin["hooks"] == ["register_samplers"]
    assert plugin["registered"] == {"samplers": ["dpmpp-2m", "euler", "heun", "euler-ancestral"]}


def test_loading_the_plugin_imports_no_torch():
    code = ("import sys, minidiff_solvers\n"
            "names = []\n"
            "minidiff_solvers.register_samplers(lambda s: names.append(s.name))\n"
            "print(len(names), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "False"]

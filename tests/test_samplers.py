"""Samplers, timestep spacing and the public sample(), on data whose exact denoiser is known.

For 1-D Gaussian data x0 ~ N(mu, s^2), x_t = sqrt(abar) x0 + sqrt(1 - abar) eps is Gaussian too,
and the best noise prediction is E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar).
With it, a correct sampler must give back N(mu, s^2), up to its discretisation error.
"""

import math

import pytest
import torch

from minidiff_cli.diffusion.sampling import Sampler, gaussian_denoiser, noise_like, sample, timesteps
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.errors import MinidiffError, UnknownNameError
from minidiff_cli.plugins import get_sampler

MU, S, N = 0.5, 0.5, 20_000
SCHEDULES = ("linear", "cosine", "scaled-linear", "sigmoid")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Thousands of tiny steps: a second intra-op thread only adds hand-off cost, and on a
    # busy CPU it makes the 1000-step runs 20 times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(sampler, schedule_name, steps, seed=0, **opts):
    schedule = get_schedule(schedule_name, 1000)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, generator=g)
    return get_sampler(sampler).sample(gaussian_denoiser(schedule, MU, S), x, schedule, steps, generator=g, **opts)


# -- timesteps ---------------------------------------------------------------------
def test_trailing_spacing_starts_at_the_last_timestep():
    assert timesteps(1000, 10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps(10, 3, "trailing").tolist() == [9, 6, 2]  # round(10, 6.67, 3.33) - 1


def test_leading_spacing_uses_multiples_of_t_over_steps():
    assert timesteps(1000, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timesteps(10, 3, "leading").tolist() == [6, 3, 0]


def test_linspace_spacing_spans_t_minus_one_to_zero():
    assert timesteps(1000, 10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timesteps(10, 3, "linspace").tolist() == [9, 4, 0]  # 4.5 rounds to even


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_every_spacing_gives_distinct_descending_timesteps_in_range(spacing):
    for T in range(2, 40):
        for steps in range(1, T + 1):
            ts = timesteps(T, steps, spacing)
            assert ts.dtype == torch.int64 and len(ts) == steps
            assert (ts.diff() < 0).all() and 0 <= ts.min() and ts.max() <= T - 1
        assert timesteps(T, T, spacing).tolist() == list(range(T - 1, -1, -1))


@pytest.mark.parametrize("steps", [0, 1001])
def test_steps_out_of_range_are_refused(steps):
    with pytest.raises(MinidiffError, match=rf"steps must be between 1 and T=1000 \(got {steps}\)"):
        timesteps(1000, steps)


def test_unknown_spacing_is_refused():
    with pytest.raises(MinidiffError, match="unknown spacing 'even'.*trailing, leading, linspace"):
        timesteps(1000, 10, "even")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "lcm"])
@pytest.mark.parametrize("given", ["899,499", [899, 499], "899, 499"])
def test_a_grid_given_by_hand_is_the_one_visited_and_the_one_levels_report(sampler, given):
    schedule = get_schedule("cosine", 1000)
    seen = []
    get_sampler(sampler).sample(gaussian_denoiser(schedule, MU, S), torch.randn(8), schedule, 2,
                                callback=seen.append, timesteps=given)
    assert [info["t"] for info in seen] == [899, 499]
    levels = get_sampler(sampler).noise_levels(schedule, 2, timesteps=given)
    assert levels == pytest.approx([schedule.alphas_cumprod[899].item(), schedule.alphas_cumprod[499].item(), 1.0])


def test_a_grid_given_by_hand_replaces_the_spacing_and_matches_the_spaced_run_it_equals():
    # The trailing grid written out by hand is the trailing run, bit for bit.
    by_hand = run("ddim", "cosine", 4, timesteps=",".join(map(str, timesteps(1000, 4).tolist())))
    assert torch.equal(by_hand, run("ddim", "cosine", 4))
    assert not torch.equal(run("ddim", "cosine", 4, timesteps="899,599,299,0"), by_hand)


@pytest.mark.parametrize("given, message", [
    ("999,499,0", r"3 timesteps given for 2 steps; give one a step or pass --steps 3"),
    ("499,999", r"must descend strictly from at most 999 to at least 0 \(got 499,999\)"),
    ("999,999", r"must descend strictly"),
    ([1000, 0], r"must descend strictly .* \(got 1000,0\)"),
    ("999,-1", r"whole numbers separated by commas, e.g. 999,499"),
    ("9²,0", r"whole numbers"),  # a superscript two is a digit to str.isdigit(), not to int()
    ([999.5, 0], r"whole numbers"),
    ("9" * 5000 + ",0", r"whole numbers"),  # beyond int()'s digit limit
    ([True, False], r"whole numbers"),
    (7, r"whole numbers"),
])
def test_a_bad_grid_is_refused_in_one_line(given, message):
    schedule = get_schedule("cosine", 1000)
    with pytest.raises(MinidiffError, match="sampler 'lcm': .*" + message):
        get_sampler("lcm").sample(gaussian_denoiser(schedule, MU, S), torch.randn(4), schedule, 2, timesteps=given)


# -- samplers on Gaussian data --------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_with_all_1000_steps_recovers_the_gaussian(schedule):
    x = run("ddpm", schedule, 1000)
    assert x.mean().item() == pytest.approx(MU, rel=0.02)
    assert x.std().item() == pytest.approx(S, rel=0.02)


# Fewer, larger steps lose a little spread: DDPM's fixed variance leaves out the uncertainty of
# x0 (why Nichol & Dhariwal 2021 learn it), and DDIM is a coarse ODE solver. Hence 7% on std.
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler, steps", [("ddpm", 100), ("ddim", 50)])
def test_respaced_ddpm_and_ddim_recover_the_gaussian_within_a_few_percent(schedule, sampler, steps):
    x = run(sampler, schedule, steps)
    assert x.mean().item() == pytest.approx(MU, rel=0.02)
    assert x.std().item() == pytest.approx(S, rel=0.07)


def _closed_form_output_law(schedule, ts, step):
    """Push N(0, 1) through a linear-Gaussian sampler step by step; ``step`` gives (A, B, var) of x' = A x + B + noise."""
    mean, var = 0.0, 1.0
    abar = schedule.alphas_cumprod.tolist()
    for i, t in enumerate(ts):
        a, a_prev = abar[t], abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        k = math.sqrt(1 - a) / (a * S * S + 1 - a)  # eps_hat = k (x - sqrt(a) mu)
        x0_gain, x0_bias = (1 - math.sqrt(1 - a) * k) / math.sqrt(a), math.sqrt(1 - a) * k * MU
        A, B, v = step(a, a_prev, k, x0_gain, x0_bias, last=i == len(ts) - 1)
        mean, var = A * mean + B, A * A * var + v
    return mean, math.sqrt(var)


def _ddpm_law(a, a_prev, k, x0_gain, x0_bias, last):
    # Posterior mean of q(x_prev | x_t, x0) (Ho et al. eq. 7), with beta = 1 - a / a_prev.
    beta = 1 - a / a_prev
    c0, ct = math.sqrt(a_prev) * beta / (1 - a), math.sqrt(a / a_prev) * (1 - a_prev) / (1 - a)
    return c0 * x0_gain + ct, c0 * x0_bias, 0.0 if last else beta * (1 - a_prev) / (1 - a)


def _ddim_law(a, a_prev, k, x0_gain, x0_bias, last):
    # Song et al. eq. 12 with eta = 0: sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    d = math.sqrt(1 - a_prev)
    return math.sqrt(a_prev) * x0_gain + d * k, math.sqrt(a_prev) * x0_bias - d * k * math.sqrt(a) * MU, 0.0


@pytest.mark.parametrize("sampler, steps, law", [("ddpm", 100, _ddpm_law), ("ddim", 50, _ddim_law)])
def test_samples_follow_the_closed_form_law_of_the_sampler_to_sampling_error(sampler, steps, law):
    schedule = get_schedule("linear", 1000)
    mean, std = _closed_form_output_law(schedule, timesteps(1000, steps).tolist(), law)
    x = run(sampler, "linear", steps, seed=4)
    assert abs(x.mean().item() - mean) < 4 * std / math.sqrt(N)
    assert abs(x.std().item() - std) < 4 * std / math.sqrt(2 * N)


def test_ddim_with_eta_1_is_ddpm():
    # With eta = 1, sigma_t^2 is DDPM's posterior variance and eq. 12 is the posterior mean:
    # the same noise gives the same samples, not just the same distribution.
    ddpm, ddim = run("ddpm", "cosine", 100, seed=5), run("ddim", "cosine", 100, seed=5, eta=1.0)
    assert torch.allclose(ddpm, ddim, atol=1e-4)
    assert ddim.mean().item() == pytest.approx(MU, rel=0.02)
    assert ddim.std().item() == pytest.approx(S, rel=0.05)


def test_ddim_with_eta_0_draws_no_noise():
    schedule = get_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x = torch.randn(100, generator=torch.Generator().manual_seed(1))
    get_sampler("ddim").sample(gaussian_denoiser(schedule, MU, S), x, schedule, 20, generator=g)
    assert torch.equal(g.get_state(), state)


def test_ddpm_beta_variance_adds_more_noise_than_beta_tilde():
    assert run("ddpm", "cosine", 100, variance="beta").std() > run("ddpm", "cosine", 100).std()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_x0_keeps_the_result_in_range(sampler):
    schedule = get_schedule("cosine", 100)
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    wild = gaussian_denoiser(schedule, mu=5.0, s=2.0)
    out = get_sampler(sampler).sample(wild, x, schedule, 10, generator=torch.Generator(), clip_x0=1.0)
    assert out.abs().max() <= 1.0 + 1e-6
    assert get_sampler(sampler).sample(wild, x, schedule, 10, generator=torch.Generator()).abs().max() > 1.0


def test_callback_sees_every_step_with_the_documented_keys():
    seen = []
    schedule = get_schedule("cosine", 1000)
    x = torch.randn(8)
    out = get_sampler("ddim").sample(gaussian_denoiser(schedule, MU, S), x, schedule, 5, callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2, 3, 4] and {s["steps"] for s in seen} == {5}
    assert [s["t"] for s in seen] == timesteps(1000, 5).tolist() and isinstance(seen[0]["t"], int)
    assert torch.equal(seen[-1]["x"], out) and seen[-1]["x0"].shape == x.shape


@pytest.mark.parametrize("sampler, option, message", [
    ("ddim", {"etta": 0.5}, "sampler 'ddim' has no option etta; its options are: eta, spacing, timesteps, clip_x0"),
    ("ddpm", {"eta": 0.5}, "sampler 'ddpm' has no option eta"),
    ("ddim", {"eta": 2}, "eta must be between 0 and 1"),
    ("ddpm", {"variance": "big"}, "variance must be 'beta-tilde' or 'beta'"),
    ("ddim", {"clip_x0": -1}, "clip_x0 must be above 0"),
    ("ddpm", {"spacing": "odd"}, "unknown spacing 'odd'"),
])
def test_bad_sampler_options_are_refused(sampler, option, message):
    schedule = get_schedule("cosine", 10)
    with pytest.raises(MinidiffError, match=message):
        get_sampler(sampler).sample(gaussian_denoiser(schedule, MU, S), torch.zeros(2), schedule, 5, **option)


def test_builtin_samplers_follow_the_protocol():
    for name, steps in (("ddpm", 1000), ("ddim", 50)):
        sampler = get_sampler(name)
        assert isinstance(sampler, Sampler) and sampler.name == name and sampler.default_steps == steps


# -- noise and the public sample() ----------------------------------------------------
def test_noise_row_k_comes_from_generator_k_on_the_cpu():
    gens = [torch.Generator().manual_seed(10 + k) for k in range(3)]
    noise = noise_like(torch.empty(3, 2, 4, dtype=torch.float64), gens)
    assert noise.dtype == torch.float64
    for k in range(3):
        alone = noise_like(torch.empty(1, 2, 4, dtype=torch.float64), [torch.Generator().manual_seed(10 + k)])
        assert torch.equal(noise[k], alone[0])
    with pytest.raises(MinidiffError, match="one generator per row"):
        noise_like(torch.empty(3, 2), gens[:2])


def test_half_precision_noise_is_float32_noise_rounded():
    half = noise_like(torch.empty(2, 5, dtype=torch.float16), [torch.Generator().manual_seed(k) for k in range(2)])
    full = noise_like(torch.empty(2, 5), [torch.Generator().manual_seed(k) for k in range(2)])
    assert half.dtype == torch.float16 and torch.equal(half, full.half())


@pytest.mark.parametrize("sampler, opts", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("ddim", {})])
def test_row_k_of_a_batch_is_the_single_run_with_seed_plus_k(sampler, opts):
    schedule = get_schedule("cosine", 1000)
    kwargs = dict(schedule=schedule, sampler=sampler, steps=20, **opts)
    batch = sample(gaussian_denoiser(schedule, MU, S), (3, 2, 4, 4), seed=7, **kwargs)
    for k in range(3):
        alone = sample(gaussian_denoiser(schedule, MU, S), (1, 2, 4, 4), seed=7 + k, **kwargs)
        assert torch.allclose(batch[k], alone[0], atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_sample_defaults_to_the_samplers_own_step_count_by_name():
    calls = []
    schedule = get_schedule("cosine", 1000)
    den = gaussian_denoiser(schedule, MU, S)
    sample(lambda x, t: calls.append(t) or den(x, t), (2, 3), schedule="cosine", sampler="ddim")
    assert len(calls) == 50 and calls[0].tolist() == [999, 999] and calls[0].dtype == torch.int64


def test_sample_reports_unknown_names_with_what_exists():
    with pytest.raises(UnknownNameError, match="unknown sampler 'no-such-sampler'; available: ") as info:
        sample(lambda x, t: x, (1, 2), sampler="no-such-sampler")
    assert {"ddim", "ddpm"} <= set(str(info.value).split("available: ")[1].split(", "))
    with pytest.raises(UnknownNameError, match="unknown schedule 'zigzag'; available: ") as info:
        sample(lambda x, t: x, (1, 2), schedule="zigzag")
    assert set(SCHEDULES) <= set(str(info.value).split("available: ")[1].split(", "))


def test_sample_refuses_steps_beyond_the_schedule():
    with pytest.raises(MinidiffError, match="steps must be between 1 and T=100"):
        sample(lambda x, t: x, (1, 2), num_timesteps=100, steps=101)

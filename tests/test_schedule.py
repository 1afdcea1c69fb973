"""NoiseSchedule and the built-in schedules, checked against the published formulas."""

import math

import pytest
import torch
from conftest import assert_error
from conftest import run_in_process as cli

from minidiff_cli.builtin import schedules as builtin
from minidiff_cli.diffusion.schedule import NoiseSchedule, get_schedule
from minidiff_cli.errors import MinidiffError

NAMES = ["linear", "cosine", "scaled-linear", "sigmoid", "flow"]


# -- the built-in schedules ---------------------------------------------------------
@pytest.mark.parametrize("T", [1000, 10])
def test_linear_betas_are_evenly_spaced_from_1e4_to_002(T):
    betas = builtin.linear(T)
    for t in (0, 1, T // 2, T - 1):
        assert betas[t].item() == pytest.approx(1e-4 + t * (0.02 - 1e-4) / (T - 1), rel=1e-12)


def _cosine_f(t, T, s=0.008):
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_alpha_bar_is_f_of_t_over_f_of_0(T):
    # Index t is the paper's t + 1 (Nichol & Dhariwal 2021, eq. 17).
    abar = NoiseSchedule.from_betas(builtin.cosine(T)).alphas_cumprod
    for t in (0, 1, T // 4, T // 2, 3 * T // 4, T - 2):
        assert abar[t].item() == pytest.approx(_cosine_f(t + 1, T) / _cosine_f(0, T), rel=1e-9)


def test_cosine_betas_are_clipped_at_0999():
    betas = builtin.cosine(1000)
    assert betas.max().item() == 0.999
    assert betas[-1].item() == 0.999  # f(T) = cos^2(pi/2) = 0: an unclipped beta would be 1
    assert betas[-2].item() < 0.999


@pytest.mark.parametrize("T", [1000, 20])
def test_scaled_linear_is_linear_in_sqrt_beta(T):
    betas = builtin.scaled_linear(T)
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    for t in (0, 3, T // 2, T - 1):
        assert betas[t].item() == pytest.approx((lo + t * (hi - lo) / (T - 1)) ** 2, rel=1e-12)


@pytest.mark.parametrize("T", [1000, 7])
def test_sigmoid_betas_follow_a_scaled_sigmoid_over_minus6_to_6(T):
    betas = builtin.sigmoid(T)
    for t in (0, 1, T // 2, T - 1):
        x = -6 + 12 * t / (T - 1)
        assert betas[t].item() == pytest.approx(1 / (1 + math.exp(-x)) * (0.02 - 1e-4) + 1e-4, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_every_schedule_gives_float64_betas_in_range_and_decreasing_alpha_bar(name):
    schedule = get_schedule(name, 1000)
    assert schedule.name == name and schedule.num_timesteps == 1000
    assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == torch.float64
    assert ((schedule.betas > 0) & (schedule.betas <= 0.999)).all()
    assert (schedule.alphas_cumprod.diff() < 0).all()


def test_alpha_bar_is_the_running_product_of_one_minus_beta():
    schedule = get_schedule("linear", 1000)
    betas = schedule.betas.tolist()
    for t in (0, 10, 500, 999):
        assert schedule.alphas_cumprod[t].item() == pytest.approx(math.prod(1 - b for b in betas[: t + 1]), rel=1e-9)
    assert torch.equal(schedule.alphas, 1 - schedule.betas)


def test_schedule_options_are_keywords_and_unknown_ones_are_refused():
    assert builtin.linear(10, beta_end=0.01)[-1].item() == pytest.approx(0.01)
    assert builtin.cosine(10, s=0.0)[0].item() == pytest.approx(1 - _cosine_f(1, 10, s=0.0))
    with pytest.raises(MinidiffError, match="has no option 'beta_max'.*beta_start, beta_end"):
        builtin.linear(10, beta_max=0.1)
    with pytest.raises(MinidiffError, match="must be a number"):
        builtin.sigmoid(10, beta_end="lots")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 0, 2.5])
def test_fewer_than_two_timesteps_is_refused(name, T):
    with pytest.raises(MinidiffError, match="timesteps must be at least 2"):
        get_schedule(name, T)


# -- NoiseSchedule ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cosine():
    return get_schedule("cosine", 1000)


def test_add_noise_is_the_closed_form_of_q_xt_given_x0(cosine):
    # Ho et al. 2020 eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per row of the batch.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = cosine.add_noise(x0, noise, t)
    for k in range(4):
        abar = cosine.alphas_cumprod[t[k]].item()
        assert torch.allclose(x_t[k], math.sqrt(abar) * x0[k] + math.sqrt(1 - abar) * noise[k], atol=1e-6)


def test_add_noise_has_the_mean_and_variance_of_q_xt_given_x0(cosine):
    t = torch.full((200_000,), 300)
    x0 = torch.full((200_000,), 0.7)
    x_t = cosine.add_noise(x0, torch.randn(200_000, generator=torch.Generator().manual_seed(1)), t)
    abar = cosine.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.02)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_add_noise_keeps_the_data_dtype(cosine, dtype):
    x0 = torch.ones(2, 3, dtype=dtype)
    assert cosine.add_noise(x0, torch.zeros_like(x0), torch.tensor([0, 999])).dtype == dtype


def test_add_noise_refuses_timesteps_out_of_range_or_not_integers(cosine):
    x = torch.zeros(2, 3)
    with pytest.raises(MinidiffError, match=r"timesteps must lie in \[0, 999\]"):
        cosine.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(MinidiffError, match="must be integers"):
        cosine.add_noise(x, x, torch.tensor([0.5, 1.0]))


def test_snr_is_alpha_bar_over_one_minus_alpha_bar(cosine):
    t = torch.tensor([0, 250, 500, 999])
    abar = cosine.alphas_cumprod[t]
    assert torch.allclose(cosine.snr(t), abar / (1 - abar), rtol=1e-12)
    assert torch.allclose(cosine.log_snr(t), torch.log(abar / (1 - abar)), rtol=1e-9)
    assert cosine.snr().shape == (1000,) and (cosine.snr().diff() < 0).all()
    assert torch.allclose(cosine.log_snr(), cosine.snr().log(), rtol=1e-9)
    assert cosine.snr(500).item() == pytest.approx(abar[2].item() / (1 - abar[2].item()))


def test_sigmas_are_the_inverse_square_root_of_snr(cosine):
    assert torch.allclose(cosine.sigmas, cosine.snr().rsqrt(), rtol=1e-12)
    assert (cosine.sigmas.diff() > 0).all()


def test_predict_x0_undoes_add_noise(cosine):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 8, dtype=torch.float64, generator=g), torch.randn(3, 8, dtype=torch.float64, generator=g)
    t = torch.tensor([0, 400, 900])
    assert torch.allclose(cosine.predict_x0(cosine.add_noise(x0, eps, t), eps, t), x0, atol=1e-9)


def test_v_target_follows_salimans_and_ho_and_eps_from_v_inverts_it(cosine):
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([5, 500, 995])
    v = cosine.v_target(x0, eps, t)
    abar = cosine.alphas_cumprod[500].item()
    assert torch.allclose(v[1], math.sqrt(abar) * eps[1] - math.sqrt(1 - abar) * x0[1], atol=1e-6)
    assert torch.allclose(cosine.eps_from_v(cosine.add_noise(x0, eps, t), v, t), eps, atol=1e-5)


@pytest.mark.parametrize("betas, message", [
    ([[0.1, 0.2]], "1-D"),
    ([0.1], "at least 2 timesteps"),
    ([0.1, 0.0], r"every beta must lie in \(0, 0.999\] \(got 0 at t=1\)"),
    ([-0.1, 0.2], "every beta must lie in"),
    ([0.5, 1.0], "every beta must lie in"),
    ([0.1, float("nan")], "finite"),
    ([0.1, float("inf")], "finite"),
])
def test_invalid_betas_are_refused_in_one_line(betas, message):
    with pytest.raises(MinidiffError, match=message) as info:
        NoiseSchedule.from_betas(torch.tensor(betas, dtype=torch.float64), name="mine")
    assert "\n" not in str(info.value) and "schedule 'mine'" in str(info.value)


def test_from_betas_accepts_a_list_and_stores_float64():
    schedule = NoiseSchedule.from_betas([0.1, 0.2, 0.3])
    assert schedule.betas.dtype == torch.float64 and schedule.num_timesteps == 3
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.9 * 0.8 * 0.7)
    assert repr(schedule) == "NoiseSchedule(name=None, num_timesteps=3)"


# -- timesteps -------------------------------------------------------------------
@pytest.mark.hostile
def test_schedule_timesteps_are_checked_before_the_plugin_is_called(plugin_dir):
    for T in (0, 1, 2.5, "1000", True):
        with pytest.raises(MinidiffError, match="timesteps must be at least 2, a whole number"):
            get_schedule("cosine", T)
    with pytest.raises(MinidiffError, match="1000000000000 timesteps is more than the 100000 minidiff allows"):
        get_schedule("cosine", 10**12)  # would need 8 TB
    assert_error(cli("schedules", "show", "cosine", "-T", "1000000000000"), "is more than the 100000")

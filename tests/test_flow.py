"""Flow matching (--prediction flow) and zero terminal SNR, with known answers.

- the rescaling flow <-> eps <-> v round-trips to float precision, on the flow schedule and a VP one;
- for data N(mu, s^2) the exact flow velocity is known in closed form: driven by it (through the same
  conversion a flow model's predict_eps makes), every sampler gives the data's law back;
- DDIM on the flow schedule is rectified flow's Euler step (FlowMatchEuler), to float precision;
- zero terminal SNR is Lin et al.'s rescaling, and samplers still recover the Gaussian on it;
- a tiny flow model trains, saves, loads and samples through the CLI with every sampler, img2img too;
  bad settings and hostile model files are one-line errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli, run_in_process
from safetensors import safe_open
from safetensors.torch import save_file
from tinymodels import TINY_TOML, TINY_TRAIN, without

from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.diffusion.sampling import flow_denoiser, gaussian_denoiser, gaussian_velocity, timesteps
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.diffusion.timestep_sampling import draw_timesteps
from minidiff_cli.errors import MinidiffError, ModelFileError
from minidiff_cli.plugins import get_sampler

MU, S, N = 0.5, 0.5, 20_000
# Each sampler with a step count that keeps its own discretisation error on Gaussian data small.
GAUSSIAN = [("ddpm", 100, {}), ("ddim", 50, {}), ("ddim", 100, {"eta": 1.0}), ("dpmpp-2m", 20, {}),
            ("euler", 50, {}), ("heun", 25, {}), ("euler-ancestral", 100, {})]
IDS = [f"{name}-{steps}{''.join(f'-{k}={v}' for k, v in opts.items())}" for name, steps, opts in GAUSSIAN]
SAMPLERS = ("ddpm", "ddim", "dpmpp-2m", "euler", "heun", "euler-ancestral")


# -- the conversions ----------------------------------------------------------------------
@pytest.mark.parametrize("name, opts", [("flow", {}), ("flow", {"shift": 3.0}), ("cosine", {}), ("linear", {})])
def test_flow_eps_and_v_round_trip_to_float_precision(name, opts):
    schedule = get_schedule(name, 1000, **opts)
    g = torch.Generator().manual_seed(0)
    t = torch.arange(0, 999, 7)  # the capped last level aside: there x0 / alpha amplifies rounding a billion times
    x0, eps = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64), \
        torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    tau = schedule.flow_time(t).view(-1, 1, 1, 1)
    u = eps - x0
    assert torch.allclose(schedule.to_flow(x_t, t), (1 - tau) * x0 + tau * eps, rtol=0, atol=1e-12)
    assert torch.allclose(schedule.eps_from_flow(x_t, u, t), eps, rtol=0, atol=1e-12)
    assert torch.allclose(schedule.flow_from_eps(x_t, eps, t), u, rtol=0, atol=1e-9)
    v = schedule.v_target(x0, eps, t)
    via_v = schedule.eps_from_v(x_t, v, t)  # flow -> eps -> v -> eps -> flow
    assert torch.allclose(schedule.flow_from_eps(x_t, via_v, t), u, rtol=0, atol=1e-9)
    x32, u32 = x_t.float(), u.float()
    assert torch.allclose(schedule.eps_from_flow(x32, u32, t), eps.float(), rtol=0, atol=1e-5)


def test_the_flow_schedule_is_the_straight_path_with_sd3s_shift():
    for shift in (1.0, 3.0):
        schedule = get_schedule("flow", 1000, shift=shift)
        u = torch.arange(1, 1000, dtype=torch.float64) / 1000  # the last level is capped, see below
        want = shift * u / (1 + (shift - 1) * u)
        assert torch.allclose(schedule.flow_time(torch.arange(999)), want, rtol=0, atol=1e-12)
        # t = 1 is pure noise, alpha_bar = 0: capped at beta 0.999 like the cosine schedule's end
        assert schedule.betas[-1].item() == pytest.approx(0.999)
        assert 0.9999 < schedule.flow_time(999).item() < 1
    assert get_schedule("flow", 1000).alphas_cumprod[499].item() == pytest.approx(0.5)  # t = 1/2: SNR 1


@pytest.mark.parametrize("shift", [0, -1, float("nan"), 101, "x"])
def test_a_bad_shift_is_refused(shift):
    with pytest.raises(MinidiffError, match="schedule 'flow': .*shift"):
        get_schedule("flow", 100, shift=shift)


@pytest.mark.parametrize("name", ["flow", "cosine"])
def test_the_gaussian_velocity_is_the_gaussian_denoiser_in_the_flow_view(name):
    schedule = get_schedule(name, 1000)
    x = torch.randn(64, 5, dtype=torch.float64)
    for t in (0, 250, 500, 998):
        tt = torch.full((64,), t)
        ours = flow_denoiser(gaussian_velocity(schedule, MU, S), schedule)(x, tt)
        assert torch.allclose(ours, gaussian_denoiser(schedule, MU, S)(x, tt), rtol=0, atol=1e-10)


# -- every sampler on a flow model with a known answer ---------------------------------------
def run(sampler, steps, schedule, denoiser, **opts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=g)
    return get_sampler(sampler).sample(denoiser, x, schedule, steps, generator=g, **opts)


def run_flow(sampler, steps, schedule, **opts):
    velocity = gaussian_velocity(schedule, MU, S)
    return run(sampler, steps, schedule, flow_denoiser(velocity, schedule), **opts)  # predict_eps's conversion


def run_gaussian(sampler, steps, schedule, **opts):
    return run(sampler, steps, schedule, gaussian_denoiser(schedule, MU, S), **opts)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sampler, steps, opts", GAUSSIAN, ids=IDS)
def test_every_sampler_driven_by_the_exact_velocity_recovers_the_data(sampler, steps, opts, shift):
    x = run_flow(sampler, steps, get_schedule("flow", 1000, shift=shift), **opts)
    assert x.mean().item() == pytest.approx(MU, rel=0.03)
    assert x.std().item() == pytest.approx(S, rel=0.07)


def test_ddim_on_the_flow_schedule_is_rectified_flows_euler_step():
    schedule = get_schedule("flow", 1000, shift=3.0)
    velocity = gaussian_velocity(schedule, MU, S)
    x = torch.randn(256, dtype=torch.float64)
    ddim = get_sampler("ddim").sample(flow_denoiser(velocity, schedule), x, schedule, 8)
    ts = timesteps(1000, 8)
    taus = schedule.flow_time(ts).tolist() + [0.0]
    z = schedule.to_flow(x, ts[:1])  # FlowMatchEuler: z <- z + (t' - t) u(z, t), from t = t_0 to 0
    for i, t in enumerate(ts.tolist()):
        z = z + (taus[i + 1] - taus[i]) * velocity(z, torch.full((256,), t))
    assert torch.allclose(ddim, z, rtol=0, atol=1e-10)


# -- zero terminal SNR ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "scaled-linear", "cosine"])
def test_zero_terminal_snr_is_lin_et_als_rescaling(name):
    plain = get_schedule(name, 1000)
    zero = plain.with_zero_terminal_snr()
    root, new = plain.alphas_cumprod.sqrt(), zero.alphas_cumprod.sqrt()
    want = (root - root[-1]) * root[0] / (root[0] - root[-1])
    assert torch.allclose(new[:-1], want[:-1], rtol=1e-9, atol=0)
    assert zero.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    assert zero.snr(999).item() < 1e-9 < plain.snr(999).item() or name == "cosine"
    assert zero.betas[-1].item() == pytest.approx(0.999)  # beta = 1 capped: see schedule.zero_terminal_snr


# On linear: DPM-Solver++(2M) at 20 steps loses 8 % of the spread on scaled-linear with or without
# the rescaling (its log-SNR steps are uneven there), which is the solver's, not the rescaling's.
@pytest.mark.parametrize("sampler, steps, opts", GAUSSIAN, ids=IDS)
def test_samplers_recover_the_gaussian_on_a_zero_terminal_snr_schedule(sampler, steps, opts):
    out = run_gaussian(sampler, steps, get_schedule("linear", 1000).with_zero_terminal_snr(), **opts)
    assert out.mean().item() == pytest.approx(MU, rel=0.03)
    assert out.std().item() == pytest.approx(S, rel=0.07)


def test_zero_terminal_snr_makes_the_start_the_law_of_x_T():
    # Stable Diffusion's schedule leaves sqrt(0.0047) of the signal at T - 1, so starting from N(0, I)
    # misses the data's mean there (Lin et al. 2023, sec. 3.1); rescaled, the start is exact.
    plain = get_schedule("scaled-linear", 1000)
    before = abs(run_gaussian("ddim", 50, plain).mean().item() - MU)
    after = abs(run_gaussian("ddim", 50, plain.with_zero_terminal_snr()).mean().item() - MU)
    assert after < before / 2


# -- training timesteps --------------------------------------------------------------------
def test_logit_normal_timesteps_follow_sd3s_density():
    g = torch.Generator().manual_seed(0)
    t = draw_timesteps("logit-normal", 1000, 100_000, g, mean=0.0, std=1.0)
    u = (t.double() + 0.5) / 1000
    logit = (u / (1 - u)).log()
    assert logit.mean().item() == pytest.approx(0.0, abs=0.02)
    assert logit.std().item() == pytest.approx(1.0, abs=0.02)
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.int64
    shifted = draw_timesteps("logit-normal", 1000, 100_000, torch.Generator().manual_seed(0), mean=1.0)
    assert shifted.double().mean() > t.double().mean() + 100


def test_uniform_timesteps_are_the_draws_training_always_made():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(draw_timesteps("uniform", 100, 64, g1), torch.randint(0, 100, (64,), generator=g2))


# -- through the CLI -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    (root / "tiny.toml").write_text(TINY_TOML)
    result = run_cli("train", *TINY_TRAIN, "--config", str(root / "tiny.toml"), "--prediction", "flow",
                     "--shift", "2", "--max-steps", "4", "--save-every", "4", "--sample-every", "4",
                     "--out", str(root / "run"))
    assert result.returncode == 0, result.stderr
    return root


def test_a_flow_model_stores_its_objective(flow_run):
    config = DiffusionModel.check_file(flow_run / "run" / "model.safetensors")
    assert config["prediction"] == "flow"
    assert config["schedule"] == {"name": "flow", "num_timesteps": 100, "options": {"shift": 2.0}}
    flags = config["training"]["flags"]
    assert (flags["timestep_sampling"], flags["logit_mean"], flags["logit_std"]) == ("logit-normal", 0.0, 1.0)
    model = DiffusionModel.load(flow_run / "run" / "model.safetensors")
    assert torch.allclose(model.schedule.alphas_cumprod, get_schedule("flow", 100, shift=2.0).alphas_cumprod)
    code, out, _ = run_in_process("info", flow_run / "run" / "model.safetensors")
    assert code == 0 and "flow over 100 steps, shift 2.0" in out and "│ flow" in out.split("prediction")[1][:40]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_flow_model_samples_through_the_cli_with_every_sampler(flow_run, tmp_path, sampler):
    code, out, err = run_in_process("generate", "red circle", "-m", flow_run / "run" / "model.safetensors",
                                    "--sampler", sampler, "--steps", "4", "-o", tmp_path / "a.png", "-q")
    assert code == 0, err
    assert (tmp_path / "a.png").is_file()


def test_a_flow_model_does_image_to_image_and_inpainting(flow_run, tmp_path):
    model = flow_run / "run" / "model.safetensors"
    code, _, err = run_in_process("generate", "red circle", "-m", model, "--steps", "4", "-o", tmp_path / "a.png", "-q")
    assert code == 0, err
    code, _, err = run_in_process("generate", "blue square", "-m", model, "--steps", "6", "--init-image",
                                  tmp_path / "a.png", "--strength", "0.5", "-o", tmp_path / "b.png", "-q")
    assert code == 0, err
    from PIL import Image

    Image.new("L", (16, 16), 0).save(tmp_path / "keep.png")
    code, _, err = run_in_process("generate", "blue square", "-m", model, "--steps", "4", "--init-image",
                                  tmp_path / "a.png", "--mask", tmp_path / "keep.png", "-o", tmp_path / "c.png", "-q")
    assert code == 0, err
    assert Image.open(tmp_path / "c.png").tobytes() == Image.open(tmp_path / "a.png").tobytes()  # all kept


def test_v_prediction_trains_on_a_zero_terminal_snr_schedule(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    result = run_cli("train", *without(TINY_TRAIN, "--timesteps"), "--timesteps", "100", "--schedule", "linear",
                     "--config", str(tmp_path / "tiny.toml"), "--prediction", "v", "--zero-terminal-snr",
                     "--max-steps", "2", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    model = DiffusionModel.load(tmp_path / "run" / "model.safetensors")
    assert model.config["schedule"]["zero_terminal_snr"] is True
    assert "zero terminal SNR" in run_in_process("info", tmp_path / "run" / "model.safetensors")[1]
    want = get_schedule("linear", 100).with_zero_terminal_snr()
    assert torch.equal(model.schedule.alphas_cumprod, want.alphas_cumprod)


@pytest.mark.parametrize("args, message", [
    (["--prediction", "flow", "--min-snr-gamma", "5"], "--min-snr-gamma"),
    (["--shift", "3"], "--schedule flow"),
    (["--prediction", "flow", "--shift", "0"], "--shift must be above 0"),
    (["--zero-terminal-snr"], "--zero-terminal-snr needs --prediction v or flow"),
    (["--prediction", "flow", "--zero-terminal-snr"], "the flow schedule already ends"),
    (["--timestep-sampling", "beta"], "--timestep-sampling must be uniform or logit-normal"),
    (["--prediction", "flow", "--logit-std", "0"], "--logit-std"),
    (["--prediction", "x0"], "--prediction must be eps, v or flow"),
])
def test_bad_flow_settings_are_one_line_errors(tmp_path, args, message):
    result = run_cli("train", *TINY_TRAIN, *args, "--max-steps", "1", "--out", str(tmp_path / "run"))
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()


def rewrite_config(src, dst, change):
    with safe_open(str(src), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    config = json.loads(meta["config"])
    change(config)
    save_file(tensors, str(dst), metadata={**meta, "config": json.dumps(config)})
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda c: c["schedule"].update(zero_terminal_snr="yes"), "zero_terminal_snr must be true or false"),
    (lambda c: c["schedule"]["options"].update(shift=-1), "shift must be in"),
    (lambda c: c["schedule"]["options"].update(shift="far"), "shift must be a number"),
    (lambda c: c.update(prediction="flux"), "unknown prediction type 'flux'"),
])
def test_a_hostile_flow_model_file_is_refused_in_one_line(flow_run, tmp_path, change, message):
    bad = rewrite_config(flow_run / "run" / "model.safetensors", tmp_path / "bad.safetensors", change)
    with pytest.raises(ModelFileError, match=message):
        DiffusionModel.load(bad)
    assert_one_line_error(run_cli("info", str(bad)), message)


def test_fine_tuning_a_flow_model_with_min_snr_weights_is_refused(flow_run, tmp_path):
    result = run_cli("train", *TINY_TRAIN, "--config", str(flow_run / "tiny.toml"), "--init-from",
                     str(flow_run / "run" / "model.safetensors"), "--min-snr-gamma", "5", "--max-steps", "1",
                     "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "--min-snr-gamma", "predicts a flow velocity")

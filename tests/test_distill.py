"""Distillation (`minidiff distill`): low-rank adapters, the lcm sampler on a case with a known answer,
a tiny teacher distilled through the CLI (resumable bit for bit), and hostile student files."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import assert_error, run_cli, run_in_process
from safetensors.torch import load_file, save_file
from tinymodels import TINY_TOML, TINY_TRAIN

from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.diffusion.sampling import gaussian_denoiser, timesteps
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.errors import MinidiffError, ModelFileError
from minidiff_cli.files.png_parameters import read_parameters
from minidiff_cli.nets import lora
from minidiff_cli.nets.unet import UNet, UNetConfig
from minidiff_cli.plugins import get_sampler
from minidiff_cli.training.distill import _ddim_jump, segment_ends

MU, S, N = 0.5, 0.5, 20_000
DISTILL = ["--max-steps", "4", "--lr-decay-steps", "4", "--batch-size", "4", "--save-every", "2", "--sample-every", "1000", "--log-every", "1",
           "--rank", "4", "--quiet", "--device", "cpu", "--threads", "1"]


# -- low-rank adapters -------------------------------------------------------------------
def small_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig.from_dict({"image_size": 8, "in_channels": 3, "out_channels": 3, "base_channels": 8,
                                      "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
                                      "cross_attention_resolutions": [], "pooled_dim": 8, "head_dim": 8})).eval()


def forward(net: UNet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, pooled = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([3, 40]), pooled=pooled)


def test_a_fresh_adapter_changes_nothing_and_merging_equals_running_it():
    base = small_unet()
    with torch.no_grad():  # the U-Net's zero-initialised output layers would hide every change
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    before = forward(base)
    adapted = small_unet()
    adapted.load_state_dict(base.state_dict())
    adapters = lora.add_adapters(adapted, rank=3, alpha=6.0)
    assert torch.equal(forward(adapted), before)  # up starts at zero
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora.trainable(adapters):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    live = forward(adapted)
    with lora.disabled(adapters):
        assert torch.equal(forward(adapted), before)  # the teacher inside its student
    assert not torch.allclose(live, before, atol=1e-4)
    merged = small_unet()
    merged.load_state_dict(base.state_dict())
    lora.merge(merged, lora.adapter_tensors(adapters), rank=3, alpha=6.0)
    assert torch.allclose(forward(merged), live, atol=1e-5)


def test_every_linear_and_convolution_is_adapted_and_only_the_adapters_train():
    net = small_unet()
    layers = lora.adaptable(net)
    adapters = lora.add_adapters(net, rank=2, alpha=2.0)
    assert set(adapters) == set(layers) and any(isinstance(m, torch.nn.Conv2d) for m in layers.values())
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora.trainable(adapters)}


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"nowhere.down": t[next(iter(t))]}), "names no adaptable layer"),
    (lambda t: t.pop(next(k for k in t if k.endswith(".up"))), "lacks its down or up tensor"),
    (lambda t: t.update({k: torch.zeros(1, 1) for k in list(t)[:1]}), "has shapes"),
])
@pytest.mark.hostile
def test_an_adapter_that_does_not_fit_is_refused_by_name(change, message):
    tensors = lora.adapter_tensors(lora.add_adapters(small_unet(), rank=2, alpha=2.0))
    change(tensors)
    with pytest.raises(MinidiffError, match=message):
        lora.merge(small_unet(), tensors, rank=2, alpha=2.0)


@pytest.mark.parametrize("rank, alpha", [(0, 1.0), (10_000, 1.0), (2, 0.0), (2, float("nan")), (True, 1.0), (2, "x")])
@pytest.mark.hostile
def test_absurd_ranks_and_scales_are_refused(rank, alpha):
    with pytest.raises(MinidiffError, match="adapter"):
        lora.check_rank(rank, alpha)


# -- the lcm sampler ------------------------------------------------------------------
def lcm_output_law(schedule, ts):
    """Mean and std of the lcm sampler's output from N(0, 1) with the exact Gaussian denoiser, in closed
    form: each step is linear in x (x0_hat = g x + b), then renoised: x' = sqrt(a') x0_hat + sqrt(1 - a') z."""
    mean, var = 0.0, 1.0
    abar = schedule.alphas_cumprod.tolist()
    for i, t in enumerate(ts):
        a, a_next = abar[t], abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        k = math.sqrt(1 - a) / (a * S * S + 1 - a)  # eps_hat = k (x - sqrt(a) mu)
        gain, bias = (1 - math.sqrt(1 - a) * k) / math.sqrt(a), math.sqrt(1 - a) * k * MU
        mean, var = math.sqrt(a_next) * (gain * mean + bias), a_next * gain * gain * var + (1 - a_next)
    return mean, math.sqrt(var)


@pytest.mark.parametrize("steps", [1, 2, 4, 50])
def test_lcm_samples_follow_their_closed_form_law(steps):
    schedule = get_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, generator=g, dtype=torch.float64)  # float32 rounding, magnified 300x at t = T, would swamp step 1
    out = get_sampler("lcm").sample(gaussian_denoiser(schedule, MU, S), x, schedule, steps, generator=g)
    mean, std = lcm_output_law(schedule, timesteps(1000, steps).tolist())
    assert abs(out.mean().item() - mean) < 4 * max(std, 1e-3) / math.sqrt(N) + 1e-4
    assert abs(out.std().item() - std) < 4 * max(std, 1e-3) / math.sqrt(2 * N) + 1e-4
    if steps == 1:  # one step from pure noise: the posterior mean, i.e. (nearly) the data mean
        assert mean == pytest.approx(MU, abs=1e-3) and std < 0.01


def test_lcm_runs_in_parts_exactly_as_in_one():
    schedule = get_schedule("cosine", 1000)
    sampler, denoiser = get_sampler("lcm"), gaussian_denoiser(schedule, MU, S)
    whole = sampler.sample(denoiser, torch.randn(64, generator=torch.Generator().manual_seed(5)), schedule, 4,
                           generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    x = sampler.sample(denoiser, torch.randn(64, generator=torch.Generator().manual_seed(5)), schedule, 4,
                       generator=g, stop=2)
    parts = sampler.sample(denoiser, x, schedule, 4, generator=g, start=2)
    assert torch.equal(whole, parts)
    assert len(sampler.noise_levels(schedule, 4)) == 5


# -- a tiny teacher, distilled through the CLI ---------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny class-conditional run (the teacher) in runs/teacher of a fresh folder."""
    root = tmp_path_factory.mktemp("distill")
    (root / "tiny.toml").write_text(TINY_TOML)
    result = run_cli("train", "--data", "shapes", "--conditioner", "class", *TINY_TRAIN, "--config",
                     str(root / "tiny.toml"), "--max-steps", "4", "--sample-every", "1000",
                     "--out", str(root / "runs" / "teacher"))
    assert result.returncode == 0, result.stderr
    return root / "runs" / "teacher"


@pytest.fixture(scope="module")
def student(teacher) -> Path:
    out = teacher.parent / "student"
    result = run_cli("distill", "--model", str(teacher), "--out", str(out), "--steps", "2", *DISTILL)
    assert result.returncode == 0, result.stderr
    return out


def test_the_student_is_a_small_file_that_names_its_teacher_and_its_sampling(teacher, student):
    meta = header(student / "model.safetensors")
    config = json.loads(meta["__metadata__"]["config"])
    assert config["student"]["teacher"] == {"name": "teacher", "hash": DiffusionModel.load(teacher / "model.safetensors").hash}
    assert config["sampling"] == {"sampler": "lcm", "steps": 2, "cfg": 1.0}
    assert all(k.startswith("adapter.") for k in meta if k != "__metadata__")
    size, teacher_size = (student / "model.safetensors").stat().st_size, (teacher / "model.safetensors").stat().st_size
    assert size < teacher_size  # rank 4 on a tiny U-Net; the shipped students are a few per cent of theirs


def test_generate_defaults_to_the_students_sampler_steps_and_cfg(student, tmp_path):
    rc, out, err = run_in_process("generate", "a red circle", "--model", str(student), "-o", str(tmp_path / "a.png"),
                                  "--quiet", "--device", "cpu")
    assert rc == 0, err
    params = read_parameters(tmp_path / "a.png")
    assert (params["sampler"], params["steps"], params["cfg"]) == ("lcm", 2, 1.0)
    rc, _, err = run_in_process("generate", "a red circle", "--model", str(student), "-o", str(tmp_path / "b.png"),
                                "--steps", "1", "--sampler", "ddim", "--quiet", "--device", "cpu")
    assert rc == 0, err
    params = read_parameters(tmp_path / "b.png")
    assert (params["sampler"], params["steps"]) == ("ddim", 1)


def test_the_student_draws_what_its_merged_weights_draw(teacher, student):
    """Loading merges the adapter into the teacher: the result equals the teacher plus up @ down."""
    model = DiffusionModel.load(student / "model.safetensors")
    base = DiffusionModel.load(teacher / "model.safetensors")
    tensors = load_file(str(student / "model.safetensors"))
    name = next(k for k in tensors if k.endswith(".down"))[len("adapter."):-len(".down")]
    delta = lora.weight_delta(tensors[f"adapter.{name}.down"].float(), tensors[f"adapter.{name}.up"].float())
    expected = base.unet.get_submodule(name).weight + delta  # alpha = rank: scale 1
    assert torch.allclose(model.unet.get_submodule(name).weight, expected, atol=1e-6)
    assert model.hash != base.hash and model.config["sampling"]["steps"] == 2


@pytest.mark.parametrize("method", [[], ["--method", "mcm", "--steps", "2", "--target-ema", "0.9"]],
                         ids=["lcm", "mcm-target-ema"])
def test_a_resumed_distillation_equals_an_uninterrupted_one(teacher, tmp_path, method):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert run_cli("distill", "--model", str(teacher), "--out", str(straight), *method, *DISTILL).returncode == 0
    first = run_cli("distill", "--model", str(teacher), "--out", str(halves), *method, *DISTILL[:1], "2", *DISTILL[2:])
    assert first.returncode == 0, first.stderr
    again = run_cli("distill", "--out", str(halves), "--resume", "--max-steps", "4")
    assert again.returncode == 0, again.stderr
    for name in ("model.safetensors", "checkpoint.safetensors"):  # the checkpoint: the target's average too
        a, b = load_file(str(straight / name)), load_file(str(halves / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.startswith("target.") for k in a) == bool(method)


def test_the_target_average_moves_by_one_minus_mu_and_is_what_the_targets_see(teacher, tmp_path):
    from minidiff_cli.training.distill import DistillConfig, Distiller

    cfg = DistillConfig(teacher=str(teacher), method="mcm", steps=2, target_ema=0.9, out=str(tmp_path / "run"),
                        batch_size=4, rank=4, warmup=0, device="cpu", threads=1, quiet=True)
    d = Distiller(cfg, log=lambda line: None)
    before = [p.detach().clone() for p in d.live]
    d.train_step()
    assert any(not torch.equal(a, p) for a, p in zip(before, d.live))  # the live weights moved (the "up" ones first)
    for average, old, live in zip(d.target.values(), before, d.live):
        assert torch.allclose(average, 0.9 * old + 0.1 * live, atol=1e-7)
    live = [p.detach().clone() for p in d.live]
    with d._target_weights():
        assert all(torch.equal(p, average) for p, average in zip(d.live, d.target.values()))
    assert all(torch.equal(p, q) for p, q in zip(d.live, live))  # and back


def test_mcm_segments_end_at_the_next_point_of_the_students_grid():
    grid = timesteps(1000, 2).flip(0)  # 499, 999
    t = torch.tensor([19, 499, 519, 979, 999])
    assert segment_ends(grid, t).tolist() == [-1, -1, 499, 499, 499]
    four = timesteps(1000, 4).flip(0)  # 249, 499, 749, 999
    assert segment_ends(four, torch.tensor([249, 250, 749, 999])).tolist() == [-1, 249, 499, 749]


def test_a_ddim_jump_to_its_own_level_is_the_identity_and_to_level_one_is_x0():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    abar = torch.tensor([0.9, 0.5, 0.01]).reshape(3, 1, 1, 1)
    assert torch.allclose(_ddim_jump(x, eps, abar, abar), x, atol=1e-5)
    x0 = _ddim_jump(x, eps, abar, torch.ones_like(abar))
    assert torch.allclose(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, x, atol=1e-5)  # Ho et al. eq. 4 holds


def test_an_mcm_student_is_drawn_by_ddim_at_its_steps(teacher, tmp_path):
    out = teacher.parent / "mcm"  # beside the teacher's run folder, where a student finds it
    result = run_cli("distill", "--model", str(teacher), "--out", str(out), "--method", "mcm", "--steps", "2", *DISTILL)
    assert result.returncode == 0, result.stderr
    config = json.loads(header(out / "model.safetensors")["__metadata__"]["config"])
    assert config["sampling"] == {"sampler": "ddim", "steps": 2, "cfg": 1.0}
    assert config["student"]["method"] == "mcm" and config["student"]["guidance"] == 3.0
    rc, _, err = run_in_process("generate", "a red circle", "--model", str(out), "-o", str(tmp_path / "a.png"),
                                "--quiet", "--device", "cpu")
    assert rc == 0, err
    params = read_parameters(tmp_path / "a.png")
    assert (params["sampler"], params["steps"], params["cfg"]) == ("ddim", 2, 1.0)
    # Three steps on T = 100 end segments at 66 and 32, which the 50-point solver grid (every 2nd t) misses.
    assert_error(run_in_process("distill", "--model", str(teacher), "--out", str(tmp_path / "off"), "--method", "mcm",
                                "--steps", "3", *DISTILL), "choose --solver-steps 100")
    assert not (tmp_path / "off").exists()
    # Four steps end segments at 75, 50 and 25: grids of 20 and 100 points land there, 50 (every 2nd t) does not.
    assert_error(run_in_process("distill", "--model", str(teacher), "--out", str(tmp_path / "off"), "--method", "mcm",
                                "--steps", "4", *DISTILL), "choose --solver-steps 20 or 100")


def test_distill_refuses_what_it_cannot_do_in_one_line(teacher, student, tmp_path):
    assert_error(run_in_process("distill", "--model", str(student), "--out", str(tmp_path / "x"), *DISTILL),
                 "is itself a distilled student")
    assert_error(run_in_process("distill", "--model", str(teacher), "--out", str(tmp_path / "y"), "--steps", "0",
                                *DISTILL), "--steps")
    assert_error(run_in_process("distill", "--out", str(tmp_path / "z"), "--resume"), "nothing to resume")
    assert_error(run_in_process("distill", "--out", str(student), "--resume", "--rank", "8"),
                 "--rank cannot change when resuming")


# -- hostile student files ------------------------------------------------------------------
def header(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])


def rewritten(student: Path, folder: Path, change_config=None, change_tensors=None) -> Path:
    """A copy of the student's file with its config or tensors changed, in a folder beside the teacher's run."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(student / "model.safetensors"))
    meta = header(student / "model.safetensors")["__metadata__"]
    config = json.loads(meta["config"])
    if change_config:
        change_config(config)
    if change_tensors:
        change_tensors(tensors)
    path = folder / "model.safetensors"
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(config)})
    return path


@pytest.mark.parametrize("change, message", [
    (lambda c: c["student"]["teacher"].update(name="../../etc/passwd"), "not a path"),
    (lambda c: c["student"]["teacher"].update(name="/tmp/teacher"), "not a path"),
    (lambda c: c["student"]["teacher"].update(hash="0123456789"), "which is not here"),
    (lambda c: c["student"]["teacher"].update(hash="x" * 10), "10 hexadecimal digits"),
    (lambda c: c["student"].update(rank=5), "does not match"),
    (lambda c: c["student"].update(rank=10**6), "adapter rank"),
    (lambda c: c["student"].update(method="magic"), "unknown distillation method"),
    (lambda c: c["sampling"].update(steps="many"), "sampling.steps"),
    (lambda c: c["sampling"].update(steps=10**9), "sampling.steps"),
    (lambda c: c["unet"].update(base_channels=16), "does not match"),
])
@pytest.mark.hostile
def test_a_hostile_student_file_is_a_one_line_error(student, change, message):
    path = rewritten(student, student.parent / f"hostile-{abs(hash(message)) % 10**6}", change_config=change)
    with pytest.raises(ModelFileError, match=message):
        DiffusionModel.load(path)
    assert_error(run_in_process("generate", "a red circle", "--model", str(path), "-o", str(path.parent / "x.png")),
                 message.split(" ")[0])


@pytest.mark.hostile
def test_a_student_with_nan_weights_or_another_teachers_config_is_refused(student):
    nan = rewritten(student, student.parent / "nan",
                    change_tensors=lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in list(t.items())[:1]}))
    with pytest.raises(ModelFileError):
        DiffusionModel.load(nan)
    other = rewritten(student, student.parent / "other", change_config=lambda c: c.update(prediction="v"))
    with pytest.raises(ModelFileError, match="not distilled from this teacher"):
        DiffusionModel.load(other)


def test_a_student_finds_its_teacher_beside_it_and_only_by_hash(teacher, student, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(student / "model.safetensors", alone / "fast.safetensors")
    with pytest.raises(ModelFileError, match="which is not here"):
        DiffusionModel.load(alone / "fast.safetensors")
    shutil.copy(teacher / "model.safetensors", alone / "whatever-name.safetensors")
    assert DiffusionModel.load(alone / "fast.safetensors").config["sampling"]["sampler"] == "lcm"

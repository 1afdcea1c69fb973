"""Training: the loss falls, runs resume exactly (after a stop, a kill or a signal), inputs are checked."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_error, assert_one_line_error, cli_command, run_cli, timed_cli
from PIL import Image
from safetensors.torch import load_file
from tinymodels import TINY_TOML, TINY_TRAIN, tiny_clip_file, tiny_model, without

from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.model_file import read_config
from minidiff_cli.inference.pipeline import Pipeline
from minidiff_cli.runtime.distributed import Dist, weights_fingerprint
from minidiff_cli.training.checkpoint import read_checkpoint_meta
from minidiff_cli.training.config import TrainConfig, check_resume_flags, merge
from minidiff_cli.training.optim import lr_at
from minidiff_cli.training.trainer import CHECKPOINT, METRICS, MODEL, RUN_CONFIG, Trainer

# The in-process twin of TINY_TRAIN + TINY_TOML (a test below checks that they agree).
TINY = dict(data="shapes", conditioner="class", image_size=16, base_channels=8, channel_mult=[1, 2],
            attention_resolutions=[8], cross_attention_resolutions=[8], head_dim=8, class_dim=16, timesteps=100,
            batch_size=4, warmup=2, lr=1e-3, quiet=True, device="cpu", sample_every=1000, log_every=1)


def tiny_cfg(out: Path, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **changes}).validate()


def train(cfg: TrainConfig, resume: bool = False) -> Trainer:
    trainer = Trainer(cfg, resume=resume, log=lambda message: None)
    trainer.run()
    return trainer


def train_cli(toml: Path, out: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli("train", *TINY_TRAIN, "--config", str(toml), "--sample-every", "1000", "--out", str(out),
                   *args, **kwargs)


def same_tensors(a: Path, b: Path, atol: float = 0.0) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return all(torch.allclose(ta[k], tb[k], atol=atol, rtol=0) if atol else torch.equal(ta[k], tb[k]) for k in ta)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / METRICS).read_text().splitlines()]


# -- learning ----------------------------------------------------------------------------------
def test_loss_falls_on_a_tiny_run(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path / "run", batch_size=8, lr=3e-3, warmup=5, max_steps=40), log=lambda m: None)

    def held_out_loss() -> float:  # batches, timesteps and noise of steps never trained on: fixed by the seed
        with torch.no_grad():
            return sum(trainer.loss(step).item() for step in range(10_000, 10_004)) / 4

    before = held_out_loss()
    assert 0.9 < before < 1.1  # the U-Net starts by predicting zero noise: E[eps^2] = 1
    trainer.run()
    assert held_out_loss() < 0.7 * before
    assert trainer.step == 40 and len(trainer.losses) == 40


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(lr=1e-3, warmup=10, max_steps=110)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))))
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    longer = TrainConfig(lr=1e-3, warmup=10, max_steps=1000, lr_decay_steps=110)
    assert [lr_at(s, longer) for s in (9, 60, 110, 999)] == [lr_at(s, cfg) for s in (9, 60, 110, 999)]


# -- resuming ------------------------------------------------------------------------------------
def test_stopped_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    whole = train(tiny_cfg(tmp_path / "whole", max_steps=8, save_every=4, lr_decay_steps=8))
    first = train(tiny_cfg(tmp_path / "parts", max_steps=4, save_every=4, lr_decay_steps=8))
    assert first.step == 4
    # What `minidiff train --out parts --resume --max-steps 8` does:
    stored = TrainConfig.from_dict(read_checkpoint_meta(tmp_path / "parts" / CHECKPOINT)["train"])
    second = Trainer(check_resume_flags(stored, {"max_steps": 8}), resume=True, log=lambda m: None)
    assert second.step == 4
    second.run()
    assert same_tensors(tmp_path / "whole" / MODEL, tmp_path / "parts" / MODEL, atol=1e-6)
    assert same_tensors(tmp_path / "whole" / CHECKPOINT, tmp_path / "parts" / CHECKPOINT, atol=1e-6)
    assert [loss for _, loss in second.losses] == pytest.approx([loss for _, loss in whole.losses], abs=1e-6)
    assert metric_steps(tmp_path / "parts") == list(range(1, 9))


def test_learning_rate_schedule_is_fixed_when_a_run_starts(tmp_path):
    first = train(tiny_cfg(tmp_path / "run", max_steps=4, save_every=4, warmup=0))
    assert first.cfg.lr_decay_steps == 4
    assert json.loads((tmp_path / "run" / RUN_CONFIG).read_text())["lr_decay_steps"] == 4
    stored = TrainConfig.from_dict(read_checkpoint_meta(tmp_path / "run" / CHECKPOINT)["train"])
    longer = Trainer(check_resume_flags(stored, {"max_steps": 6}), resume=True, log=lambda m: None)
    longer.run()
    # The extra steps go on at the final rate instead of jumping back up the cosine.
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 1e-3)


def test_killed_run_resumes_from_its_last_checkpoint_and_finishes_like_an_uninterrupted_one(tmp_path, toml):
    out = tmp_path / "killed"
    command = [*cli_command(), "train", *TINY_TRAIN, "--config", str(toml), "--sample-every", "1000",
               "--max-steps", "20", "--save-every", "5", "--log-every", "1", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no handler runs, no goodbye
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    saved = read_checkpoint_meta(out / CHECKPOINT)["step"]
    assert saved % 5 == 0 and 5 <= saved < 20

    resumed = run_cli("train", "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {saved} to 20" in resumed.stderr
    assert read_config(out / MODEL)["training"]["step"] == 20
    assert metric_steps(out) == list(range(1, 21))  # steps logged after the checkpoint were redone, not doubled

    train(tiny_cfg(tmp_path / "whole", max_steps=20, save_every=5))
    assert same_tensors(tmp_path / "whole" / MODEL, out / MODEL, atol=1e-6)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_at_the_current_step_and_exits(tmp_path, toml, sig):
    out = tmp_path / "run"
    command = [*cli_command(), "train", *TINY_TRAIN, "--config", str(toml), "--max-steps", "100000",
               "--save-every", "100000", "--sample-every", "100000", "--log-every", "1", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / METRICS).exists() or len((out / METRICS).read_text().splitlines()) < 3:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not (out / CHECKPOINT).exists()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = read_checkpoint_meta(out / CHECKPOINT)["step"]
    assert step >= 3 and step == metric_steps(out)[-1]
    assert f"interrupted at step {step}; saved" in err and "Traceback" not in err
    assert read_config(out / MODEL)["training"]["step"] == step
    if sig == signal.SIGINT:
        return
    resumed = run_cli("train", "--out", str(out), "--resume", "--max-steps", str(step + 2), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == step + 2


def test_existing_run_folder_without_resume_is_an_error_and_nothing_is_overwritten(trained_run, tmp_path, toml):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = snapshot(out)
    result = train_cli(toml, out, "--max-steps", "6")
    assert_one_line_error(result, f"'{out}' already holds a training run; pass --resume")
    assert snapshot(out) == before


@pytest.mark.parametrize("args, message", [
    (["--max-steps", "8", "--lr", "0.5"], "--lr cannot change when resuming (the run used 0.001)"),
    (["--max-steps", "8", "--base-channels", "16"], "--base-channels cannot change when resuming (the run used 8)"),
    (["--max-steps", "8", "--data", "/elsewhere"], "--data cannot change when resuming (the run used 'shapes')"),
    (["--max-steps", "6"], "already reached step 6; raise --max-steps above it"),
    (["--max-steps", "8", "--config", "{toml_lr}"], "--lr cannot change when resuming"),
])
def test_resume_refuses_a_changed_recipe(trained_run, tmp_path, args, message):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = snapshot(out)
    (tmp_path / "lr.toml").write_text("lr = 0.5\n")
    args = [a.replace("{toml_lr}", str(tmp_path / "lr.toml")) for a in args]
    result = run_cli("train", "--out", str(out), "--resume", "--quiet", *args)
    assert_one_line_error(result, message)
    assert snapshot(out) == before


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    (tmp_path / "run").mkdir()
    assert_one_line_error(run_cli("train", "--out", str(tmp_path / "run"), "--resume"),
                          "nothing to resume", CHECKPOINT)


def test_the_tiny_recipes_of_the_cli_and_of_these_tests_agree(trained_run):
    stored = json.loads((trained_run / RUN_CONFIG).read_text())
    assert {k: stored[k] for k in TINY} == {**TINY, "sample_every": 1000}


# -- the recipe from a TOML file -------------------------------------------------------------------
def test_toml_values_are_used_and_flags_override_them(tmp_path):
    config = tmp_path / "recipe.toml"
    config.write_text("[train]\n" + TINY_TOML + "max-steps = 100\nlr = 0.005\nwarmup = 1\n"
                      'sample_prompts = ["red circle"]\n')
    out = tmp_path / "run"
    flags = without(TINY_TRAIN, "--lr", "--warmup")
    result = run_cli("train", *flags, "--config", str(config), "--max-steps", "2", "--sample-every", "1000",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    stored = json.loads((out / RUN_CONFIG).read_text())
    assert stored["max_steps"] == 2  # the flag wins
    assert (stored["lr"], stored["warmup"], stored["head_dim"], stored["class_dim"]) == (0.005, 1, 8, 16)
    assert stored["sample_prompts"] == ["red circle"]
    assert read_config(out / MODEL)["unet"]["head_dim"] == 8


def test_merge_follows_flags_then_file_then_defaults(tmp_path):
    config = tmp_path / "recipe.toml"
    config.write_text("max_steps = 100\nbatch-size = 16\n")
    cfg = merge({"max_steps": 5, "lr": None}, config)
    assert (cfg.max_steps, cfg.batch_size, cfg.lr) == (5, 16, TrainConfig().lr)


def test_unknown_or_invalid_toml_keys_are_errors(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text("max_step = 100\nlearning_rate = 1\n")
    result = run_cli("train", "--config", str(typo), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, f"unknown key(s) in config file '{typo}': learning_rate, max_step")
    broken = tmp_path / "broken.toml"
    broken.write_text("max_steps = \n")
    assert_one_line_error(run_cli("train", "--config", str(broken), "--out", str(tmp_path / "run")),
                          f"config file '{broken}' is not valid TOML")
    assert_one_line_error(run_cli("train", "--config", str(tmp_path / "none.toml")), "does not exist")
    assert not (tmp_path / "run").exists()


# -- your own images ------------------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def image_folder(root: Path, classes: bool) -> Path:
    lines = []
    for colour, rgb in COLOURS.items():
        for k in range(2):
            name = f"{colour}/{k}.png" if classes else f"{colour}-{k}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 24), rgb).save(root / name)
            lines.append(json.dumps({"file_name": name, "text": f"a {colour} picture"}))
    if not classes:
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_folder_with_captions_trains_with_the_clip_conditioner(tmp_path, toml):
    data = image_folder(tmp_path / "captioned", classes=False)
    clip = tiny_clip_file(tmp_path / "clip.safetensors")
    out = tmp_path / "run"
    result = train_cli(toml, out, "--data", str(data), "--conditioner", "clip", "--clip-weights", str(clip),
                       "--max-steps", "2")
    assert result.returncode == 0, result.stderr
    config = read_config(out / MODEL)
    assert config["conditioner"]["name"] == "clip" and config["unet"]["context_dim"] == 16
    images = Pipeline.load(out / MODEL, device="cpu").generate("a red picture", steps=2, num_images=2)
    assert [image.size for image in images] == [(16, 16), (16, 16)]


def test_image_folder_with_subfolders_trains_with_the_class_conditioner(tmp_path, toml):
    data = image_folder(tmp_path / "classes", classes=True)
    out = tmp_path / "run"
    result = train_cli(toml, out, "--data", str(data), "--conditioner", "class", "--max-steps", "2")
    assert result.returncode == 0, result.stderr
    assert read_config(out / MODEL)["class_names"] == ["blue", "red"]
    pipe = Pipeline.load(out / MODEL, device="cpu")
    assert pipe.generate("red", steps=2)[0].size == (16, 16)
    with pytest.raises(MinidiffError, match="'green' is not a class of this model; its classes are: blue, red"):
        pipe.generate("green", steps=2)


def test_init_from_starts_with_the_weights_of_a_model_file(trained_run, tmp_path, toml):
    source = trained_run / MODEL
    out = tmp_path / "finetuned"
    result = train_cli(toml, out, "--init-from", str(source), "--lr", "1e-12", "--warmup", "0", "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    before, after = load_file(str(source)), load_file(str(out / MODEL))
    assert before.keys() == after.keys()
    for key in before:  # one step at a learning rate of 1e-12 moves nothing visibly
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
    config = read_config(out / MODEL)
    assert config["init_from"]["file"] == str(source) and config["training"]["step"] == 1


def test_init_from_a_model_with_other_classes_is_an_error(trained_run, tmp_path, toml):
    data = image_folder(tmp_path / "classes", classes=True)
    out = tmp_path / "run"
    result = train_cli(toml, out, "--data", str(data), "--init-from", str(trained_run / MODEL), "--max-steps", "1")
    assert_one_line_error(result, "the --init-from model was trained on other classes")
    assert not out.exists()


def test_init_from_keeps_the_prediction_type_of_the_model(tmp_path):
    """The loss target follows the model being trained, not the --prediction default."""
    path = tiny_model("none", prediction="v").save(tmp_path / "v.safetensors")
    cfg = tiny_cfg(tmp_path / "run", image_size=8, conditioner="none", init_from=str(path), max_steps=1)
    trainer = Trainer(cfg, log=lambda m: None)
    assert trainer.model.prediction == "v" and cfg.prediction == "eps"
    x0, _, _ = trainer.load_batch(0)
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + 0) * 1_009 + 0)
    t = torch.randint(0, 50, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    schedule = trainer.model.schedule
    with torch.no_grad():
        out = trainer.net(schedule.add_noise(x0, noise, t), t)
        expected = torch.nn.functional.mse_loss(out, schedule.v_target(x0, noise, t))
        assert trainer.loss(0).item() == pytest.approx(expected.item(), rel=1e-5)


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/missing"], "--data '{tmp}/missing' is neither a folder nor a dataset name (imagefolder, shapes"),
    (["--data", "{tmp}/empty"], "no images (.png, .jpg, .jpeg, .webp) found in '{tmp}/empty'"),
    (["--image-size", "0"], "--image-size must be a positive whole number (got 0)"),
    (["--max-steps", "0"], "--max-steps must be a positive whole number (got 0)"),
    (["--batch-size", "-4"], "--batch-size must be a positive whole number (got -4)"),
    (["--base-channels", "0"], "--base-channels must be a positive whole number (got 0)"),
    (["--save-every", "0"], "--save-every must be a positive whole number (got 0)"),
    (["--lr", "0"], "--lr must be positive (got 0.0)"),
    (["--lr-decay-steps", "-1"], "--lr-decay-steps must be 0 or more (got -1)"),
    (["--channel-mult", "1,x"], "--channel-mult takes whole numbers separated by commas (got '1,x')"),
    (["--timesteps", "1000000000"], "1000000000 timesteps is more than the 100000 minidiff allows"),
    (["--conditioner", "clip", "--data", "{tmp}/classes"], "has no captions, and this command learns or judges captions"),
    (["--conditioner", "class", "--data", "{tmp}/flat"], "class conditioning needs the images of '{tmp}/flat' in one"),
])
def test_bad_training_input_is_a_one_line_error_and_nothing_is_written(tmp_path, toml, args, message):
    (tmp_path / "empty").mkdir()
    image_folder(tmp_path / "flat", classes=False)
    image_folder(tmp_path / "classes", classes=True)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "run"
    result = train_cli(toml, out, "--max-steps", "2", *args)
    assert_one_line_error(result, message.replace("{tmp}", str(tmp_path)))
    assert not out.exists()


def test_out_under_a_file_is_an_error(tmp_path, toml):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(train_cli(toml, tmp_path / "file" / "run", "--max-steps", "2"),
                          f"'{tmp_path / 'file'}' is a file, not a folder; choose another --out")


# -- several processes -------------------------------------------------------------------------------
def test_ranks_share_each_global_batch_without_overlap(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path / "run", batch_size=6, max_steps=1), log=lambda m: None)
    for step in (0, 1, 16_666):
        whole = trainer.batch_indices(step)
        parts = []
        for rank in range(3):
            trainer.dist = Dist(rank=rank, world=3)
            parts.append(trainer.batch_indices(step))
        trainer.dist = Dist()
        assert all(len(p) == 2 for p in parts) and sorted(sum(parts, [])) == sorted(whole)
    assert trainer.batch_indices(0) != trainer.batch_indices(1)
    assert len(set(trainer.batch_indices(0))) == 6


def test_weights_fingerprint_sees_a_change_of_one_bit():
    a, b = tiny_model("class", seed=1), tiny_model("class", seed=1)
    assert weights_fingerprint(a.unet, a.conditioner) == weights_fingerprint(b.unet, b.conditioner)
    with torch.no_grad():
        w = b.unet.conv_in.weight.view(-1)
        w[3] = torch.nextafter(w[3], torch.tensor(math.inf))
    assert weights_fingerprint(a.unet, a.conditioner) != weights_fingerprint(b.unet, b.conditioner)


def test_batch_smaller_than_the_number_of_processes_is_an_error(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "run", batch_size=1, max_steps=1)
    monkeypatch.setattr("minidiff_cli.runtime.distributed.init_distributed", lambda device: Dist(rank=0, world=2))
    with pytest.raises(MinidiffError, match="--batch-size 1 is smaller than the 2 processes"):
        Trainer(cfg, log=lambda m: None)


@pytest.mark.slow
def test_two_process_gloo_run_ends_with_identical_weights_on_both_ranks(tmp_path, toml):
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    command = [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "minidiff_cli", "train", *TINY_TRAIN,
               "--config", str(toml), "--max-steps", "4", "--save-every", "2", "--sample-every", "1000",
               "--log-every", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on cpu x2, global batch 4 (2 per process)" in result.stderr
    assert "checked: all 2 processes hold identical weights" in result.stderr
    assert result.stderr.count("checked: all") == 1  # rank 0 speaks for both
    training = read_config(out / MODEL)["training"]
    assert training["world_size"] == 2 and training["step"] == 4
    assert metric_steps(out) == [1, 2, 3, 4]
    assert DiffusionModel.load(out / MODEL).unet.config.image_size == 16


def test_attention_defaults_follow_the_image_size_unless_given():
    assert merge({"image_size": 64}, None).attention_resolutions == [16]  # 64, 32, 16: the lowest
    assert merge({"image_size": 32}, None).cross_attention_resolutions == [8]  # as before at the default size
    assert merge({"image_size": 64, "channel_mult": [1, 2]}, None).attention_resolutions == [32]
    given = merge({"image_size": 64, "attention_resolutions": [32, 16]}, None)
    assert (given.attention_resolutions, given.cross_attention_resolutions) == ([32, 16], [16])
    recipe = merge({"image_size": 64}, ROOT / "recipes" / "shapes-clip.toml")  # sets them: they stay
    assert (recipe.attention_resolutions, recipe.cross_attention_resolutions) == ([8], [8])


# -- hostile config files -------------------------------------------------------------------------
@pytest.mark.hostile
def test_a_deeply_nested_toml_is_one_line(tmp_path):
    config = tmp_path / "deep.toml"
    config.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert_error(timed_cli("train", "--config", config, "--out", tmp_path / "run"), "nested too deeply", str(config))


# -- a clip run resumes bit for bit ----------------------------------------------------------------
def clip_file(path: Path, width: int) -> Path:
    """A seeded `clip train`-style text encoder of ``width`` (64: wide enough that this CPU's matrix kernels
    give a caption other last bits in a batch of one or two than in a larger one)."""
    from safetensors.torch import save_file
    from tinymodels import TINY_CLIP

    from minidiff_cli import plugins

    config = json.loads(json.dumps(TINY_CLIP))
    config["embed_dim"] = config["text_cfg"]["width"] = width
    torch.manual_seed(0)
    encoder = plugins.get_conditioner("clip").from_config(config)
    metadata = {"format": "minidiff-clip", "format_version": "1", "config": json.dumps(config)}
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(path), metadata=metadata)
    return path


def batch_sensitive(monkeypatch) -> None:
    """Make the clip conditioner's output depend on the batch it is encoded in, in the last bits, as real
    kernels do on some machines and widths (whatever this machine's kernels do)."""
    from minidiff_cli.clip.conditioner import ClipTextConditioner

    encode_tokens = ClipTextConditioner.encode_tokens

    def sensitive(self, tokens):
        context, pooled = encode_tokens(self, tokens)
        wobble = 1 + 2.0 ** -22 * (len(tokens) % 7)
        return context * wobble, pooled * wobble

    monkeypatch.setattr(ClipTextConditioner, "encode_tokens", sensitive)


@pytest.mark.hostile
@pytest.mark.parametrize("kernels", ["this-machine", "batch-sensitive"])
def test_a_clip_run_interrupted_and_resumed_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch, kernels):
    """A frozen text encoder's rows must not depend on which captions were new together (a resume changes
    that history): the caption table encodes in batches fixed by the data set (training/captions.py)."""
    if kernels == "batch-sensitive":
        batch_sensitive(monkeypatch)
    clip = clip_file(tmp_path / "clip.safetensors", width=16 if kernels == "batch-sensitive" else 64)
    data = tmp_path / "captioned"  # few captions, so that steps meet captions seen before
    data.mkdir()
    lines = []
    for k in range(12):
        Image.new("RGB", (16, 16), (20 * k, 200 - 15 * k, 90)).save(data / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "text": f"picture number {k % 7} in colour"}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cfg = dict(data=str(data), holdout="", conditioner="clip", clip_weights=str(clip), max_steps=12, save_every=100,
               lr_decay_steps=12)
    whole = train(tiny_cfg(tmp_path / "whole", **cfg))

    def stop_at_5(info):  # as a Ctrl-C at step 5: the loop saves, then stops
        if info["step"] == 5:
            raise KeyboardInterrupt

    first = Trainer(tiny_cfg(tmp_path / "parts", **cfg), log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        first.run(progress=stop_at_5)
    stored = TrainConfig.from_dict(read_checkpoint_meta(tmp_path / "parts" / CHECKPOINT)["train"])
    second = Trainer(check_resume_flags(stored, {}), resume=True, log=lambda m: None)
    assert second.step == 5
    second.run()
    assert [loss for _, loss in second.losses] == [loss for _, loss in whole.losses]
    assert same_tensors(tmp_path / "whole" / MODEL, tmp_path / "parts" / MODEL)  # every bit: net, EMA
    assert same_tensors(tmp_path / "whole" / CHECKPOINT, tmp_path / "parts" / CHECKPOINT)  # and AdamW's moments


def test_a_process_leaves_the_group_before_the_interpreter_shuts_down(tmp_path):
    """Exiting inside a gloo group leaves its teardown to interpreter finalisation, where it can abort
    a rank (exit -6; issue 26 item 10): init_distributed registers leave_group with atexit. A hook
    registered before joining runs after it (atexit is last in, first out) and sees the group gone."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import atexit, torch, torch.distributed as dist\n"
        "from minidiff_cli.runtime.distributed import init_distributed\n"
        "atexit.register(lambda: print(f'rank {dist.get_rank() if dist.is_initialized() else \"-\"} '\n"
        "                              f'initialized at exit: {dist.is_initialized()}', flush=True))\n"
        "ranks = init_distributed(torch.device('cpu'))\n"
        "dist.barrier()\n"
        "print(f'joined as {ranks.rank} of {ranks.world}', flush=True)\n")
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    result = subprocess.run([*launcher, "--standalone", "--nproc-per-node", "2", str(script)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # the two ranks share one pipe, so their lines may interleave: count, do not split
    assert sorted(re.findall(r"joined as \d of 2", result.stdout)) == ["joined as 0 of 2", "joined as 1 of 2"], \
        result.stdout
    assert result.stdout.count("initialized at exit: False") == 2, result.stdout

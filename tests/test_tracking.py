"""Watching a run: --log-with tensorboard (event files read back), wandb refused when missing, --sample-prompts
drawn at step 0 and every --sample-every, and a validation loss that is the same number on the same weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_error, run_in_process, train_args
from PIL import Image

from minidiff_cli.errors import MinidiffError
from minidiff_cli.training import tracking
from minidiff_cli.training.config import TrainConfig
from minidiff_cli.training.trainer import Trainer
from minidiff_cli.training.validation import validation_items

PROMPTS = 'a red circle\n{"prompt": "a blue square", "seed": 7, "n": 2, "steps": 5, "cfg": 2, "negative": "a red square"}\n'
TRAIN_TAGS = ("train/loss", "train/loss_smoothed", "train/lr", "train/steps_per_s", "train/grad_norm")
CLIP_TINY = ["--width", "16", "--heads", "2", "--layers", "1", "--embed-dim", "16", "--context-length", "12",
             "--vision-width", "8", "--batch-size", "8", "--device", "cpu", "--quiet"]
VAE_TINY = ["--image-size", "16", "--base-channels", "8", "--channel-mult", "1,2", "--batch-size", "2",
            "--warmup", "1", "--device", "cpu", "--quiet"]


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar_steps(ea, tag: str) -> list[int]:
    values = ea.Scalars(tag)
    assert all(math.isfinite(e.value) for e in values), (tag, values)
    return [e.step for e in values]


def logged_hparams(ea) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- train ------------------------------------------------------------------------------------
def test_tensorboard_shows_curves_sample_grids_validation_loss_and_the_recipe_and_a_resumed_run_goes_on(
        tmp_path, toml):
    pytest.importorskip("tensorboard")
    prompts, out = tmp_path / "prompts.txt", tmp_path / "run"
    prompts.write_text(PROMPTS)
    code, _, err = run_in_process(*train_args(toml, out, "--max-steps", "4", "--sample-every", "2", "--log-every",
                                              "1", "--log-with", "tensorboard", "--sample-prompts", prompts))
    assert code == 0, err
    assert f"watch this run: tensorboard --logdir {out / 'logs'}" in err.splitlines()[:3], err
    assert "validation loss on 32 training images (the data has no held-out images)" in err

    ea = events(out / "logs")
    for tag in TRAIN_TAGS:
        assert scalar_steps(ea, tag) == [1, 2, 3, 4], tag
    assert scalar_steps(ea, "val/loss") == [0, 2, 4] and scalar_steps(ea, "eval/adherence_seen") == [0, 2, 4]
    grids = ea.Images("samples")
    assert [g.step for g in grids] == [0, 2, 4]
    assert (grids[0].width, grids[0].height) == Image.open(out / "samples" / "step-0000000.png").size
    assert grids[0].width == 4 * 16 + 3 * 2 and grids[0].height == 2 * 16 + 2  # a row a line, 4 columns
    hparams = logged_hparams(ea)
    assert hparams["log_with"].string_value == "tensorboard" and hparams["max_steps"].number_value == 4
    assert json.loads(hparams["sample_prompts"].string_value)[0] == "a red circle"

    # metrics.jsonl stays the record: the same validation losses, at step 0 and every --sample-every
    lines = records(out)
    val = {r["step"]: r["val_loss"] for r in lines if "val_loss" in r}
    assert sorted(val) == [0, 2, 4]
    assert [e.value for e in ea.Scalars("val/loss")] == pytest.approx([val[0], val[2], val[4]], rel=1e-6)
    assert all(r["grad_norm"] > 0 for r in lines if r["step"] > 0)
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-0000000.png", "step-0000002.png", "step-0000004.png"]

    # --resume keeps the logger and the sample prompts of the run; its steps go on in TensorBoard
    code, _, err = run_in_process("train", "--out", out, "--resume", "--max-steps", "6", "--quiet")
    assert code == 0, err
    assert "tensorboard --logdir" in err
    ea = events(out / "logs")
    assert scalar_steps(ea, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert scalar_steps(ea, "val/loss") == [0, 2, 4, 6] and [g.step for g in ea.Images("samples")] == [0, 2, 4, 6]
    assert Image.open(out / "samples" / "step-0000006.png").size == (grids[0].width, grids[0].height)


def test_without_a_tracker_nothing_is_logged_and_no_norm_is_computed_without_clipping(tmp_path):
    trainer = Trainer(TrainConfig(**TINY, out=str(tmp_path / "run"), max_steps=2, grad_clip=0.0).validate(),
                      log=lambda m: None)
    trainer.run()
    assert trainer.tracker is tracking.NULL and trainer.grad_norm is None
    assert not (tmp_path / "run" / "logs").exists()
    assert all("grad_norm" not in r and "val_loss" not in r for r in records(tmp_path / "run") if r["step"] < 2)


def test_log_with_wandb_without_wandb_is_one_line_and_creates_nothing(tmp_path, toml, monkeypatch):
    if tracking.importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = tmp_path / "run"
    assert_error(run_in_process(*train_args(toml, out, "--max-steps", "2", "--log-with", "wandb")),
                 "--log-with wandb needs wandb", "pip install wandb")
    assert_error(run_in_process("clip", "train", "--out", tmp_path / "c.safetensors", "--steps", "2", *CLIP_TINY,
                                "--log-with", "wandb"), "--log-with wandb needs wandb")
    assert_error(run_in_process("vae", "train", "--out", tmp_path / "v.safetensors", "--max-steps", "2", *VAE_TINY,
                                "--log-with", "wandb"), "--log-with wandb needs wandb")
    assert_error(run_in_process(*train_args(toml, out, "--log-with", "mlflow")), "--log-with must be tensorboard")
    assert list(tmp_path.iterdir()) == [toml]  # no run folder, no file, no log folder


def test_log_with_tensorboard_without_tensorboard_names_the_extra(tmp_path, toml, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    line = assert_error(run_in_process(*train_args(toml, tmp_path / "run", "--log-with", "tensorboard")))
    assert 'pip install "minidiff[tensorboard]"' in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ('{"prompt": "a red circle", "steps": "many"}\n', "line 1"),
    ("".join(f"prompt {k}\n" for k in range(65)), "at most 64"),
    ('{"prompt": "a red circle", "n": 17}\n', "per prompt (16)"),
    ('{"prompt": "a red circle", "steps": 500}\n', "this model has 100 timesteps"),
    ("a red circle\na green star\n", "sample prompt 2: 'a green star' is not a class"),
])
def test_a_bad_sample_prompts_file_is_one_line_before_anything_is_made(tmp_path, toml, content, message):
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_text(content)
    assert_error(run_in_process(*train_args(toml, tmp_path / "run", "--sample-prompts", prompts)), message)
    assert not (tmp_path / "run").exists()


def test_vae_train_refuses_sample_prompts_in_one_line(tmp_path):
    assert_error(run_in_process("vae", "train", "--out", tmp_path / "v.safetensors", "--sample-prompts", "p.txt"),
                 "reconstructions of held-out images")


# -- the validation loss ----------------------------------------------------------------------
def test_validation_loss_is_the_same_on_the_same_weights_and_leaves_training_alone(tmp_path):
    trainer = Trainer(TrainConfig(**{**TINY, "sample_every": 3}, out=str(tmp_path / "run"), max_steps=3).validate(),
                      log=lambda m: None)
    rng = torch.get_rng_state()
    first = trainer.validation_loss()
    assert trainer.validation_loss() == first and math.isfinite(first) and 0.5 < first < 1.5
    assert torch.equal(torch.get_rng_state(), rng) and trainer.net.training
    trainer.run()
    assert trainer.validation_loss() != first
    assert [r["val_loss"] for r in records(tmp_path / "run") if "val_loss" in r] == [trainer.validation_loss()]


def test_validation_images_are_held_out_where_the_data_holds_some_out(tmp_path):
    from captioned import captioned_folder

    from minidiff_cli.data.sources import open_dataset

    shapes = open_dataset("shapes", image_size=16, holdout="purple triangle")
    source, indices, what = validation_items(shapes, lambda: open_dataset("shapes", image_size=16, holdout=""))
    assert what == "images of held-out pairs" and len(indices) == 32
    assert all("purple triangle" in source[i]["caption"] for i in indices)
    _, indices, what = validation_items(shapes)  # no way to their images (a class-conditional run): training ones
    assert what.startswith("training images") and len(indices) == 32

    folder = captioned_folder(tmp_path / "pictures")
    held = open_dataset(str(folder), image_size=16, holdout="30%")
    source, indices, what = validation_items(held)
    assert what == "images of held-out captions" and indices
    assert {source[i]["caption"] for i in indices} <= set(held.heldout_captions)


# -- clip train and vae train -----------------------------------------------------------------
def test_clip_train_logs_its_losses_and_validation_loss_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "c.safetensors"
    code, _, err = run_in_process("clip", "train", "--data", "shapes", "--out", out, "--steps", "4", *CLIP_TINY,
                                  "--val-every", "2", "--log-with", "tensorboard")
    assert code == 0, err
    assert f"tensorboard --logdir {tmp_path / 'c-logs'}" in err
    ea = events(tmp_path / "c-logs")
    assert scalar_steps(ea, "train/loss") == [1, 2, 3, 4] and scalar_steps(ea, "train/grad_norm") == [1, 2, 3, 4]
    assert scalar_steps(ea, "val/loss") == [2, 4]
    assert logged_hparams(ea)["val_every"].number_value == 2


def test_the_text_encoder_stage_of_train_logs_its_curves_under_clip_beside_the_diffusion_run(tmp_path):
    pytest.importorskip("tensorboard")
    from captioned import TINY_CLIP_TABLE
    from tinymodels import TINY_TOML, TINY_TRAIN

    config, out = tmp_path / "tiny.toml", tmp_path / "run"
    config.write_text("[train]\n" + TINY_TOML + TINY_CLIP_TABLE)
    code, _, err = run_in_process("train", *TINY_TRAIN, "--config", config, "--data", "shapes", "--conditioner",
                                  "clip", "--clip-steps", "3", "--max-steps", "2", "--sample-every", "1000",
                                  "--log-every", "1", "--log-with", "tensorboard", "--out", out)
    assert code == 0, err
    stage_one = events(out / "logs" / "clip")  # a run of its own: both stages count their steps from 1
    assert scalar_steps(stage_one, "clip/train/loss") == [1, 2, 3]
    assert scalar_steps(stage_one, "clip/train/grad_norm") == [1, 2, 3]
    assert scalar_steps(stage_one, "clip/val/loss") == [3]  # at the last step (val_every is 100)
    assert stage_one.Scalars("clip/train/loss")[0].value > 0  # a contrastive loss (finite: scalar_steps checks)
    diffusion = events(out / "logs")
    assert scalar_steps(diffusion, "train/loss") == [1, 2]
    assert not [tag for tag in diffusion.Tags()["scalars"] if tag.startswith("clip/")]


def test_vae_train_logs_reconstructions_and_validation_loss_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "v.safetensors"
    code, _, err = run_in_process("vae", "train", "--data", "shapes", "--out", out, "--max-steps", "2", *VAE_TINY,
                                  "--sample-every", "2", "--log-every", "1", "--log-with", "tensorboard")
    assert code == 0, err
    ea = events(tmp_path / "v-run" / "logs")
    assert scalar_steps(ea, "train/loss") == [1, 2] and scalar_steps(ea, "val/loss") == [2]
    assert scalar_steps(ea, "eval/psnr") == [2] and [g.step for g in ea.Images("reconstructions")] == [2]
    assert [r["val_loss"] for r in records(tmp_path / "v-run") if "val_loss" in r] == pytest.approx(
        [ea.Scalars("val/loss")[0].value], rel=1e-6)


def test_hparams_of_a_recipe_are_numbers_text_and_bools():
    values = tracking.hparam_values({"lr": 1e-3, "name": "x", "quiet": True, "channel_mult": [1, 2], "vae": None})
    assert values == {"lr": 1e-3, "name": "x", "quiet": True, "channel_mult": "[1, 2]", "vae": "null"}
    with pytest.raises(MinidiffError, match="tensorboard, wandb or none"):
        tracking.check_log_with("mlflow")


def test_the_live_display_draws_the_sample_grid_in_the_terminal(tmp_path, monkeypatch):
    from rich.console import Console

    from minidiff_cli.cli.train import _preview, samples_line

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    grid = tmp_path / "grid.png"
    Image.new("RGB", (20, 10), (200, 30, 30)).save(grid)
    console = Console(record=True, width=80, force_terminal=True, color_system="truecolor", file=open("/dev/null", "w"))
    _preview(console, str(grid))
    assert console.export_text().count("\u2580") == 20 * 5
    line = samples_line({"step": 0, "samples": {"grid": str(grid), "adherence_seen": 0.5}, "val_loss": 0.25})
    assert line == f"step 0: samples {grid}  val_loss 0.2500  adherence_seen 0.50"

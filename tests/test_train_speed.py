"""A training step that does not wait for the GPU (issue 25): losses read at log, sample and save steps,
a NaN still stopping the run at its own step before anything is saved, ``--compile``, and the benchmark.

The deferred loss check is what ``train`` does on CUDA; ``Trainer.defer_loss_check`` turns it on here,
on the CPU, where it must give the run the same weights, losses and files as reading every step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from captioned import captioned_folder
from conftest import ROOT, TINY, assert_error, run_in_process, train_args
from safetensors.torch import load_file

from minidiff_cli.errors import MinidiffError
from minidiff_cli.training.checkpoint import read_checkpoint_meta
from minidiff_cli.training.config import TrainConfig
from minidiff_cli.training.loop import METRICS, PendingLosses
from minidiff_cli.training.trainer import CHECKPOINT, MODEL, Trainer

# lr 10 with a 10-step warm-up: the loss grows for a few steps and becomes NaN near step 5.
DIVERGING = dict(lr=10.0, warmup=10, grad_clip=0.0, max_steps=30, save_every=2, log_every=1000)


def tiny(out: Path, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **changes}).validate()


def trainer(cfg: TrainConfig, defer: bool) -> Trainer:
    run = Trainer(cfg, log=lambda message: None)
    run.defer_loss_check = defer
    return run


def stop_message(run: Trainer) -> str:
    with pytest.raises(MinidiffError) as caught:
        run.run()
    return str(caught.value)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# -- the deferred loss check -------------------------------------------------------------------
def test_on_the_cpu_each_step_reads_its_loss_as_before_unless_told_to_defer(tmp_path):
    run = Trainer(tiny(tmp_path / "run"), log=lambda message: None)
    assert run.device.type == "cpu" and run.defer_loss_check is False
    assert isinstance(run.train_step(), float)
    run.defer_loss_check = True
    loss = run.train_step()
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad


def test_a_deferred_run_ends_with_the_weights_losses_and_records_of_a_run_that_reads_every_loss(tmp_path):
    cfg = dict(max_steps=6, log_every=4, save_every=6, lr_decay_steps=6)
    read = trainer(tiny(tmp_path / "read", **cfg), defer=False)
    read.run()
    deferred = trainer(tiny(tmp_path / "deferred", **cfg), defer=True)
    last = deferred.run()
    assert deferred.losses == read.losses and all(type(loss) is float for _, loss in deferred.losses)
    assert last["loss"] == read.losses[-1][1] and last["smoothed"] == pytest.approx(sum(
        loss for _, loss in read.losses) / 6)
    for name in (MODEL, CHECKPOINT):
        a, b = tensors(tmp_path / "read" / name), tensors(tmp_path / "deferred" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert read_checkpoint_meta(tmp_path / "deferred" / CHECKPOINT)["losses"] == [list(x) for x in read.losses]

    def records(out: Path) -> list[dict]:  # it_s is a clock reading; samples names the run's own folder
        return [{k: v for k, v in json.loads(line).items() if k not in ("it_s", "samples")}
                for line in (out / METRICS).read_text().splitlines()]

    assert records(tmp_path / "deferred") == records(tmp_path / "read")
    assert [r["step"] for r in records(tmp_path / "read")] == [4, 6]  # log steps and the last


def test_a_nan_loss_found_later_names_its_own_step_and_the_last_good_checkpoint_stays(tmp_path):
    at_once = trainer(tiny(tmp_path / "at-once", **DIVERGING), defer=False)
    message = stop_message(at_once)
    assert message.startswith("the loss became nan at step ") and message.endswith(
        "; lower --lr or use --mixed-precision no")
    bad_step = int(message.split("at step ")[1].split(";")[0])
    assert 2 < bad_step < 30 and at_once.step == bad_step  # the step that made it was not taken

    later = trainer(tiny(tmp_path / "later", **DIVERGING), defer=True)
    assert stop_message(later) == message  # the same line, naming the same step
    assert later.step > bad_step  # it trained on past the NaN before the save step read the losses...
    assert [step for step, _ in later.losses] == list(range(1, bad_step + 1))  # ...which keeps only good ones
    assert all(math.isfinite(loss) for _, loss in later.losses)

    saved = bad_step - bad_step % DIVERGING["save_every"]  # the last save step the NaN had not reached
    for out in ("at-once", "later"):
        assert read_checkpoint_meta(tmp_path / out / CHECKPOINT)["step"] == saved
    for name in (CHECKPOINT, MODEL):  # written at that step, by both runs alike
        a, b = tensors(tmp_path / "at-once" / name), tensors(tmp_path / "later" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and torch.isfinite(b[k].float()).all()
                                            for k in a), name


def test_waiting_losses_are_read_in_step_order_and_the_first_bad_one_is_named():
    losses: list = []
    pending = PendingLosses(losses, "lower --lr")
    pending.add(1, 0.5)  # a float goes straight in
    pending.add(2, torch.tensor(0.25))
    assert losses == [(1, 0.5)] and len(pending) == 1 and pending.loss_at(2) is None
    pending.settle()
    assert losses == [(1, 0.5), (2, 0.25)] and pending.loss_at(2) == 0.25
    for step, value in ((3, 1.0), (4, math.inf), (5, math.nan)):
        pending.add(step, torch.tensor(value))
    with pytest.raises(MinidiffError, match=r"^the loss became inf at step 3; lower --lr$"):
        pending.settle()
    assert losses[-1] == (3, 1.0)


# -- the latent path reads an item's text once ---------------------------------------------------
def test_a_latent_run_with_a_posterior_table_trains_on_the_captions_and_labels_of_its_items(tmp_path):
    from minidiff_cli.vae.autoencoder import Autoencoder, VAEConfig
    from minidiff_cli.vae.vae_file import save_vae

    torch.manual_seed(0)
    vae = save_vae(tmp_path / "vae.safetensors", Autoencoder(VAEConfig(base_channels=8, channel_mult=(1, 2))),
                   {"name": "tiny", "image_size": 16})
    folder = captioned_folder(tmp_path / "data")
    cfg = tiny(tmp_path / "run", data=str(folder), vae=str(vae), conditioner="none", lr_decay_steps=1000,
               attention_resolutions=[4], cross_attention_resolutions=[4])
    run = Trainer(cfg, log=lambda message: None)
    assert run._posterior_table() is not None
    for step in range(4):
        _, captions, labels = run.load_batch(step)
        items = [run.dataset[i] for i in run.batch_indices(step)]
        assert captions == [it["caption"] for it in items]
        assert labels.tolist() == [it["label"] for it in items]


# -- --compile ---------------------------------------------------------------------------------
def test_compile_without_a_compiler_is_refused_in_one_line_before_the_folder_is_made(tmp_path, toml, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++ to be found
    monkeypatch.delenv("CXX", raising=False)
    out = tmp_path / "run"
    assert_error(run_in_process(*train_args(toml, out, "--max-steps", "1", "--compile")),
                 "--compile on the CPU needs a C++ compiler")
    assert not out.exists()


@pytest.mark.slow  # a CPU compile of the tiny U-Net, forward and backward: minutes on 2 busy cores
def test_a_compiled_run_trains_and_saves_the_names_of_an_uncompiled_one(tmp_path):
    plain = Trainer(tiny(tmp_path / "plain", max_steps=2, save_every=2), log=lambda m: None)
    plain.run()
    compiled = Trainer(tiny(tmp_path / "compiled", max_steps=2, save_every=2, compile=True), log=lambda m: None)
    compiled.run()
    for name in (MODEL, CHECKPOINT):
        a, b = tensors(tmp_path / "plain" / name), tensors(tmp_path / "compiled" / name)
        assert a.keys() == b.keys() and not [k for k in b if "_orig_mod" in k], name
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a), name  # fused kernels round
    assert [loss for _, loss in compiled.losses] == pytest.approx([loss for _, loss in plain.losses], abs=1e-4)
    assert read_checkpoint_meta(tmp_path / "compiled" / CHECKPOINT)["train"]["compile"] is True


# -- the large-batch recipe --------------------------------------------------------------------
def test_the_gpu_recipe_is_the_emoji_recipe_scaled_to_its_batch_by_the_square_root_rule():
    from minidiff_cli.training.config import load_toml, merge

    small, large = load_toml(ROOT / "recipes" / "emoji.toml"), load_toml(ROOT / "recipes" / "emoji-gpu.toml")
    k = large["batch_size"] / small["batch_size"]
    assert k == 8
    assert large["lr"] == pytest.approx(small["lr"] * math.sqrt(k), rel=0.01)  # Adam's square-root rule
    assert large["max_steps"] * large["batch_size"] == small["max_steps"] * small["batch_size"]  # the same images
    assert large["lr_decay_steps"] == large["max_steps"]
    assert large["warmup"] == math.ceil(small["warmup"] / k)  # warming up over the same images
    assert large["ema_decay"] == pytest.approx(small["ema_decay"] ** k, abs=1e-4)  # averaging over the same images
    scaled = {"batch_size", "lr", "max_steps", "lr_decay_steps", "warmup", "ema_decay", "device", "out",
              "save_every", "log_every"}
    assert {key: value for key, value in large.items() if key not in scaled} == {
        key: value for key, value in small.items() if key not in scaled}  # the same model, data and objective
    assert merge({}, ROOT / "recipes" / "emoji-gpu.toml").device == "cuda"


# -- the benchmark -----------------------------------------------------------------------------
def test_the_training_speed_benchmark_measures_every_variant_against_the_baseline():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_speed.py"), "--smoke", "--json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["device"] == "cpu" and report["date"] and report["recipe"] == "recipes/emoji.toml"
    rows = report["batches"]["4"]
    assert rows["reference"] == "baseline" and rows["baseline"]["ratio_to_reference"]["median"] == 1.0
    for variant in ("baseline", "deferred", "bf16"):
        assert rows[variant]["steps_per_s"]["median"] > 0 and rows[variant]["steps_per_s"]["n"] == 2
    assert report["compiled"] == {}  # compiled variants are not asked for on the CPU

"""Training checkpoints (minidiff_cli.training.checkpoint): a damaged or hostile checkpoint is refused in one line
on resume and leaves the run as it was; restore checks everything before it loads anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_error, snapshot, timed_cli
from conftest import run_in_process as cli
from hostile_models import HOSTILE_MODELS, safetensors_with
from safetensors.torch import save_file
from tinymodels import tiny_model

from minidiff_cli.errors import ModelFileError
from minidiff_cli.files.model_file import save_model_file
from minidiff_cli.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, read_checkpoint_meta, restore
from minidiff_cli.training.config import TrainConfig
from minidiff_cli.training.trainer import CHECKPOINT, Trainer


def rewrite_checkpoint(path: Path, change) -> None:
    meta, tensors = load_checkpoint(path)
    change(meta, tensors)
    save_model_file(path, tensors, meta, overwrite=True, format=CHECKPOINT_FORMAT)


def first_key(tensors: dict, prefix: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix))


def shrink_optimizer_state(meta, tensors):
    key = first_key(tensors, "optim.0.exp_avg")
    tensors[key] = torch.zeros(3, 1, 7)


def drop_exp_avg(meta, tensors):
    del tensors[first_key(tensors, "optim.0.exp_avg_sq")]


def integer_weights(meta, tensors):
    key = first_key(tensors, "net.unet.conv_in.weight")
    tensors[key] = tensors[key].long()


def nan_ema(meta, tensors):
    key = first_key(tensors, "ema.unet.conv_in.weight")
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")


def drop_optimizer_state(meta, tensors, index: str = ""):
    for key in [k for k in tensors if k.startswith(f"optim.{index}")]:
        del tensors[key]


CHECKPOINT_DAMAGE = [
    ("step-not-a-number", lambda m, t: m.__setitem__("step", "many"), "its step is 'many'"),
    ("negative-step", lambda m, t: m.__setitem__("step", -1), "its step is -1"),
    ("train-not-a-table", lambda m, t: m.__setitem__("train", [1, 2]), "lacks the step or the training config"),
    ("train-lr-not-a-number", lambda m, t: m["train"].__setitem__("lr", "fast"),
     "holds a training config this minidiff cannot use: --lr must be a finite number (got 'fast')"),
    ("train-lr-nan", lambda m, t: m["train"].__setitem__("lr", float("nan")), "--lr must be a finite number"),
    ("train-unknown-key", lambda m, t: m["train"].__setitem__("turbo", True), "unknown key(s)"),
    ("param-groups-missing", lambda m, t: m.pop("param_groups"), "optimizer settings are missing"),
    ("param-groups-garbage", lambda m, t: m["param_groups"][0].__setitem__("betas", "fast"),
     "optimizer setting 'betas' is 'fast'"),
    ("param-groups-out-of-range", lambda m, t: m["param_groups"][0].__setitem__("betas", [1.5, 0.9]),
     "optimizer setting 'betas'"),
    ("param-groups-other-parameters", lambda m, t: m["param_groups"][0].__setitem__("params", [0, 1]),
     "optimizer state for other parameters"),
    ("losses-garbage", lambda m, t: m.__setitem__("losses", 5), "loss history is not a list"),
    ("optimizer-state-wrong-shape", shrink_optimizer_state, "has shape (3, 1, 7), its parameter"),
    ("optimizer-state-missing-part", drop_exp_avg, "lacks exp_avg_sq"),
    ("optimizer-state-without-a-parameter", lambda m, t: t.__setitem__("optim.99999.exp_avg", torch.zeros(1)),
     "optimizer state optim.99999.exp_avg has no parameter"),
    ("optimizer-key-garbled", lambda m, t: t.__setitem__("optim.x", torch.zeros(1)), "has no parameter"),
    ("integer-weights", integer_weights, "is stored as torch.int64, expected torch.float32"),
    ("nan-weights", nan_ema, "holds NaN or infinite values"),
    ("stray-tensor", lambda m, t: t.__setitem__("vae.weight", torch.zeros(1)), "unexpected tensor vae.weight"),
    ("rng-garbage", lambda m, t: t.__setitem__("rng.torch", torch.zeros(3, dtype=torch.uint8)),
     "random-number state"),
    # What resume needs: AdamW's moments of every parameter that had them (a fresh state before, without a word).
    ("optimizer-state-removed", drop_optimizer_state, "it lacks the optimizer state of parameter 0"),
    ("optimizer-state-of-one-parameter-removed", lambda m, t: drop_optimizer_state(m, t, "3."),
     "it lacks the optimizer state of parameter 3 (1 of the"),
    ("optimizer-state-and-its-list-removed", lambda m, t: (m.pop("optimizer_state"), drop_optimizer_state(m, t)),
     "it lacks the optimizer state that resuming at step 1 needs"),
    ("optimizer-state-list-garbage", lambda m, t: m.__setitem__("optimizer_state", "all"),
     "its list of optimizer states is not a list of parameter numbers"),
    ("optimizer-state-unlisted", lambda m, t: m["optimizer_state"].remove(0),
     "holds an optimizer state for parameter 0, which its own list does not name"),
]


def damaged(trained_checkpoint_run: Path, folder: Path, make) -> tuple[Path, Path]:
    out = folder / "run"
    shutil.copytree(trained_checkpoint_run, out)
    path = out / CHECKPOINT
    if isinstance(make, tuple):  # (kind, change) of the checkpoint's own content
        rewrite_checkpoint(path, make[1])
    else:  # a hostile file in place of the checkpoint
        path.unlink()
        make(out).rename(path)
    return out, path


RESUME_CASES = ([(name, make, message) for name, make, message in HOSTILE_MODELS
                 if name not in ("future-version", "version-zero", "foreign-safetensors", "no-metadata",
                                 "config-not-json")]
                + [("foreign-safetensors", safetensors_with({"format": "pt"}), "not a minidiff training checkpoint"),
                   ("a-model-file", lambda f: tiny_model("class").save(f / "m.safetensors"),
                    "not a minidiff training checkpoint"),
                   ("future-version", safetensors_with({"format": CHECKPOINT_FORMAT, "format_version": "99",
                                                        "config": "{}"}), "comes from a newer minidiff")]
                + [(name, ("change", change), message) for name, change, message in CHECKPOINT_DAMAGE])


@pytest.mark.hostile
@pytest.mark.parametrize("make, message", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_damaged_checkpoint_is_a_one_line_error_on_resume_and_the_run_is_left_as_it_was(
        tmp_path, trained_checkpoint_run, make, message):
    out, path = damaged(trained_checkpoint_run, tmp_path, make)
    before = snapshot(out)
    assert_error(cli("train", "--out", out, "--resume", "--max-steps", "3", "--quiet"), f"'{path}'", message)
    assert snapshot(out) == before


API_DAMAGE = [c for c in CHECKPOINT_DAMAGE if not c[0].startswith("train-")]  # only the CLI reads the recipe


@pytest.mark.hostile
@pytest.mark.parametrize("make, message", [c[1:] for c in API_DAMAGE], ids=[c[0] for c in API_DAMAGE])
def test_damaged_checkpoint_is_a_model_file_error_in_the_python_api(tmp_path, trained_checkpoint_run, make, message):
    out, path = damaged(trained_checkpoint_run, tmp_path, ("change", make))
    cfg = TrainConfig(**TINY, out=str(out), max_steps=3, save_every=1).validate()
    before = snapshot(out)
    with pytest.raises(ModelFileError) as caught:
        Trainer(cfg, resume=True, log=lambda m: None)
    assert f"'{path}'" in str(caught.value) and message in str(caught.value)
    assert snapshot(out) == before


@pytest.mark.hostile
def test_undamaged_checkpoint_still_resumes(tmp_path, trained_checkpoint_run):
    out = tmp_path / "run"
    shutil.copytree(trained_checkpoint_run, out)
    meta = read_checkpoint_meta(out / CHECKPOINT)
    assert meta["step"] == 1
    trainer = Trainer(TrainConfig(**TINY, out=str(out), max_steps=2, save_every=1).validate(), resume=True,
                      log=lambda m: None)
    assert trainer.step == 1
    trainer.run()
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 2


@pytest.mark.hostile
def test_resume_keeps_the_live_optimizer_kernels_whatever_the_file_says(tmp_path, trained_checkpoint_run):
    """fused / foreach say how this torch on this device computes; a file from elsewhere must not set them."""
    out = tmp_path / "run"
    shutil.copytree(trained_checkpoint_run, out)
    assert read_checkpoint_meta(out / CHECKPOINT)["param_groups"][0]["fused"] is True  # a CPU run is fused
    rewrite_checkpoint(out / CHECKPOINT, lambda meta, tensors: meta["param_groups"][0].update(fused=False,
                                                                                              foreach=True))
    trainer = Trainer(TrainConfig(**TINY, out=str(out), max_steps=2, save_every=1).validate(), resume=True,
                      log=lambda m: None)
    group = trainer.optimizer.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None
    assert group["lr"] == read_checkpoint_meta(out / CHECKPOINT)["param_groups"][0]["lr"]  # the state still loads
    trainer.run()
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 2


@pytest.mark.hostile
def test_restore_checks_everything_before_loading_anything(tmp_path, trained_checkpoint_run):
    """A mismatch found late must not leave the live model half-loaded with the file's weights."""
    trainer = Trainer(TrainConfig(**TINY, out=str(tmp_path / "fresh"), max_steps=1).validate(), log=lambda m: None)
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    meta, tensors = load_checkpoint(trained_checkpoint_run / CHECKPOINT)
    tensors["rng.torch"] = torch.zeros(3, dtype=torch.uint8)  # checked after the weights and the optimizer
    with pytest.raises(ModelFileError, match="random-number state"):
        restore(meta, tensors, trained_checkpoint_run / CHECKPOINT, modules={"net": trainer.net, "ema": trainer.ema},
                optimizer=trainer.optimizer)
    after = trainer.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.optimizer.state_dict()["state"] == {}


def rewrite_checkpoint_config(path: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as fh:
        metadata = dict(fh.metadata())
    config = json.loads(metadata["config"])
    change(config)
    save_file(load_file(str(path)), str(path), metadata={**metadata, "config": json.dumps(config)})


def copied_run(trained_run: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    return out


@pytest.mark.hostile
def test_a_checkpoint_step_beyond_any_run_is_one_line(tmp_path, trained_run):
    out = copied_run(trained_run, tmp_path)
    rewrite_checkpoint_config(out / "checkpoint.safetensors", lambda c: c.__setitem__("step", 2**62))
    assert_error(timed_cli("train", "--out", out, "--resume", "--max-steps", "10"), "its step is 4611686018427387904")
    assert_error(timed_cli("train", "--out", out, "--resume", "--max-steps", 2**62 + 2),
                 "--max-steps 4611686018427387906 is more than minidiff allows (1,000,000,000)")


@pytest.mark.hostile
@pytest.mark.parametrize("target", ["hostile", "fifo", "folder"])
def test_init_from_in_a_checkpoint_pointing_at_a_hostile_file_is_one_line(tmp_path, trained_run, target):
    import os

    out = copied_run(trained_run, tmp_path)
    path = tmp_path / target
    if target == "hostile":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    elif target == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    rewrite_checkpoint_config(out / "checkpoint.safetensors", lambda c: c["train"].__setitem__("init_from", str(path)))
    assert_error(timed_cli("train", "--out", out, "--resume", "--max-steps", "10"), str(path))


@pytest.mark.hostile
def test_a_vae_checkpoint_without_its_optimizer_state_is_refused_on_resume(tmp_path):
    from minidiff_cli.training.vae import VAETrainConfig, VAETrainer

    out = tmp_path / "vae.safetensors"
    VAETrainer(VAETrainConfig(data="shapes", image_size=16, base_channels=8, channel_mult=[1, 2], batch_size=4,
                              warmup=2, device="cpu", quiet=True, max_steps=2, save_every=2, out=str(out)),
               log=lambda m: None).run()
    run = tmp_path / "vae-run"
    rewrite_checkpoint(run / CHECKPOINT, drop_optimizer_state)
    before = snapshot(tmp_path)
    assert_error(cli("vae", "train", "--out", out, "--resume", "--max-steps", "4", "--quiet"),
                 f"'{run / CHECKPOINT}' is corrupt: it lacks the optimizer state of parameter 0")
    assert snapshot(tmp_path) == before

"""Hostile input, round 2 (issue 18): every refusal is one line, within seconds and bounded memory.

Every hostile file is made here and goes through the real CLI (``main([...])`` in this process, or a
real process where exit codes, signals or stdout matter). Round 1 is test_hardening.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from conftest import run_in_process
from test_hardening import assert_error  # exit 2, no traceback, exactly one line
from tinymodels import CLASS_NAMES, TINY_CLIP, TINY_TRAIN, tiny_config, tiny_model


def timed_cli(*args, limit: float = 5.0) -> tuple[int, str, str]:
    start = time.perf_counter()
    result = run_in_process(*args)
    assert time.perf_counter() - start < limit, ("too slow to refuse", args)
    return result


def header_only_model(path: Path, config: dict) -> Path:
    """A model file of a few hundred bytes: a config and no tensors (it claims whatever it likes)."""
    save_file({}, str(path), metadata={"format": "minidiff", "format_version": "1", "config": json.dumps(config)})
    return path


# -- 1. small files that would cost gigabytes or minutes -------------------------------------------
def _unet(**changes):
    def change(config):
        config["unet"].update(changes)
    return change


def _text(**changes):
    def change(config):
        config["conditioner"]["config"]["text_cfg"].update(changes)
    return change


def _clip(**changes):
    def change(config):
        config["conditioner"]["config"].update(changes)
    return change


COSTLY = {
    # 6,000,000 residual blocks at 1 channel: few parameters, but 6 GB and minutes of modules
    "res blocks": ("class", _unet(num_res_blocks=6_000_000, base_channels=1, norm_groups=1, head_dim=1,
                                  channel_mult=[1], attention_resolutions=[], cross_attention_resolutions=[]),
                   "num_res_blocks 6000000 is more than the 32"),
    # self-attention over every pixel of 1024 x 1024: a 4 TB attention matrix for one image
    "attention activations": ("class", _unet(image_size=1024, base_channels=8, channel_mult=[1],
                                             attention_resolutions=[1024], head_dim=1, mid_attention=False),
                              "GiB of activations for one image"),
    "clip layers": ("clip", _text(layers=10**7), "layers must be a whole number from 1 to 64"),
    "clip context": ("clip", _text(context_length=40_000), "context_length must be a whole number from 4 to 1,024"),
    "clip width": ("clip", _text(width=10**6, heads=1), "width must be a whole number from 1 to 8,192"),
    "clip embed_dim": ("clip", _clip(embed_dim=10**9), "embed_dim must be a whole number"),
}


@pytest.mark.parametrize("case", list(COSTLY))
def test_a_small_file_that_would_cost_gigabytes_is_refused_at_once_by_info_and_generate(tmp_path, case):
    conditioner, change, message = COSTLY[case]
    config = json.loads(json.dumps(tiny_config(conditioner)))
    change(config)
    path = header_only_model(tmp_path / "costly.safetensors", config)
    assert path.stat().st_size < 2000
    assert_error(timed_cli("info", path), message, str(path))
    assert_error(timed_cli("generate", "x", "--model", path, "-o", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_activations_are_bounded_at_the_batch_chosen(tmp_path):
    """A model fine for one image (0.5 GiB of attention) is refused for a batch that needs over 64 GiB."""
    from minidiff_cli.model import DiffusionModel

    config = json.loads(json.dumps(tiny_config("class")))
    config["unet"].update(image_size=64, base_channels=8, channel_mult=[1], attention_resolutions=[64], head_dim=1,
                          mid_attention=False)
    path = tmp_path / "wide-attention.safetensors"
    DiffusionModel.build(config).save(path)
    assert_error(timed_cli("generate", CLASS_NAMES[0], "--model", path, "-n", "200", "--batch-size", "200", "--quiet",
                           "-o", tmp_path / "out"), "GiB of activations for 200 images")
    assert not (tmp_path / "out").exists()


# -- 2. CLIP files and configs are checked by an allow-list -----------------------------------------
HOSTILE_TEXT_CFG = {
    "heads do not divide width": ({"width": 16, "heads": 3}, "width 16 must be a multiple of heads 3"),
    "device in act_kwargs": ({"act_kwargs": {"device": "meta"}}, "act_kwargs may not set 'device'"),
    "bogus norm kwarg": ({"norm_kwargs": {"elementwise_affine": "yes"}}, "norm_kwargs may not set"),
    "norm eps a string": ({"norm_kwargs": {"eps": "1e-5"}}, "eps must be a number"),
    "bogus gelu": ({"act_kwargs": {"approximate": "cubic"}}, "approximate must be one of none, tanh"),
    "bpe_path": ({"tokenizer_kwargs": {"bpe_path": "/etc/passwd"}}, "tokenizer_kwargs may not set 'bpe_path'"),
    "special tokens": ({"tokenizer_kwargs": {"additional_special_tokens": ["(("]}}, "may not set"),
    "clean mode": ({"tokenizer_kwargs": {"clean": "(["}}, "clean must be one of lower, whitespace, canonicalize"),
    "unknown tokenizer key": ({"tokenizer_kwargs": {"context_length": 10**9}}, "tokenizer_kwargs may not set"),
    "pool type": ({"pool_type": "median"}, "pool_type must be one of"),
    "proj type": ({"proj_type": "mlp"}, "proj_type must be one of linear, none"),
    "huge eos id": ({"eos_id": 2**70}, "eos_id must be a whole number from 0 to 49,407"),
    "negative pad id": ({"pad_id": -1}, "pad_id must be a whole number"),
    "fractional heads": ({"heads": 2.5}, "heads must be a whole number"),
    "boolean layers": ({"layers": True}, "layers must be a whole number"),
    "nan mlp ratio": ({"mlp_ratio": float("nan")}, "mlp_ratio must be a number"),
    "unknown key": ({"output_dim": 3}, "unknown key 'output_dim'"),
    "flag not a bool": ({"no_causal_mask": "no"}, "no_causal_mask must be true or false"),
}


def _tiny_clip_config(change: dict) -> dict:
    return {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], **change}}


def clip_text_file(path: Path, config: dict) -> Path:
    """A minidiff-clip text-encoder file with ``config`` and the tensors of the tiny one."""
    from minidiff_cli import plugins

    encoder = plugins.get_conditioner("clip").from_config(TINY_CLIP)
    tensors = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    metadata = {"format": "minidiff-clip", "format_version": "1", "config": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case", list(HOSTILE_TEXT_CFG))
def test_a_hostile_clip_config_is_one_line_in_a_model_file_and_a_clip_file(tmp_path, case):
    change, message = HOSTILE_TEXT_CFG[case]
    config = json.loads(json.dumps(tiny_config("clip"), allow_nan=True))
    config["conditioner"]["config"] = _tiny_clip_config(change)
    model = header_only_model(tmp_path / "model.safetensors", config)
    assert_error(timed_cli("info", model), message, str(model))
    clip_file = clip_text_file(tmp_path / "clip.safetensors", _tiny_clip_config(change))
    out = tmp_path / "run"
    assert_error(timed_cli("train", "--data", "shapes", "--conditioner", "clip", "--clip-weights", clip_file,
                           *TINY_TRAIN, "--max-steps", "1", "--out", out), message, str(clip_file))
    assert not out.exists()


def test_a_clip_file_cannot_make_minidiff_open_a_path(tmp_path):
    """A FIFO would hang any reader; the allow-list refuses bpe_path before anything is opened."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    config = _tiny_clip_config({"tokenizer_kwargs": {"bpe_path": str(fifo)}})
    clip_file = clip_text_file(tmp_path / "clip.safetensors", config)
    model = tiny_model("clip")
    model.conditioner._config = config  # a model file whose clip conditioner names the FIFO
    model_file = tmp_path / "model.safetensors"
    model.save(model_file)
    assert_error(timed_cli("generate", "a red circle", "--model", model_file, "-o", tmp_path / "o"), "bpe_path")
    assert_error(timed_cli("train", "--data", "shapes", "--conditioner", "clip", "--clip-weights", clip_file,
                           *TINY_TRAIN, "--max-steps", "1", "--out", tmp_path / "run"), "bpe_path")


def full_clip_file(path: Path, vision_cfg: dict, text_change: dict | None = None) -> Path:
    """A `clip train` file with an image tower, made by clip_train's own code at the tiniest size."""
    import torch

    from minidiff_cli.clip_train import ClipRecipe, build_clip, save_clip

    recipe = ClipRecipe(width=16, heads=2, layers=1, context_length=12, embed_dim=16, vision_width=8)
    config = recipe.model_config()
    torch.manual_seed(0)
    model = build_clip(config)
    save_clip(path, model, config, {}, {})
    # Then its config is replaced by the hostile one (the tensors stay those of the honest config).
    from safetensors.torch import load_file

    from minidiff_cli.clip_text import read_safetensors

    metadata, _ = read_safetensors(path)
    config = {**config, "vision_cfg": {**config["vision_cfg"], **vision_cfg},
              "text_cfg": {**config["text_cfg"], **(text_change or {})}}
    save_file(load_file(str(path)), str(path), metadata={**metadata, "config": json.dumps(config)})
    return path


HOSTILE_VISION_CFG = {
    "huge image": ({"image_size": 10**6}, "image_size must be a whole number from 1 to 512"),
    "deep resnet": ({"layers": [10**7, 1, 1, 1]}, "layers must be a whole number from 1 to 64"),
    "three stages": ({"layers": [1, 1, 1]}, "must list 4 stages"),
    "unknown key": ({"timm_model_name": "x"}, "unknown key 'timm_model_name'"),
    "heads do not split": ({"head_width": 3}, "does not split"),
    "image not a multiple of the stride": ({"image_size": 40}, "must be a multiple of 32"),
}


@pytest.mark.parametrize("case", list(HOSTILE_VISION_CFG))
def test_clip_eval_checks_a_files_whole_config_before_building_it(tmp_path, case):
    change, message = HOSTILE_VISION_CFG[case]
    path = full_clip_file(tmp_path / "clip.safetensors", change)
    assert_error(timed_cli("clip", "eval", path), message, str(path))


def test_clip_eval_refuses_a_hostile_text_config_and_a_config_that_does_not_fit(tmp_path):
    path = full_clip_file(tmp_path / "a.safetensors", {}, {"layers": 10**7})
    assert_error(timed_cli("clip", "eval", path), "layers must be", str(path))
    path = full_clip_file(tmp_path / "b.safetensors", {}, {"layers": 3})
    assert_error(timed_cli("clip", "eval", path), "does not match its config", str(path))


def test_the_projects_own_clip_configs_still_load():
    from minidiff_cli.clip_config import check_clip_config, check_clip_model_config
    from minidiff_cli.clip_text import read_clip_config, read_safetensors
    from minidiff_cli.clip_train import ClipRecipe

    shipped = Path(__file__).resolve().parents[1] / "minidiff_cli" / "models" / "shapes-clip.safetensors"
    metadata, _ = read_safetensors(shipped)
    check_clip_config(read_clip_config(metadata, shipped))
    check_clip_config(TINY_CLIP)
    emoji = ClipRecipe(context_length=24, width=64, layers=4, heads=4)  # the emoji recipe's text tower
    check_clip_model_config(emoji.model_config())
    check_clip_model_config(ClipRecipe(vision="vit").model_config())

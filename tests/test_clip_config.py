"""CLIP configs (minidiff_cli.clip.config): a CLIP config in a model file or a CLIP file is checked against an
allow-list, in one line and at once, before anything is built or any path it names is opened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_error, timed_cli
from hostile_models import header_only_model
from safetensors.torch import save_file
from tinymodels import TINY_CLIP, TINY_TRAIN, tiny_config, tiny_model

# -- CLIP files and configs are checked by an allow-list -----------------------------------------
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


@pytest.mark.hostile
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


@pytest.mark.hostile
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

    from minidiff_cli.clip.clip_file import build_clip, save_clip
    from minidiff_cli.training.clip import ClipRecipe

    recipe = ClipRecipe(width=16, heads=2, layers=1, context_length=12, embed_dim=16, vision_width=8)
    config = recipe.model_config()
    torch.manual_seed(0)
    model = build_clip(config)
    save_clip(path, model, config, {}, {})
    # Then its config is replaced by the hostile one (the tensors stay those of the honest config).
    from safetensors.torch import load_file

    from minidiff_cli.clip.weights import read_safetensors

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


@pytest.mark.hostile
@pytest.mark.parametrize("case", list(HOSTILE_VISION_CFG))
def test_clip_eval_checks_a_files_whole_config_before_building_it(tmp_path, case):
    change, message = HOSTILE_VISION_CFG[case]
    path = full_clip_file(tmp_path / "clip.safetensors", change)
    assert_error(timed_cli("clip", "eval", path), message, str(path))


@pytest.mark.hostile
def test_clip_eval_refuses_a_hostile_text_config_and_a_config_that_does_not_fit(tmp_path):
    path = full_clip_file(tmp_path / "a.safetensors", {}, {"layers": 10**7})
    assert_error(timed_cli("clip", "eval", path), "layers must be", str(path))
    path = full_clip_file(tmp_path / "b.safetensors", {}, {"layers": 3})
    assert_error(timed_cli("clip", "eval", path), "does not match its config", str(path))


@pytest.mark.hostile
def test_the_projects_own_clip_configs_still_load():
    from minidiff_cli.clip.config import check_clip_config, check_clip_model_config
    from minidiff_cli.clip.weights import read_clip_config, read_safetensors
    from minidiff_cli.training.clip import ClipRecipe

    shipped = Path(__file__).resolve().parents[1] / "minidiff_cli" / "models" / "shapes-clip.safetensors"
    metadata, _ = read_safetensors(shipped)
    check_clip_config(read_clip_config(metadata, shipped))
    check_clip_config(TINY_CLIP)
    emoji = ClipRecipe(context_length=24, width=64, layers=4, heads=4)  # the emoji recipe's text tower
    check_clip_model_config(emoji.model_config())
    check_clip_model_config(ClipRecipe(vision="vit").model_config())

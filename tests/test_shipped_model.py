"""The model in the package: it loads, its config is what the recipe says, and it draws
what it is asked (a fast regression guard; `minidiff eval` is the full evaluation)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_cli

from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.evaluation.shapes_judge import score
from minidiff_cli.files.model_file import read_config
from minidiff_cli.files.models_dir import DEFAULT_MODEL, SHIPPED_DIR, resolve_model
from minidiff_cli.inference.pipeline import Generation, Pipeline
from minidiff_cli.training.config import load_toml

MODEL = SHIPPED_DIR / f"{DEFAULT_MODEL}.safetensors"
RECIPE = ROOT / "recipes" / "shapes-clip.toml"


def test_the_default_model_is_the_shipped_file():
    assert MODEL.is_file()
    assert resolve_model(None) == MODEL
    assert MODEL.stat().st_size < 30 * 1024 * 1024


def test_shipped_config_matches_the_recipe():
    config = read_config(MODEL)
    recipe = load_toml(RECIPE)
    assert config["conditioner"]["name"] == "clip"
    assert config["unet"]["base_channels"] == recipe["base_channels"]
    assert config["unet"]["channel_mult"] == recipe["channel_mult"]
    assert config["unet"]["context_dim"] == config["conditioner"]["config"]["text_cfg"]["width"]
    assert config["schedule"] == {"name": recipe["schedule"], "num_timesteps": recipe["timesteps"], "options": {}}
    training = config["training"]
    assert training["holdout"] == recipe["holdout"] == "purple triangle,orange square"
    assert training["step"] > 0 and training["data"] == "shapes"


def test_shipped_model_loads_with_a_frozen_text_encoder():
    model = DiffusionModel.load(MODEL)
    assert model.conditioner.name == "clip" and not model.conditioner.trainable
    cond = model.conditioner.encode(["a red circle", "a blue square"])
    assert cond.context.shape[:2] == (2, model.conditioner.config()["text_cfg"]["context_length"])
    assert not torch.allclose(cond.context[0], cond.context[1])


def test_shipped_model_draws_the_colour_and_shape_asked_for():
    pipe = Pipeline.load(device="cpu")
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a pink triangle",
               "a cyan square"]
    per_prompt = 3
    rows = [p for p in prompts for _ in range(per_prompt)]
    seeds = [k for _ in prompts for k in range(per_prompt)]
    x = pipe.sample_many(Generation("", steps=20, cfg=3.0, sampler="ddim", seed=0), rows, seeds, batch_size=18)
    hits = [score(x[i * per_prompt:(i + 1) * per_prompt], *p.split()[1:])["both"] for i, p in enumerate(prompts)]
    # A loose floor: the full evaluation (minidiff eval, 50 steps) is recorded in recipes/README.md.
    assert sum(hits) / len(hits) >= 0.6, dict(zip(prompts, hits))


def test_shipped_model_samples_in_bfloat16_near_its_float32_images():
    # The network runs in bfloat16, the sampler in float32: the cosine schedule's first steps have
    # 1 - alpha_bar below bfloat16's resolution at 1, which once turned every image into NaN.
    gen = Generation("a red circle", steps=20, cfg=3.0, sampler="ddim", seed=0)
    full = Pipeline.load(device="cpu").sample(gen, 2)
    half = Pipeline.load(device="cpu", dtype="bfloat16").sample(gen, 2)
    assert torch.isfinite(half).all() and half.dtype == torch.float32
    assert (half - full).abs().mean() < 0.05, (half - full).abs().mean()
    assert score(half, "red", "circle")["both"] == 1.0


def test_generate_uses_the_shipped_model_by_default(tmp_path):
    result = run_cli("generate", "a red circle", "--steps", "5", "-o", str(tmp_path), "-q", "--json")
    assert result.returncode == 0, result.stderr
    params = json.loads(result.stdout)["parameters"][0]
    assert params["model"] == DEFAULT_MODEL and params["steps"] == 5
    assert (tmp_path / "minidiff-00000.png").is_file()


@pytest.mark.parametrize("command", [("info", "--json"), ("models", "--json")])
def test_info_and_models_show_the_shipped_model(command):
    result = run_cli(*command)
    assert result.returncode == 0, result.stderr
    assert DEFAULT_MODEL in result.stdout

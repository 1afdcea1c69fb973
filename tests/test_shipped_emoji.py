"""The second shipped model: text-to-image on Noto emoji at 64x64 (a latent model), with the CLIP
that judges it.

A fast regression guard on 12 real emoji copied into tests/data (the folder itself is not
needed): the file is what the recipe says, carries its attribution, knows its words, and
the shipped CLIP ranks the real pictures' own captions first.
"""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, run_cli

from minidiff_cli.files.model_file import read_config
from minidiff_cli.files.models_dir import SHIPPED_DIR, resolve_model
from minidiff_cli.training.config import load_toml

MODEL = SHIPPED_DIR / "emoji.safetensors"
CLIP = SHIPPED_DIR / "clip" / "emoji.safetensors"
SAMPLE = ROOT / "tests" / "data" / "emoji-sample"


def test_the_emoji_model_is_shipped_small_with_its_clip_and_notice():
    assert resolve_model("emoji") == MODEL
    total = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*.safetensors"))
    assert total < 50 * 1024 * 1024  # every shipped file together
    assert (SHIPPED_DIR / "NOTICE").read_text().count("Noto Emoji") >= 1
    assert (SHIPPED_DIR / "LICENSE-Apache-2.0.txt").is_file()


def test_its_config_is_the_recipe_and_its_card_carries_the_attribution():
    config = read_config(MODEL)
    recipe = load_toml(ROOT / "recipes" / "emoji.toml")
    text_encoder = load_toml(ROOT / "recipes" / "emoji16.toml")  # its stage 1 made the text tower
    factor = 2 ** (len(config["vae"]["config"]["channel_mult"]) - 1)
    assert config["unet"]["image_size"] * factor == recipe["image_size"] == 64
    assert config["unet"]["image_size"] == 16 and config["unet"]["in_channels"] == 4  # 4x16x16 latents
    assert config["unet"]["base_channels"] == recipe["base_channels"]
    assert config["unet_storage"] == "float16" and config["conditioner"]["name"] == "clip"
    assert config["conditioner"]["config"]["text_cfg"]["context_length"] == text_encoder["clip"]["context_length"]
    assert 0 < config["vae"]["scale"] and config["vae"]["hash"]
    assert "Noto Emoji" in config["card"]["notice"] and "Apache" in config["card"]["notice"]
    assert {"red", "apple", "flag", "skin", "tone"} <= set(config["vocabulary"])
    info = run_cli("info", "emoji")
    assert info.returncode == 0 and "Noto Emoji project" in info.stdout


def test_it_draws_a_red_apple_without_a_warning(tmp_path):
    result = run_cli("generate", "red apple", "--model", "emoji", "--steps", "10", "-q", "-o", str(tmp_path / "a.png"))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    from PIL import Image

    with Image.open(tmp_path / "a.png") as image:
        assert image.size == (64, 64)


@pytest.fixture(scope="module")
def report():
    result = run_cli("eval", "--model", "emoji", "--data", str(SAMPLE), "--captions", "12", "--runs", "ddim:20",
                     "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_eval_on_real_emoji_uses_the_shipped_clip(report):
    assert report["clip_file"] == str(CLIP) and report["captions"] == 12 and report["images"] == 12
    assert report["real"]["r_precision"] >= 0.9  # the CLIP knows these pictures


def test_the_model_draws_what_the_clip_recognises(report):
    # Among 12 captions chance is 1/12; the full figure (200 captions of the folder, R-precision
    # among 100) is in recipes/README.md.
    assert report["generated"]["r_precision"] >= 0.5

"""`minidiff clip train`: a small CLIP trained with open_clip, saved for the clip conditioner."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors import safe_open

from minidiff_cli import plugins
from minidiff_cli.clip.clip_file import load_clip
from minidiff_cli.evaluation.clip import class_prompt, zero_shot_accuracy
from minidiff_cli.training.clip import ClipRecipe, train_clip

# A CLIP of a few thousand parameters (plus the 49408-row token table): seconds on a CPU.
TINY = ["--width", "16", "--heads", "2", "--layers", "1", "--embed-dim", "16", "--context-length", "12",
        "--vision-width", "8", "--batch-size", "16", "--threads", "1", "--device", "cpu", "--quiet"]
TINY_RECIPE = dict(width=16, heads=2, layers=1, embed_dim=16, context_length=12, vision_width=8,
                   batch_size=16, device="cpu", threads=1)


@pytest.fixture(scope="module")
def trained_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.safetensors"
    result = run_cli("clip", "train", "--data", "shapes", "--out", str(path), "--steps", "30", *TINY)
    assert result.returncode == 0, result.stderr
    return path, result


def test_clip_train_writes_a_minidiff_clip_file(trained_file):
    path, result = trained_file
    assert "saved" in result.stdout and "zero-shot top-1" in result.stdout
    with safe_open(str(path), "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
        dtype = f.get_tensor("token_embedding.weight").dtype
    assert metadata["format"] == "minidiff-clip" and metadata["format_version"] == "1"
    config = json.loads(metadata["config"])
    assert config["embed_dim"] == 16 and config["text_cfg"]["width"] == 16 and config["text_cfg"]["context_length"] == 12
    assert "vision_cfg" in config
    accuracy = json.loads(metadata["eval"])
    assert {"seen", "heldout", "colour", "shape"} <= set(accuracy)
    assert accuracy["heldout_classes"] == ["orange square", "purple triangle"]
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"} <= keys
    assert any(k.startswith("visual.") for k in keys) and dtype == torch.float16


def test_the_clip_conditioner_loads_the_trained_file(trained_file):
    path, _ = trained_file
    clip = plugins.get_conditioner("clip").from_options(weights=str(path))
    cond = clip.encode(["a red circle"])
    assert cond.context.shape == (1, 12, 16) and cond.pooled.shape == (1, 16)
    model, _ = load_clip(path)  # the whole CLIP too: open_clip's layout, loaded strictly
    assert torch.allclose(model.encode_text(clip.tokenize(["a red circle"])).detach(), cond.pooled, atol=1e-5)


def test_clip_train_refuses_to_overwrite_before_training(trained_file):
    path, _ = trained_file
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run_cli("clip", "train", "--out", str(path), "--steps", "100000", *TINY, timeout=60)
    assert_one_line_error(result, "already exists")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_clip_train_checks_its_flags(tmp_path):
    result = run_cli("clip", "train", "--out", str(tmp_path / "x.safetensors"), "--width", "10", "--heads", "4")
    assert_one_line_error(result, "multiple of heads")
    assert not (tmp_path / "x.safetensors").exists()


def test_the_loss_falls_over_a_short_run():
    losses = []
    train_clip(ClipRecipe(steps=40, **TINY_RECIPE), callback=lambda info: losses.append(info["loss"]))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2


def test_class_prompt_uses_the_right_article():
    assert class_prompt("red circle") == "a red circle"
    assert class_prompt("orange square") == "an orange square"


class _Oracle(torch.nn.Module):
    """A stand-in CLIP whose image of class k is most like caption ``answer[k]``."""

    context_length = 12

    def __init__(self, class_names, answer):
        super().__init__()
        from minidiff_cli.clip.tokenizer import tokenizer_for

        self.tokens = tokenizer_for({"context_length": 12})([class_prompt(n) for n in class_names])
        self.answer = answer
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens, normalize=False):
        rows = [(self.tokens == t).all(dim=1).nonzero().item() for t in tokens]
        return torch.eye(len(self.tokens))[rows]

    def encode_image(self, images, normalize=False):
        return torch.eye(len(self.tokens))[[self.answer[int(k)] for k in images[:, 0, 0, 0]]]


def test_zero_shot_accuracy_counts_top1_per_group():
    names = ["red circle", "red square", "blue circle", "blue square"]
    # Images of class k carry k in a pixel; the oracle mistakes "blue square" for "red square".
    images = {k: torch.full((2, 3, 4, 4), float(k)) for k in range(4)}
    model = _Oracle(names, answer={0: 0, 1: 1, 2: 2, 3: 1})
    result = zero_shot_accuracy(model, names, images, heldout={"blue square"})
    assert result["seen"] == 1.0 and result["heldout"] == 0.0
    assert result["colour"] == 0.75 and result["shape"] == 1.0
    assert result["heldout_classes"] == ["blue square"] and result["images_per_class"] == 2

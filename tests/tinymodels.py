"""Tiny models for tests: a U-Net of a few thousand parameters, built in a fraction of a second.

A freshly built U-Net predicts exactly zero (its output convolutions start at zero), which
would make every image and every guidance scale alike; ``tiny_model`` therefore gives all
weights seeded random values, so that predictions depend on x, t and the condition.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minidiff_cli import plugins
from minidiff_cli.diffusion.model import DiffusionModel

CLASS_NAMES = ["red circle", "blue square", "green triangle"]
TIMESTEPS = 50

# A CLIP text tower small enough to build in a second (the vocabulary is the tokenizer's).
TINY_CLIP = {"embed_dim": 16, "quick_gelu": False,
             "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}

# `minidiff train` flags for a run that takes seconds (16 px, 2 levels, T = 100).
TINY_TRAIN = ["--image-size", "16", "--base-channels", "8", "--channel-mult", "1,2",
              "--attention-resolutions", "8", "--cross-attention-resolutions", "8", "--timesteps", "100",
              "--batch-size", "4", "--warmup", "2", "--lr", "1e-3", "--quiet", "--device", "cpu"]
# head_dim and class_dim have no flag; 16 channels at 8 px need heads of 8 (or 16).
TINY_TOML = "head_dim = 8\nclass_dim = 16\n"


def without(flags: list[str], *names: str) -> list[str]:
    """``flags`` less the named options and their values."""
    out, skip = [], False
    for item in flags:
        if skip:
            skip = False
        elif item in names:
            skip = True
        else:
            out.append(item)
    return out


def unet_config(context_dim=None, pooled_dim=None, image_size: int = 8) -> dict:
    return {"image_size": image_size, "in_channels": 3, "out_channels": 3, "base_channels": 8,
            "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
            "cross_attention_resolutions": [4], "context_dim": context_dim, "pooled_dim": pooled_dim,
            "head_dim": 8}


def tiny_config(conditioner: str = "class", prediction: str = "eps") -> dict:
    if conditioner == "class":
        cond = {"name": "class", "config": {"class_names": CLASS_NAMES, "dim": 8}}
        unet = unet_config(pooled_dim=8)
    elif conditioner == "clip":
        cond = {"name": "clip", "config": TINY_CLIP}
        unet = unet_config(context_dim=TINY_CLIP["text_cfg"]["width"], pooled_dim=TINY_CLIP["embed_dim"])
    else:
        cond = {"name": "none", "config": {}}
        unet = unet_config()
    return {"name": f"tiny-{conditioner}", "unet": unet,
            "schedule": {"name": "cosine", "num_timesteps": TIMESTEPS, "options": {}},
            "conditioner": cond, "prediction": prediction,
            "class_names": CLASS_NAMES if conditioner == "class" else []}


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def tiny_model(conditioner: str = "class", seed: int = 0, prediction: str = "eps") -> DiffusionModel:
    """A built model whose every weight is seeded noise (its predictions are far from zero)."""
    model = DiffusionModel.build(tiny_config(conditioner, prediction))
    randomize(model.unet, seed)
    if conditioner == "class":
        randomize(model.conditioner, seed + 1, scale=1.0)
    return model.eval()


def tiny_model_file(path: Path, conditioner: str = "class", seed: int = 0) -> Path:
    tiny_model(conditioner, seed).save(path)
    return path


def tiny_clip_file(path: Path, seed: int = 0) -> Path:
    """A `minidiff clip train`-style text encoder file (format minidiff-clip), untrained but seeded."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    encoder = plugins.get_conditioner("clip").from_config(TINY_CLIP)
    tensors = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    metadata = {"format": "minidiff-clip", "format_version": "1", "config": json.dumps(TINY_CLIP)}
    save_file(tensors, str(path), metadata=metadata)
    return path

"""The CLIP file ``minidiff clip train`` writes, and the full open_clip CLIP (both towers) it holds.

An open_clip CLIP state dict in safetensors (float16): the text tower under open_clip's
names, the image tower under ``visual.``, and metadata ``format = minidiff-clip``,
``config`` (embed_dim, text_cfg, vision_cfg) and ``eval`` (the accuracies). The text tower
conditions a U-Net (``--clip-weights FILE``); the image tower gives evaluation its features.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from minidiff_cli.clip.config import check_clip_model_config
from minidiff_cli.clip.weights import FORMAT, FORMAT_VERSION, read_safetensors
from minidiff_cli.errors import MinidiffError, ModelFileError
from minidiff_cli.files.atomic import atomic_write


def build_clip(config: dict[str, Any]):
    """An untrained ``open_clip.CLIP`` for ``config`` (see ``ClipRecipe.model_config``)."""
    import open_clip

    return open_clip.CLIP(config["embed_dim"], vision_cfg=config["vision_cfg"], text_cfg=config["text_cfg"],
                          quick_gelu=config.get("quick_gelu", False))


def fit_to_tower(images: torch.Tensor, model) -> torch.Tensor:
    """``images`` [B, 3, H, W] scaled (bilinear) to the side the CLIP's image tower takes."""
    visual = getattr(model, "visual", None)
    if visual is None:  # a CLIP-like model without open_clip's tower (an oracle in a test)
        return images
    size = visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def encode_images(model, images: torch.Tensor) -> torch.Tensor:
    """Normalised CLIP image features of ``images`` in [-1, 1], at any size."""
    return model.encode_image(fit_to_tower(images, model), normalize=True)


def save_clip(path: str | os.PathLike, model, config: dict[str, Any], evaluation: dict[str, Any],
              training: dict[str, Any], *, include_vision: bool = True, overwrite: bool = False) -> Path:
    """Write the CLIP's tensors (float16, open_clip names) and metadata; never overwrites unless asked."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith("visual.") and not include_vision:
            continue
        value = value.detach().cpu()
        tensors[key] = (value.half() if value.is_floating_point() else value).contiguous()
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config),
                "eval": json.dumps(evaluation), "training": json.dumps(training),
                "contents": "text+vision" if include_vision else "text"}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)


def load_clip(path: str | os.PathLike):
    """(open_clip.CLIP in float32, metadata) from a ``minidiff clip train`` file with its image tower."""
    path = Path(path)
    metadata, tensors = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"'{path}' is not a minidiff-clip file (made by `minidiff clip train`)")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise ModelFileError(f"'{path}' has no readable CLIP config") from None
    if not isinstance(config, dict) or not isinstance(config.get("vision_cfg"), dict):
        raise ModelFileError(f"'{path}' holds no image tower (a text encoder only)")
    try:  # allow-listed and bounded before anything is built from it
        config = check_clip_model_config(config)
    except MinidiffError as exc:
        raise ModelFileError(f"'{path}' has an invalid CLIP config: {exc}") from None
    with torch.device("meta"):  # shapes first: a file that does not fit its config allocates nothing
        expected = {k: tuple(v.shape) for k, v in build_clip(config).state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in tensors.items()}:
        raise ModelFileError(f"'{path}' does not match its config, or holds no image tower "
                             "(it was saved with --no-vision)")
    model = build_clip(config)
    model.load_state_dict(tensors, strict=True)
    return model.float().eval(), metadata

"""Where CLIP text-tower weights come from: minidiff CLIP files, open_clip safetensors, the local cache.

Weights come from safetensors files only. A pickle (``torch.save``'s ``.pt`` or ``.bin``)
can run code when loaded, so minidiff refuses it rather than unpickling. Pretrained
open_clip weights are looked up in the local caches open_clip and the Hugging Face hub
write; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from minidiff_cli.errors import MinidiffError, ModelFileError

# The file `minidiff clip train` writes: an open_clip CLIP state dict in safetensors.
FORMAT = "minidiff-clip"


FORMAT_VERSION = 1


TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; a pickle is refused, never loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from minidiff_cli.files.model_file import read_header

    path = Path(path)
    if not path.is_file():
        raise MinidiffError(f"weights file '{path}' does not exist" if not path.exists()
                            else f"'{path}' is not a file")
    try:
        metadata, _ = read_header(path)  # reads the JSON header only: safe on any file
    except ModelFileError:
        with open(path, "rb") as fh:
            head = fh.read(2)
        # torch.save writes a zip archive ("PK"); the legacy format starts with pickle's PROTO opcode.
        if head == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise ModelFileError(f"'{path}' is a PyTorch pickle file, not safetensors; minidiff never unpickles "
                                 "files (loading a pickle can run code): convert it to .safetensors first") from None
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelFileError(f"'{path}' is not a safetensors file; {path.suffix} files are usually pickles, "
                                 "which minidiff never loads: convert it to .safetensors first") from None
        raise
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"'{path}' could not be read: {exc}") from None
    return metadata, tensors


def text_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-encoder tensors of an open_clip checkpoint, under the names this module uses.

    Accepts a whole CLIP (text parts at the top, ``visual.*`` ignored), a
    ``CustomTextCLIP`` (text parts under ``text.``) and DDP's ``module.`` prefix.
    """
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix("module.")
        key = key.removeprefix("text.")
        if key.startswith(TEXT_KEYS):
            out[key] = value
    return out


def read_clip_config(metadata: dict[str, str], path: Path) -> Optional[dict[str, Any]]:
    """The text-encoder config stored in a file's metadata, or None if it has none."""
    fmt = metadata.get("format")
    try:
        if fmt == FORMAT:
            if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
                raise ModelFileError(f"'{path}' is a newer minidiff-clip file than this minidiff reads; "
                                     "upgrade minidiff")
            config = json.loads(metadata["config"])
            return {k: config[k] for k in ("embed_dim", "text_cfg", "quick_gelu") if k in config}
        if fmt == "minidiff":  # a diffusion model file: reuse its clip conditioner
            conditioner = json.loads(metadata["config"]).get("conditioner", {})
            if conditioner.get("name") == "clip":
                return conditioner["config"]
    except (KeyError, TypeError, ValueError):
        raise ModelFileError(f"'{path}' has a missing or unreadable config in its metadata") from None
    return None


HF_HUB_PREFIX = "hf-hub:"


def arch_config(arch: str, pretrained_tag: Optional[str] = None) -> dict[str, Any]:
    """The text-encoder config of open_clip architecture ``arch`` (e.g. ``ViT-B-32``).

    ``hf-hub:ORG/NAME`` reads ``open_clip_config.json`` from the Hugging Face cache.
    """
    import open_clip

    if arch.startswith(HF_HUB_PREFIX):
        path = _hf_cached(arch[len(HF_HUB_PREFIX):], ["open_clip_config.json"])
        if path is None:
            raise not_cached(arch)
        try:
            model_cfg = json.loads(path.read_text()).get("model_cfg")
        except (OSError, ValueError, AttributeError):
            model_cfg = None
        if not isinstance(model_cfg, dict):
            raise MinidiffError(f"the cached open_clip_config.json of '{arch}' has no model_cfg")
    else:
        model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise MinidiffError(f"open_clip has no architecture '{arch}'; e.g. ViT-B-32, RN50, ViT-B-16 "
                            "(see open_clip.list_models())")
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if pretrained_tag:  # e.g. OpenAI's weights were trained with QuickGELU
        quick_gelu = quick_gelu or bool(open_clip.get_pretrained_cfg(arch, pretrained_tag).get("quick_gelu"))
    return {"embed_dim": model_cfg["embed_dim"], "text_cfg": dict(model_cfg["text_cfg"]), "quick_gelu": quick_gelu}


def cached_pretrained_file(arch: str, tag: str) -> Path:
    """The local file of open_clip's pretrained ``tag`` for ``arch``, if it is in the HF cache.

    Never downloads: offline, open_clip's own download retries for most of a
    minute before failing, so look in the cache and fail at once instead.
    """
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        more = f" and {len(tags) - 6} more" if len(tags) > 6 else ""
        known = f"its tags: {', '.join(tags[:6])}{more}" if tags else "it has no pretrained tags"
        raise MinidiffError(f"open_clip has no pretrained weights '{tag}' for '{arch}'; {known} "
                            "(or pass a local .safetensors file)")
    if cfg.get("file"):
        return Path(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        found = _hf_cached(repo_id, _weight_names(filename or HF_WEIGHTS_NAME))
        if found is not None:
            return found
    raise not_cached(arch, tag)


def hub_weights_file(arch: str) -> Path:
    """The cached weights of an ``hf-hub:ORG/NAME`` architecture (its repo holds config and weights)."""
    from open_clip.constants import HF_WEIGHTS_NAME

    found = _hf_cached(arch[len(HF_HUB_PREFIX):], _weight_names(HF_WEIGHTS_NAME))
    if found is None:
        raise not_cached(arch)
    return found


def not_cached(arch: str, tag: Optional[str] = None) -> MinidiffError:
    what = f"pretrained weights '{tag}' for '{arch}' are" if tag else f"'{arch}' is"
    return MinidiffError(f"{what} not cached and cannot be downloaded here; "
                         "pass a local weights file with --clip-weights")


def _weight_names(filename: str) -> list[str]:
    """The safetensors twin of a checkpoint name first (open_clip's hub repos often hold both)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    stem = os.path.splitext(filename)[0]
    twin = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else stem + ".safetensors"
    return list(dict.fromkeys([twin, filename]))


def _hf_cached(repo_id: str, names: list[str]) -> Optional[Path]:
    """The first of ``names`` in the local Hugging Face cache of ``repo_id``; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        try:
            found = try_to_load_from_cache(repo_id, name)
        except ValueError:  # not a valid repo id or file name
            return None
        if isinstance(found, str):
            return Path(found)
    return None

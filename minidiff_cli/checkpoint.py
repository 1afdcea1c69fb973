"""Training checkpoints in safetensors: weights, EMA, optimizer state, step, RNG.

Never pickle: the optimizer's per-parameter tensors are stored as named tensors
(``optim.<index>.<key>``), its hyper-parameters and the step as JSON metadata.
The file is written atomically, so a process killed at any moment leaves the
previous complete checkpoint in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from minidiff_cli.errors import ModelFileError
from minidiff_cli.weights import FORMAT_VERSION, read_header, save_model_file

CHECKPOINT_FORMAT = "minidiff-checkpoint"


def save_checkpoint(path: str | os.PathLike, *, modules: dict[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer, step: int, train_config: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> Path:
    """``modules`` maps a prefix ("net", "ema") to a module whose state is saved under it."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value
    state = optimizer.state_dict()
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": state["param_groups"], "train": train_config, **(extra or {})}
    return save_model_file(path, tensors, meta, overwrite=True, format=CHECKPOINT_FORMAT)


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's metadata (step, training config, ...), without loading its tensors."""
    path = Path(path)
    metadata, _ = read_header(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"'{path}' is not a minidiff training checkpoint")
    try:
        version = int(metadata.get("format_version", "0") or 0)
        meta = json.loads(metadata["config"])
    except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ModelFileError(f"'{path}' is corrupt: {exc}") from None
    if version > FORMAT_VERSION:
        raise ModelFileError(f"'{path}' comes from a newer minidiff; upgrade minidiff to resume it")
    if not isinstance(meta, dict) or not isinstance(meta.get("train"), dict) or "step" not in meta:
        raise ModelFileError(f"'{path}' is corrupt: its metadata lacks the step or the training config")
    return meta


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint, after checking its framing and format."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"'{path}' is corrupt: {exc}") from None
    return meta, tensors


def restore(meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path, *,
            modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Load a checkpoint into live objects; returns the step to continue from."""
    for prefix, module in modules.items():
        part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelFileError(f"'{path}' does not match this model ({prefix}): {first}") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as exc:
        raise ModelFileError(f"'{path}' has an optimizer state that does not fit this model: {exc}") from None
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])

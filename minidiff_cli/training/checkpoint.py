"""Training checkpoints in safetensors: weights, EMA, optimizer state, step, RNG.

Never pickle: the optimizer's per-parameter tensors are stored as named tensors
(``optim.<index>.<key>``), its hyper-parameters and the step as JSON metadata, with the
list of the parameters that have a state (``optimizer_state``): a checkpoint that lacks
some of them is refused on resume, where AdamW would otherwise start those moments
again from zero without a word. The file is written atomically, so a process killed at
any moment leaves the previous complete checkpoint in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from minidiff_cli.errors import ModelFileError, first_line, is_count, is_finite_number
from minidiff_cli.files.model_file import FORMAT_VERSION, load_finite_tensors, read_header, save_model_file
from minidiff_cli.training.config import MAX_STEPS

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
    meta = {"step": step, "param_groups": state["param_groups"], "train": train_config,
            "optimizer_state": sorted(int(index) for index in state["state"]), **(extra or {})}
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
    except (KeyError, TypeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ModelFileError(f"'{path}' is corrupt: {first_line(exc, empty=type(exc).__name__)}") from None
    if version > FORMAT_VERSION:
        raise ModelFileError(f"'{path}' comes from a newer minidiff; upgrade minidiff to resume it")
    if not isinstance(meta, dict) or not isinstance(meta.get("train"), dict) or "step" not in meta:
        raise ModelFileError(f"'{path}' is corrupt: its metadata lacks the step or the training config")
    if not is_count(meta["step"]) or meta["step"] > MAX_STEPS:
        raise ModelFileError(f"'{path}' is corrupt: its step is {meta['step']!r:.40}, not a whole number "
                             f"from 0 to {MAX_STEPS:,}")
    if not isinstance(meta.get("param_groups"), list) or not all(isinstance(g, dict) for g in meta["param_groups"]):
        raise ModelFileError(f"'{path}' is corrupt: its optimizer settings are missing or not a list")
    held = meta.get("optimizer_state")
    if held is not None and (not isinstance(held, list) or not all(is_count(i) for i in held)):
        raise ModelFileError(f"'{path}' is corrupt: its list of optimizer states is not a list of parameter numbers")
    losses = meta.get("losses", [])
    if not isinstance(losses, list) or not all(_is_loss(x) for x in losses):
        raise ModelFileError(f"'{path}' is corrupt: its loss history is not a list of [step, loss] pairs")
    return meta


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint, after checking its framing and format."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    return meta, load_finite_tensors(path)


def restore(meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path, *,
            modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Load a checkpoint into live objects; returns the step to continue from.

    Everything is checked against the live objects before anything is loaded: the names,
    shapes and dtypes of the weights, the optimizer's per-parameter state and settings,
    the RNG state. A mismatch is a ModelFileError naming the file (and nothing was
    changed), never a crash later in training.
    """
    path = Path(path)
    known = tuple(f"{prefix}." for prefix in modules) + ("optim.", "rng.")
    stray = sorted(k for k in tensors if not k.startswith(known))
    if stray:
        raise ModelFileError(f"'{path}' does not match this model: unexpected tensor {stray[0]}")
    parts = {}
    for prefix, module in modules.items():
        parts[prefix] = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        _check_module(path, prefix, module, parts[prefix])
    state = _optimizer_state(path, tensors, optimizer)
    _check_complete(path, meta, state)
    groups = _param_groups(path, meta["param_groups"], optimizer)
    rng = tensors.get("rng.torch")
    if rng is not None and (rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape):
        raise ModelFileError(f"'{path}' is corrupt: its random-number state is not one torch can use")
    for prefix, module in modules.items():
        try:
            module.load_state_dict(parts[prefix], strict=True)
        except RuntimeError as exc:  # checked above; kept for modules with custom loading
            first = str(exc).strip().splitlines()[0]
            raise ModelFileError(f"'{path}' does not match this model ({prefix}): {first}") from None
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelFileError(f"'{path}' has an optimizer state that does not fit this model: "
                             f"{first_line(exc, empty=type(exc).__name__)}") from None
    if rng is not None:
        try:
            torch.set_rng_state(rng)
        except (RuntimeError, TypeError, ValueError):
            raise ModelFileError(f"'{path}' is corrupt: its random-number state is not one torch can use") from None
    return int(meta["step"])


def _check_module(path: Path, prefix: str, module: torch.nn.Module, part: dict[str, torch.Tensor]) -> None:
    """The stored tensors are exactly the module's: names, shapes and dtypes (load_state_dict would
    silently cast integers into float weights)."""
    live = module.state_dict()
    missing, extra = sorted(set(live) - set(part)), sorted(set(part) - set(live))
    if missing or extra:
        what = f"missing {prefix}.{missing[0]}" if missing else f"unexpected {prefix}.{extra[0]}"
        raise ModelFileError(f"'{path}' does not match this model: {what} "
                             f"({len(missing)} missing, {len(extra)} unexpected tensors)")
    for key, want in live.items():
        have = part[key]
        if have.shape != want.shape:
            raise ModelFileError(f"'{path}' does not match this model: {prefix}.{key} has shape "
                                 f"{tuple(have.shape)}, expected {tuple(want.shape)}")
        if have.dtype != want.dtype:
            raise ModelFileError(f"'{path}' does not match this model: {prefix}.{key} is stored as "
                                 f"{have.dtype}, expected {want.dtype}")


def _optimizer_state(path: Path, tensors: dict[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """``optim.<index>.<name>`` tensors as the optimizer's state, each checked against its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, index, name = (key.split(".", 2) + ["", ""])[:3]
        if not index.isdigit() or int(index) >= len(params) or not name:
            raise ModelFileError(f"'{path}' does not match this model: optimizer state {key} has no parameter")
        param = params[int(index)]
        if value.dim() != 0 and value.shape != param.shape:
            raise ModelFileError(f"'{path}' does not match this model: {key} has shape {tuple(value.shape)}, "
                                 f"its parameter {tuple(param.shape)}")
        if not (value.is_floating_point() or value.dim() == 0):
            raise ModelFileError(f"'{path}' is corrupt: {key} is stored as {value.dtype}")
        state.setdefault(int(index), {})[name] = value
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    needed = {"step", "exp_avg", "exp_avg_sq"} if adam else set()
    for index, entry in state.items():
        missing = sorted(needed - set(entry))
        if missing:
            raise ModelFileError(f"'{path}' is corrupt: optimizer state optim.{index} lacks {missing[0]}")
    return state


def _check_complete(path: Path, meta: dict[str, Any], state: dict[int, dict[str, torch.Tensor]]) -> None:
    """Every parameter state the saving run had is in the file. Without its list (a checkpoint from before
    minidiff wrote one), a checkpoint past step 0 must hold some optimizer state at least."""
    held = meta.get("optimizer_state")
    if held is None:
        if meta["step"] > 0 and not state:
            raise ModelFileError(f"'{path}' is corrupt: it lacks the optimizer state that resuming at step "
                                 f"{meta['step']} needs (AdamW's moments would start again from zero)")
        return
    missing, unlisted = sorted(set(held) - set(state)), sorted(set(state) - set(held))
    if missing:
        raise ModelFileError(f"'{path}' is corrupt: it lacks the optimizer state of parameter {missing[0]} "
                             f"({len(missing)} of the {len(set(held))} it lists are missing); resuming without "
                             "them would start their AdamW moments again from zero")
    if unlisted:
        raise ModelFileError(f"'{path}' is corrupt: it holds an optimizer state for parameter {unlisted[0]}, "
                             "which its own list does not name")


# How the live optimizer computes, not what it has learnt: these stay as the resuming run set
# them (a run saved with fused kernels may resume on a device or torch that has none).
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def _param_groups(path: Path, stored: list, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The stored optimizer settings, each of the type the live optimizer uses; unknown keys dropped."""
    live = optimizer.state_dict()["param_groups"]
    if len(stored) != len(live):
        raise ModelFileError(f"'{path}' has {len(stored)} optimizer parameter groups, this model {len(live)}")
    groups = []
    for have, want in zip(stored, live):
        if have.get("params") != want["params"]:
            raise ModelFileError(f"'{path}' has an optimizer state for other parameters than this model's")
        group = dict(want)
        for key, default in want.items():
            if key == "params" or key in IMPLEMENTATION_KEYS or key not in have:
                continue
            if not _same_kind(have[key], default) or not _in_range(key, have[key]):
                raise ModelFileError(f"'{path}' is corrupt: optimizer setting '{key}' is {have[key]!r:.40}")
            group[key] = tuple(have[key]) if isinstance(default, tuple) else have[key]
        groups.append(group)
    return groups


def _same_kind(value: Any, default: Any) -> bool:
    """``value`` (from JSON) can stand where the optimizer keeps ``default``."""
    if isinstance(default, bool) or default is None:
        return value is None or isinstance(value, bool)
    if isinstance(default, (int, float)):
        return is_finite_number(value)
    if isinstance(default, (tuple, list)):
        return isinstance(value, list) and len(value) == len(default) and all(is_finite_number(v) for v in value)
    if isinstance(default, str):
        return isinstance(value, str)
    return False


def _in_range(key: str, value: Any) -> bool:
    """The settings AdamW checks when it is built, checked again: JSON bypasses its constructor."""
    if key in ("lr", "eps", "weight_decay"):
        return value >= 0
    if key == "betas":
        return all(0 <= b < 1 for b in value)
    return True


def _is_loss(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 2 and is_count(item[0]) and is_finite_number(item[1])

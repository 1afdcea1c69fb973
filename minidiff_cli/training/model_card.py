"""What a trained model file says about itself: its schedule entry and its card (description, examples)."""

from __future__ import annotations

from typing import Any

from minidiff_cli.training.config import TrainConfig


def schedule_entry(cfg: TrainConfig) -> dict[str, Any]:
    """The model file's schedule: the flow schedule's shift, and zero terminal SNR only when asked for."""
    entry: dict[str, Any] = {"name": cfg.schedule, "num_timesteps": cfg.timesteps, "options": {}}
    if cfg.schedule == "flow":
        entry["options"]["shift"] = cfg.shift
    if cfg.zero_terminal_snr:
        entry["zero_terminal_snr"] = True
    return entry


def model_card(cfg: TrainConfig, captions: list[str] | None) -> dict[str, Any]:
    """What `info` and `models` say about a trained model: its description, example prompts, notice."""
    import hashlib

    examples = sorted((c for c in captions or [] if c), key=lambda c: hashlib.sha256(c.encode()).digest())[:6]
    card: dict[str, Any] = {"description": cfg.description or f"trained on {cfg.data}", "examples": examples}
    if cfg.notice:
        card["notice"] = cfg.notice
    return card

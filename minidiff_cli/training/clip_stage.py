"""Stage 1 of ``minidiff train --conditioner clip`` without a text encoder: train one on the data.

A user with a folder of captioned pictures should not have to know that a text-to-image
model needs a text encoder first. When ``--conditioner clip`` comes without
``--clip-weights`` (or an open_clip architecture), ``train`` first trains a small CLIP on
the same data, at the same image size, with the same holdout, into the run folder
(``clip.safetensors``, image tower included, so that ``eval`` can measure with it), then
trains the diffusion model on its frozen text tower.

The stage checkpoints itself (``clip.checkpoint.safetensors``), so ``--resume`` after a
crash continues it where it stopped; once ``clip.safetensors`` exists the stage is done
and is skipped. The CLIP's own settings come from ``clip_steps`` and the ``clip`` table
of the train config (any ``ClipRecipe`` field but those the diffusion stage shares).

With ``--log-with``, the stage logs to the run's tracker too: into ``clip/`` inside the run's log
folder, every tag under ``clip/``. A folder of its own, not the diffusion stage's event file or wandb
run: both stages count their steps from 1, and wandb drops a step lower than one it has seen (so it
would drop the diffusion stage's first ``clip_steps`` steps). ``tensorboard --logdir`` of the log
folder shows both, as two runs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.atomic import atomic_write, ensure_writable_dir

CLIP_FILE = "clip.safetensors"
# Shared with the diffusion stage, so not settable in the ``clip`` table.
SHARED = ("data", "image_size", "holdout", "seed", "device", "threads", "steps", "log_with", "log_dir")
CLIP_LOGS = "clip"  # the stage's tracker folder, inside the run's log folder


def needs_clip_stage(cfg) -> bool:
    """True when ``cfg`` asks for CLIP conditioning but names no text encoder."""
    return cfg.conditioner == "clip" and not (cfg.clip_weights or cfg.clip_arch or cfg.init_from)


def clip_path(out: str | Path) -> Path:
    return Path(out) / CLIP_FILE


def checkpoint_path(clip_file: Path) -> Path:
    """Where a CLIP being trained into ``clip_file`` keeps its checkpoint."""
    return clip_file.with_name(clip_file.name.replace(".safetensors", "") + ".checkpoint.safetensors")


def recipe_for(cfg):
    """The ClipRecipe of the run ``cfg`` (a TrainConfig): its data, size, holdout, seed and device."""
    from minidiff_cli.training.clip import ClipRecipe

    known = {f.name: f for f in dataclasses.fields(ClipRecipe)}
    for key, value in cfg.clip.items():
        if key not in known or key in SHARED:
            allowed = ", ".join(sorted(set(known) - set(SHARED)))
            raise MinidiffError(f"unknown key '{key}' in the clip table of the train config; known: {allowed}")
        default = known[key].default
        if type(value) is not type(default) and not (isinstance(default, float) and type(value) is int):
            raise MinidiffError(f"clip.{key} must be {type(default).__name__} like its default "
                                f"{default!r} (got {value!r:.40})")
    values = dict(cfg.clip)
    values.update(data=cfg.data, image_size=cfg.image_size, holdout=cfg.holdout, seed=cfg.seed,
                  device=cfg.device, threads=cfg.threads, steps=cfg.clip_steps, log_with=cfg.log_with,
                  log_dir=str(cfg.logs_folder() / CLIP_LOGS) if cfg.log_with != "none" else None)
    return ClipRecipe(**values).check()


def run_clip_stage(cfg, *, resume: bool, callback: Optional[Callable[[dict], None]] = None,
                   log: Callable[[str], None] = print) -> Path:
    """Train (or continue, or skip) the run's CLIP; returns the path of the finished file."""
    from minidiff_cli.clip.clip_file import save_clip
    from minidiff_cli.evaluation.clip import describe_accuracy, evaluate
    from minidiff_cli.training.clip import train_clip

    path = clip_path(cfg.out)
    if path.is_file():
        log(f"stage 1/2 (text encoder): done before, using {path}")
        return path
    recipe = recipe_for(cfg)
    checkpoint = checkpoint_path(path)
    if checkpoint.exists() and not resume:
        raise MinidiffError(f"'{checkpoint}' holds an unfinished text-encoder stage; pass --resume to continue "
                            "it or choose another --out")
    def announce(step: int) -> None:
        # The whole recipe, so that `train --out DIR --resume` can continue from here with no other flag.
        from minidiff_cli.training.trainer import RUN_CONFIG

        ensure_writable_dir(path.parent)
        atomic_write(path.parent / RUN_CONFIG, lambda p: p.write_text(json.dumps(cfg.to_dict(), indent=2)),
                     overwrite=True)
        start = f"from step {step} " if step else ""
        log(f"stage 1/2 (text encoder): training a CLIP on '{cfg.data}' {start}to step {recipe.steps} into {path}")

    model, summary = train_clip(recipe, callback=callback, checkpoint=checkpoint, on_start=announce,
                                name=f"{cfg.name or Path(cfg.out).name}-clip", tag_prefix=f"{CLIP_LOGS}/")
    accuracy = evaluate(model, recipe)
    ensure_writable_dir(path.parent)
    save_clip(path, model, recipe.model_config(), accuracy, summary)
    checkpoint.unlink(missing_ok=True)
    log(f"stage 1/2 (text encoder): saved {path}; {describe_accuracy(accuracy)}")
    return path

"""Watching a run: ``--log-with tensorboard|wandb|none`` and ``--log-dir``, for ``train``, ``clip train``, ``vae train``.

A tracker takes scalars (``log_scalars(step, {tag: value})``), images (``log_image(tag, step, path)``),
the run's recipe as hyperparameters (``log_hparams(config)``) and is closed at the end. Three kinds:

- ``none``: the default. ``NULL`` does nothing; trainers test ``tracker.active`` before they compute
  anything only a tracker wants (the gradient norm without --grad-clip), so it costs nothing per step.
- ``tensorboard``: torch's ``SummaryWriter`` event files in the log folder (``pip install
  "minidiff[tensorboard]"``); ``tensorboard --logdir DIR`` shows them. The recipe goes in as the
  hparams plugin's session (one table row per run) and as a JSON text.
- ``wandb``: only where the user installed it (minidiff does not depend on it); ``WANDB_MODE``
  (offline, disabled) and ``WANDB_PROJECT`` are wandb's own. A resumed run goes on in the same
  wandb run: its id is kept in the log folder.

The run's own record stays ``metrics.jsonl``: a tracker is a view. A resumed run logs the steps after
its last checkpoint again; TensorBoard then shows both, the record keeps the last.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

from minidiff_cli.errors import MinidiffError, first_line

KINDS = ("none", "tensorboard", "wandb")
LOGS = "logs"  # the default log folder inside a run folder


class Tracker:
    """The ``none`` tracker, and the interface of the others."""

    kind = "none"
    active = False

    def log_scalars(self, step: int, values: dict[str, Any]) -> None:
        pass

    def log_image(self, tag: str, step: int, path: str | os.PathLike) -> None:
        pass

    def log_hparams(self, config: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


NULL = Tracker()


def check_log_with(kind: Optional[str]) -> None:
    """Refuse, in one line and before anything is made, a kind that is unknown or not installed."""
    if kind is None or kind == "none":
        return
    if kind not in KINDS:
        raise MinidiffError(f"--log-with must be tensorboard, wandb or none (got {kind!r:.40})")
    if kind == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise MinidiffError('--log-with tensorboard needs the tensorboard package: pip install "minidiff[tensorboard]"')
    if kind == "wandb" and importlib.util.find_spec("wandb") is None:
        raise MinidiffError("--log-with wandb needs wandb, which is not installed: pip install wandb "
                            "(or use --log-with tensorboard)")


def watch_hint(kind: Optional[str], log_dir: str | os.PathLike) -> Optional[str]:
    """The line a run prints first about where to watch it; None for ``none``."""
    if kind == "tensorboard":
        return f"watch this run: tensorboard --logdir {log_dir}"
    if kind == "wandb":
        mode = os.environ.get("WANDB_MODE", "")
        return f"logging to wandb ({mode or 'online'}); its files in {log_dir}"
    return None


def open_tracker(kind: Optional[str], log_dir: str | os.PathLike, *, name: str,
                 config: dict[str, Any] | None = None) -> Tracker:
    """The tracker of ``kind`` writing into ``log_dir`` (made if missing), with ``config`` logged."""
    if kind is None or kind == "none":
        return NULL
    check_log_with(kind)
    from minidiff_cli.files.atomic import ensure_writable_dir

    folder = ensure_writable_dir(log_dir)
    tracker = TensorBoardTracker(folder) if kind == "tensorboard" else WandbTracker(folder, name, config)
    if config is not None:
        tracker.log_hparams(config)
    return tracker


def finite_scalars(values: dict[str, Any]) -> dict[str, float]:
    """The real, finite numbers of ``values`` as floats (None, NaN, text and bools left out)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def hparam_values(config: dict[str, Any]) -> dict[str, Any]:
    """A recipe flattened to what TensorBoard's hparams take: numbers, text and bools (the rest as JSON)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, (bool, int, float, str)) and not (isinstance(value, float) and not math.isfinite(value)):
            out[key] = value
        else:
            out[key] = json.dumps(value, sort_keys=True, default=str)[:500]
    return out


def read_picture(path: str | os.PathLike):
    """A PNG as an H x W x 3 uint8 array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class TensorBoardTracker(Tracker):
    kind, active = "tensorboard", True

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # an old or broken tensorboard
            raise MinidiffError(f"--log-with tensorboard could not load TensorBoard ({first_line(exc, 120)}); "
                                'pip install "minidiff[tensorboard]"') from None
        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=30)

    def log_scalars(self, step: int, values: dict[str, Any]) -> None:
        for tag, value in finite_scalars(values).items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, step: int, path: str | os.PathLike) -> None:
        self.writer.add_image(tag, read_picture(path), step, dataformats="HWC")

    def log_hparams(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Into this writer's own file (SummaryWriter.add_hparams would open another run folder per call).
        for summary in hparams(hparam_values(config), {"val/loss": 0.0, "train/loss_smoothed": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("recipe", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker(Tracker):
    kind, active = "wandb", True
    ID_FILE = "wandb-run-id"

    def __init__(self, folder: Path, name: str, config: dict[str, Any] | None):
        import wandb

        self.wandb = wandb
        id_file = folder / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        if not id_file.is_file():
            id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minidiff"), name=name, id=run_id,
                                  resume="allow", dir=str(folder), config=config or {})
        except Exception as exc:  # noqa: BLE001 (a login or network problem: one line, not wandb's traceback)
            raise MinidiffError(f"wandb could not start: {first_line(exc, 200, empty=type(exc).__name__)} "
                                "(WANDB_MODE=offline logs without an account)") from None

    def log_scalars(self, step: int, values: dict[str, Any]) -> None:
        self.run.log(finite_scalars(values), step=step)

    def log_image(self, tag: str, step: int, path: str | os.PathLike) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def log_hparams(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


def step_scalars(record: dict[str, Any]) -> dict[str, Any]:
    """A trainer's step record (loop.py's ``last``) under the tags trackers show."""
    names = {"loss": "train/loss", "smoothed": "train/loss_smoothed", "lr": "train/lr", "it_s": "train/steps_per_s",
             "grad_norm": "train/grad_norm", "val_loss": "val/loss"}
    values = {tag: record.get(key) for key, tag in names.items()}
    for key, value in (record.get("samples") or {}).items():
        values[f"eval/{key}"] = value
    return values


def log_record(tracker: Tracker, record: dict[str, Any], image_tag: str = "samples",
               extra: Callable[[dict[str, Any]], dict[str, Any]] | None = None, prefix: str = "") -> None:
    """A step record into ``tracker``: its scalars, and its grid (``samples`` or ``check``'s) as an image;
    every tag after ``prefix`` (``clip/``: the text-encoder stage of ``train``)."""
    if not tracker.active:
        return
    step = int(record["step"])
    values = step_scalars(record)
    if extra is not None:
        values.update(extra(record))
    tracker.log_scalars(step, {prefix + tag: value for tag, value in values.items()})
    for key in ("samples", "check"):
        grid = (record.get(key) or {}).get("grid")
        if grid and Path(grid).is_file():
            tracker.log_image(prefix + image_tag, step, grid)

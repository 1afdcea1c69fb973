"""The step loop every trainer shares (``train``, ``distill``): step, record, sample, log, save, report.

A job gives ``cfg`` (max_steps, sample_every, log_every, save_every), ``step``, ``losses``,
``auto_threads``, ``optimizer``, ``log``, ``out`` and ``train_step()``, ``sample_grid()``,
``save()``; under torchrun also ``main`` (only rank 0 writes and reports) and ``any_rank(flag)``
(ranks stop at the same step). SIGTERM or Ctrl-C finishes the step, saves and stops: the step
count is resumable. Optional: ``validation_loss()`` (measured at each sample step), ``grad_norm``
(the last step's, recorded at log steps), ``tracker`` (tracking.py: what metrics.jsonl records goes
there too), ``cfg.sample_prompts`` (then a fresh run draws its first grid at step 0) and
``loss_hint`` (what the error line of a non-finite loss advises).

``train_step()`` returns the step's loss as a float, or (the trainer on CUDA) as a tensor still on
the device: reading it there would make the host wait for the GPU at every step. Such losses wait
in ``PendingLosses`` and are read, all at once, and checked at the steps that need them (log,
sample, save, the end, a stop), so no checkpoint is written without its losses checked first.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.atomic import append_line, atomic_write, ensure_writable_dir
from minidiff_cli.runtime.signals import stop_signals
from minidiff_cli.training.tracking import NULL, log_record

METRICS = "metrics.jsonl"
MAX_PENDING = 500  # losses left on the device at most: a sync per 500 steps costs nothing, and memory stays bounded


def run_steps(job, progress: Callable[[dict], None] | None = None,
              after_sample: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train ``job`` to ``cfg.max_steps``; returns the last step's record."""
    cfg, main = job.cfg, getattr(job, "main", True)
    any_rank = getattr(job, "any_rank", lambda flag: flag)
    start_step, start_time = job.step, time.time()
    tracker = getattr(job, "tracker", NULL) if main else NULL
    last: dict[str, Any] = {}
    pending = PendingLosses(job.losses, getattr(job, "loss_hint", "lower --lr"))
    with stop_signals(job.log if main else None) as stop_asked:
        try:
            if job.step == 0 and getattr(cfg, "sample_prompts", None):  # what the untrained weights draw
                first = {"step": 0, **_sample_step(job, after_sample)}
                if main:
                    append_metrics(job.out, first)
                    log_record(tracker, first)
                    if progress is not None:
                        progress(first)
            while job.step < cfg.max_steps:
                job.auto_threads.tick()
                pending.add(job.step + 1, job.train_step())  # job.step counts the step once it is done
                if _needs_losses(job.step, cfg) or len(pending) >= MAX_PENDING:
                    pending.settle()
                last = {"step": job.step, "loss": pending.loss_at(job.step), "smoothed": smoothed(job.losses),
                        "lr": job.optimizer.param_groups[0]["lr"],
                        "it_s": (job.step - start_step) / max(1e-9, time.time() - start_time)}
                if job.step % cfg.sample_every == 0 or job.step == cfg.max_steps:
                    last.update(_sample_step(job, after_sample))
                if main and (job.step % cfg.log_every == 0 or "samples" in last):
                    norm = getattr(job, "grad_norm", None)
                    if norm is not None:
                        last["grad_norm"] = float(norm)
                    append_metrics(job.out, last)  # before the save: a checkpoint's own step is logged
                    log_record(tracker, last)
                if job.step % cfg.save_every == 0 or job.step == cfg.max_steps:
                    job.save()
                if progress is not None and main:
                    progress(last)
                if job.step < cfg.max_steps and any_rank(stop_asked()):
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            pending.settle()  # a non-finite loss stops here instead: the last good checkpoint stays
            job.save()  # nothing lost: the interrupted step count is resumable
            raise
    return last


def _needs_losses(step: int, cfg) -> bool:
    """Whether step ``step`` logs, samples, saves or ends the run: then its losses must be floats, checked."""
    return (step % cfg.log_every == 0 or step % cfg.sample_every == 0 or step % cfg.save_every == 0
            or step == cfg.max_steps)


class PendingLosses:
    """The losses of steps done, appended to the run's ``losses`` as floats; those still on a device wait.

    A float from ``train_step`` (the CPU, distill) goes straight in, as it always did. A tensor stays
    where it is until ``settle()``, which reads every waiting loss in one transfer (one wait for the
    GPU instead of one per step), then checks them in step order. A NaN or infinite loss raises the
    error ``train_step`` raises on the CPU, naming the step where it happened: the run has trained on
    past it, but it stops before anything of those steps is saved.
    """

    def __init__(self, losses: list, hint: str):
        self.losses, self.hint = losses, hint
        self.waiting: list[tuple[int, Any]] = []

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, step: int, loss) -> None:
        if hasattr(loss, "detach"):  # a tensor: read later
            self.waiting.append((step, loss.detach()))
        else:
            self.losses.append((step, loss))

    def settle(self) -> None:
        if not self.waiting:
            return
        import torch

        steps = [step for step, _ in self.waiting]
        values = torch.stack([loss.float() for _, loss in self.waiting]).tolist()  # the one wait for the GPU
        self.waiting = []
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise loss_error(value, step - 1, self.hint)  # train_step counts from the step before it
            self.losses.append((step, value))

    def loss_at(self, step: int) -> float | None:
        """The loss of ``step`` if it has been read; None while it waits on the device."""
        return self.losses[-1][1] if self.losses and self.losses[-1][0] == step and not self.waiting else None


def loss_error(value: float, step: int, hint: str) -> MinidiffError:
    """The one line a NaN or infinite loss stops a run with, whether it was seen at once or later."""
    return MinidiffError(f"the loss became {value} at step {step}; {hint}")


def _sample_step(job, after_sample: Callable[[], None] | None) -> dict[str, Any]:
    """The sample grid and, where the job measures one, the validation loss."""
    out: dict[str, Any] = {"samples": job.sample_grid()}
    validation = getattr(job, "validation_loss", None)
    value = validation() if validation is not None else None
    if value is not None:
        out["val_loss"] = value
    if after_sample is not None:
        after_sample()
    return out


def smoothed(losses: list[tuple[int, float]], window: int = 100) -> float | None:
    """The mean of the last ``window`` losses (None before the first)."""
    recent = [loss for _, loss in losses[-window:]]
    return sum(recent) / len(recent) if recent else None


def append_metrics(out, record: dict[str, Any]) -> None:
    """One JSON line of ``record`` in the run's metrics.jsonl (absent and NaN values left out)."""
    values = {k: v for k, v in record.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    append_line(ensure_writable_dir(out) / METRICS, json.dumps(values))


def forget_metrics_after(out, step: int) -> None:
    """A run killed after its last checkpoint logged steps that it will now redo: drop those lines."""
    path = out / METRICS
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _record_step(line) <= step]
    if len(keep) != len(lines):
        atomic_write(path, lambda p: p.write_text("".join(keep)))


def _record_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by the kill

"""``minidiff distill``: a student of a trained model that draws in one to four steps; resumable."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.cli.options import threads_option
from minidiff_cli.errors import MinidiffError, ModelFileError


@app.command("distill")
def distill_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", autocompletion=completion.models,
                                        help="The teacher: a model name or .safetensors file [default: shapes-clip]."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder; the student is OUT/model.safetensors "
                                      "[default: runs/distill]."),
    method: Optional[str] = typer.Option(None, "--method", help="lcm: consistency distillation from the teacher's "
                                         "guided steps; mcm: multistep consistency distillation, drawn by DDIM at "
                                         "exactly --steps; lct: consistency training, no teacher calls, no guidance "
                                         "folded in [default: lcm]."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps the student is made for; `generate` "
                                        "defaults to them [default: 4]."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="The teacher's cfg folded into the student, "
                                             "which then runs once per step [default: 3]."),
    data: Optional[str] = typer.Option(None, "--data", autocompletion=completion.datasets,
                                       help="Images to distill on [default: what the teacher was trained on]."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Left out of distillation [default: the teacher's]."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Distillation steps [default: 1000]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step [default: 32]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of the adapter [default: 1e-3]."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warm-up steps [default: 50]."),
    lr_decay_steps: Optional[int] = typer.Option(None, "--lr-decay-steps", help="Length of the cosine decay to 10% "
                                                 "of --lr; fixed for the run, even if resumed with more steps "
                                                 "[default: --max-steps]."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank of the low-rank adapter [default: 16]."),
    solver_steps: Optional[int] = typer.Option(None, "--solver-steps", help="The teacher's DDIM grid that "
                                               "consistency steps skip along [default: 50]."),
    gain_cap: Optional[float] = typer.Option(None, "--gain-cap", help="Weight of the x0 error at t: min(1, G "
                                             "sqrt(alpha_bar_t)); 1 counts it as x_t carries it, larger values "
                                             "count the noisiest steps more (what 1- and 2-step students need) "
                                             "[default: 1]."),
    target_ema: Optional[float] = typer.Option(None, "--target-ema", help="Compute the consistency targets with an "
                                               "average of the adapter's weights that moves by 1 - MU a step "
                                               "(0.95 steadied mcm); 0: the live weights [default: 0]."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint and student file every N steps "
                                             "[default: 250]."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Student samples every N steps "
                                               "[default: 250]."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Metrics record every N steps [default: 25]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the data order, timesteps and noise [default: 0]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or mps [default: auto]."),
    threads: Optional[int] = threads_option(),
    quiet: Optional[bool] = typer.Option(None, "--quiet", "-q", help="Log lines instead of a live display."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name stored in the file [default: the run folder's name]."),
) -> None:
    """Distill a trained model into a student that draws in a few steps (latent consistency distillation
    with a low-rank adapter: the student file is small and names its teacher by hash).

    Examples:

      minidiff distill --model shapes-clip --out runs/shapes-fast --max-steps 1000

      minidiff generate "a red circle" --model runs/shapes-fast

      minidiff distill --out runs/shapes-fast --resume --max-steps 2000
    """
    from minidiff_cli.training.distill import DistillConfig

    flags = {"teacher": model, "method": method, "out": out, "steps": steps, "guidance": guidance, "data": data, "holdout": holdout,
             "max_steps": max_steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
             "lr_decay_steps": lr_decay_steps, "rank": rank,
             "solver_steps": solver_steps, "gain_cap": gain_cap, "target_ema": target_ema,
             "save_every": save_every, "sample_every": sample_every,
             "log_every": log_every, "seed": seed, "device": device, "threads": threads, "quiet": quiet, "name": name}
    given = {k: v for k, v in flags.items() if v is not None}
    cfg = _resumed(given) if resume else DistillConfig(**given).validate()
    _distill(cfg, resume)


def _resumed(given: dict):
    """The recipe stored in the run's checkpoint, with the values given now (if they may change)."""
    from minidiff_cli.training.checkpoint import read_checkpoint_meta
    from minidiff_cli.training.distill import DistillConfig, check_resume_flags
    from minidiff_cli.training.run_folder import CHECKPOINT

    path = Path(given.get("out", DistillConfig.out)) / CHECKPOINT
    if not path.is_file():
        raise MinidiffError(f"nothing to resume: '{path}' does not exist")
    try:
        stored = DistillConfig.from_dict(read_checkpoint_meta(path)["train"])
    except ModelFileError:
        raise
    except (MinidiffError, TypeError) as exc:
        raise ModelFileError(f"'{path}' holds a distillation recipe this minidiff cannot use: {exc}") from None
    return check_resume_flags(stored, given)


def _distill(cfg, resume: bool) -> None:
    """One run at a time in a folder that is this run's (see training/run_folder.py)."""
    from minidiff_cli.training.run_folder import check_contents, locked

    out = Path(cfg.out)
    check_contents(out, resume)  # before the lock, so that a refused run does not touch the folder at all
    with locked(out):
        check_contents(out, resume)
        _distill_locked(cfg, resume)


def _distill_locked(cfg, resume: bool) -> None:
    from minidiff_cli.cli.display import loss_progress
    from minidiff_cli.training.distill import Distiller

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    distiller = Distiller(cfg, resume=resume, log=log)
    print(f"distilling '{distiller.teacher_path}' on {distiller.device} into a {cfg.steps}-step student "
          f"(rank {cfg.rank} adapter, {sum(p.numel() for p in distiller.optimizer.param_groups[0]['params']):,} "
          f"parameters, guidance {cfg.guidance:g} folded in), from step {distiller.step} to {cfg.max_steps}; "
          f"files in {cfg.out}", file=sys.stderr)
    try:
        with loss_progress(cfg.max_steps, bool(cfg.quiet), label="distill", log_every=cfg.log_every) as report:
            last = distiller.run(progress=_with_samples(report, log))
    except KeyboardInterrupt:
        print(f"interrupted at step {distiller.step}; saved. Continue with: minidiff distill --out {cfg.out} --resume",
              file=sys.stderr)
        sys.exit(130)
    loss = last.get("smoothed")
    student = Path(cfg.out) / "model.safetensors"
    print(f"done: step {distiller.step}, loss {loss:.4f}; student: {student}" if loss is not None
          else f"done; student: {student}")


def _with_samples(report, log):
    def progress(info: dict) -> None:
        report(info)
        samples = info.get("samples")
        if samples:
            extra = "".join(f"  {k} {v:.2f}" for k, v in samples.items() if isinstance(v, float))
            log(f"step {info['step']}: samples {samples['grid']}{extra}")
    return progress

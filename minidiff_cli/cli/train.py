"""``minidiff train``: train a model on shapes or a folder of images; resumable."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.cli.options import int_list, threads_option
from minidiff_cli.errors import MinidiffError

LIST_FLAGS = ("channel_mult", "attention_resolutions", "cross_attention_resolutions")


@app.command("train")
def train_command(
    data: Optional[str] = typer.Option(None, "--data", autocompletion=completion.datasets, help="'shapes' (built in) or a folder of images [default: shapes]."),
    conditioner: Optional[str] = typer.Option(None, "--conditioner", autocompletion=completion.conditioners, help="none, class or clip [default: class]."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Training resolution [default: 32]."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Total optimizer steps [default: 2000]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size [default: 64]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate [default: 2e-4]."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warm-up steps [default: 500]."),
    lr_decay_steps: Optional[int] = typer.Option(None, "--lr-decay-steps", help="Length of the cosine decay to 10% of "
                                                 "--lr; fixed for the run, even if resumed with more steps "
                                                 "[default: --max-steps]."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="EMA decay of the exported weights [default: 0.999]."),
    cfg_dropout: Optional[float] = typer.Option(None, "--cfg-dropout", help="Fraction of rows trained without a condition [default: 0.1]."),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="no, bf16 or fp16 [default: no]."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="Run the network through "
                                           "torch.compile: for GPUs, where small steps wait on kernel launches; "
                                           "costs a compile of about a minute before the first step [default: off]."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint and model file every N steps [default: 500]."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Sample grid every N steps [default: 500]."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder [default: runs/train]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of weights, data order and noise [default: 0]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or mps [default: auto]."),
    threads: Optional[int] = threads_option(),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file with any of these flags (flags given win)."),
    quiet: Optional[bool] = typer.Option(None, "--quiet", "-q", help="Log lines instead of a live display."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Log line / metrics record every N steps [default: 50]."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Colour-shape pairs to leave out, e.g. \"purple triangle,orange square\"."),
    prediction: Optional[str] = typer.Option(None, "--prediction", help="eps, v or flow (rectified flow's velocity, "
                                             "as Flux and SD3 train) [default: eps]."),
    min_snr_gamma: Optional[float] = typer.Option(None, "--min-snr-gamma", help="Min-SNR loss weighting, 0 is off [default: 0]."),
    timestep_sampling: Optional[str] = typer.Option(None, "--timestep-sampling", help="Training timesteps: uniform "
                                                    "or logit-normal (SD3) [default: logit-normal for flow, else uniform]."),
    logit_mean: Optional[float] = typer.Option(None, "--logit-mean", help="Logit-normal mean m [default: 0]."),
    logit_std: Optional[float] = typer.Option(None, "--logit-std", help="Logit-normal spread s [default: 1]."),
    shift: Optional[float] = typer.Option(None, "--shift", help="The flow schedule's timestep shift (SD3/Flux); "
                                          "above 1 spends more steps at high noise [default: 1]."),
    zero_terminal_snr: Optional[bool] = typer.Option(None, "--zero-terminal-snr", help="Rescale the schedule to end "
                                                     "at zero SNR (Lin et al. 2023); needs --prediction v or flow."),
    schedule: Optional[str] = typer.Option(None, "--schedule", autocompletion=completion.schedules, help="Noise schedule "
                                           "[default: flow for --prediction flow, else cosine]."),
    timesteps: Optional[int] = typer.Option(None, "--timesteps", help="Diffusion timesteps T [default: 1000]."),
    base_channels: Optional[int] = typer.Option(None, "--base-channels", help="U-Net width at full resolution [default: 64]."),
    channel_mult: Optional[str] = typer.Option(None, "--channel-mult", help="Width multipliers per level [default: 1,2,2]."),
    num_res_blocks: Optional[int] = typer.Option(None, "--num-res-blocks", help="ResBlocks per level [default: 1]."),
    attention_resolutions: Optional[str] = typer.Option(None, "--attention-resolutions", help="Self-attention at these feature-map sizes [default: the lowest, e.g. 8 at --image-size 32]."),
    cross_attention_resolutions: Optional[str] = typer.Option(None, "--cross-attention-resolutions", help="Cross-attention at these sizes [default: the lowest]."),
    clip_weights: Optional[str] = typer.Option(None, "--clip-weights", help="Text encoder file (from `minidiff clip train`); "
                                               "without it, --conditioner clip first trains one on --data."),
    clip_steps: Optional[int] = typer.Option(None, "--clip-steps", help="Steps of that first stage, when it runs [default: 2000]."),
    clip_arch: Optional[str] = typer.Option(None, "--clip-arch", help="open_clip architecture, with --clip-pretrained."),
    clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", help="open_clip pretrained tag or local weights file."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from a model file's weights (fine-tuning)."),
    vae: Optional[str] = typer.Option(None, "--vae", help="A VAE file (`minidiff vae train`): train a latent model, "
                                      "whose U-Net works on the VAE's latents; the model file holds the VAE."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name stored in the file [default: the run folder's name]."),
    sample_prompts: Optional[Path] = typer.Option(None, "--sample-prompts", help="A prompts file (`generate --prompts`' "
                                                  "format: a prompt a line, or JSON with seed, steps, cfg, negative, n) "
                                                  "drawn at step 0 and every --sample-every [default: a spread of the "
                                                  "data's classes or captions, from the first --sample-every]."),
    log_with: Optional[str] = typer.Option(None, "--log-with", help="Also log to tensorboard or wandb (installed "
                                           "apart), or none; metrics.jsonl is written anyway [default: none]."),
    log_dir: Optional[str] = typer.Option(None, "--log-dir", help="Where --log-with writes [default: OUT/logs]."),
) -> None:
    """Train a diffusion model; files land in --out, and Ctrl-C saves before stopping.

    Examples:

      minidiff train --data shapes --conditioner class --max-steps 2000 --out runs/shapes

      minidiff train --data ./my_images --image-size 64 --out runs/mine

      minidiff train --data ./my_images --image-size 64 --vae vae.safetensors --out runs/latent

      minidiff train --out runs/shapes --resume --max-steps 4000

      minidiff train --data shapes --log-with tensorboard --sample-prompts prompts.txt --out runs/watched

      torchrun --nproc-per-node 2 -m minidiff_cli train --data shapes --out runs/ddp
    """
    flags = {k: v for k, v in locals().items() if k not in ("config", "resume")}
    for key in LIST_FLAGS:
        if flags[key] is not None:
            flags[key] = int_list(flags[key], key)
    if sample_prompts is not None:  # read and checked now: a bad file is refused before anything is made
        from minidiff_cli.training.sample_prompts import read_sample_prompts

        flags["sample_prompts"] = read_sample_prompts(sample_prompts)
    from minidiff_cli.training.config import load_toml, merge
    from minidiff_cli.training.tracking import check_log_with

    cfg = merge(flags, config)
    if resume:
        given = {k for k, v in flags.items() if v is not None}
        given |= {k.replace("-", "_") for k in (load_toml(config) if config else {})}
        cfg = _text_stage_config(cfg, given) or _resumed_config(cfg, given)
    check_log_with(cfg.log_with)  # the one a resumed run keeps too: installed, before the folder is touched
    _train(cfg, resume)


def _text_stage_config(cfg, given: set[str]):
    """The recipe of a run that stopped in (or right after) stage 1, before any diffusion checkpoint:
    the one it stored at the start of stage 1, with the values given now; None for any other run."""
    import json

    from minidiff_cli.training.clip_stage import needs_clip_stage
    from minidiff_cli.training.config import TrainConfig, check_resume_flags
    from minidiff_cli.training.trainer import CHECKPOINT, RUN_CONFIG

    out = Path(cfg.out)
    if (out / CHECKPOINT).is_file():
        return None
    stored_file = out / RUN_CONFIG
    if not stored_file.is_file():
        return cfg if needs_clip_stage(cfg) else None  # every setting given again, as on the first run
    try:
        stored = TrainConfig.from_dict(json.loads(stored_file.read_text(encoding="utf-8")), where=str(stored_file))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MinidiffError(f"'{stored_file}' is not a readable training config: {str(exc)[:80]}") from None
    if not needs_clip_stage(stored):
        return None
    return check_resume_flags(stored, {k: v for k, v in cfg.to_dict().items() if k in given})


def _resumed_config(cfg, given: set[str]):
    """The recipe stored in the run's checkpoint, with the values given now (if they may change)."""
    from minidiff_cli.training.checkpoint import read_checkpoint_meta
    from minidiff_cli.training.config import TrainConfig, check_resume_flags
    from minidiff_cli.training.trainer import CHECKPOINT

    # The checkpoint, not train_config.json, is the truth: a run killed between the two writes
    # must still resume from its last complete checkpoint.
    path = Path(cfg.out) / CHECKPOINT
    if not path.is_file():
        raise MinidiffError(f"nothing to resume: '{path}' does not exist")
    from minidiff_cli.errors import ModelFileError

    try:
        stored = TrainConfig.from_dict(read_checkpoint_meta(path)["train"], where=str(path))
    except ModelFileError:
        raise
    except MinidiffError as exc:  # a checkpoint whose recipe is damaged or from another version
        raise ModelFileError(f"'{path}' holds a training config this minidiff cannot use: {exc}") from None
    return check_resume_flags(stored, {k: v for k, v in cfg.to_dict().items() if k in given})


def _train(cfg, resume: bool) -> None:
    """One run at a time in a folder that is this run's (see training/run_folder.py)."""
    import os

    from minidiff_cli.training.clip_stage import needs_clip_stage
    from minidiff_cli.training.run_folder import CHECKPOINT, check_contents, locked

    out, stages = Path(cfg.out), needs_clip_stage(cfg)
    # A run still in its first stage (the CLIP) has no checkpoint to resume yet.
    check = lambda: check_contents(out, resume and (not stages or (out / CHECKPOINT).is_file()))  # noqa: E731
    check()  # before the lock, so that a refused run does not touch the folder at all
    with locked(out, main=int(os.environ.get("RANK", "0")) == 0):
        check()  # again: another run may have finished into it meanwhile
        _train_locked(cfg, resume, stages)


def _train_locked(cfg, resume: bool, stages: bool) -> None:
    import os

    from minidiff_cli.training.tracking import watch_hint
    from minidiff_cli.training.trainer import CHECKPOINT, Trainer

    hint = watch_hint(cfg.log_with, cfg.logs_folder()) if int(os.environ.get("RANK", "0")) == 0 else None
    if stages:
        if hint:  # first: the text encoder's stage logs there too (under clip/)
            print(hint, file=sys.stderr)
            hint = None
        cfg = dataclasses.replace(cfg, clip_weights=str(_text_stage(cfg, resume)))
        resume = resume and (Path(cfg.out) / CHECKPOINT).is_file()
    trainer = Trainer(cfg, resume=resume, log=lambda msg: print(msg, file=sys.stderr))
    trainer.stage_label = "stage 2/2: diffusion" if stages else "training"
    main = trainer.dist.main
    if main:
        world = trainer.dist.world
        print(f"training on {trainer.device} x{world}, global batch {cfg.batch_size} "
              f"({cfg.batch_size // world} per process), {trainer.model.unet.num_parameters() / 1e6:.2f} M U-Net "
              f"parameters, from step {trainer.step} to {cfg.max_steps}; files in {cfg.out}", file=sys.stderr)
        from minidiff_cli.training.optim import warmup_note

        note = warmup_note(trainer.cfg)  # the trainer's: its schedule length is fixed by then
        if note:
            print(f"minidiff: note: {note}", file=sys.stderr)
        if hint:
            print(hint, file=sys.stderr)
    try:
        if cfg.quiet or not main or not sys.stderr.isatty():  # a live bar only on a terminal; lines elsewhere
            last = trainer.run(progress=_log_lines(cfg.log_every, cfg.max_steps) if main else None)
        else:
            last = _run_with_display(trainer)
    except KeyboardInterrupt:
        if main:
            print(f"interrupted at step {trainer.step}; saved. Continue with: minidiff train --out {cfg.out} --resume",
                  file=sys.stderr)
        sys.exit(130)
    if main:
        loss = last.get("smoothed")
        print(f"done: step {trainer.step}, loss {loss:.4f}; model: {Path(cfg.out) / 'model.safetensors'}"
              if loss is not None else f"done; model: {Path(cfg.out) / 'model.safetensors'}")


def _text_stage(cfg, resume: bool) -> Path:
    """Stage 1: the run's own CLIP, trained (or continued, or found done) in --out."""
    import os

    from minidiff_cli.training.clip_stage import clip_path, run_clip_stage

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not clip_path(cfg.out).is_file():
        raise MinidiffError("the text-encoder stage runs in one process: run `minidiff train` once without "
                            "torchrun (it stops after stage 1 with Ctrl-C), or pass --clip-weights")
    from minidiff_cli.cli.display import loss_progress

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    try:
        with loss_progress(cfg.clip_steps, bool(cfg.quiet) or not sys.stderr.isatty(), label="stage 1/2: text encoder",
                           log_every=cfg.log_every) as report:
            return run_clip_stage(cfg, resume=resume, callback=report, log=log)
    except KeyboardInterrupt:
        print(f"interrupted in stage 1 (text encoder); saved. Continue with: minidiff train --out {cfg.out} "
              "--resume (--clip-steps N to change its length)", file=sys.stderr)
        sys.exit(130)


def _log_lines(every: int, total: int | None = None, first_after: float = 5.0):
    """Progress as lines on stderr (no terminal, or --quiet): one every ``every`` steps, and once, at
    the first step after ``first_after`` seconds (or the first logged one), how long the rest will take."""
    import time

    started, told = time.monotonic(), []

    def log(info: dict) -> None:
        step = info["step"]
        if "samples" in info:
            print(samples_line(info), file=sys.stderr, flush=True)
        if "loss" not in info:  # step 0's grid, before any training
            return
        if total is not None and not told and (time.monotonic() - started >= first_after or step % every == 0
                                               or step >= total):
            told.append(True)
            if info["it_s"] > 0 and step < total:
                print(f"step {step} of {total}: about {_duration((total - step) / info['it_s'])} to go at "
                      f"{info['it_s']:.2f} it/s", file=sys.stderr, flush=True)
        if step % every == 0:
            print(f"step {step} loss {info['smoothed']:.4f} lr {info['lr']:.2e} {info['it_s']:.2f} it/s",
                  file=sys.stderr, flush=True)
    return log


def samples_line(info: dict) -> str:
    """"step 500: samples runs/x/samples/step-0000500.png  val_loss 0.0812  adherence_seen 0.75"."""
    s = info.get("samples") or {}
    values = {"val_loss": info.get("val_loss"), **s}
    extra = "".join(f"  {k} {v:.4f}" if k == "val_loss" else f"  {k} {v:.2f}"
                    for k, v in values.items() if isinstance(v, float))
    return f"step {info['step']}: samples {s.get('grid', '-')}{extra}"


def _preview(console, grid: str) -> None:
    """The sample grid drawn in the terminal under the progress bar (colour terminals only)."""
    import os

    if os.environ.get("NO_COLOR") or os.environ.get("TERM", "").lower() == "dumb":
        return
    from PIL import Image

    from minidiff_cli.cli.display import image_to_text

    with Image.open(grid) as image:
        console.print(image_to_text(image, max_width=max(16, min(console.width, 96))))


def _duration(seconds: float) -> str:
    """'40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _run_with_display(trainer) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from minidiff_cli.cli.display import stderr_console

    columns = [TextColumn(getattr(trainer, "stage_label", "training")), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]}"),
               TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=stderr_console()) as progress:
        task = progress.add_task("train", total=trainer.cfg.max_steps, completed=trainer.step,
                                 loss="-", lr="-", speed="")

        def update(info: dict) -> None:
            if "loss" in info:  # not step 0's grid, drawn before training
                smoothed = info["smoothed"]  # None until a GPU run's first losses are read (loop.PendingLosses)
                progress.update(task, completed=info["step"], loss="-" if smoothed is None else f"{smoothed:.4f}",
                                lr=f"{info['lr']:.2e}", speed=f"{info['it_s']:.2f} it/s")
            if info.get("samples"):
                progress.console.print(samples_line(info))
                if info["samples"].get("grid"):
                    _preview(progress.console, info["samples"]["grid"])

        return trainer.run(progress=update)

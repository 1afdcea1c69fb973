"""``minidiff clip``: train a small CLIP whose text encoder the ``clip`` conditioner uses.

torch and open_clip are imported inside the commands, so ``minidiff --help``
does not pay for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.cli.display import loss_progress
from minidiff_cli.cli.options import threads_option
from minidiff_cli.errors import MinidiffError

clip_app = typer.Typer(
    help="Train a small CLIP (open_clip) for text-to-image conditioning, with no downloads.\n\n"
         "Example:\n\n"
         "  minidiff clip train --data shapes --out shapes-clip.safetensors\n\n"
         "  minidiff train --conditioner clip --clip-weights shapes-clip.safetensors",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(clip_app, name="clip")


@clip_app.command("train")
def train_command(
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors file to write (never overwritten)."),
    data: str = typer.Option("shapes", "--data", autocompletion=completion.datasets, help="Data set with captions (a registered name)."),
    steps: int = typer.Option(1200, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(64, "--batch-size", help="Image-caption pairs per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW; warm-up, then cosine decay)."),
    warmup: int = typer.Option(50, "--warmup", help="Linear warm-up steps."),
    width: int = typer.Option(64, "--width", help="Text transformer width (the file holds 49408 x width "
                                                  "token embeddings)."),
    layers: int = typer.Option(2, "--layers", help="Text transformer layers."),
    heads: int = typer.Option(4, "--heads", help="Text attention heads."),
    context_length: int = typer.Option(16, "--context-length", help="Tokens per caption, start/end included."),
    embed_dim: int = typer.Option(64, "--embed-dim", help="Size of the shared image-text embedding."),
    vision: str = typer.Option("resnet", "--vision", help="Image tower: resnet or vit."),
    vision_width: int = typer.Option(16, "--vision-width", help="Image tower width."),
    vision_layers: int = typer.Option(1, "--vision-layers", help="ViT blocks, or ResNet blocks per stage."),
    patch_size: int = typer.Option(8, "--patch-size", help="ViT patch size."),
    holdout: Optional[str] = typer.Option(None, "--holdout",
                                          help="Left out of training: colour-shape pairs (shapes), or a share of "
                                               "a folder's captions such as 5%; '' for none [default: purple "
                                               "triangle,orange square on shapes, none on a folder]."),
    image_size: int = typer.Option(32, "--image-size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed for weights and data order."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = threads_option(),
    save_vision: bool = typer.Option(True, "--save-vision/--no-save-vision",
                                     help="Also store the image tower (needed by `minidiff clip eval`)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint next to --out "
                                                        "(OUT.checkpoint.safetensors) after a crash or Ctrl-C."),
    val_every: int = typer.Option(100, "--val-every", help="Validation loss (contrastive, on held-out pairs) every "
                                                           "N steps and at the end."),
    log_with: Optional[str] = typer.Option(None, "--log-with", help="Also log to tensorboard or wandb (installed "
                                           "apart), or none [default: none; on --resume, the run's choice]."),
    log_dir: Optional[str] = typer.Option(None, "--log-dir", help="Where --log-with writes [default: OUT's name "
                                          "with -logs, beside it]."),
) -> None:
    """Train a CLIP on image-caption pairs and save it, with its evaluation.

    Held-out captions are left out of training. On a folder, the evaluation ranks every
    caption of the folder for each image (top-1 / top-5 retrieval); on shapes, the
    captions "a {colour} {shape}" of every class for fresh images. Seen and held-out
    captions are reported apart. A checkpoint is kept next to --out while training.

    Examples:

      minidiff clip train --data shapes --out shapes-clip.safetensors --threads 1

      minidiff clip train --data ./my_images --holdout 5% --out my-clip.safetensors

      minidiff clip train --data shapes --log-with tensorboard --out shapes-clip.safetensors
    """
    if out.exists() and not overwrite:  # before minutes of training (and seconds of imports), not after
        raise MinidiffError(f"'{out}' already exists; choose another name, or pass --overwrite")
    from minidiff_cli.clip.clip_file import save_clip
    from minidiff_cli.evaluation.clip import describe_accuracy, evaluate
    from minidiff_cli.training.clip import ClipRecipe, default_holdout, train_clip
    from minidiff_cli.training.clip_stage import checkpoint_path
    from minidiff_cli.training.tracking import watch_hint

    if holdout is None:
        holdout = default_holdout(data)
    checkpoint = checkpoint_path(out)
    log_with, log_dir = _logging(log_with, log_dir, out, checkpoint if resume else None)

    recipe = ClipRecipe(data=data, image_size=image_size, holdout=holdout, steps=steps, batch_size=batch_size,
                        lr=lr, warmup=warmup, width=width, heads=heads, layers=layers,
                        context_length=context_length, embed_dim=embed_dim, vision=vision,
                        vision_width=vision_width, vision_layers=vision_layers, patch_size=patch_size,
                        seed=seed, device=device, threads=threads or 0, val_every=val_every,
                        log_with=log_with, log_dir=log_dir).check()
    if checkpoint.exists() and not resume:
        raise MinidiffError(f"'{checkpoint}' holds an unfinished run; pass --resume to continue it, or remove it")
    if resume and not checkpoint.exists():
        raise MinidiffError(f"nothing to resume: '{checkpoint}' does not exist")
    hint = watch_hint(log_with, log_dir)
    if hint:
        typer.echo(hint, err=True)
    try:
        with loss_progress(steps, quiet) as report:
            model, summary = train_clip(recipe, callback=_with_validation(report, quiet), checkpoint=checkpoint,
                                        name=out.stem)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; saved {checkpoint}. Continue with the same command and --resume", err=True)
        raise typer.Exit(130)
    accuracy = evaluate(model, recipe)
    path = save_clip(out, model, recipe.model_config(), accuracy, summary, include_vision=save_vision,
                     overwrite=overwrite)
    checkpoint.unlink(missing_ok=True)
    minutes, seconds = divmod(summary["wall_s"], 60)
    took = f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s"
    typer.echo(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB) after {steps} steps in {took}; "
               f"loss {summary['first_loss']:.4f} at step 1 -> {summary['final_loss']:.4f} (mean of the last "
               "50 steps, as on the progress bar)")
    typer.echo(describe_accuracy(accuracy))


def _logging(log_with: Optional[str], log_dir: Optional[str], out: Path,
             resumed: Optional[Path]) -> tuple[str, Optional[str]]:
    """(--log-with, --log-dir): as given, else the resumed run's, else none and OUT-logs; checked before work."""
    from minidiff_cli.training.tracking import check_log_with

    if resumed is not None and resumed.is_file() and (log_with is None or log_dir is None):
        from minidiff_cli.training.checkpoint import read_checkpoint_meta

        stored = read_checkpoint_meta(resumed).get("train", {})
        log_with = log_with if log_with is not None else stored.get("log_with")
        log_dir = log_dir if log_dir is not None else stored.get("log_dir")
    log_with = log_with or "none"
    check_log_with(log_with)
    if log_with != "none" and not log_dir:
        stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
        log_dir = str(out.with_name(f"{stem}-logs"))
    return log_with, log_dir


def _with_validation(report, quiet: bool):
    """The progress callback, and (unless quiet) a line at each validation (what it is measured on, the first time)."""
    def callback(info: dict) -> None:
        report(info)
        if quiet:
            return
        if info.get("validation"):
            typer.echo(info["validation"], err=True)
        if info.get("val_loss") is not None:
            typer.echo(f"clip: step {info['step']} validation loss {info['val_loss']:.4f}", err=True)
    return callback


@clip_app.command("eval")
def eval_command(
    path: Path = typer.Argument(..., help="A file written by `minidiff clip train` (with its image tower)."),
    images_per_class: int = typer.Option(32, "--images-per-class", help="Fresh images of each class."),
    as_json: bool = typer.Option(False, "--json", help="Print the accuracies as JSON."),
) -> None:
    """Zero-shot accuracy of a saved CLIP, on fresh images of every class.

    Example:

      minidiff clip eval shapes-clip.safetensors
    """
    from minidiff_cli.clip.clip_file import load_clip
    from minidiff_cli.evaluation.clip import describe_accuracy, evaluate
    from minidiff_cli.training.clip import ClipRecipe

    model, metadata = load_clip(path)
    trained = json.loads(metadata.get("training", "{}")).get("recipe", {})
    keep = ("data", "image_size", "holdout", "seed")
    recipe = ClipRecipe(**{k: trained[k] for k in keep if k in trained}, eval_images_per_class=images_per_class)
    accuracy = evaluate(model, recipe)
    typer.echo(json.dumps(accuracy) if as_json else describe_accuracy(accuracy))



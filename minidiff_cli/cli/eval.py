"""``minidiff eval``: how often a shapes model draws the colour and shape it is asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.cli.options import model_sampling_defaults, threads_option
from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.atomic import refuse_existing
from minidiff_cli.runtime.threads import apply_threads


@app.command("eval")
def eval_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", autocompletion=completion.models, help="Model name or path [default: the shipped model]."),
    n: Optional[int] = typer.Option(None, "-n", "--per-prompt", help="Images per prompt [default: 8 on shapes, "
                                    "1 per caption with --data]."),
    runs: Optional[str] = typer.Option(None, "--runs", help="Sampler:steps pairs, e.g. \"ddim:50,ddim:20,ddpm:100\" "
                                       "[default: the model's sampler and steps (a distilled student's), else ddim:50]."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance scale [default: the model's, else 3]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image of each prompt."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Held-out pairs [default: those the model was trained without]."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images sampled at once."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16 (as for generate)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the full report as JSON here."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also save the first run's images as a grid PNG "
                                        "(shapes: a row per colour, shapes side by side; --data: the first 32 "
                                        "images with their captions, held-out ones starred)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the -o and --grid files if they exist."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    data: Optional[str] = typer.Option(None, "--data", help="A captioned folder: measure the model on it "
                                       "(CLIP score, R-precision, Frechet distance, KID, precision/recall) "
                                       "instead of shapes adherence."),
    clip: Optional[Path] = typer.Option(None, "--clip", help="With --data: the CLIP trained on that folder "
                                        "[default: clip.safetensors next to the model file]."),
    captions: int = typer.Option(200, "--captions", help="With --data: how many of its captions (a fixed set)."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="With --data: FID's Inception-v3 weights "
                                             "as safetensors, to report standard FID too."),
    threads: Optional[int] = threads_option(),
) -> None:
    """How good is a model? On shapes: prompt adherence. On a captioned folder: image metrics.

    Shapes: for every "a {colour} {shape}", sample N images, classify their colour and
    shape, and report the fraction right, seen and held-out pairs apart.

    A folder (--data DIR): one image for each of a fixed set of its captions (-n per
    caption), judged by the CLIP trained on that folder: CLIP score, R-precision among 100
    captions, Frechet distance and KID against the folder's images, precision and recall,
    with the same figures for the real images beside them. See docs/metrics.md.

    Examples:

      minidiff eval

      minidiff eval --model runs/shapes/model.safetensors -n 16 --runs ddim:50,ddim:20

      minidiff eval --dtype bfloat16     # does half precision cost adherence?

      minidiff eval --model runs/mine/model.safetensors --data ./my_images -n 1
    """
    apply_threads(threads)
    defaults = model_sampling_defaults(model)
    if runs is None:
        runs = f"{defaults.get('sampler', 'ddim')}:{defaults.get('steps', 50)}"
    cfg = defaults.get("cfg", 3.0) if cfg is None else cfg
    if data is not None:
        return _eval_folder(model, data, clip, captions, inception, n=1 if n is None else n, runs=runs, cfg=cfg,
                            seed=seed, batch_size=batch_size, device=device, dtype=dtype, output=output,
                            grid=grid, as_json=as_json, quiet=quiet, overwrite=overwrite)
    n = 8 if n is None else n
    from minidiff_cli.data.holdout import parse_holdout
    from minidiff_cli.data.shapes import COLOURS, DEFAULT_SHAPES
    from minidiff_cli.evaluation.shapes_judge import evaluate
    from minidiff_cli.inference.pipeline import Pipeline

    pairs = _parse_runs(runs)
    refuse_existing((output, grid), overwrite)
    if n < 1:
        raise MinidiffError(f"-n must be at least 1 (got {n})")
    pipe = Pipeline.load(model, device=device, dtype=dtype)
    trained_holdout = pipe.model.config.get("training", {}).get("holdout", "")
    held = parse_holdout(holdout if holdout is not None else trained_holdout)
    classes = pipe.model.config.get("class_names") or [f"{c} {s}" for c in COLOURS for s in DEFAULT_SHAPES]
    colours = list(dict.fromkeys(name.split()[0] for name in classes))
    shapes = list(dict.fromkeys(name.split()[1] for name in classes))
    total = sum(steps for _, steps in pairs) * -(-len(colours) * len(shapes) * n // batch_size)
    from minidiff_cli.cli.display import step_progress

    with step_progress(total, "evaluating", quiet) as advance:
        report = evaluate(pipe, colours=colours, shapes=shapes, holdout=held, n=n, runs=pairs, cfg=cfg,
                          seed=seed, batch_size=batch_size, progress=lambda info: advance(), grid_path=grid,
                          overwrite=overwrite)
    report["model"] = {"name": pipe.name, "hash": pipe.model.hash}
    if output is not None:
        from minidiff_cli.files.atomic import atomic_write

        atomic_write(output, lambda p: p.write_text(json.dumps(report, indent=2)), overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print(report)


def _eval_folder(model, data, clip, captions, inception, *, n, runs, cfg, seed, batch_size, device, dtype,
                 output, grid, as_json, quiet, overwrite) -> None:
    from minidiff_cli.cli.display import step_progress
    from minidiff_cli.data.holdout import holdout_fraction, is_heldout
    from minidiff_cli.data.sources import open_dataset
    from minidiff_cli.evaluation.caption_eval import CaptionEvalSettings, describe, evaluate_captions
    from minidiff_cli.evaluation.features import load_clip_features, load_inception
    from minidiff_cli.inference.pipeline import Pipeline

    pairs = _parse_runs(runs)
    if len(pairs) != 1:
        raise MinidiffError("with --data, --runs takes one sampler:steps pair")
    refuse_existing((output, grid), overwrite)
    if n < 1 or captions < 2:
        raise MinidiffError("-n must be at least 1 and --captions at least 2")
    pipe = Pipeline.load(model, device=device, dtype=dtype)
    clip_file = clip or _default_clip(pipe)
    features = load_clip_features(clip_file)
    extractor = load_inception(inception) if inception is not None else None
    dataset = open_dataset(data, image_size=pipe.model.image_size, holdout="", require_captions=True)
    fraction = holdout_fraction(pipe.model.config.get("training", {}).get("holdout", ""))
    settings = CaptionEvalSettings(captions=captions, per_caption=n, sampler=pairs[0][0], steps=pairs[0][1],
                                   cfg=cfg, seed=seed, batch_size=batch_size)
    total = pairs[0][1] * -(-min(captions, len(dataset)) * n // batch_size)
    with step_progress(total, "evaluating", quiet) as advance:
        held = (lambda c: bool(fraction) and is_heldout(c, fraction))  # noqa: E731
        report = evaluate_captions(pipe, dataset, features, settings, inception=extractor, heldout=held,
                                   progress=lambda info: advance(),
                                   on_images=(lambda x, c: _save_captioned_grid(grid, x, c, held, overwrite)) if grid else None)
    report["model"] = {"name": pipe.name, "hash": pipe.model.hash}
    report["clip_file"] = str(clip_file)
    if output is not None:
        from minidiff_cli.files.atomic import atomic_write

        atomic_write(output, lambda p: p.write_text(json.dumps(report, indent=2)), overwrite=overwrite)
    typer.echo(json.dumps(report, indent=2) if as_json else "\n".join(describe(report)))


GRID_IMAGES = 32


def _save_captioned_grid(path: Path, images, captions: list[str], heldout, overwrite: bool) -> None:
    """The first GRID_IMAGES images of the evaluation, each above its caption (held-out ones starred)."""
    from minidiff_cli.data.images import tensor_to_pil
    from minidiff_cli.evaluation.captioned_grid import captioned_grid
    from minidiff_cli.files.atomic import atomic_write

    shown = list(range(min(GRID_IMAGES, len(captions))))
    sheet = captioned_grid([tensor_to_pil(images[k]) for k in shown], [captions[k] for k in shown],
                           heldout={c for c in captions if heldout(c)})
    atomic_write(path, lambda p: sheet.save(p, format="PNG"), overwrite=overwrite)


def _default_clip(pipe) -> Path:
    """The CLIP the model's run trained on its folder: clip.safetensors next to the model file (a run
    folder), or clip/NAME.safetensors beside it (how a shipped or installed model keeps it; a
    distilled student's is its teacher's)."""
    source = Path(pipe.source) if pipe.source else None
    candidates = [source.with_name("clip.safetensors"), source.parent / "clip" / source.name] if source else []
    teacher = (pipe.model.config.get("student") or {}).get("teacher", {}).get("name")
    if source and isinstance(teacher, str) and "/" not in teacher:  # a distilled student is judged as its teacher
        candidates.append(source.parent / "clip" / f"{teacher}.safetensors")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MinidiffError("--data needs the CLIP trained on that folder: pass --clip FILE (from `minidiff clip "
                        "train --data DIR`, or clip.safetensors in the run folder)")


def _parse_runs(text: str) -> list[tuple[str, int]]:
    pairs = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        if not name or not steps.isdigit() or int(steps) < 1:
            raise MinidiffError(f"--runs takes sampler:steps pairs like ddim:50 (got '{item.strip()}')")
        pairs.append((name, int(steps)))
    return pairs


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prompt adherence of {report['model']['name']} ({report['n_per_prompt']} images per prompt, cfg {report['cfg']})")
    for column in ("sampler", "steps", "seen", "held-out", "seen colour", "seen shape", "diversity", "seconds"):
        table.add_column(column)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for run in report["runs"]:
        table.add_row(run["sampler"], str(run["steps"]), fmt(run["seen"]), fmt(run["held_out"]),
                      fmt(run["seen_colour"]), fmt(run["seen_shape"]), fmt(run["diversity"]), str(run["seconds"]))
    Console().print(table)
    worst = sorted(report["runs"][0]["per_prompt"].items(), key=lambda kv: kv[1]["both"])[:5]
    Console().print("weakest prompts: " + ", ".join(f"{p} {r['both']:.2f}" for p, r in worst))

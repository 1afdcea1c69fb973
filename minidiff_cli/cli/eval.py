"""``minidiff eval``: how often a shapes model draws the colour and shape it is asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from minidiff_cli.cli.app import app
from minidiff_cli.errors import MinidiffError


@app.command("eval")
def eval_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name or path [default: the shipped model]."),
    n: int = typer.Option(8, "-n", "--per-prompt", help="Images per prompt."),
    runs: str = typer.Option("ddim:50", "--runs", help="Sampler:steps pairs, e.g. \"ddim:50,ddim:20,ddpm:100\"."),
    cfg: float = typer.Option(3.0, "--cfg", help="Guidance scale."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image of each prompt."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Held-out pairs [default: those the model was trained without]."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images sampled at once."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16 (as for generate)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the full report as JSON here."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also save the first run's images as a grid PNG "
                                        "(a row per colour, shapes side by side)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Prompt adherence on the shapes world: for every "a {colour} {shape}", sample N images,
    classify their colour and shape, and report the fraction right, seen and held-out pairs apart.

    Examples:

      minidiff eval

      minidiff eval --model runs/shapes/model.safetensors -n 16 --runs ddim:50,ddim:20

      minidiff eval --dtype bfloat16     # does half precision cost adherence?
    """
    from minidiff_cli.data import parse_holdout
    from minidiff_cli.evaluation import evaluate
    from minidiff_cli.pipeline import Pipeline
    from minidiff_cli.shapes import COLOURS, DEFAULT_SHAPES

    pairs = _parse_runs(runs)
    for path in (output, grid):
        if path is not None and path.exists():
            raise MinidiffError(f"'{path}' already exists; choose another file name")
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
                          seed=seed, batch_size=batch_size, progress=lambda info: advance(), grid_path=grid)
    report["model"] = {"name": pipe.name, "hash": pipe.model.hash}
    if output is not None:
        from minidiff_cli.fileio import atomic_write

        atomic_write(output, lambda p: p.write_text(json.dumps(report, indent=2)), overwrite=False)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print(report)


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

"""``generate --prompts FILE``: every line of a prompts file, in one process or split over torchrun's.

The order of work: read and check every line (line numbers in errors), check every output
name, join the processes, load the model, check every line against it, and only then sample.
Each process samples its share of the batches (``prompts_file.share``) and writes its own
lines' files; rank 0 gathers what was written and alone prints it, in line order, exactly as
a single process would (and makes the --grid from the gathered images).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from minidiff_cli.data.vocabulary import prompt_warnings
from minidiff_cli.errors import MinidiffError


@dataclass(frozen=True)
class FileRun:
    """The generate flags that matter to a prompts file (the sampling settings are in ``params``)."""

    prompts: Path
    output: Path
    num_images: int
    batch_size: int | None
    grid: bool
    device: str
    dtype: str
    as_json: bool
    quiet: bool
    model_from_image: Path | None  # the --from image that chose the model, for the error if it is missing
    overwrite: bool = False


@dataclass(frozen=True)
class Written:
    """One image a process wrote; ``image`` travels to rank 0 only when it is needed there."""

    line: int
    index: int
    path: str
    params: dict[str, Any]
    image: Any = None


def generate_from_file(params: dict[str, Any], run: FileRun) -> None:
    from minidiff_cli.inference import prompts_file
    from minidiff_cli.inference.pipeline import Generation
    from minidiff_cli.runtime import ranks

    if ranks.world_size() > 1 and not os.path.isfile(run.prompts):
        raise MinidiffError("under torchrun, every process reads the --prompts FILE: give a file, not standard "
                            "input or a pipe (each process would get a part of it)")
    lines = prompts_file.read_prompts(run.prompts)
    shown_as = prompts_file.shown_name(run.prompts)
    base = Generation("", params["negative_prompt"] or "", params["steps"], float(params["cfg"]), params["sampler"],
                      params["seed"], params["eta"], params["sampler_options"] or {})
    jobs = prompts_file.jobs(lines, base, run.num_images, shown_as)
    names = prompts_file.image_names(jobs, _folder(run.output))
    if not run.overwrite:  # every process checks every name before any joins, so that none has written yet
        _check_free(names.values())
    with ranks.joined(run.device) as (dist, device):
        pipe = _load(params["model"], device, run.dtype, run.model_from_image)
        _check_lines(pipe, jobs, shown_as, params["model"])
        mine = prompts_file.share(prompts_file.batches(jobs, run.batch_size or 16), dist.rank, dist.world)
        keep_images = dist.world == 1 or run.grid
        written = _sample(pipe, mine, names, run.quiet or not dist.main, dist, keep_images, run.overwrite)
        everything = ranks.gather(written, dist)
        if dist.main:
            _report(sorted((w for part in everything for w in part), key=lambda w: (w.line, w.index)), run, dist)


def _folder(output: Path) -> Path:
    from minidiff_cli.files.atomic import ensure_writable_dir

    return ensure_writable_dir(output)  # a folder: generate's output_target refused a FILE.png


def _check_free(paths) -> None:
    for path in paths:
        if os.path.lexists(path):
            raise MinidiffError(f"'{path}' already exists; choose another -o, or pass --overwrite")


def _load(model: str | None, device: str, dtype: str, from_image: Path | None):
    from minidiff_cli.cli.generate import _load as load  # the same errors as a single prompt's

    return load(model, device, dtype, from_image)


def _check_lines(pipe, jobs, path: str, model: str | None = None) -> None:
    """What only the model can check, line by line, before any sampling."""
    from minidiff_cli import plugins

    plugins.get_sampler(jobs[0].gen.sampler)  # an unknown sampler: one line, before any work
    steps_limit = pipe.model.schedule.num_timesteps
    seen: set[tuple[str, str]] = set()
    for job in jobs:
        if job.gen.steps > steps_limit:
            raise MinidiffError(f"{path}, line {job.line}: steps must be between 1 and {steps_limit} for this "
                                f"model (got {job.gen.steps})")
        key = (job.gen.prompt, job.gen.negative_prompt)
        if key not in seen:
            seen.add(key)
            try:
                pipe.check_prompt(*key)
            except MinidiffError as exc:
                raise MinidiffError(f"{path}, line {job.line}: {exc}") from None
            if pipe.model.conditioner.name != "none":
                for note in prompt_warnings(job.gen.prompt, pipe.model.config, pipe.model.conditioner, model):
                    print(f"minidiff: warning: {path}, line {job.line}: {note}", file=sys.stderr)
    if pipe.model.conditioner.name == "none":
        print("minidiff: warning: this model is unconditional; the prompts are ignored", file=sys.stderr)


def _sample(pipe, batches, names, quiet: bool, dist, keep_images: bool, overwrite: bool) -> list[Written]:
    """Sample and write this process's batches, with one progress bar over all of them."""
    from minidiff_cli.cli.display import step_progress
    from minidiff_cli.files.png_parameters import save_png

    count = sum(len(batch.rows) for batch in batches)
    what = f"sampling {count} image(s)" + (f" (process 1 of {dist.world})" if dist.world > 1 else "")
    written = []
    with step_progress(sum(batch.gen.steps for batch in batches), what, quiet) as advance:
        for batch in batches:
            x = pipe.sample_many(batch.gen, batch.prompts, batch.seeds, batch_size=len(batch.rows),
                                 callback=lambda info: advance())
            for sample, (job, k) in zip(x, batch.rows):
                image = pipe.image(sample, job.gen, k)
                path = save_png(image, names[(job.line, k)], image.info["minidiff"], overwrite=overwrite)
                written.append(Written(job.line, k, str(path), image.info["minidiff"], image if keep_images else None))
    return written


def _report(written: list[Written], run: FileRun, dist) -> None:
    """Rank 0: the grid, then the paths (or JSON) in line order, then the preview."""
    paths = [w.path for w in written]
    if run.grid:
        paths.append(str(_save_grid(written, _folder(run.output))))
    if run.as_json:
        typer.echo(json.dumps({"images": paths, "parameters": [w.params for w in written],
                               "lines": [w.line for w in written]}, indent=2))
        return
    for path in paths:
        typer.echo(path)
    if not run.quiet and dist.world == 1:
        from minidiff_cli.cli.display import show_images

        show_images([w.image for w in written])


def _save_grid(written: list[Written], folder: Path) -> Path:
    """One row per line when every line has the same number (> 1) of images; else near-square."""
    from minidiff_cli.data.images import make_grid
    from minidiff_cli.files.atomic import next_free_path
    from minidiff_cli.files.png_parameters import save_png

    per_line: dict[int, int] = {}
    for w in written:
        per_line[w.line] = per_line.get(w.line, 0) + 1
    counts = set(per_line.values())
    columns = counts.pop() if len(counts) == 1 and len(per_line) > 1 else None
    sheet = make_grid([w.image for w in written], columns=columns if columns and columns > 1 else None)
    params = dict(written[0].params, grid=len(written), lines=len(per_line))
    return save_png(sheet, next_free_path(folder, "grid", ".png"), params)

"""``train --sample-prompts FILE``: what the run's sample grids draw, at step 0 and every ``--sample-every``.

The file is read by ``generate --prompts``' reader (``inference/prompts_file.py``): a prompt a line, or
a JSON object with ``prompt`` and any of ``negative``, ``seed``, ``steps``, ``cfg`` and ``n``. The recipe
keeps the lines as text (``TrainConfig.sample_prompts``, which a TOML recipe can also list), so a
resumed run draws the same grids without the file. Each line is one row of the grid: ``n`` images
(4) from its ``seed`` (0) up, ``steps`` (25) DDIM steps at ``cfg`` (3), the settings of the default
grids. Bounded, so that a sample step stays short: 64 lines, 16 images a line, 256 in all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minidiff_cli.errors import MinidiffError

MAX_LINES = 64
MAX_PER_LINE = 16
MAX_IMAGES = 256
DEFAULTS = {"n": 4, "seed": 0, "steps": 25, "cfg": 3.0, "negative_prompt": ""}


@dataclass(frozen=True)
class SamplePrompt:
    """One row of the sample grid."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25
    cfg: float = 3.0
    n: int = 4

    def settings(self) -> tuple:
        return self.negative_prompt, self.steps, self.cfg


def read_sample_prompts(path: str | os.PathLike) -> list[str]:
    """The lines of a prompts file, checked and bounded, as the recipe keeps them (text)."""
    from minidiff_cli.inference.prompts_file import read_prompts, shown_name

    lines = [_as_text(line) for line in read_prompts(path)]
    parse_sample_prompts(lines, f"--sample-prompts '{shown_name(path)}'")
    return lines


def parse_sample_prompts(lines: list[str], where: str = "sample_prompts") -> list[SamplePrompt]:
    """Each line's row, its values checked; a bad line or too many images is one MinidiffError."""
    from minidiff_cli.inference.prompts_file import parse_line

    if len(lines) > MAX_LINES:
        raise MinidiffError(f"{where}: {len(lines)} prompts; a sample grid takes at most {MAX_LINES}")
    rows = []
    for number, text in enumerate(lines, start=1):
        line = parse_line(text, where, number)
        values = {**DEFAULTS, **line.overrides}
        if values["n"] > MAX_PER_LINE:
            raise MinidiffError(f"{where}, line {number}: \"n\" {values['n']} is more than a sample grid draws "
                                f"per prompt ({MAX_PER_LINE})")
        rows.append(SamplePrompt(line.prompt, values["negative_prompt"], values["seed"], values["steps"],
                                 float(values["cfg"]), values["n"]))
    total = sum(row.n for row in rows)
    if total > MAX_IMAGES:
        raise MinidiffError(f"{where}: {total} images; a sample grid draws at most {MAX_IMAGES}")
    return rows


def check_against(lines: list[str], model) -> None:
    """Every line fits the model: its steps the schedule, its prompts the conditioner (a class model knows
    its class names only). Checked when the model is built, before the first step and the first file."""
    from minidiff_cli.training.captions import _fresh

    timesteps, conditioner = model.schedule.num_timesteps, model.conditioner
    for number, row in enumerate(parse_sample_prompts(lines), start=1):
        if row.steps > timesteps:
            raise MinidiffError(f"sample prompt {number} asks for {row.steps} steps; this model has "
                                f"{timesteps} timesteps")
        if conditioner.name == "none":
            continue
        try:
            _fresh(conditioner, lambda: conditioner.encode([row.prompt, row.negative_prompt]))
        except MinidiffError as exc:
            raise MinidiffError(f"sample prompt {number}: {exc}") from None


def _as_text(line) -> str:
    """A PromptLine back as a line of the format: the prompt alone where that reads back the same."""
    from minidiff_cli.inference.prompts_file import OVERRIDES

    if not line.overrides and not line.prompt.startswith("{") and line.prompt == line.prompt.strip():
        return line.prompt
    keys = {field: key for key, field in OVERRIDES.items()}
    obj = {"prompt": line.prompt, **{keys.get(k, k): v for k, v in line.overrides.items()}}
    return json.dumps(obj, ensure_ascii=False)


def draw(model, lines: list[str], path: Path, *, shapes: bool) -> dict[str, Any]:
    """The grid of ``lines`` (one row each) saved to ``path``; on shapes, how often colour and shape match."""
    import torch
    from PIL import Image

    from minidiff_cli.data.images import make_grid, tensor_to_pil
    from minidiff_cli.files.atomic import atomic_write
    from minidiff_cli.inference.pipeline import Generation, Pipeline

    rows = parse_sample_prompts(lines)
    pipe = Pipeline(model, name=model.config.get("name", "model"))
    images: list[torch.Tensor] = []
    start = 0
    while start < len(rows):  # consecutive lines with the same settings are sampled as one batch
        stop = start + 1
        while stop < len(rows) and rows[stop].settings() == rows[start].settings():
            stop += 1
        group = rows[start:stop]
        first = group[0]
        gen = Generation("", negative_prompt=first.negative_prompt, steps=first.steps, cfg=first.cfg,
                         sampler="ddim", seed=0)
        prompts = [row.prompt for row in group for _ in range(row.n)]
        seeds = [row.seed + k for row in group for k in range(row.n)]
        images.extend(pipe.sample_many(gen, prompts, seeds, batch_size=32))
        start = stop
    columns = max(row.n for row in rows)
    tiles, k = [], 0
    for row in rows:
        tiles.extend(tensor_to_pil(img) for img in images[k:k + row.n])
        k += row.n
        blank = Image.new("RGB", tiles[-1].size, (255, 255, 255))
        tiles.extend([blank] * (columns - row.n))
    grid = make_grid(tiles, columns=columns)
    atomic_write(path, lambda p: grid.save(p, format="PNG"))
    result: dict[str, Any] = {"grid": str(path)}
    if shapes:
        result.update(_adherence(model, rows, images))
    return result


def _adherence(model, rows: list[SamplePrompt], images) -> dict[str, Any]:
    """As the default grids report it: the share of images whose colour and shape match "a colour shape"."""
    import torch

    from minidiff_cli.evaluation.shapes_judge import score

    held = set(model.config.get("training", {}).get("holdout", "").replace(", ", ",").split(","))
    seen, unseen, k = [], [], 0
    for row in rows:
        batch = images[k:k + row.n]
        k += row.n
        parts = row.prompt.split()
        if len(parts) < 2:
            continue
        ok = score(torch.stack(batch), parts[-2], parts[-1])["both"]
        (unseen if f"{parts[-2]} {parts[-1]}" in held else seen).append(ok)
    return {"adherence_seen": sum(seen) / len(seen) if seen else None,
            "adherence_heldout": sum(unseen) / len(unseen) if unseen else None}

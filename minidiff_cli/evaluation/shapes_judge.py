"""Prompt adherence on the shapes world: does "a red circle" give a red circle?

For each prompt "a {colour} {shape}", sample N images, classify each one's main
shape and colour with the heuristic classifier in ``shape_classifier.py``, and
count how often both match. Seen pairs and held-out pairs (never in training)
are reported apart, the latter being the test of composition. Diversity is the
mean pixel distance between images of one prompt: a memorised picture scores ~0.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from minidiff_cli.data.vocabulary import article
from minidiff_cli.inference.pipeline import Generation, Pipeline


def prompt_for(name: str) -> str:
    """ "orange square" -> "an orange square": the article the training captions use."""
    return f"{article(name)} {name}"


def class_prompts(colours, shapes) -> list[tuple[str, str, str]]:
    return [(prompt_for(f"{c} {s}"), c, s) for c in colours for s in shapes]


def default_prompts(dataset, holdout: str = "") -> list[str]:
    """Prompts for the sample grids saved while training: a spread of classes, held-out ones last."""
    names = list(getattr(dataset, "class_names", []) or [])
    if not names:
        return caption_prompts(dataset)
    held = {f"{c} {s}" for c, s in getattr(dataset, "holdout", [])}
    seen = [n for n in names if n not in held]
    step = max(1, len(seen) // 6)
    return [prompt_for(n) for n in seen[::step][:6]] + [prompt_for(n) for n in sorted(held)]


def caption_prompts(dataset, seen: int = 6, heldout: int = 2) -> list[str]:
    """A spread of a captioned data set's captions, held-out ones last; unconditional rows without captions."""
    from minidiff_cli.data.dataset import caption_set

    captions = [c for c in (caption_set(dataset) or []) if c]
    if not captions:
        return [""] * 4
    step = max(1, len(captions) // seen)
    return captions[::step][:seen] + sorted(getattr(dataset, "heldout_captions", []))[:heldout]


def score(images: torch.Tensor, colour: str, shape: str) -> dict[str, float]:
    """Fractions of images whose colour, shape, and both match the prompt."""
    from minidiff_cli.evaluation.shape_classifier import classify

    guesses = [classify(img) for img in images]
    colour_ok = [g[0] == colour for g in guesses]
    shape_ok = [g[1] == shape for g in guesses]
    n = max(1, len(guesses))
    return {"colour": sum(colour_ok) / n, "shape": sum(shape_ok) / n,
            "both": sum(c and s for c, s in zip(colour_ok, shape_ok)) / n}


def diversity(images: torch.Tensor) -> float:
    """Mean RMS pixel distance (in [0, 2] units) between distinct images of one prompt."""
    flat = images.flatten(1)
    if len(flat) < 2:
        return 0.0
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(d.sum() / (len(flat) * (len(flat) - 1)))


def sample_and_score(model, prompts: list[str], path: Path, *, shapes: bool, per_prompt: int = 4,
                     steps: int = 25, cfg: float = 3.0, sampler: str = "ddim") -> dict[str, Any]:
    """A grid (one row per prompt) of samples saved to ``path``; adherence when on shapes."""
    from minidiff_cli.data.images import make_grid, tensor_to_pil
    from minidiff_cli.files.atomic import atomic_write

    pipe = Pipeline(model, name=model.config.get("name", "model"))
    gen = Generation("", steps=steps, cfg=cfg, sampler=sampler, seed=0)
    rows = [p for p in prompts for _ in range(per_prompt)]
    seeds = list(range(per_prompt)) * len(prompts)
    x = pipe.sample_many(gen, rows, seeds, batch_size=32)
    grid = make_grid([tensor_to_pil(img) for img in x], columns=per_prompt)
    atomic_write(path, lambda p: grid.save(p, format="PNG"))
    result: dict[str, Any] = {"grid": str(path)}
    if shapes:
        held = set(model.config.get("training", {}).get("holdout", "").replace(", ", ",").split(","))
        seen, unseen = [], []
        for k, prompt in enumerate(prompts):
            parts = prompt.split()
            if len(parts) < 2:
                continue
            colour, shape = parts[-2], parts[-1]
            ok = score(x[k * per_prompt:(k + 1) * per_prompt], colour, shape)["both"]
            (unseen if f"{colour} {shape}" in held else seen).append(ok)
        result["adherence_seen"] = sum(seen) / len(seen) if seen else None
        result["adherence_heldout"] = sum(unseen) / len(unseen) if unseen else None
    return result


def evaluate(pipe: Pipeline, *, colours, shapes, holdout: list[tuple[str, str]], n: int = 8,
             runs: list[tuple[str, int]] = (("ddim", 50),), cfg: float = 3.0, seed: int = 0,
             batch_size: int = 64, progress=None, grid_path: Path | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """The full report: per sampler/steps, per prompt, seen and held-out.

    With ``grid_path``, the first run's images are also saved as a grid: one row per
    colour, each shape's images side by side.
    """
    held = {f"{c} {s}" for c, s in holdout}
    prompts = class_prompts(colours, shapes)
    report: dict[str, Any] = {"n_per_prompt": n, "cfg": cfg, "seed": seed, "runs": []}
    for sampler, steps in runs:
        start = time.time()
        gen = Generation("", steps=steps, cfg=cfg, sampler=sampler, seed=seed)
        rows = [p for p, _, _ in prompts for _ in range(n)]
        seeds = [seed + k for _ in prompts for k in range(n)]
        x = pipe.sample_many(gen, rows, seeds, batch_size=batch_size, callback=progress)
        per_prompt = judge(x, prompts, n, held)
        report["runs"].append({"sampler": sampler, "steps": steps, "seconds": round(time.time() - start, 1),
                               **summarise(per_prompt), "per_prompt": per_prompt})
        if grid_path is not None and len(report["runs"]) == 1:
            save_grid(x, columns=n * len(shapes), path=grid_path, overwrite=overwrite)
    return report


def judge(x: torch.Tensor, prompts: list[tuple[str, str, str]], n: int, held: set[str]) -> dict[str, dict[str, Any]]:
    """Scores and diversity of each prompt's ``n`` images, which lie in ``x`` in the order of ``prompts``
    (``class_prompts``); ``held`` holds the held-out pairs as "colour shape"."""
    per_prompt = {}
    for k, (prompt, colour, shape) in enumerate(prompts):
        images = x[k * n:(k + 1) * n]
        per_prompt[prompt] = {**score(images, colour, shape), "diversity": diversity(images),
                              "held_out": f"{colour} {shape}" in held}
    return per_prompt


def save_grid(x: torch.Tensor, columns: int, path: Path, overwrite: bool = False) -> None:
    from minidiff_cli.data.images import make_grid, tensor_to_pil
    from minidiff_cli.files.atomic import atomic_write

    grid = make_grid([tensor_to_pil(img) for img in x], columns=columns)
    atomic_write(path, lambda p: grid.save(p, format="PNG"), overwrite=overwrite)


def summarise(per_prompt: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def mean(rows, key):
        return round(sum(r[key] for r in rows) / len(rows), 4) if rows else None

    seen = [r for r in per_prompt.values() if not r["held_out"]]
    unseen = [r for r in per_prompt.values() if r["held_out"]]
    return {"seen": mean(seen, "both"), "held_out": mean(unseen, "both"),
            "seen_colour": mean(seen, "colour"), "seen_shape": mean(seen, "shape"),
            "held_out_colour": mean(unseen, "colour"), "held_out_shape": mean(unseen, "shape"),
            "diversity": mean(list(per_prompt.values()), "diversity")}

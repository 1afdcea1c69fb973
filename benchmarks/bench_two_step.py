"""Where a 2-step student loses to its teacher: the first timestep of its grid, side by side.

A few-step student's first step decides each picture's layout and background. On the shapes
student, starting at the noisiest level (t = 999 of the capped cosine, sqrt(alpha_bar) = 0.0045)
leaves grain in the pictures; starting lower leaves them clean but alike. This draws the same
prompts and seeds with each grid (the samplers' ``timesteps`` option) and measures, beside prompt
adherence (seen / held-out, the `minidiff eval` judge) and its pixel diversity, two things about
the background, read from a 2-pixel border that the shapes never cover:

- border spread: the mean distance between the border colours of two pictures of one prompt
  (how varied the backgrounds are; the teacher's is the reference);
- border grain: the RMS of the border pixels about their own mean colour (leftover noise; the
  training pictures' backgrounds are flat).

    python benchmarks/bench_two_step.py                       # shapes-fast against shapes-clip
    python benchmarks/bench_two_step.py -n 8 --grids 999,499 899,499
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from minidiff_cli.data.holdout import parse_holdout
from minidiff_cli.data.shapes import COLOURS, DEFAULT_SHAPES
from minidiff_cli.evaluation.shapes_judge import class_prompts, judge, summarise
from minidiff_cli.inference.pipeline import Generation, Pipeline

BORDER = 2  # pixels; the shapes world draws no shape this close to the edge


def border_stats(x: torch.Tensor, n: int) -> tuple[float, float]:
    """(border spread, border grain) of images grouped n to a prompt; see the module docstring."""
    mask = torch.ones_like(x[0, 0])
    mask[BORDER:-BORDER, BORDER:-BORDER] = 0
    colour = (x * mask).sum((2, 3)) / mask.sum()  # [images, channels]
    spreads = []
    for k in range(0, len(x), n):
        c = colour[k:k + n]
        spreads.append(torch.cdist(c, c).sum() / (n * (n - 1)))
    grain = (((x - colour[:, :, None, None]) * mask) ** 2).sum((1, 2, 3)) / (mask.sum() * x.shape[1])
    return float(torch.stack(spreads).mean()), float(grain.sqrt().mean())


def measure(pipe: Pipeline, gen: Generation, n: int, held: set[str]) -> dict:
    prompts = class_prompts(COLOURS, DEFAULT_SHAPES)
    start = time.time()
    x = pipe.sample_many(gen, [p for p, _, _ in prompts for _ in range(n)], [k for _ in prompts for k in range(n)],
                         batch_size=64)
    summary = summarise(judge(x, prompts, n, held))
    spread, grain = border_stats(x, n)
    return {"seen": summary["seen"], "held_out": summary["held_out"], "diversity": summary["diversity"],
            "border_spread": spread, "border_grain": grain, "seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="shapes-fast")
    parser.add_argument("--teacher", default="shapes-clip")
    parser.add_argument("--grids", nargs="+", default=["999,499", "959,499", "919,499", "899,499", "849,499",
                                                        "999,799", "999,599"],
                        help="the student's 2-step grids (the first is its default)")
    parser.add_argument("-n", type=int, default=32, help="images a prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher, student = Pipeline.load(args.teacher, device="cpu"), Pipeline.load(args.student, device="cpu")
    held = {f"{c} {s}" for c, s in parse_holdout(teacher.model.config.get("training", {}).get("holdout", ""))}
    runs = [(f"{args.teacher}, ddim 50, cfg 3", teacher, Generation("", steps=50, cfg=3.0, sampler="ddim")),
            (f"{args.student}, lcm 4", student, Generation("", steps=4, cfg=1.0, sampler="lcm"))]
    runs += [(f"{args.student}, lcm 2, timesteps {grid}", student,
              Generation("", steps=len(grid.split(",")), cfg=1.0, sampler="lcm", sampler_options={"timesteps": grid}))
             for grid in args.grids]
    report = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "n_per_prompt": args.n, "runs": {}}
    if not args.json:
        print("| run | seen | held-out | diversity | border spread | border grain |\n|---|---|---|---|---|---|")
    for name, pipe, gen in runs:
        result = report["runs"][name] = measure(pipe, gen, args.n, held)
        if not args.json:
            cells = [result[k] for k in ("seen", "held_out", "diversity", "border_spread", "border_grain")]
            print(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |", flush=True)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Part 6 of the series (sampling): DDPM, DDIM and a fast ODE solver, from the same starting noise.

A sampler walks from pure noise back to an image, asking the model for the noise at each step.
DDPM (Ho et al. 2020) adds fresh noise at every step and needs many of them; DDIM (Song et al.
2021) takes a deterministic path and gets by with far fewer; DPM-Solver++(2M) (Lu et al. 2022),
from the minidiff-solvers plugin, uses the last two predictions to step further still. The
same seed gives all three the same start. The bottom row is DDIM's running guess of the clean
image x_0 (the sampler callback's "x0"), sharpening as the noise comes off.

    python examples/05_samplers.py [--out examples/out] [--model FILE.safetensors] [--prompt "a red circle"]
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt
import numpy as np
import torch

from minidiff_cli import Pipeline, plugins

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
parser.add_argument("--model", default=None, help="model name or .safetensors file [default: the shipped model]")
parser.add_argument("--prompt", default="a red circle")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

pipe = Pipeline.load(args.model)
solver = "dpmpp-2m"
if solver not in plugins.registry().names("samplers"):
    print(f"note: the '{solver}' sampler is not installed (pip install ./plugins/minidiff-solvers); "
          "showing ddim with 10 steps in its place")
    solver = "ddim"

rows, guesses = [], []
for name, steps in [("ddpm", 100), ("ddim", 25), (solver, 10)]:
    keep = guesses if name == "ddim" and steps == 25 else []  # record DDIM's x_0 guesses only
    start = time.perf_counter()
    images = pipe.generate(args.prompt, steps=steps, cfg=3.0, sampler=name, seed=args.seed, num_images=4,
                           callback=lambda info: keep.append(info["x0"][0].float().cpu().clone()))
    seconds = time.perf_counter() - start
    rows.append((f"{name}, {steps} steps, {seconds:.1f} s", np.hstack([np.asarray(im) for im in images])))
    print(f"{name:<9} {steps:>3} steps {seconds:5.1f} s")

# DDIM's guess of x_0 after steps 1, 5, 10, 15, 20 and 25: [3, H, W] tensors in [-1, 1].
picked = [guesses[i] for i in (0, 4, 9, 14, 19, 24)]
strip = ((torch.cat(picked, dim=2).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
rows.append(("DDIM's guess of x_0 after steps 1, 5, 10, 15, 20, 25", strip))

fig, axes = plt.subplots(len(rows), 1, figsize=(7, 2.1 * len(rows)), constrained_layout=True)
for ax, (title, picture) in zip(axes, rows):
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
fig.suptitle(f'"{args.prompt}", seed {args.seed}, cfg 3')
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "05_samplers.png", dpi=100)
print(f"wrote {args.out / '05_samplers.png'}")

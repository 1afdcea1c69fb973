"""Sampling from a picture: image-to-image (SDEdit) and inpainting (RePaint).

SDEdit (Meng et al. 2022): noise a picture part of the way, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
and denoise from there with the prompt. `strength` picks how far: 0 keeps the picture, 1 starts from
pure noise (a plain text-to-image sample). In between, the noise washes out details first and the
layout last, so a middling strength redraws colour and texture but keeps where things are.

Inpainting (Lugmayr et al. 2022): a mask says which pixels to redraw (white) and which to keep
(black). At every step the kept pixels are pinned to the picture noised to that step's level, so
the model draws the hole to fit them, and they come out exactly as they went in.

    python examples/08_img2img.py [--out examples/out] [--model FILE.safetensors]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from minidiff_cli import Pipeline
from minidiff_cli.data.shapes import ShapeSpec, draw
from minidiff_cli.evaluation.shape_classifier import classify

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
parser.add_argument("--model", default=None, help="model name or .safetensors file [default: the shipped model]")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

pipe = Pipeline.load(args.model)
size = pipe.model.image_size
# The picture to start from: a red circle, drawn by the shapes data set's own renderer.
red_circle = draw(ShapeSpec("red", "circle", "white", 0.55, (0.4, 0.45), 0.0, "a red circle"), size)
pixels = np.asarray(red_circle).astype(int)

# 1. strength: how much of the picture is redrawn for the prompt "a green circle".
strengths = [0.0, 0.3, 0.5, 0.7, 0.9, 1.0]
row1 = []
for s in strengths:
    image = pipe.generate("a green circle", steps=20, cfg=3.0, seed=args.seed, init_image=red_circle, strength=s)[0]
    change = np.abs(np.asarray(image).astype(int) - pixels).mean()
    print(f"strength {s:.1f}: classified as {classify(image)}, mean pixel change {change:5.1f} of 255")
    row1.append((image, f"strength {s:g}"))

# 2. the mask: keep the left half (black), repaint the right half (white) as "a blue square".
mask = Image.new("L", (size, size), 0)
mask.paste(255, (size // 2, 0, size, size))
row2 = [(red_circle, "init image"), (mask, "mask (white: repaint)")]
for resample in (0, 3):
    # resample: after each step, noise back and take it again, so the hole fits what is kept
    image = pipe.generate("a blue square", steps=20, cfg=3.0, seed=args.seed, init_image=red_circle, mask=mask,
                          resample=resample)[0]
    kept = np.abs(np.asarray(image).astype(int) - pixels)[:, : size // 2].max()
    print(f"inpainting, resample {resample}: kept half differs by at most {kept} (of 255)")
    row2.append((image, f"inpainted, resample {resample}"))

fig, axes = plt.subplots(2, len(strengths), figsize=(2.2 * len(strengths), 5), constrained_layout=True)
for ax in axes.flat:
    ax.axis("off")
for row, items in enumerate((row1, row2)):
    for col, (image, title) in enumerate(items):
        grey = dict(cmap="gray", vmin=0, vmax=255) if image.mode == "L" else {}
        axes[row, col].imshow(image, interpolation="nearest", **grey)
        axes[row, col].set_title(title, fontsize=9)
fig.suptitle(f'"a green circle" from a red one at each strength; inpainting "a blue square" (seed {args.seed})')
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "08_img2img.png", dpi=100)
print(f"wrote {args.out / '08_img2img.png'}")

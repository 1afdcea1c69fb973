"""Parts 6 and 7 of the series (sampling, text conditioning): classifier-free guidance.

The model was trained to predict the noise both with the prompt and, a tenth of the time,
without it (Ho & Salimans 2022). At sampling time the two predictions are mixed:

    eps = eps_uncond + w * (eps_cond - eps_uncond)

w = 0 ignores the prompt (an unconditional sample), w = 1 is the plain conditional model, and
w > 1 pushes past it, towards pictures that fit the prompt more closely, at some cost in
variety and, at large w, in quality. Same seed everywhere: only w and the prompt change.

    python examples/06_guidance.py [--out examples/out] [--model FILE.safetensors]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt

from minidiff_cli import Pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
parser.add_argument("--model", default=None, help="model name or .safetensors file [default: the shipped model]")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

pipe = Pipeline.load(args.model)
prompts = ["a red circle", "a blue square", "a green triangle"]
scales = [0.0, 1.0, 3.0, 7.0]

fig, axes = plt.subplots(len(prompts), len(scales), figsize=(2.2 * len(scales), 2.4 * len(prompts)),
                         constrained_layout=True)
for row, prompt in enumerate(prompts):
    for col, w in enumerate(scales):
        # The guidance scale is the `cfg` argument; everything else stays the same.
        image = pipe.generate(prompt, steps=25, cfg=w, sampler="ddim", seed=args.seed)[0]
        ax = axes[row, col]
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if row == 0:
            ax.set_title(f"cfg {w:g}" + {0.0: " (no prompt)", 1.0: " (plain)"}.get(w, ""), fontsize=10)
        if col == 0:
            ax.set_ylabel(prompt, fontsize=10)
    print(f"{prompt}: done")
fig.suptitle(f"classifier-free guidance, seed {args.seed}, DDIM 25 steps")
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "06_guidance.png", dpi=100)
print(f"wrote {args.out / '06_guidance.png'}")

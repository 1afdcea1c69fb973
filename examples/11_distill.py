"""Beyond the series: pictures in one to four steps, by distilling a teacher into a student.

A trained model needs 50 network calls (twice that with guidance) for its best pictures. Latent
consistency distillation (Song et al. 2023; Luo et al. 2023) teaches a student to jump from any
noisy x_t straight to the x_0 at the end of the teacher's path: each step, the teacher takes one
guided DDIM step from t to a slightly cleaner s, and the student's guess of x_0 at t is pulled
towards its own guess at s. Guidance is folded in, so the student runs once per step, not twice.
The student here is a low-rank adapter (LoRA) on the teacher's U-Net: a few hundred thousand
numbers beside the teacher's 1.3 million, merged into its weights when loaded.

This script distills the shipped shapes model for a few minutes and draws the same seeds with the
teacher (DDIM, 50 and 2 steps, cfg 3) and the student (the lcm sampler, 1, 2 and 4 steps, cfg 1).

    python examples/11_distill.py [--out examples/out] [--steps 150] [--model shapes-clip]
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt

from minidiff_cli.data.images import tensor_to_pil
from minidiff_cli.inference.pipeline import Generation, Pipeline
from minidiff_cli.training.distill import DistillConfig, Distiller

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
parser.add_argument("--steps", type=int, default=150, help="distillation steps")
parser.add_argument("--model", default="shapes-clip", help="the teacher: a model name or file")
args = parser.parse_args()
PROMPTS = ["a red circle", "a yellow square", "a blue triangle", "a green circle", "a purple square", "a cyan triangle"]

# 1. Distill: the same Distiller `minidiff distill` runs, into a run folder (checkpoint + student file).
run = args.out / "11_distill_run"
cfg = DistillConfig(teacher=args.model, out=str(run), steps=2, batch_size=16, max_steps=args.steps,
                    save_every=args.steps, sample_every=10 * args.steps, threads=0)
start = time.time()
distiller = Distiller(cfg, resume=(run / "checkpoint.safetensors").is_file(), log=print)


def report(info: dict) -> None:
    if info["step"] % 25 == 0:
        print(f"step {info['step']}: loss {info['smoothed']:.4f}")


if distiller.step < cfg.max_steps:
    distiller.run(progress=report)
print(f"distilled {cfg.max_steps} steps in {time.time() - start:.0f} s; the student: {run / 'model.safetensors'}")

# 2. Draw: the teacher with DDIM, the student with the lcm sampler, one seed per column.
teacher, student = Pipeline.load(args.model, device="cpu"), Pipeline.load(str(run), device="cpu")
rows = [("teacher, DDIM 50", teacher, "ddim", 50, 3.0), ("teacher, DDIM 2", teacher, "ddim", 2, 3.0)]
rows += [(f"student, {n} step{'s' * (n > 1)}", student, "lcm", n, 1.0) for n in (1, 2, 4)]
fig, axes = plt.subplots(len(rows), len(PROMPTS), figsize=(1.6 * len(PROMPTS), 1.7 * len(rows)))
for r, (label, pipe, sampler, steps, guidance) in enumerate(rows):
    tic = time.time()
    images = pipe.sample_many(Generation("", steps=steps, cfg=guidance, sampler=sampler, seed=0), PROMPTS,
                              list(range(len(PROMPTS))))
    print(f"{label}: {time.time() - tic:.2f} s for {len(PROMPTS)} pictures")
    for c, image in enumerate(images):
        axes[r, c].imshow(tensor_to_pil(image))
        axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[0, c].set_title(PROMPTS[c], fontsize=7)
    axes[r, 0].set_ylabel(label, fontsize=7)
fig.tight_layout()
args.out.mkdir(parents=True, exist_ok=True)
path = args.out / "11_distill.png"
fig.savefig(path, dpi=110)
print(f"wrote {path}")

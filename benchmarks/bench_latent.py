"""A latent model at 64x64 against a pixel model at 32x32, for the same training wall time.

Both train with `minidiff train` on the same captioned folder, the same text encoder (a CLIP file
given with --clip, also the judge), the same U-Net widths and optimisation (recipes/emoji.toml),
one after the other with the same threads, each stopped by Ctrl-C (SIGINT: it saves) after
--minutes of wall time, process start and the latent model's one-off encoding included. Then
each is judged by `minidiff eval --data` (R-precision, CLIP score, Frechet distance, ... on a
fixed set of captions), and its sampling time per image is measured in this process.

    python benchmarks/bench_latent.py --data path/to/emoji-noto --vae vae.safetensors \\
        --clip minidiff_cli/models/clip/emoji.safetensors --minutes 25 --out runs/bench-latent

--eval-only measures runs already in --out (e.g. after continuing one with --resume).
The judge sees each picture at its own input size (the emoji CLIP: 32 px), so detail beyond
that is invisible to it: the metrics compare fidelity, the grids show the resolution.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "emoji.toml"
# name -> the flags that differ: the latent model draws 64 px through the VAE (16x16 latents, the
# shipped 16 px model's U-Net); the pixel model draws 32 px (attention at its two lowest sizes, as
# the recipe has it at 16 px).
MODELS = {
    "latent 64x64": lambda vae: ["--image-size", "64", "--vae", str(vae)],
    "pixel 32x32": lambda vae: ["--image-size", "32", "--attention-resolutions", "16,8",
                                "--cross-attention-resolutions", "16,8"],
}


def minidiff() -> list[str]:
    import shutil

    exe = shutil.which("minidiff")
    return [exe] if exe else [sys.executable, "-m", "minidiff_cli"]


def train_for(minutes: float, flags: list[str], out: Path, log: Path) -> float:
    """Run `minidiff train` and send Ctrl-C after ``minutes``; its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        process = subprocess.Popen([*minidiff(), "train", *flags, "--out", str(out)], stdout=fh, stderr=fh)
        try:
            process.wait(timeout=minutes * 60)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # finishes the step, saves, exits 130
            process.wait()
    if process.returncode not in (0, 130):
        sys.exit(f"training failed (exit {process.returncode}); see {log}")
    return time.perf_counter() - start


def evaluate(model: Path, args) -> dict:
    result = subprocess.run([*minidiff(), "eval", "-m", str(model), "--data", str(args.data), "--clip",
                             str(args.clip), "--captions", str(args.captions), "--runs", args.run, "--threads",
                             str(args.threads), "--json", "-q"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"minidiff eval failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def seconds_per_image(model: Path, args, images: int = 32) -> float:
    """Sampling time per image at the eval's sampler and steps, in this process (load excluded)."""
    import torch

    from minidiff_cli.inference.pipeline import Generation, Pipeline

    torch.set_num_threads(args.threads)
    sampler, steps = args.run.split(":")
    pipe = Pipeline.load(str(model), device="cpu")
    gen = Generation("red apple", steps=int(steps), sampler=sampler, cfg=3.0)
    pipe.sample(gen, 2)  # warm-up
    start = time.perf_counter()
    pipe.sample(gen, images, batch_size=images)
    return (time.perf_counter() - start) / images


def row(name: str, run: dict) -> str:
    g, model = run["report"]["generated"], run["model"]
    return (f"| {name} | {model['step']:,} | {run['train_seconds'] / 60:.1f} | {g['r_precision']:.3f} | "
            f"{g.get('r_precision_seen') or 0:.3f} / {g.get('r_precision_heldout') or 0:.3f} | {g['clip_score']:.1f} | "
            f"{g['fd_clip']:.4f} | {g['precision']:.2f} / {g['recall']:.2f} | {run['seconds_per_image']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the captioned folder")
    parser.add_argument("--vae", type=Path, required=True, help="the VAE of the latent model (minidiff vae train)")
    parser.add_argument("--clip", type=Path, required=True, help="text encoder of both models, and their judge")
    parser.add_argument("--minutes", type=float, default=25, help="training wall time of each model [25]")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every command [1]")
    parser.add_argument("--captions", type=int, default=200, help="captions of the evaluation [200]")
    parser.add_argument("--run", default="ddim:50", help="sampler:steps of the evaluation [ddim:50]")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-latent"), help="the runs' folder")
    parser.add_argument("--eval-only", action="store_true", help="measure the runs already in --out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--config", str(RECIPE), "--data", str(args.data), "--clip-weights", str(args.clip),
              "--sample-every", "1000000", "--threads", str(args.threads), "--quiet", "--device", "cpu"]
    results = {}
    for k, (name, extra) in enumerate(MODELS.items()):
        out = args.out / f"run{k}"
        timing = args.out / f"run{k}.train_seconds"
        if not args.eval_only:
            timing.write_text(str(train_for(args.minutes, [*common, *extra(args.vae), "--name", f"run{k}"], out,
                                            args.out / f"run{k}.log")))
        from minidiff_cli.files.model_file import read_config

        model = out / "model.safetensors"
        results[name] = {"train_seconds": float(timing.read_text()), "model": read_config(model)["training"],
                         "report": evaluate(model, args), "seconds_per_image": seconds_per_image(model, args)}
        print(f"{name}: done", file=sys.stderr)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"| model | steps | training minutes | R-precision | seen / held-out | CLIP score | FD (CLIP) | "
          f"precision / recall | s / image ({args.run}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, run in results.items():
        print(row(name, run))
    for name, run in results.items():
        r = run["report"]["real"]
        size = name.split()[-1]
        print(f"| real images at {size} | | | {r['r_precision']:.3f} | | {r['clip_score']:.1f} | {r['fd_clip']:.4f} | "
              f"{r['precision']:.2f} / {r['recall']:.2f} | |")


if __name__ == "__main__":
    main()

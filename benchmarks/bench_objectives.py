"""Time to quality on the shapes world: eps, v and flow matching, through the real CLI.

Trains one model per objective with the same U-Net, batch, learning rate and step budget
(recipes/shapes.toml's class-conditional model) and measures shapes adherence with
`minidiff eval` at several points of the budget, then at few sampling steps for the final
models. Training is one `minidiff train` run per objective, stopped at each measuring point and
continued with --resume (the cosine learning-rate decay is fixed to the whole budget, so the
weights are those of one uninterrupted run; see docs/design.md, "Training is stateless per step").

    python benchmarks/bench_objectives.py                      # the comparison: hours on 2 cores
    python benchmarks/bench_objectives.py --smoke              # tiny U-Net, a few steps: proves it runs
    python benchmarks/bench_objectives.py --steps 4000 --every 500 --out runs/bench-objectives --json

The objectives (OBJECTIVES below): eps on the cosine schedule with min-SNR-5 weighting (the
shipped model's recipe), v on the cosine schedule rescaled to zero terminal SNR with the plain v
loss (as Lin et al. 2023; min-SNR's v weight, min(SNR, 5) / (SNR + 1), would all but drop the
zero-SNR step that the rescaling is for), and flow matching on the flow schedule with SD3's
logit-normal timesteps.
Wall times are the training processes' alone (evaluation excluded), on the threads given; they
include each process's start (a few seconds per measuring point).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OBJECTIVES = {
    "eps (cosine)": ["--prediction", "eps", "--schedule", "cosine", "--min-snr-gamma", "5"],
    "v (cosine, zero-terminal SNR)": ["--prediction", "v", "--schedule", "cosine", "--zero-terminal-snr"],
    "flow (logit-normal)": ["--prediction", "flow", "--schedule", "flow", "--timestep-sampling", "logit-normal"],
}
# recipes/shapes.toml's U-Net and optimisation, for every objective.
RECIPE = ["--data", "shapes", "--conditioner", "class", "--image-size", "32", "--base-channels", "32",
          "--channel-mult", "1,2,2", "--attention-resolutions", "8", "--cross-attention-resolutions", "8",
          "--batch-size", "32", "--lr", "4e-4", "--warmup", "200"]
SMOKE = ["--data", "shapes", "--conditioner", "class", "--image-size", "16", "--base-channels", "8",
         "--channel-mult", "1,2", "--attention-resolutions", "8", "--cross-attention-resolutions", "8",
         "--timesteps", "100", "--batch-size", "4", "--lr", "1e-3", "--warmup", "2"]
SMOKE_TOML = "head_dim = 8\nclass_dim = 16\n"  # no flags for these; 8-channel heads at 16 px
SHIPPED_SEEN = 0.972  # recipes/README.md: the shipped shapes-clip model, seen pairs, DDIM 50 steps


def minidiff() -> list[str]:
    exe = shutil.which("minidiff")
    return [exe] if exe else [sys.executable, "-m", "minidiff_cli"]


def run(args: list[str]) -> float:
    """Run a minidiff command; its wall time in seconds. A failure stops the benchmark with its stderr."""
    start = time.perf_counter()
    result = subprocess.run([*minidiff(), *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"minidiff {' '.join(args[:2])} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def evaluate(model: Path, runs: str, per_prompt: int, threads: int) -> list[dict]:
    """`minidiff eval --json`'s runs: seen adherence, seconds, per sampler:steps."""
    result = subprocess.run([*minidiff(), "eval", "-m", str(model), "-n", str(per_prompt), "--runs", runs,
                             "--threads", str(threads), "--json", "-q"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"minidiff eval failed:\n{result.stderr[-2000:]}")
    return [{k: r[k] for k in ("sampler", "steps", "seen", "seconds")} for r in json.loads(result.stdout)["runs"]]


def train_curve(name: str, flags: list[str], out: Path, args) -> dict:
    """Train ``name`` to args.steps, evaluating at every args.every steps; its curve and final runs."""
    points, train_s = [], 0.0
    common = [*args.recipe, *flags, "--lr-decay-steps", str(args.steps), "--save-every", str(args.every),
              "--sample-every", str(args.steps * 10), "--log-every", str(args.every), "--threads",
              str(args.threads), "--quiet", "--device", "cpu", "--out", str(out), *args.extra]
    for step in range(args.every, args.steps + 1, args.every):
        again = ["--resume"] if step > args.every else []
        train_s += run(["train", *common, *again, "--max-steps", str(step)])
        seen = evaluate(out / "model.safetensors", args.curve_run, args.per_prompt, args.threads)[0]["seen"]
        points.append({"step": step, "train_seconds": round(train_s, 1), "seen": seen})
        print(f"{name}: step {step}, {train_s:.0f} s of training, seen adherence {seen:.3f}", file=sys.stderr)
    final = evaluate(out / "model.safetensors", args.final_runs, args.per_prompt, args.threads)
    return {"objective": name, "flags": flags, "curve": points, "final": final,
            "time_to_target": next((p["train_seconds"] for p in points if p["seen"] >= args.target), None)}


def table(results: list[dict], args) -> str:
    """The curves and the final runs as Markdown tables, with time to the target adherence."""
    steps = [p["step"] for p in results[0]["curve"]]
    lines = [f"Seen-pair adherence ({args.curve_run}, {args.per_prompt} images per prompt) at each step; "
             f"training wall time in brackets.", "",
             "| objective | " + " | ".join(str(s) for s in steps) + f" | time to {args.target:.3f} |",
             "|---|" + "---|" * (len(steps) + 1)]
    for r in results:
        cells = [f"{p['seen']:.3f} ({p['train_seconds']:.0f} s)" for p in r["curve"]]
        reached = "not reached" if r["time_to_target"] is None else f"{r['time_to_target']:.0f} s"
        lines.append(f"| {r['objective']} | " + " | ".join(cells) + f" | {reached} |")
    runs = [f"{x['sampler']}:{x['steps']}" for x in results[0]["final"]]
    lines += ["", "Final models, seen-pair adherence (sampling seconds):", "",
              "| objective | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for r in results:
        lines.append(f"| {r['objective']} | " + " | ".join(f"{x['seen']:.3f} ({x['seconds']:.1f} s)"
                                                         for x in r["final"]) + " |")
    return "\n".join(lines)


def machine(threads: int) -> str:
    import os

    import torch

    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {threads} threads per command, load average "
            f"{os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="training steps per objective [4000]")
    parser.add_argument("--every", type=int, default=500, help="evaluate every N steps [500]")
    parser.add_argument("--per-prompt", type=int, default=8, help="images per prompt for each evaluation [8]")
    parser.add_argument("--curve-run", default="ddim:25", help="sampler:steps of the curve [ddim:25]")
    parser.add_argument("--final-runs", default="ddim:4,ddim:8,ddim:15", help="sampler:steps for the final models")
    parser.add_argument("--target", type=float, default=SHIPPED_SEEN, help="adherence to reach [the shipped model's]")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every command [2]")
    parser.add_argument("--out", type=Path, help="keep the runs in this folder [a temporary one]")
    parser.add_argument("--smoke", action="store_true", help="a tiny U-Net at 16 px, 4 steps: does it all run?")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-objectives-"))
    args.recipe, args.extra = RECIPE, []
    if args.smoke:
        args.steps, args.every, args.per_prompt = 4, 2, 1
        args.recipe = SMOKE
        root.mkdir(parents=True, exist_ok=True)
        (root / "smoke.toml").write_text(SMOKE_TOML)
        args.extra = ["--config", str(root / "smoke.toml")]
    if args.steps % args.every:
        sys.exit("--steps must be a multiple of --every")
    start = time.perf_counter()
    results = [train_curve(name, flags, root / f"run{k}", args) for k, (name, flags) in enumerate(OBJECTIVES.items())]
    summary = {"machine": machine(args.threads), "steps": args.steps, "every": args.every,
               "wall_seconds": round(time.perf_counter() - start, 1), "results": results}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"Machine: {summary['machine']}. Total wall time {summary['wall_seconds']:.0f} s; runs in {root}.\n")
        print(table(results, args))


if __name__ == "__main__":
    main()

"""Distillation methods side by side on the shapes model: adherence at 1, 2 and 4 steps against CPU time.

Runs `minidiff distill` once per method from the same teacher, stopped at each measuring point
and continued with --resume (the learning-rate decay is fixed to the whole budget, so the
weights are those of one uninterrupted run), and measures prompt adherence with `minidiff eval`
at 1, 2 and 4 steps of the student's sampler after each chunk (lcm; ddim for mcm). The teacher's own DDIM at 2, 4 and 50 steps is the
reference, in the same run. CPU seconds are the distill processes' own (user + system), so two
methods run side by side on a busy machine still compare fairly; wall seconds are given too.

    python benchmarks/bench_distill.py --out runs/bench-distill --json
    python benchmarks/bench_distill.py --methods lcm --steps 1500 --every 250 --out runs/bench-lcm
    python benchmarks/bench_distill.py --smoke          # a few steps of each: proves it runs

Methods: lcm (consistency distillation: one guided DDIM step of the teacher per target, guidance
folded in, the student samples at cfg 1), mcm (multistep consistency distillation: the same
teacher step, the student consistent at the next point of its own grid, sampled by DDIM) and lct (consistency training: no teacher call, the
student samples at the teacher's cfg, two network calls per step).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cli() -> list[str]:
    exe = shutil.which("minidiff", path=str(Path(sys.executable).parent)) or shutil.which("minidiff")
    return [exe] if exe else [sys.executable, "-m", "minidiff_cli"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str]) -> tuple[float, float]:
    """(cpu seconds, wall seconds) of one minidiff process; a failure stops the benchmark with its stderr."""
    cpu, wall = children_cpu(), time.time()
    result = subprocess.run(cli() + args, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"minidiff {' '.join(args[:2])} failed:\n{result.stderr[-2000:]}")
    return children_cpu() - cpu, time.time() - wall


def evaluate(model: str, runs: str, cfg: float, threads: int, n: int) -> dict[str, dict]:
    out = Path(tempfile.mkdtemp()) / "eval.json"  # not in the run folder, which must hold only its own files
    subprocess.run(cli() + ["eval", "--model", model, "--runs", runs, "--cfg", str(cfg), "-n", str(n), "--quiet",
                            "--threads", str(threads), "-o", str(out)], check=True, capture_output=True)
    report = json.loads(out.read_text())
    shutil.rmtree(out.parent)
    return {f"{r['sampler']}:{r['steps']}": {"seen": r["seen"], "held_out": r["held_out"]} for r in report["runs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="shapes-clip")
    parser.add_argument("--methods", default="lcm,lct")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--student-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-n", type=int, default=8, help="images per prompt in each evaluation")
    parser.add_argument("--out", default="runs/bench-distill")
    parser.add_argument("--extra", default="", help="more distill flags for every method, e.g. \"--gain-cap 16\"")
    parser.add_argument("--no-teacher", action="store_true", help="skip the teacher's evaluation (known already)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.every, args.n = 4, 2, 1
    out = Path(args.out)
    report = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "teacher": args.teacher, "batch_size": args.batch_size,
              "threads": args.threads,
              "teacher_eval": None if args.no_teacher else evaluate(args.teacher, "ddim:2,ddim:4,ddim:50", 3.0,
                                                                    args.threads, args.n),
              "methods": {}}
    for method in args.methods.split(","):
        folder, cpu, wall, curve = out / method, 0.0, 0.0, []
        for stop in range(args.every, args.steps + 1, args.every):
            flags = ["--max-steps", str(stop), "--threads", str(args.threads), "--quiet", "--sample-every", "100000"]
            if stop == args.every:
                flags += ["--model", args.teacher, "--method", method, "--steps", str(args.student_steps),
                          "--batch-size", str(args.batch_size), "--lr-decay-steps", str(args.steps),
                          "--save-every", str(args.every), *shlex.split(args.extra)]
            else:
                flags += ["--resume"]
            c, w = run(["distill", "--out", str(folder), *flags])
            cpu, wall = cpu + c, wall + w
            cfg = 3.0 if method == "lct" else 1.0  # lct folds no guidance in
            sampler = "ddim" if method == "mcm" else "lcm"
            scores = evaluate(str(folder), f"{sampler}:1,{sampler}:2,{sampler}:4", cfg, args.threads, args.n)
            curve.append({"step": stop, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), **scores})
            print(f"{method} step {stop}: cpu {cpu:.0f} s, " + ", ".join(
                f"{k} {v['seen']:.3f}/{v['held_out']:.3f}" for k, v in scores.items()), file=sys.stderr, flush=True)
        report["methods"][method] = curve
    text = json.dumps(report, indent=2)
    (out / "report.json").write_text(text)
    print(text if args.json else f"report: {out / 'report.json'}")


if __name__ == "__main__":
    main()

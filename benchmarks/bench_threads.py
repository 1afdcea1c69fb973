"""Does minidiff's automatic thread count hold up on a quiet machine and on a busy one?

For each machine state (quiet; k other CPU-bound processes, started here and stopped by
themselves), runs real `minidiff` commands in new processes, as a user would, with:
  - auto: no --threads, no OMP_NUM_THREADS, no MINIDIFF_THREADS (the default);
  - --threads 1, and --threads C for C = the usable cores (torch's own default).
Reports the median wall time of each and the two ratios the design promises:
  quiet: auto / torch's default  (target: at most 1.10)
  busy:  auto / best fixed setting  (target: at most 1.30)

    python benchmarks/bench_threads.py                 # ~10 min on 2 cores
    python benchmarks/bench_threads.py --reps 3 --json
    python benchmarks/bench_threads.py --workloads generate

Run it on an otherwise idle machine: "quiet" means only what this script starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"
BURN_LIMIT_S = 900  # a burner never outlives this, even if this script is killed


def minidiff() -> list[str]:
    exe = shutil.which("minidiff")
    return [exe] if exe else [sys.executable, "-m", "minidiff_cli"]


def workloads(folder: Path) -> dict[str, list[str]]:
    return {
        # A cold start included: what `minidiff generate` costs a user, 8 images, 20 DDIM steps.
        "generate": ["generate", "a red circle", "-n", "8", "--steps", "20", "-q", "-o", str(folder / "g")],
        # 30 training steps of the shipped model's size at batch 32, set-up included.
        "train": ["train", "--data", "shapes", "--conditioner", "class", "--max-steps", "30", "--batch-size", "32",
                  "--base-channels", "32", "--save-every", "1000", "--sample-every", "1000", "--quiet",
                  "--out", str(folder / "t")],
    }


def run_once(args: list[str], threads: int | None, folder: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MINIDIFF_THREADS")}
    shutil.rmtree(folder / "g", ignore_errors=True)
    shutil.rmtree(folder / "t", ignore_errors=True)
    flags = [] if threads is None else ["--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run([*minidiff(), *args, *flags], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def start_burners(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=BURN_LIMIT_S)]) for _ in range(count)]


def stop(burners: list[subprocess.Popen]) -> None:
    for p in burners:
        p.kill()
    for p in burners:
        p.wait()


def measure(states: list[int], names: list[str], reps: int) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {"auto": None, "1": 1, str(cores): cores}
    results: dict = {"cores": cores, "reps": reps, "states": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for busy in states:
            burners = start_burners(busy)
            time.sleep(1.0)  # let them reach full speed
            state = results["states"].setdefault(f"{busy} busy", {})
            try:
                for name in names:
                    args = workloads(folder)[name]
                    times = {label: [] for label in settings}
                    for _ in range(reps):  # settings interleaved, so drift hits each alike
                        for label, threads in settings.items():
                            times[label].append(run_once(args, threads, folder))
                            print(f"{busy} busy, {name}, threads {label}: {times[label][-1]:.2f} s",
                                  file=sys.stderr, flush=True)
                    state[name] = {label: {"median_s": round(statistics.median(v), 3),
                                           "min_s": round(min(v), 3), "max_s": round(max(v), 3)}
                                   for label, v in times.items()}
            finally:
                stop(burners)
    return add_ratios(results, str(cores))


def add_ratios(results: dict, default: str) -> dict:
    for state, per_workload in results["states"].items():
        quiet = state.startswith("0 ")
        for figures in per_workload.values():
            auto = figures["auto"]["median_s"]
            if quiet:
                figures["auto_vs_torch_default"] = round(auto / figures[default]["median_s"], 3)
            else:
                best = min(v["median_s"] for k, v in figures.items() if k not in ("auto",) and isinstance(v, dict))
                figures["auto_vs_best_fixed"] = round(auto / best, 3)
    return results


def table(results: dict) -> str:
    cores = results["cores"]
    lines = [f"| machine | workload | auto | --threads 1 | --threads {cores} | ratio |", "|---|---|---|---|---|---|"]
    for state, per_workload in results["states"].items():
        for name, f in per_workload.items():
            cells = [f"{f[k]['median_s']:.2f} s ({f[k]['min_s']:.2f}-{f[k]['max_s']:.2f})" for k in ("auto", "1", str(cores))]
            ratio = (f"auto / torch default {f['auto_vs_torch_default']:.2f}" if "auto_vs_torch_default" in f
                     else f"auto / best fixed {f['auto_vs_best_fixed']:.2f}")
            lines.append(f"| {state} | {name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--busy", default="0,1,2", help="numbers of other busy processes, e.g. 0,1,2")
    parser.add_argument("--workloads", default="generate,train")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = measure([int(b) for b in args.busy.split(",")], args.workloads.split(","), args.reps)
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()

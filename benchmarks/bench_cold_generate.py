"""A cold `minidiff generate` against a cold `python -c "import torch"`, side by side, as a ratio.

Each round starts both as new processes, one after the other (the order alternates), so both see
the same machine load and the same file cache; the report gives the median and spread of each and
the ratio of the medians.

    python benchmarks/bench_cold_generate.py --model shapes-fast --rounds 10
    python benchmarks/bench_cold_generate.py --model shapes-clip --args "--steps 50"
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:3])} failed:\n{result.stderr[-1500:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-fast")
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--args", default="", help="more generate flags, e.g. \"--steps 50\"")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    exe = shutil.which("minidiff", path=str(Path(sys.executable).parent)) or shutil.which("minidiff")
    folder = Path(tempfile.mkdtemp())
    torch_times, generate_times = [], []
    for k in range(args.rounds):
        generate = [exe, "generate", args.prompt, "--model", args.model, "-o", str(folder / f"{k}.png"), "--quiet",
                    *shlex.split(args.args)]
        pair = [("torch", [sys.executable, "-c", "import torch"]), ("generate", generate)]
        for name, command in pair if k % 2 == 0 else reversed(pair):
            (torch_times if name == "torch" else generate_times).append(timed(command))
    shutil.rmtree(folder)
    report = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "model": args.model, "args": args.args, "rounds": args.rounds,
              "import_torch_s": {"median": statistics.median(torch_times), "min": min(torch_times),
                                 "max": max(torch_times)},
              "generate_s": {"median": statistics.median(generate_times), "min": min(generate_times),
                             "max": max(generate_times)}}
    report["ratio"] = report["generate_s"]["median"] / report["import_torch_s"]["median"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"import torch {report['import_torch_s']['median']:.2f} s (min {min(torch_times):.2f}, "
              f"max {max(torch_times):.2f}); generate --model {args.model} {report['generate_s']['median']:.2f} s "
              f"(min {min(generate_times):.2f}, max {max(generate_times):.2f}); ratio {report['ratio']:.2f}")


if __name__ == "__main__":
    main()

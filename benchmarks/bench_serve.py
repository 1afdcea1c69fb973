"""`minidiff serve` under load: 8 concurrent clients, a fixed number of requests at 4 steps, against
the CLI drawing the same pictures on the same machine.

    python benchmarks/bench_serve.py --clients 8 --requests 48 --steps 4 --model shapes-clip

The server is started through the installed console script on a free port of 127.0.0.1 with a
queue long enough for every client (so nothing is refused by design); each client sends its share
of txt2img requests (one picture at the model's size, its own seed) one after another. Reported:
requests answered and lost (any non-200 or client error), latency p50 / p95 / min..max, images/s
over the wall time from the first request to the last answer, and the CLI's images/s for the same
prompts and seeds (`generate --prompts FILE --batch-size 1`, the batching the server uses), both
with and without its start-up (a run of one picture is subtracted). Both run at the same thread
count (--threads, default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a pink square",
           "a cyan triangle", "a purple circle", "an orange triangle"]


def minidiff() -> list[str]:
    exe = shutil.which("minidiff")
    return [exe] if exe else [sys.executable, "-m", "minidiff_cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, env) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    proc = subprocess.Popen([*minidiff(), "serve", "--port", str(port), "--model", args.model, "--queue",
                             str(args.requests), "--threads", str(args.threads)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"minidiff serve exited: {proc.stderr.read()[-1500:]}")
        try:
            if requests.get(f"{url}/sdapi/v1/options", timeout=5).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.3)
    proc.kill()
    sys.exit("minidiff serve did not start in 300 s")


def load(url: str, args) -> dict:
    import requests

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    jobs = [(k, PROMPTS[k % len(PROMPTS)]) for k in range(args.requests)]

    def client(share):
        session = requests.Session()
        for k, prompt in share:
            body = {"prompt": prompt, "seed": k, "steps": args.steps, "sampler_name": "DDIM", "cfg_scale": 3,
                    "width": 0, "height": 0}
            start = time.perf_counter()
            try:
                answer = session.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)
                ok = answer.status_code == 200 and len(answer.json()["images"]) == 1
                reason = None if ok else f"{answer.status_code}: {answer.text[:200]}"
            except requests.RequestException as exc:
                reason = f"{type(exc).__name__}: {exc}"
            with lock:
                if reason is None:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures.append(reason)

    threads = [threading.Thread(target=client, args=(jobs[i::args.clients],)) for i in range(args.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    return {"answered": len(latencies), "lost": args.requests - len(latencies), "failures": failures[:5],
            "wall_s": wall, "images_per_s": len(latencies) / wall, "p50_s": statistics.median(latencies),
            "p95_s": quantiles[18], "min_s": min(latencies), "max_s": max(latencies)}


def cli_rate(args, env) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lines = [json.dumps({"prompt": PROMPTS[k % len(PROMPTS)], "seed": k, "n": 1}) for k in range(args.requests)]
        (Path(tmp) / "prompts.txt").write_text("\n".join(lines) + "\n")
        (Path(tmp) / "one.txt").write_text(lines[0] + "\n")
        common = ["--model", args.model, "--steps", str(args.steps), "--cfg", "3", "--sampler", "ddim",
                  "--batch-size", "1", "-q", "--threads", str(args.threads)]
        times = {}
        for name in ("one", "prompts"):
            start = time.perf_counter()
            result = subprocess.run([*minidiff(), "generate", "--prompts", str(Path(tmp) / f"{name}.txt"), *common,
                                     "-o", f"{tmp}/{name}/"], env=env, capture_output=True, text=True)
            if result.returncode:
                sys.exit(f"generate failed: {result.stderr[-1500:]}")
            times[name] = time.perf_counter() - start
    steady = (args.requests - 1) / max(1e-9, times["prompts"] - times["one"])
    return {"cli_wall_s": times["prompts"], "cli_images_per_s": args.requests / times["prompts"],
            "cli_start_s": times["one"], "cli_steady_images_per_s": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc, url = start_server(args, env)
    try:
        import requests

        requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": args.steps}, timeout=600)
        served = load(url, args)
    finally:
        proc.send_signal(2)  # Ctrl-C
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    cli = cli_rate(args, env)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "model": args.model,
              "clients": args.clients, "requests": args.requests, "steps": args.steps, "threads": args.threads,
              **served, **cli, "ratio_to_cli": served["images_per_s"] / cli["cli_images_per_s"],
              "ratio_to_cli_steady": served["images_per_s"] / cli["cli_steady_images_per_s"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key:>26}: {value:.3f}" if isinstance(value, float) else f"{key:>26}: {value}")


if __name__ == "__main__":
    main()

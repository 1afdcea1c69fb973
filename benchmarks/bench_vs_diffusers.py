"""minidiff's U-Net against diffusers' UNet2DConditionModel at equal FLOPs, on the CPU or a GPU.

    python benchmarks/bench_vs_diffusers.py                # the full run (a few minutes on 2 cores)
    python benchmarks/bench_vs_diffusers.py --quick        # a smoke test: small batches, few steps
    python benchmarks/bench_vs_diffusers.py --json         # one JSON object on stdout
    python benchmarks/bench_vs_diffusers.py --threads 1    # torch threads, here and in the CLI runs
    python benchmarks/bench_vs_diffusers.py --device cuda --autocast bf16 [--compile]   # on a GPU

What is compared, in one process and one run (see benchmarks/README.md):

1. sampling: 16 images at 32x32, 50 DDIM steps, classifier-free guidance (a batch of 32 per
   step). minidiff goes through its own ``Pipeline`` (prompt encoding, guidance, x0 clamping,
   DDIM); diffusers through ``UNet2DConditionModel`` + ``DDIMScheduler`` (clip_sample) in the
   usual cond/uncond loop, given the same text context [32, 16, 64] and pooled vector [32, 64];
2. one training step: batch 64, noise-prediction MSE, forward + backward + AdamW.

The diffusers U-Net is the one, among a few widths, whose FLOPs per forward pass (counted with
torch.utils.flop_counter) are closest to minidiff's; both counts are printed and must agree
within 10%. Timings alternate the two models (ABBA order), after a warm-up, and report the
median with the spread (min..max). Achieved GFLOP/s is set against a 2048x2048 float32 matmul
measured in the same run (on a GPU: 8192x8192, float32 and, with --autocast, bfloat16).
``--autocast bf16`` runs both models under torch.autocast and ``--compile [MODE]`` runs both
through torch.compile; these work on the CPU as well, so the GPU code paths run everywhere.
Then, in fresh processes: ``minidiff --help`` and a cold
``minidiff generate`` (median of 5 runs, and the peak RSS of the generate).

diffusers is a benchmark-only dependency: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "minidiff_cli" / "models" / "shapes-clip.safetensors"
PROMPT = "a red circle"
CFG = 3.0
FLOP_TOLERANCE = 0.10

# The shipped model's configuration (recipes/shapes-clip.toml and the text tower it was trained with).
SHIPPED_CONFIG = {
    "name": "bench-random",
    "unet": {"image_size": 32, "in_channels": 3, "out_channels": 3, "base_channels": 32,
             "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [8],
             "cross_attention_resolutions": [8], "mid_attention": True, "context_dim": 64,
             "pooled_dim": 64, "head_dim": 32, "dropout": 0.0, "norm_groups": 8},
    "schedule": {"name": "cosine", "num_timesteps": 1000, "options": {}},
    "conditioner": {"name": "clip", "config": {
        "embed_dim": 64, "quick_gelu": False,
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}},
    "prediction": "eps",
}

# diffusers widths tried: the same layout as minidiff (attention at 8x8 and in the middle), other widths.
DIFFUSERS_WIDTHS = [(32, 64, 64), (32, 64, 56), (32, 56, 64), (32, 64, 48), (24, 64, 64)]


# -- the two models ------------------------------------------------------------------------
def minidiff_model(path: Path | None, device: torch.device):
    """The shipped model (or ``path``) if it exists, else the same config with random weights."""
    from minidiff_cli.diffusion.model import DiffusionModel

    if path is not None and path.is_file():
        return DiffusionModel.load(path, device=device), str(path)
    model = DiffusionModel.build(SHIPPED_CONFIG)
    randomize(model.unet)
    randomize(model.conditioner)
    return model.to(device).eval(), "random weights in the shipped config"


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Small random weights everywhere (the U-Net zero-initialises its residual branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def diffusers_unet(widths: tuple[int, ...], head_dim: int = 32):
    from diffusers import UNet2DConditionModel

    heads = max(1, round(widths[-1] / head_dim))
    while widths[-1] % heads:
        heads -= 1
    # Same layout as minidiff's shipped U-Net: 3 levels, 1 block each way down (2 up), attention
    # (self + cross, here in a transformer block with a feed-forward) at 8x8 and in the middle,
    # GroupNorm(8), the pooled text vector projected into the time embedding.
    return UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=widths, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=heads,  # diffusers reads this as the number of heads
        norm_num_groups=8, class_embed_type="projection", projection_class_embeddings_input_dim=64,
    ).eval()


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def pick_diffusers(target: int, x, t, ctx, pooled):
    """The diffusers U-Net whose forward FLOPs are closest to ``target``; and every candidate's."""
    tried = []
    for widths in DIFFUSERS_WIDTHS:
        net = diffusers_unet(widths).to(x.device)
        with torch.no_grad():
            flops = count_flops(lambda: net(x, t, encoder_hidden_states=ctx, class_labels=pooled))
        tried.append((abs(flops - target), widths, flops, net))
    tried.sort(key=lambda item: item[0])
    _, widths, flops, net = tried[0]
    return net, widths, flops, [(w, f) for _, w, f, _ in tried]


# -- what is timed -------------------------------------------------------------------------
def minidiff_sampler(model, images: int, steps: int):
    from minidiff_cli.inference.pipeline import Generation, Pipeline

    pipe = Pipeline(model, name="bench")
    gen = Generation(PROMPT, steps=steps, cfg=CFG, sampler="ddim", seed=0)
    return lambda: pipe.sample(gen, images)


def diffusers_sampler(unet, ctx, pooled, images: int, steps: int):
    from diffusers import DDIMScheduler

    # The same process as minidiff's default: cosine betas, trailing timesteps, x0 clamped to [-1, 1].
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                              clip_sample_range=1.0, set_alpha_to_one=True, timestep_spacing="trailing")

    def run():
        with torch.inference_mode():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(images, 3, 32, 32, generator=g).to(ctx.device)
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                eps = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx, class_labels=pooled).sample
                eps_cond, eps_uncond = eps.chunk(2)
                x = scheduler.step(eps_uncond + CFG * (eps_cond - eps_uncond), t, x).prev_sample
        return x

    return run


def train_step(forward, params, schedule, batch: int, ctx, pooled, seed: int = 0):
    """One noise-prediction step: forward, MSE, backward, AdamW (the same for both models)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    abar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t, noise, t = ((abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(ctx.device), noise.to(ctx.device),
                     t.to(ctx.device))
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = F.mse_loss(forward(x_t, t, ctx, pooled), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def sync(device: torch.device) -> None:
    """Wait for the device: GPU work is asynchronous, so a host clock read without this times nothing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def trainers(unet, dunet, schedule, batch: int, ctx, pooled) -> dict:
    """A training step for each U-Net (put in training mode), fed the same batch."""
    unet.train().requires_grad_(True)
    dunet.train().requires_grad_(True)

    def diffusers_forward(x_, t_, c_, p_):
        return dunet(x_, t_, encoder_hidden_states=c_, class_labels=p_).sample

    return {"minidiff": train_step(lambda x_, t_, c_, p_: unet(x_, t_, context=c_, pooled=p_),
                                   list(unet.parameters()), schedule, batch, ctx, pooled),
            "diffusers": train_step(diffusers_forward, list(dunet.parameters()), schedule, batch, ctx, pooled)}


def timed(fns: dict, reps: int, device: torch.device, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function; calls alternate in ABBA order so that drift cancels."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def matmul_gflops(reps: int, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The machine's practical matmul rate: 2048x2048 on a CPU, 8192x8192 on a GPU (large enough to fill it)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):  # warm-up: thread pool and caches
        a @ b
    times = []
    for _ in range(max(reps, 7)):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def under(context, fn):
    """``fn`` run inside a fresh ``context()`` each call (autocast, or nothing)."""
    def run():
        with context():
            return fn()
    return run


# -- the command line, in fresh processes ----------------------------------------------------
def minidiff_command() -> list[str]:
    exe = shutil.which("minidiff")
    return [exe] if exe else [sys.executable, "-m", "minidiff_cli"]


# Runs one command and reports its wall time and peak RSS. It runs in a small process of its own:
# a child's ru_maxrss counts the memory of the process it was forked from (Linux keeps the high-water
# mark across exec), so forking the command straight from this big benchmark would report our size.
TIMER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"wall": time.perf_counter() - start, "maxrss_kib": usage.ru_maxrss,
                  "rc": os.waitstatus_to_exitcode(status), "stderr": err.decode(errors="replace")[-500:]}))
"""


def run_process(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one run of ``cmd``; fails loudly if it fails."""
    out = subprocess.run([sys.executable, "-c", TIMER, *cmd], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if result["rc"]:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result['rc']}): {result['stderr']}")
    return result["wall"], result["maxrss_kib"] / 1024  # ru_maxrss is in KiB on Linux


def cli_timings(model_file: Path | None, runs: int, threads: int | None, device: torch.device) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch takes its intra-op thread count from it
    cmd = minidiff_command()
    out = {"help_s": [run_process(cmd + ["--help"], env)[0] for _ in range(runs)]}
    if model_file is None or not model_file.is_file():
        out["generate_note"] = f"skipped: no model file ({model_file or SHIPPED} does not exist)"
        return out
    walls, rss = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            wall, peak = run_process(cmd + ["generate", PROMPT, "--model", str(model_file), "--device",
                                            device.type, "-q", "-o", tmp], env)
        walls.append(wall)
        rss.append(peak)
    out.update(generate_s=walls, generate_maxrss_mib=rss, generate_model=str(model_file))
    return out


# -- the report ------------------------------------------------------------------------------
def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per model [5; 2 with --quick]")
    parser.add_argument("--quick", action="store_true", help="4 images x 10 steps, training batch 16, 2 CLI runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--model", type=Path, default=SHIPPED, help="model file to sample from and to generate "
                        "with in the CLI runs [the shipped model; random weights in its config if absent]")
    parser.add_argument("--no-cli", action="store_true", help="skip the --help and generate process timings")
    parser.add_argument("--nchw", action="store_true", help="run minidiff's U-Net in NCHW, as before it went "
                        "channels-last on the CPU (to measure that change)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto [cpu]")
    parser.add_argument("--autocast", choices=["bf16"], default=None,
                        help="run both models under torch.autocast in bfloat16 (sampling and training)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="torch.compile both U-Nets (MODE: default, reduce-overhead, max-autotune)")
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc as it is (the minidiff "
                        "command keeps freed memory for reuse, and by default so does this process, for both models)")
    args = parser.parse_args(argv)

    images, steps, batch, cli_runs = (4, 10, 16, 2) if args.quick else (16, 50, 64, 5)
    reps = args.reps or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    load_start = os.getloadavg()
    from minidiff_cli.errors import MinidiffError
    from minidiff_cli.runtime.devices import pick_device

    try:
        device = pick_device(args.device)  # the same choice and checks as `minidiff generate --device`
    except MinidiffError as exc:
        raise SystemExit(str(exc)) from None
    from minidiff_cli.runtime.allocator import keep_freed_memory

    kept = False if args.system_malloc else keep_freed_memory()  # process-wide: both models get it
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.autocast
                else contextlib.nullcontext)

    import diffusers

    peak = matmul_gflops(reps, device)
    peak_bf16 = matmul_gflops(reps, device, torch.bfloat16) if args.autocast else None
    model, weights = minidiff_model(args.model, device)
    if args.nchw:
        model.unet.memory_format = torch.contiguous_format
    with torch.no_grad():
        cond = model.conditioner.encode([PROMPT] * images).to(device)
        uncond = model.conditioner.null(images).to(device)
    ctx = torch.cat([cond.context, uncond.context])  # [2N, 16, 64]: cond rows, then uncond rows
    pooled = torch.cat([cond.pooled, uncond.pooled])  # [2N, 64]
    x, t = torch.randn(2 * images, 3, 32, 32, device=device), torch.full((2 * images,), 500, device=device)

    with torch.no_grad():
        flops_m = count_flops(lambda: model.unet(x[:1], t[:1], context=ctx[:1], pooled=pooled[:1]))
    dunet, widths, flops_d, tried = pick_diffusers(flops_m, x[:1], t[:1], ctx[:1], pooled[:1])
    log(f"machine: {device_name(device)}; {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s), diffusers {diffusers.__version__}; load average {load_start[0]:.2f}")
    log(f"options: device {device}, autocast {args.autocast or 'off'}, compile {args.compile or 'off'}, "
        f"freed memory {'kept for reuse' if kept else 'returned to the OS (system malloc)'}")
    log(f"float32 matmul: {peak:.1f} GFLOP/s" + (f"; bfloat16 matmul: {peak_bf16:.1f} GFLOP/s" if peak_bf16 else ""))
    log(f"FLOPs per forward (1 image): minidiff {flops_m / 1e6:.1f} M ({weights}); "
        f"diffusers {flops_d / 1e6:.1f} M with block_out_channels {widths} "
        f"({flops_d / flops_m - 1:+.1%}; tried " + ", ".join(f"{w}: {f / 1e6:.0f} M" for w, f in tried) + ")")
    if abs(flops_d / flops_m - 1) > FLOP_TOLERANCE:
        raise SystemExit(f"no diffusers width within {FLOP_TOLERANCE:.0%} of minidiff's FLOPs; add one")

    # The training steps' FLOPs are counted on the eager modules, before any compile (this takes one
    # AdamW step on each network; weights do not change timings).
    batch_ctx = [v[:1].expand(batch, *v.shape[1:]).contiguous() for v in (ctx, pooled)]
    train_flops = {name: count_flops(fn) for name, fn in trainers(model.unet, dunet, model.schedule, batch,
                                                                     *batch_ctx).items()}
    model.unet.eval().requires_grad_(False)
    dunet.eval().requires_grad_(False)
    if args.compile:
        # The first timed warm-up call compiles.
        model.unet = torch.compile(model.unet, mode=args.compile)
        dunet = torch.compile(dunet, mode=args.compile)
    warmup = 3 if args.compile else 1  # CUDA-graph modes record on the second and third calls

    # 1. sampling
    sampling = timed({"minidiff": under(autocast, minidiff_sampler(model, images, steps)),
                      "diffusers": under(autocast, diffusers_sampler(dunet, ctx, pooled, images, steps))},
                     reps, device, warmup)
    sample_flops = {"minidiff": flops_m * 2 * images * steps, "diffusers": flops_d * 2 * images * steps}

    # 2. a training step
    steppers = trainers(model.unet, dunet, model.schedule, batch, *batch_ctx)
    training = timed({name: under(autocast, fn) for name, fn in steppers.items()}, reps, device, warmup)

    cli = {} if args.no_cli else cli_timings(args.model, cli_runs, args.threads, device)
    load_end = os.getloadavg()

    result = {"machine": device_name(device), "cpu": cpu_name(), "cores": os.cpu_count(),
              "threads": torch.get_num_threads(), "device": str(device), "autocast": args.autocast,
              "compile": args.compile, "kept_freed_memory": kept,
              "torch": torch.__version__, "diffusers": diffusers.__version__, "quick": args.quick,
              "load_average_start": load_start[0], "load_average_end": load_end[0],
              "minidiff_weights": weights, "minidiff_layout": "NCHW" if args.nchw else "default",
              "diffusers_block_out_channels": list(widths),
              "forward_mflops_minidiff": flops_m / 1e6, "forward_mflops_diffusers": flops_d / 1e6,
              "matmul_peak_gflops": peak, "matmul_peak_bf16_gflops": peak_bf16, "sampling": {}, "training": {}}
    for name in ("minidiff", "diffusers"):
        s, tr = summary(sampling[name]), summary(training[name])
        result["sampling"][name] = {**s, "images_per_s": images / s["median"],
                                    "gflops": sample_flops[name] / s["median"] / 1e9}
        result["training"][name] = {**tr, "steps_per_s": 1 / tr["median"],
                                    "gflops": train_flops[name] / tr["median"] / 1e9}
    sampled, trained = result["sampling"], result["training"]
    result["sampling_ratio"] = sampled["minidiff"]["images_per_s"] / sampled["diffusers"]["images_per_s"]
    result["training_ratio"] = trained["minidiff"]["steps_per_s"] / trained["diffusers"]["steps_per_s"]
    result["sampling_gflops"] = result["sampling"]["minidiff"]["gflops"]
    result["training_gflops"] = result["training"]["minidiff"]["gflops"]
    result["setup"] = {"images": images, "steps": steps, "cfg": CFG, "train_batch": batch, "reps": reps}
    if cli:
        result["help_s"] = statistics.median(cli["help_s"])
        if "generate_s" in cli:
            result["generate_s"] = statistics.median(cli["generate_s"])
            result["generate_maxrss_mib"] = max(cli["generate_maxrss_mib"])
        result["cli"] = cli

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result, peak_bf16 or peak)
    return result


def report(r: dict, peak: float) -> None:
    """The table; achieved rates are set against the matmul rate of the precision in use."""
    s = r["setup"]
    print(f"\n{r['machine']} ({r['device']}), autocast {r['autocast'] or 'off'}, compile {r['compile'] or 'off'}")
    print(f"\nsampling: {s['images']} images, {s['steps']} DDIM steps, cfg {s['cfg']:g} (batch {2 * s['images']}), "
          f"median of {s['reps']} (min..max)")
    for name in ("minidiff", "diffusers"):
        v = r["sampling"][name]
        print(f"  {name:9s} {v['median']:7.2f} s ({v['min']:.2f}..{v['max']:.2f})  "
              f"{v['images_per_s']:6.2f} images/s  {v['gflops']:6.1f} GFLOP/s = {v['gflops'] / peak:5.1%} of matmul")
    print(f"  minidiff / diffusers: {r['sampling_ratio']:.2f}x  (target >= 1.5x)")
    print(f"training step: batch {s['train_batch']}, forward + backward + AdamW, median of {s['reps']} (min..max)")
    for name in ("minidiff", "diffusers"):
        v = r["training"][name]
        print(f"  {name:9s} {v['median']:7.3f} s ({v['min']:.3f}..{v['max']:.3f})  "
              f"{v['steps_per_s']:6.2f} steps/s   {v['gflops']:6.1f} GFLOP/s = {v['gflops'] / peak:5.1%} of matmul")
    print(f"  minidiff / diffusers: {r['training_ratio']:.2f}x  (target >= 1.2x)")
    cli = r.get("cli")
    if cli:
        h = cli["help_s"]
        print(f"minidiff --help: {statistics.median(h):.2f} s median of {len(h)} ({min(h):.2f}..{max(h):.2f})  "
              f"(target <= 0.25 s)")
        if "generate_s" in cli:
            g = cli["generate_s"]
            print(f"cold minidiff generate (1 image, 50 steps, cfg 3): {statistics.median(g):.2f} s median of {len(g)} "
                  f"({min(g):.2f}..{max(g):.2f}), peak RSS {r['generate_maxrss_mib']:.0f} MiB  (target <= 4 s)")
        else:
            print(f"cold minidiff generate: {cli['generate_note']}")
    print(f"load average: {r['load_average_start']:.2f} at the start, {r['load_average_end']:.2f} at the end "
          f"({r['cores']} cores)")


if __name__ == "__main__":
    main()

"""Training steps/s of the emoji recipe's step: the step as it ran before against each GPU option, in one run.

    python benchmarks/bench_train_speed.py --device cuda --json   # batches 32, 256, 1024 (gpu_run.sh's stage)
    python benchmarks/bench_train_speed.py                        # the CPU: batches 8 and 32
    python benchmarks/bench_train_speed.py --smoke                # a tiny U-Net, seconds: does every variant run?

What is trained: the U-Net of recipes/emoji.toml (5.3 M parameters) on the 4x16x16 latents of the
shipped emoji model's VAE, conditioned by the shipped emoji CLIP, through the real ``Trainer`` (its
posterior table, caption table, EMA, fused AdamW, gradient clipping). The data is a folder of
generated 64x64 pictures with captions, made in a temporary folder, so no data set is needed.

The variants, each its own Trainer in the same process:

- ``baseline``: the step as it was before: every copy to the device a blocking one, the loss checked
  and read every step (two waits for the GPU a step, and one per copy);
- ``deferred``: what ``train`` now does on CUDA: copies queued from pinned memory, the losses read at
  log steps (every ``log_every`` = 100 steps, as the recipe logs);
- ``bf16``: deferred, under ``--mixed-precision bf16``;
- ``compile`` / ``compile-bf16``: deferred, with ``--compile`` (torch.compile's default mode: fusion);
- ``graphs-bf16``: deferred, bf16, torch.compile's ``reduce-overhead`` mode (CUDA graphs; not a flag
  of ``train``: measured here to decide whether it should be).

Timing: every variant is warmed up first (the compiles happen there, and the caption table and the
posterior table are filled), then ``--rounds`` rounds, each timing every variant in turn for
``--seconds`` (whole steps, the GPU synchronised before each clock read), so drift in the machine's
load hits all variants alike. Reported per batch and variant: steps/s (median, min..max) and the
ratio to the baseline of the same round (median, min..max). The variants that compile run in a pass
of their own at each of ``--compile-batches`` (each batch size is a compile of its own), beside the
baseline and ``deferred`` again, right after the plain pass at that batch: a compile that takes too
long then costs only its own figures and those of the larger batches. With ``--out FILE`` the JSON
report is rewritten after each pass, so a run cut short by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "emoji.toml"
SHIPPED_MODEL = ROOT / "minidiff_cli" / "models" / "emoji.safetensors"
SHIPPED_CLIP = ROOT / "minidiff_cli" / "models" / "clip" / "emoji.safetensors"
VARIANTS = ("baseline", "deferred", "bf16", "compile", "compile-bf16", "graphs-bf16")
GPU_VARIANTS = ("baseline", "deferred", "bf16", "compile-bf16", "graphs-bf16")  # two compiles: what fits gpu_run.sh
COMPILED = ("compile", "compile-bf16", "graphs-bf16")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
THINGS = ("face", "cat", "dog", "apple", "car", "house", "tree", "star", "heart", "flag", "clock", "ball")


# -- the data and the files the recipe needs ---------------------------------------------------
def make_folder(root: Path, count: int, size: int) -> Path:
    """``count`` pictures of a coloured block on a coloured ground, captioned by colour, thing and number."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(count):
        picture = np.empty((size, size, 3), np.uint8)
        picture[:] = rng.integers(0, 256, 3)
        x, y = rng.integers(0, size // 2, 2)
        picture[y:y + size // 2, x:x + size // 2] = rng.integers(0, 256, 3)
        Image.fromarray(picture).save(root / f"{k:05d}.png")
        caption = f"{COLOURS[k % len(COLOURS)]} {THINGS[k // len(COLOURS) % len(THINGS)]} {k}"
        lines.append(json.dumps({"file_name": f"{k:05d}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def emoji_vae(path: Path) -> str:
    """The shipped emoji model's VAE as a VAE file (random weights of its config where it is absent)."""
    from minidiff_cli.vae.vae_file import save_vae

    if SHIPPED_MODEL.is_file():
        from minidiff_cli.diffusion.model import DiffusionModel

        autoencoder, what = DiffusionModel.load(SHIPPED_MODEL).latent.autoencoder, "the shipped emoji model's VAE"
    else:
        from minidiff_cli.vae.autoencoder import Autoencoder, VAEConfig

        torch.manual_seed(0)
        autoencoder = Autoencoder(VAEConfig())  # the emoji VAE's: base 32, 1-2-2, 4 latent channels
        what = "random weights in the emoji VAE's configuration"
    save_vae(path, autoencoder, {"name": "bench-vae", "image_size": 64})
    return what


def base_config(args, data: Path, vae: Path):
    """recipes/emoji.toml, on the generated folder, writing nothing (no save, sample or log step is reached)."""
    from minidiff_cli.training.config import TrainConfig, load_toml

    values = {k.replace("-", "_"): v for k, v in load_toml(RECIPE).items()}
    values.update(data=str(data), vae=str(vae), clip_weights=str(SHIPPED_CLIP), device=args.device,
                  threads=args.threads, max_steps=10**8, save_every=10**8, sample_every=10**8, quiet=True)
    if args.smoke:  # the recipe's layout, narrower and smaller: seconds on a CPU
        values.update(image_size=32, base_channels=16, attention_resolutions=[4], cross_attention_resolutions=[4])
    return TrainConfig(**values).validate()


# -- the variants ------------------------------------------------------------------------------
def make_trainer(variant: str, cfg, out: Path):
    from minidiff_cli.training.compiled import CompiledForward
    from minidiff_cli.training.trainer import Trainer

    changes = {"mixed_precision": "bf16" if variant.endswith("bf16") else "no",
               "compile": variant in ("compile", "compile-bf16"), "out": str(out)}
    trainer = Trainer(dataclasses.replace(cfg, **changes), log=lambda message: None)
    trainer.defer_loss_check = variant != "baseline"  # on the CPU too, to measure what the deferral costs there
    if variant == "graphs-bf16":
        trainer.ddp = CompiledForward(trainer.ddp, mode="reduce-overhead")
    return trainer


def set_blocking(variant: str) -> None:
    """The baseline's copies block, as every copy did before ``to_device``; the others' are queued."""
    from minidiff_cli.runtime import devices

    devices.NON_BLOCKING = variant != "baseline"


def timed_steps(trainer, variant: str, seconds: float, log_every: int) -> float:
    """Steps/s over whole steps for at least ``seconds``: train_step and the loop's loss bookkeeping
    (loop.PendingLosses, read every ``log_every`` steps and at the end), as ``train`` runs them."""
    from minidiff_cli.training.loop import PendingLosses

    set_blocking(variant)
    pending = PendingLosses(trainer.losses, trainer.loss_hint)
    synchronise(trainer.device)
    start, steps = time.perf_counter(), 0
    while True:
        pending.add(trainer.step + 1, trainer.train_step())
        steps += 1
        if trainer.step % log_every == 0:
            pending.settle()
        if steps % 5 == 0 and time.perf_counter() - start >= seconds:
            break
    pending.settle()
    synchronise(trainer.device)
    return steps / (time.perf_counter() - start)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_batch(args, cfg, batch: int, variants: list[str], work: Path, log) -> dict:
    """Every variant at ``batch``: warmed up, then timed in interleaved rounds."""
    cfg = dataclasses.replace(cfg, batch_size=batch)
    trainers, warm_s = {}, {}
    for variant in variants:
        trainer = make_trainer(variant, cfg, work / f"run-{variant}-{batch}")
        trainer.encode_captions(trainer.dataset.all_captions())  # the caption table, filled before timing
        start = time.perf_counter()
        timed_steps(trainer, variant, 0.0, cfg.log_every)  # the posterior table, the compile, CUDA graphs
        timed_steps(trainer, variant, args.seconds / 2, cfg.log_every)
        warm_s[variant] = round(time.perf_counter() - start, 1)
        trainers[variant] = trainer
        log(f"batch {batch}: {variant} warmed up in {warm_s[variant]} s")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]  # ABBA: drift within a round evens out
        for variant in order:
            rates[variant].append(timed_steps(trainers[variant], variant, args.seconds, cfg.log_every))
        log(f"batch {batch}, round {round_ + 1}: " + ", ".join(f"{v} {rates[v][-1]:.2f}" for v in variants))
    set_blocking("deferred")
    result = {}
    for variant in variants:
        ratios = [r / b for r, b in zip(rates[variant], rates[variants[0]])]
        result[variant] = {"steps_per_s": spread(rates[variant]), "ratio_to_reference": spread(ratios),
                           "images_per_s": round(statistics.median(rates[variant]) * batch, 1),
                           "warm_up_s": warm_s[variant]}
    result["reference"] = variants[0]
    result["unet_parameters_m"] = round(trainers[variants[0]].model.unet.num_parameters() / 1e6, 2)
    del trainers
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


# -- the report --------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "load_average": round(os.getloadavg()[0], 2),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def table(report: dict) -> str:
    """One line per batch and variant: steps/s and the ratio to the reference, each with its spread."""
    lines = []
    for key in ("batches", "compiled"):
        for batch, rows in report[key].items():
            reference = rows["reference"]
            for variant, row in rows.items():
                if isinstance(row, dict):
                    s, r = row["steps_per_s"], row["ratio_to_reference"]
                    lines.append(f"batch {batch:>5} {variant:>13}: {s['median']:8.2f} steps/s ({s['min']:.2f}.."
                                 f"{s['max']:.2f}), x{r['median']:.2f} ({r['min']:.2f}..{r['max']:.2f}) of {reference}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N [cpu]")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes [cuda: 32,256,1024; cpu: 8,32]")
    parser.add_argument("--variants", default=None, help=f"comma-separated, the first is the reference; of "
                        f"{', '.join(VARIANTS)} [cuda: all but compile; cpu: baseline,deferred]")
    parser.add_argument("--compile-batches", default="32", help="batch sizes at which compiled variants run [32]")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of every variant [cuda 3, cpu 5]")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per timing [cuda 1, cpu 6]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, the same for every variant [1]")
    parser.add_argument("--images", type=int, default=512, help="pictures in the generated folder [512]")
    parser.add_argument("--smoke", action="store_true", help="a narrow U-Net on 8x8 latents, batch 4, short timings")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress on stderr)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here, after each batch")
    args = parser.parse_args(argv)

    from minidiff_cli.errors import MinidiffError
    from minidiff_cli.runtime.devices import pick_device

    try:
        device = pick_device(args.device)
    except MinidiffError as exc:
        raise SystemExit(str(exc)) from None
    gpu = device.type == "cuda"
    default_batches, default_variants = ("32,256,1024", ",".join(GPU_VARIANTS)) if gpu else ("8,32", "baseline,deferred")
    if args.smoke:
        default_batches, default_variants, args.images = "4", "baseline,deferred,bf16", min(args.images, 24)
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    variants = (args.variants or default_variants).split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s): {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    compile_batches = {int(b) for b in args.compile_batches.split(",")}
    args.rounds = args.rounds or (2 if args.smoke else 3 if gpu else 5)
    args.seconds = args.seconds or (0.3 if args.smoke else 1.0 if gpu else 6.0)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    torch.set_num_threads(args.threads)  # what every Trainer sets too (cfg.threads); here for the report

    work = Path(tempfile.mkdtemp(prefix="bench-train-speed-"))
    try:
        data = make_folder(work / "data", args.images, 64)
        vae_source = emoji_vae(work / "vae.safetensors")
        cfg = base_config(args, data, work / "vae.safetensors")
        report = {"benchmark": "bench_train_speed", **machine(device), "smoke": args.smoke,
                  "recipe": str(RECIPE.relative_to(ROOT)), "vae": vae_source, "images": args.images,
                  "latent": f"4x{cfg.image_size // 4}x{cfg.image_size // 4}", "log_every": cfg.log_every,
                  "rounds": args.rounds, "seconds_per_timing": args.seconds,
                  "batches": {}, "compiled": {}}
        log(f"{report['device']} ({report['cpu']}, {report['cores']} cores, {report['threads']} thread(s)), "
            f"torch {report['torch']}; {args.rounds} rounds of {args.seconds} s; variants {', '.join(variants)}")
        plain = [v for v in variants if v not in COMPILED]
        compiled = [v for v in variants if v in COMPILED]
        passes = []
        for batch in batches:
            passes += [("batches", batch, plain)] if plain else []
            passes += [("compiled", batch, plain[:2] + compiled)] if compiled and batch in compile_batches else []
        for key, batch, here in passes:
            report[key][str(batch)] = measure_batch(args, cfg, batch, here, work, log)
            if args.out is not None:
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
    return report


if __name__ == "__main__":
    main()

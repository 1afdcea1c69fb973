"""``minidiff vae``: train a small VAE for latent diffusion, look at its latents, measure it.

torch is imported inside the commands, so ``minidiff --help`` does not pay for it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.cli.options import int_list, threads_option
from minidiff_cli.errors import MinidiffError

vae_app = typer.Typer(
    help="A small KL autoencoder (VAE) for latent diffusion: train it, see what it keeps, measure it.\n\n"
         "Examples:\n\n"
         "  minidiff vae train --data ./my_images --image-size 64 --out vae.safetensors\n\n"
         "  minidiff train --data ./my_images --image-size 64 --vae vae.safetensors --out runs/latent\n\n"
         "  minidiff vae reconstruct picture.png --vae vae.safetensors -o round-trip.png --latents latents.png\n\n"
         "  minidiff vae eval --vae vae.safetensors --data ./my_images",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(vae_app, name="vae")


@vae_app.command("train")
def train_command(
    data: Optional[str] = typer.Option(None, "--data", autocompletion=completion.datasets, help="'shapes' or a folder of images [default: shapes]."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="The VAE file to write (.safetensors; the run's checkpoint "
                                      "and reconstructions go to a folder beside it, <name>-run) [default: vae.safetensors]."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Training resolution [default: 64]."),
    latent_channels: Optional[int] = typer.Option(None, "--latent-channels", help="Channels of the latent [default: 4]."),
    channel_mult: Optional[str] = typer.Option(None, "--channel-mult", help="Width multipliers per level; n levels "
                                               "downsample by 2^(n-1): 1,2,2 is factor 4, 1,2,2,4 factor 8 [default: 1,2,2]."),
    base_channels: Optional[int] = typer.Option(None, "--base-channels", help="Width at full resolution, a multiple of 8 [default: 32]."),
    num_res_blocks: Optional[int] = typer.Option(None, "--num-res-blocks", help="Residual blocks per level [default: 1]."),
    kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help="Weight of the KL term, on latent diffusion's "
                                              "scale [default: 1e-6]."),
    disc_start: Optional[int] = typer.Option(None, "--disc-start", help="Add a PatchGAN loss from this step on "
                                             "[default: none]."),
    disc_weight: Optional[float] = typer.Option(None, "--disc-weight", help="Weight of the PatchGAN term [default: 0.1]."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Total optimizer steps [default: 2000]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size [default: 16]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW, warm-up, cosine decay) [default: 1e-3]."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warm-up steps [default: 100]."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", help="EMA decay of the saved weights [default: 0.999]."),
    holdout: Optional[str] = typer.Option(None, "--holdout", help="Share of the images never trained on, for the "
                                          "checks (a folder's: those of a share of its captions); '' for none [default: 5%]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of weights, data order and noise [default: 0]."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Checkpoint, metrics and reconstructions [default: beside --out]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run of --out from its last checkpoint."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint and VAE file every N steps [default: 250]."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Held-out PSNR/SSIM and a reconstruction "
                                               "grid every N steps [default: 500]."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Metrics record every N steps [default: 50]."),
    name: Optional[str] = typer.Option(None, "--name", help="Name stored in the file [default: the file's stem]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or mps [default: auto]."),
    threads: Optional[int] = threads_option(),
    quiet: Optional[bool] = typer.Option(None, "--quiet", "-q", help="Log lines instead of a progress bar."),
    log_with: Optional[str] = typer.Option(None, "--log-with", help="Also log to tensorboard or wandb (installed "
                                           "apart), or none; metrics.jsonl is written anyway [default: none]."),
    log_dir: Optional[str] = typer.Option(None, "--log-dir", help="Where --log-with writes [default: the run "
                                          "folder's logs/]."),
    sample_prompts: Optional[str] = typer.Option(None, "--sample-prompts", hidden=True),
) -> None:
    """Train a VAE; Ctrl-C saves, --resume continues. Runs under torchrun too.

    Every --sample-every steps: held-out PSNR / SSIM, the validation loss and a reconstruction grid
    (into --log-with's TensorBoard or wandb too).

    Examples:

      minidiff vae train --data ./my_images --image-size 64 --out vae.safetensors

      minidiff vae train --data ./my_images --log-with tensorboard --out vae.safetensors

      minidiff vae train --out vae.safetensors --resume --max-steps 4000
    """
    if sample_prompts is not None:
        raise MinidiffError("vae train draws no prompts: every --sample-every it shows reconstructions of "
                            "held-out images instead (--sample-prompts is for `minidiff train`)")
    flags = {k: v for k, v in locals().items() if k not in ("resume", "sample_prompts") and v is not None}
    from minidiff_cli.training.tracking import check_log_with
    from minidiff_cli.training.vae import VAETrainConfig, check_new_run, resumed_config

    if "channel_mult" in flags:
        flags["channel_mult"] = int_list(flags["channel_mult"], "channel_mult")
    cfg = VAETrainConfig.from_dict(flags)
    check_new_run(cfg, resume)
    if resume:
        cfg = resumed_config(cfg, set(flags) - {"out", "run_dir"})
    check_log_with(cfg.log_with)  # installed, before anything is made
    _train(cfg, resume)


def _train(cfg, resume: bool) -> None:
    import os

    from minidiff_cli.training.run_folder import locked
    from minidiff_cli.training.vae import VAETrainer

    main = int(os.environ.get("RANK", "0")) == 0
    with locked(cfg.run_folder(), main=main):
        trainer = VAETrainer(cfg, resume=resume, log=lambda msg: print(msg, file=sys.stderr))
        trainer.claim()  # a new run takes --out's name first: another run writing it is refused here
        if main:
            n = sum(p.numel() for p in trainer.autoencoder.parameters())
            vae = cfg.vae_config()
            side = cfg.image_size // vae.factor
            print(f"training a VAE on {trainer.device} x{trainer.dist.world}: {n / 1e6:.2f} M parameters, "
                  f"{cfg.image_size}x{cfg.image_size} -> {vae.latent_channels}x{side}x{side} latents; "
                  f"{len(trainer.train_items):,} training images, {len(trainer.heldout_items):,} held out; "
                  f"from step {trainer.step} to {cfg.max_steps}", file=sys.stderr)
            from minidiff_cli.training.tracking import watch_hint

            hint = watch_hint(cfg.log_with, cfg.logs_folder())
            if hint:
                print(hint, file=sys.stderr)
        from minidiff_cli.cli.display import loss_progress

        try:
            with loss_progress(cfg.max_steps, bool(cfg.quiet) or not main, label="vae",
                               log_every=cfg.log_every if main else 0) as report:
                last = trainer.run(progress=_with_checks(report))
        except KeyboardInterrupt:
            if main:
                print(f"interrupted at step {trainer.step}; saved. Continue with: minidiff vae train --out {cfg.out} "
                      "--resume", file=sys.stderr)
            sys.exit(130)
    if main:
        check = last.get("check") or {}
        print(f"done: step {trainer.step}; {_describe(check)}; VAE: {cfg.out}")


def _with_checks(report):
    def progress(info: dict) -> None:
        report(info)
        if info.get("check"):
            check = {**info["check"], "val_loss": info.get("val_loss")}
            print(f"step {info['step']}: {_describe(check)}; grid {check['grid']}", file=sys.stderr)
    return progress


def _describe(check: dict) -> str:
    if not check:
        return "no check yet"
    ssim = f", SSIM {check['ssim']:.3f}" if check.get("ssim") is not None else ""
    val = f", validation loss {check['val_loss']:.4f}" if check.get("val_loss") is not None else ""
    return f"{check.get('on', '')} PSNR {check['psnr']:.2f} dB{ssim}{val} ({check['images']} images)"


@vae_app.command("reconstruct")
def reconstruct_command(
    images: list[Path] = typer.Argument(..., help="Pictures to send through the VAE and back."),
    vae: str = typer.Option(..., "--vae", help="A VAE file, or a latent model's file or name (whose VAE is used)."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG: the originals on top, the reconstructions below."),
    latents: Optional[Path] = typer.Option(None, "--latents", help="Also a PNG of the latents, one row per picture, "
                                           "each channel as a grey image."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Fit the pictures to this size [default: the "
                                             "size the VAE trained at]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Encode pictures to latents and decode them again: what the latent space keeps, with PSNR / SSIM.

    Example:

      minidiff vae reconstruct apple.png pear.png --vae vae.safetensors -o round-trip.png --latents latents.png
    """
    from minidiff_cli.files.atomic import refuse_existing

    refuse_existing((out, latents), overwrite)
    from minidiff_cli.runtime.threads import apply_threads

    apply_threads(threads)
    import torch

    from minidiff_cli.evaluation.vae import (
        check_picture_channels,
        decode_means,
        encode_means,
        latent_channels_image,
        reconstruction_grid,
        summarise,
    )
    from minidiff_cli.runtime.devices import pick_device

    dev = pick_device(device)
    autoencoder, size = load_any_vae(vae, dev)
    channels = check_picture_channels(autoencoder)
    size = size if image_size is None else image_size
    autoencoder.check_size(size, what="--image-size" if image_size is not None else "image size")
    x = torch.stack([_picture(path, size, channels) for path in images]).to(dev)
    mean = encode_means(autoencoder, x)
    recon = decode_means(autoencoder, mean)
    reconstruction_grid(x, recon, out)
    report = summarise(recon, x)
    if latents is not None:
        _latents_png(latent_channels_image, mean, latents, upscale=max(1, 64 // mean.shape[-1]))
    c, h, w = mean.shape[1:]
    ssim = f", SSIM {report['ssim']:.3f}" if report["ssim"] is not None else ""
    fewer = channels * size * size / (c * h * w)
    print(f"{len(images)} picture(s) {size}x{size} -> latents {c}x{h}x{w} ({fewer:.0f}x fewer "
          f"values); PSNR {report['psnr']:.2f} dB{ssim}; wrote {out}" + (f" and {latents}" if latents else ""))


def _picture(path: Path, size: int, channels: int):
    from minidiff_cli.inference.img2img.images import fit_image, open_image

    tensor, note = fit_image(open_image(path, "picture"), size, channels, what=f"picture '{path}'")
    if note:
        print(f"note: {path}: {note}", file=sys.stderr)
    return tensor


def _latents_png(draw, latents, path: Path, upscale: int) -> None:
    from PIL import Image

    from minidiff_cli.files.atomic import atomic_write

    rows = [draw(latent.float().cpu(), upscale) for latent in latents]
    sheet = Image.new("L", (rows[0].width, sum(r.height + 2 for r in rows) - 2), 255)
    for k, row in enumerate(rows):
        sheet.paste(row, (0, k * (row.height + 2)))
    atomic_write(path, lambda p: sheet.save(p, format="PNG"))


def load_any_vae(source: str, device):
    """(autoencoder, the size it trained at) from a VAE file or from a latent model file."""
    from minidiff_cli.files.model_file import read_header
    from minidiff_cli.vae.vae_file import VAE_FORMAT, load_vae

    path = Path(source)
    if not path.exists():  # a model's name (emoji), or a run folder's
        from minidiff_cli.files.models_dir import resolve_model

        path = resolve_model(source)
    metadata, _ = read_header(path)
    if metadata.get("format") == VAE_FORMAT:
        loaded = load_vae(path, device)
        return loaded.autoencoder, loaded.meta.get("image_size") or 64
    from minidiff_cli.diffusion.model import DiffusionModel

    model = DiffusionModel.load(path, device=device)
    if model.latent is None:
        raise MinidiffError(f"'{source}' is a pixel model, with no VAE; pass a VAE file or a latent model")
    return model.latent.autoencoder, model.image_size


@vae_app.command("eval")
def eval_command(
    vae: str = typer.Option(..., "--vae", help="A VAE file, or a latent model (whose VAE is measured)."),
    data: str = typer.Option(..., "--data", autocompletion=completion.datasets, help="'shapes' or a folder of images."),
    holdout: str = typer.Option("5%", "--holdout", help="The held-out share, as at training (the images measured); "
                                "'' measures every image."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="[default: the size the VAE trained at]"),
    limit: int = typer.Option(1000, "--limit", help="Measure at most this many images (the first held-out ones)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Reconstruction PSNR / SSIM on the images a VAE never trained on, and bytes per image.

    Example:

      minidiff vae eval --vae vae.safetensors --data ./my_images
    """
    from minidiff_cli.runtime.threads import apply_threads

    apply_threads(threads)
    from minidiff_cli.evaluation.vae import evaluate_data
    from minidiff_cli.runtime.devices import pick_device

    dev = pick_device(device)
    autoencoder, size = load_any_vae(vae, dev)
    if image_size is not None:
        autoencoder.check_size(image_size, what="--image-size")
    report = evaluate_data(autoencoder, data, size if image_size is None else image_size, holdout, limit)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    b = report["bytes_per_image"]
    ssim = f"SSIM {report['ssim']:.4f} (sd {report['ssim_std']:.4f})" if report["ssim"] is not None else "SSIM n/a"
    print(f"{report['images']} {report['on']} images of {data} at {report['image_size']}px: PSNR {report['psnr']:.2f} dB "
          f"(sd {report['psnr_std']:.2f}), {ssim}")
    print(f"bytes per image: {b['pixels_uint8']:,} as 8-bit pixels, {b['latent_float16']:,} as a float16 latent "
          f"({b['compression']:.0f}x fewer values); {report['seconds_per_image'] * 1000:.1f} ms per image round trip")

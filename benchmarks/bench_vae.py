"""A VAE's round trip against the plain reference: a smaller picture holding as many values.

For the held-out pictures of a folder (the split of `minidiff vae train`), PSNR and SSIM of

- the VAE's round trip, decode(mean of encode(x)), with the latent in float32 and in float16
  (what storing latents in half precision would cost);
- bicubic down to the side whose RGB pixels hold about as many values as the latent, and back up
  (what the same number of values buys without any learning; Pillow's bicubic, antialiased).

    python benchmarks/bench_vae.py --vae vae.safetensors --data path/to/emoji-noto
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch


def bicubic_round_trip(x: torch.Tensor, side: int) -> torch.Tensor:
    """Pictures [B, 3, H, W] in [-1, 1] resized to side x side and back with Pillow's bicubic."""
    from PIL import Image

    from minidiff_cli.data.images import pil_to_tensor, tensor_to_pil

    size = x.shape[-1]
    out = [pil_to_tensor(tensor_to_pil(img).resize((side, side), Image.BICUBIC).resize((size, size), Image.BICUBIC))
           for img in x]
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--holdout", default="5%")
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from minidiff_cli.data.holdout import holdout_fraction, split_items
    from minidiff_cli.data.images import pil_to_tensor, tensor_to_pil
    from minidiff_cli.data.sources import open_dataset
    from minidiff_cli.evaluation.vae import decode_means, encode_means, summarise
    from minidiff_cli.vae.vae_file import load_vae

    vae = load_vae(args.vae)
    ae, size = vae.autoencoder, vae.meta.get("image_size") or 64
    dataset = open_dataset(args.data, image_size=size, holdout="")
    _, held = split_items(dataset, holdout_fraction(args.holdout))
    x = torch.stack([dataset[i]["image"] for i in held[: args.limit]])
    # what a saved PNG holds: the 8-bit rounding every method below is measured against
    x = torch.stack([pil_to_tensor(tensor_to_pil(img)) for img in x])
    start = time.perf_counter()
    mean = encode_means(ae, x)
    vae32 = decode_means(ae, mean)
    seconds = (time.perf_counter() - start) / len(x)
    vae16 = decode_means(ae, mean.half().float())
    values = mean[0].numel()
    side = round(math.sqrt(values / 3))
    rows = [(f"VAE, latent {tuple(mean.shape[1:])} float32", values, summarise(vae32, x)),
            (f"VAE, latent {tuple(mean.shape[1:])} float16", values, summarise(vae16, x)),
            (f"bicubic {size} -> {side} -> {size}", 3 * side * side, summarise(bicubic_round_trip(x, side), x))]
    print(f"{len(x)} held-out pictures of {args.data} at {size}x{size}; {args.vae} (hash {vae.hash}); "
          f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); VAE round trip "
          f"{seconds * 1000:.1f} ms per picture\n")
    print("| method | values per picture | PSNR dB (sd) | SSIM (sd) |")
    print("|---|---|---|---|")
    for name, count, r in rows:
        print(f"| {name} | {count:,} | {r['psnr']:.2f} ({r['psnr_std']:.2f}) | {r['ssim']:.4f} ({r['ssim_std']:.4f}) |")
    base = rows[2][2]
    print(f"\nVAE / bicubic: PSNR {rows[0][2]['psnr'] - base['psnr']:+.2f} dB, "
          f"SSIM ratio {rows[0][2]['ssim'] / base['ssim']:.3f}")


if __name__ == "__main__":
    main()

"""Beyond the series: the latent space of Stable Diffusion, with a VAE trained here in seconds.

Latent diffusion (Rombach et al. 2022) runs the U-Net on a small latent instead of the pixels:
an autoencoder squeezes each 32x32x3 picture into a 4x8x8 latent (12x fewer values) and its
decoder turns latents back into pictures. The encoder outputs a Gaussian (mean, log-variance)
per latent value; training minimises the reconstruction error plus a small KL term that keeps
those Gaussians near N(0, 1), so that the latent space is smooth enough to diffuse in.

This script trains minidiff's Autoencoder on shapes with the loss of `minidiff vae train`
(L1 + KL), prints the round trip's PSNR, measures the latents' spread (what SD's 0.18215
normalised), and draws originals, reconstructions and the four latent channels. 300 steps
(about 30 s on one core) give blurry round trips with colours still off; --steps 2000 gets close.

    python examples/10_latent_space.py [--out examples/out] [--steps 300]
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt
import torch

from minidiff_cli.data.shapes import ShapesDataset
from minidiff_cli.evaluation.reconstruction import psnr
from minidiff_cli.vae.autoencoder import Autoencoder, VAEConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
parser.add_argument("--steps", type=int, default=300, help="training steps")
args = parser.parse_args()
torch.manual_seed(0)

data = ShapesDataset(image_size=32, seed=0)
images = torch.stack([data[i]["image"] for i in range(1024)])
test = torch.stack([data[i]["image"] for i in range(50_000, 50_008)])  # never trained on
vae = Autoencoder(VAEConfig(in_channels=3, base_channels=16, channel_mult=(1, 2, 2), latent_channels=4))
optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
kl_weight = 1e-6  # on latent diffusion's scale: a sum over the latent against a sum over the pixels

start = time.time()
for step in range(args.steps):
    x = images[torch.randint(len(images), (16,))]
    posterior = vae.encode(x)
    z = posterior.sample(torch.randn_like(posterior.mean))  # the reparameterisation trick
    recon = vae.decode(z)
    loss = (recon - x).abs().mean() + kl_weight * posterior.kl().mean() / x[0].numel()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 100 == 0:
        print(f"step {step:4d}  loss {loss.item():.4f}")
print(f"trained {args.steps} steps in {time.time() - start:.0f} s")

vae.eval()
with torch.no_grad():
    mean = vae.encode(test).mean  # [8, 4, 8, 8]: the deterministic code of each picture
    recon = vae.decode(mean).clamp(-1, 1)
    every = vae.encode(images[:256]).mean
print(f"{tuple(test.shape[1:])} pictures -> {tuple(mean.shape[1:])} latents: "
      f"{test[0].numel() / mean[0].numel():.0f}x fewer values")
print(f"round trip on unseen pictures: PSNR {psnr(recon, test).mean():.1f} dB")
print(f"latent spread: std {every.std():.3f}, so the latent scale 1/std is {1 / every.std():.3f} "
      f"(minidiff train --vae measures it on your data and stores it in the model file)")

fig, axes = plt.subplots(6, 8, figsize=(8, 6.4))
for k in range(8):
    rows = [(test[k] + 1) / 2, (recon[k] + 1) / 2] + [mean[k, c] for c in range(4)]
    for r, picture in enumerate(rows):
        ax = axes[r, k]
        if picture.dim() == 3:
            ax.imshow(picture.permute(1, 2, 0).clamp(0, 1).numpy())
        else:
            ax.imshow(picture.numpy(), cmap="gray")  # one latent channel, its own grey range
        ax.axis("off")
for r, label in enumerate(["original", "round trip", "latent 0", "latent 1", "latent 2", "latent 3"]):
    axes[r, 0].set_title(label, fontsize=8, loc="left")
fig.tight_layout()
args.out.mkdir(parents=True, exist_ok=True)
path = args.out / "10_latent_space.png"
fig.savefig(path, dpi=100)
print(f"wrote {path}")

"""Part 5 of the series (training): a whole diffusion training loop, on shapes, with a tiny U-Net.

Each step (Ho et al. 2020, algorithm 1): take clean images x_0, pick a random timestep t and
noise eps for each, make x_t in closed form, and teach the network to predict eps from
(x_t, t) with a plain mean squared error. That is all; `minidiff train` adds EMA weights,
guidance dropout, checkpoints and several GPUs around this same loop. It runs in well under a
minute on a laptop CPU and saves the loss curve next to a few samples from the trained net.

    python examples/04_training_loop.py [--out examples/out] [--steps 250]
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from minidiff_cli import sample
from minidiff_cli.data.shapes import ShapesDataset
from minidiff_cli.diffusion.guidance import clipped
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.nets.unet import UNet, UNetConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
parser.add_argument("--steps", type=int, default=250, help="training steps")
args = parser.parse_args()
torch.manual_seed(0)

# Data: 512 pictures of 16x16 circles and squares, held in memory as one tensor [512, 3, 16, 16].
data = ShapesDataset(image_size=16, seed=0, colours=["red", "blue"], shapes=["circle", "square"])
images = torch.stack([data[i]["image"] for i in range(512)])

# A U-Net of 174 thousand parameters: two levels (16 and 8 pixels), no attention.
net = UNet(UNetConfig(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(), mid_attention=False))
schedule = get_schedule("cosine", num_timesteps=1000)
optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)

losses, start = [], time.perf_counter()
for step in range(args.steps):
    x0 = images[torch.randint(len(images), (32,))]  # a batch of 32 clean images
    t = torch.randint(0, schedule.num_timesteps, (32,))  # a timestep per image
    eps = torch.randn_like(x0)  # the noise the network must find
    x_t = schedule.add_noise(x0, eps, t)  # sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    loss = F.mse_loss(net(x_t, t), eps)  # Ho et al.'s "simple" loss, their eq. 14
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# Sample with the trained net: DDIM, 25 steps, 8 seeds. The net is the denoiser; `clipped` keeps
# its estimate of x_0 inside [-1, 1], which a young network overshoots (minidiff generate does the same).
net.eval()
denoiser = clipped(lambda x_t, t: net(x_t, t), schedule, 1.0)
x = sample(denoiser, (8, 3, 16, 16), schedule=schedule, sampler="ddim", steps=25, seed=0)

fig = plt.figure(figsize=(11, 3.6), constrained_layout=True)
ax = fig.add_subplot(1, 2, 1)
smooth = torch.tensor(losses).unfold(0, 20, 1).mean(1)  # a moving average over 20 steps
ax.plot(losses, alpha=0.3, label="loss")
ax.plot(range(19, len(losses)), smooth, label="moving average (20)")
ax.set(title="training loss (MSE on the noise)", xlabel="step", ylabel="loss", yscale="log")
ax.legend()
grid = torch.cat(list(x.clamp(-1, 1)), dim=2)  # 8 images side by side: [3, 16, 128]
ax = fig.add_subplot(1, 2, 2)
ax.imshow(((grid + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
ax.set(title=f"8 samples after {args.steps} steps (DDIM, 25 sampling steps)")
ax.axis("off")
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "04_training_loop.png", dpi=100)
print(f"wrote {args.out / '04_training_loop.png'}")

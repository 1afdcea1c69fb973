"""Parts 1 and 3 of the series (tensors, noise): the forward process q(x_t | x_0), by hand.

Training a diffusion model starts by destroying data. Ho et al. 2020 (eq. 4) give the noisy
image at step t in one line, with no loop over the steps before it:

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps,   eps ~ N(0, I)
    alpha_bar_t = (1 - beta_0) * (1 - beta_1) * ... * (1 - beta_t)

We compute it with plain tensor arithmetic, compare it with minidiff's NoiseSchedule.add_noise,
print the largest difference (float rounding only) and save the noisy frames as a PNG.

    python examples/01_forward_process.py [--out examples/out]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt
import torch

from minidiff_cli.data.shapes import ShapesDataset
from minidiff_cli.diffusion.schedule import get_schedule

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
args = parser.parse_args()

# A clean image x_0 from the shapes world: a float tensor [3, 32, 32] with pixels in [-1, 1].
x0 = ShapesDataset(image_size=32, seed=0)[0]["image"]

# The schedule is just a list of betas, the variance of the noise each step adds.
schedule = get_schedule("cosine", num_timesteps=1000)
betas = schedule.betas  # float64, shape [1000]

# By hand: alpha_bar is the running product of (1 - beta); the noise is one standard normal draw.
alpha_bar = torch.cumprod(1 - betas, dim=0)
eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
ts = [0, 100, 250, 500, 750, 999]
by_hand = torch.stack([alpha_bar[t].sqrt() * x0 + (1 - alpha_bar[t]).sqrt() * eps for t in ts])

# minidiff's closed form, as the trainer uses it: a batch of images, one timestep per row.
# Broadcasting does the work: the [6] coefficients become [6, 1, 1, 1] against [6, 3, 32, 32].
batch = x0.expand(len(ts), -1, -1, -1)
library = schedule.add_noise(batch, eps.expand_as(batch), torch.tensor(ts))

# What is left at the end is (almost) pure noise: mean near 0, standard deviation near 1.
last = library[-1]
print(f"x_999: mean {last.mean().item():+.3f}, std {last.std().item():.3f}; "
      f"signal kept sqrt(alpha_bar) = {alpha_bar[999].sqrt().item():.1e}")

fig, axes = plt.subplots(1, len(ts), figsize=(2 * len(ts), 2.5))
for ax, t, x in zip(axes, ts, library):
    ax.imshow(((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy())  # [3, H, W] in [-1, 1] -> [H, W, 3] in [0, 1]
    ax.set_title(f"t={t}\nalpha_bar={alpha_bar[t].item():.3f}", fontsize=9)
    ax.axis("off")
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "01_forward_process.png", dpi=100, bbox_inches="tight")
print(f"wrote {args.out / '01_forward_process.png'}")

difference = (by_hand.float() - library).abs().max().item()
print(f"max |by hand - NoiseSchedule.add_noise| = {difference:.2e}")

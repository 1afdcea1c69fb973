"""Beyond the series: flow matching, the objective Flux and Stable Diffusion 3 train with.

Rectified flow (Liu et al. 2022; Lipman et al. 2022; Esser et al. 2024) draws a straight line
from each clean image x_0 to its noise eps, x_t = (1 - t) x_0 + t eps for t in [0, 1], and
teaches the network the velocity along it, u = eps - x_0. Sampling walks back from t = 1 to 0
with Euler steps x <- x + (t' - t) u. The same loop as 04_training_loop.py, with three changes:
the line instead of the VP mix, the velocity instead of the noise as target, and SD3's
logit-normal choice of t, which trains the middle of the line most.

Because the line is a Gaussian path, it is the VP path rescaled: minidiff's "flow" schedule and
NoiseSchedule.to_flow / eps_from_flow let every minidiff sampler run a flow model. This script
samples both ways, by hand and with minidiff's DDIM, and prints how far apart they are.

    python examples/09_flow_matching.py [--out examples/out] [--steps 250]
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
from minidiff_cli.diffusion.sampling import flow_denoiser, timesteps
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.diffusion.timestep_sampling import draw_timesteps
from minidiff_cli.nets.unet import UNet, UNetConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
parser.add_argument("--steps", type=int, default=250, help="training steps")
args = parser.parse_args()
torch.manual_seed(0)

data = ShapesDataset(image_size=16, seed=0, colours=["red", "blue"], shapes=["circle", "square"])
images = torch.stack([data[i]["image"] for i in range(512)])
net = UNet(UNetConfig(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_resolutions=(), mid_attention=False))
# The flow schedule's timestep index i is the time t_i = (i + 1) / 1000 (with shift 1): the
# network is told the index, as minidiff's samplers will tell it.
schedule = get_schedule("flow", num_timesteps=1000)
optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
g = torch.Generator().manual_seed(0)

losses, start = [], time.perf_counter()
for step in range(args.steps):
    x0 = images[torch.randint(len(images), (32,))]
    i = draw_timesteps("logit-normal", 1000, 32, g)  # u = sigmoid(N(0, 1)), index floor(1000 u)
    t = schedule.flow_time(i).float().view(-1, 1, 1, 1)  # the index's time on the line
    eps = torch.randn_like(x0)
    x_t = (1 - t) * x0 + t * eps  # the straight line from the image to its noise
    loss = F.mse_loss(net(x_t, i), eps - x0)  # the velocity along it
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# Sampling by hand: Euler from t = 1 to 0 on 25 of the schedule's times, 8 seeds.
net.eval()
steps, ts = 25, timesteps(1000, 25)  # indices 999, 959, ..., 39: times 1.0 (capped), 0.96, ..., 0.04
times = schedule.flow_time(ts).tolist() + [0.0]
noise = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(8)])
with torch.no_grad():
    x = schedule.to_flow(noise, ts[:1])  # minidiff's start, N(0, I), put on the line (a factor of 1.00003)
    for k, index in enumerate(ts.tolist()):
        x = x + (times[k + 1] - times[k]) * net(x, torch.full((8,), index))
    # The same with minidiff's DDIM: flow_denoiser turns the velocity into the eps it expects.
    by_ddim = sample(flow_denoiser(net, schedule), (8, 3, 16, 16), schedule=schedule, sampler="ddim",
                     steps=steps, seed=0)
# They are the same steps (tests/test_flow.py checks it to 1e-10 in float64); in float32 they differ by
# about 1e-3 from the first step, at t = 1 - 3e-5, where the eps view divides by alpha = 3e-5.
print(f"Euler by hand vs minidiff's DDIM: largest difference {(x - by_ddim).abs().max().item():.2e}")

fig = plt.figure(figsize=(11, 3.6), constrained_layout=True)
ax = fig.add_subplot(1, 2, 1)
ax.plot(losses, alpha=0.3, label="loss")
ax.plot(range(19, len(losses)), torch.tensor(losses).unfold(0, 20, 1).mean(1), label="moving average (20)")
ax.set(title="training loss (MSE on the velocity)", xlabel="step", ylabel="loss", yscale="log")
ax.legend()
ax = fig.add_subplot(1, 2, 2)
ax.imshow(((torch.cat(list(x.clamp(-1, 1)), dim=2) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
ax.set(title=f"8 samples after {args.steps} steps (Euler, {steps} steps)")
ax.axis("off")
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "09_flow_matching.png", dpi=100)
print(f"wrote {args.out / '09_flow_matching.png'}")

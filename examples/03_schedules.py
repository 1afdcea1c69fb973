"""Part 3 of the series (noise): noise schedules compared, by alpha_bar and by log-SNR.

A schedule decides how fast the signal fades. alpha_bar_t is the share of the image's variance
left at step t; the signal-to-noise ratio SNR_t = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al.
2021) tells the same story on a log scale, where schedules are easiest to tell apart. Every
schedule registered with minidiff is drawn, plugins' included; for each we also print the step
where half the signal is gone (alpha_bar = 0.5, log-SNR = 0).

    python examples/03_schedules.py [--out examples/out] [--timesteps 1000]
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, open no window
import matplotlib.pyplot as plt
import torch

from minidiff_cli import plugins
from minidiff_cli.diffusion.schedule import get_schedule

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="folder for the PNG")
parser.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps T")
args = parser.parse_args()

T = args.timesteps
fig, (ax_abar, ax_snr) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
for name in plugins.registry().names("schedules"):
    try:
        schedule = get_schedule(name, T)
    except Exception as exc:  # a plugin's schedule may refuse this T; show the rest
        print(f"{name:<20} skipped: {exc}")
        continue
    abar = schedule.alphas_cumprod  # float64 [T]
    log_snr = schedule.log_snr()  # log(abar / (1 - abar)), computed stably near abar = 1
    ax_abar.plot(abar.numpy(), label=name)
    ax_snr.plot(log_snr.numpy(), label=name)
    # searchsorted needs ascending values: -log_snr goes up with t.
    half = int(torch.searchsorted(-log_snr, torch.tensor([0.0], dtype=torch.float64)))
    print(f"{name:<20} half the signal gone at t = {half:>4}; log-SNR from {log_snr[0].item():+6.2f} "
          f"to {log_snr[-1].item():+6.2f}")

ax_abar.set(title="alpha_bar(t): the signal variance kept", xlabel="timestep t", ylabel="alpha_bar")
ax_snr.set(title="log-SNR(t) = log(alpha_bar / (1 - alpha_bar))", xlabel="timestep t", ylabel="log-SNR")
for ax in (ax_abar, ax_snr):
    ax.grid(alpha=0.3)
    ax.legend()
args.out.mkdir(parents=True, exist_ok=True)
fig.savefig(args.out / "03_schedules.png", dpi=100)
print(f"wrote {args.out / '03_schedules.png'}")

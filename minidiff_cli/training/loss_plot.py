"""The run's loss curve, ``loss.png`` in the run folder: every step's loss and its running mean."""

from __future__ import annotations

from pathlib import Path

from minidiff_cli.files.atomic import atomic_write


def plot_losses(losses: list[tuple[int, float]], path: Path) -> None:
    """(step, loss) pairs as a log-scale plot, written atomically; nothing for fewer than two."""
    if len(losses) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*losses)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, lw=0.6, alpha=0.4, label="loss")
    window = max(1, len(values) // 50)
    smooth = [sum(values[max(0, i - window):i + 1]) / len(values[max(0, i - window):i + 1])
              for i in range(len(values))]
    ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)

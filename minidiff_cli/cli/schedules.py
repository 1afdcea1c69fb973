"""``minidiff schedules``: list, show and plot the noise schedules.

torch, rich and matplotlib are imported inside the commands, so that
``minidiff --help`` does not pay for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.errors import MinidiffError

schedules_app = typer.Typer(
    help="Inspect the noise schedules: how much signal is left at each timestep.\n\n"
         "Example:\n\n"
         "  minidiff schedules plot cosine linear -o schedules.png",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(schedules_app, name="schedules")

TIMESTEPS = typer.Option(1000, "--timesteps", "-T", help="Number of diffusion timesteps T.")


@schedules_app.command("list")
def list_command(
    timesteps: int = TIMESTEPS,
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List the schedules, the plugin that registered each, alpha_bar at T/2 and the final SNR.

    Example:

      minidiff schedules list --timesteps 1000 --json
    """
    if timesteps < 2:
        raise MinidiffError(f"timesteps must be at least 2 (got {timesteps})")
    rows = _schedule_rows(timesteps)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"noise schedules (T = {timesteps})")
    for column in ("name", "plugin", "alpha_bar(T/2)", "SNR(T-1)"):
        table.add_column(column, justify="left" if column in ("name", "plugin") else "right")
    for row in rows:
        if row["error"]:
            table.add_row(row["name"], row["plugin"], "[red]error[/red]", escape(row["error"]))
        else:
            table.add_row(row["name"], row["plugin"], f"{row['alpha_bar_half']:.4f}", f"{row['snr_final']:.3e}")
    Console().print(table)


def _schedule_rows(timesteps: int) -> list[dict]:
    """name, plugin, alpha_bar(T/2), SNR(T-1) of every schedule; a broken one has its error instead."""
    from minidiff_cli import plugins
    from minidiff_cli.diffusion.schedule import get_schedule

    reg = plugins.registry()
    rows = []
    for name in reg.names("schedules"):
        row = {"name": name, "plugin": reg.owner("schedules", name), "alpha_bar_half": None, "snr_final": None,
               "error": None}
        try:
            schedule = get_schedule(name, timesteps)
        except Exception as exc:  # one broken plugin schedule must not hide the others
            row["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            row["alpha_bar_half"] = schedule.alphas_cumprod[timesteps // 2].item()
            row["snr_final"] = schedule.snr(timesteps - 1).item()
        rows.append(row)
    return rows


@schedules_app.command("show")
def show_command(
    name: str = typer.Argument(..., autocompletion=completion.schedules, help="Schedule name, e.g. cosine."),
    timesteps: int = TIMESTEPS,
    as_json: bool = typer.Option(False, "--json", help="Print every beta and alpha_bar as JSON."),
) -> None:
    """Show one schedule: beta, alpha_bar and the SNR at a few timesteps, or all of it as JSON.

    Example:

      minidiff schedules show cosine --timesteps 10 --json
    """
    from minidiff_cli import plugins
    from minidiff_cli.diffusion.schedule import get_schedule

    plugins.registry().get("schedules", name)  # an unknown name fails before torch is imported
    schedule = get_schedule(name, timesteps)
    if as_json:
        typer.echo(json.dumps({"name": name, "timesteps": timesteps, "betas": schedule.betas.tolist(),
                               "alphas_cumprod": schedule.alphas_cumprod.tolist()}))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name} (T = {timesteps})")
    for column in ("t", "beta", "alpha_bar", "sqrt(1-alpha_bar)", "log SNR"):
        table.add_column(column, justify="right")
    log_snr = schedule.log_snr()
    for t in _sample_points(timesteps, 9):
        abar = schedule.alphas_cumprod[t].item()
        table.add_row(str(t), f"{schedule.betas[t].item():.3e}", f"{abar:.5f}", f"{(1 - abar) ** 0.5:.5f}",
                      f"{log_snr[t].item():+.3f}")
    Console().print(table)


@schedules_app.command("plot")
def plot_command(
    names: Optional[List[str]] = typer.Argument(None, autocompletion=completion.schedules, help="Schedules to draw (default: all)."),
    output: Path = typer.Option(Path("schedules.png"), "--output", "-o", help="PNG file to write."),
    timesteps: int = TIMESTEPS,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output file if it exists."),
    shift: List[float] = typer.Option([], "--shift", help="Draw the flow schedule at this timestep shift "
                                      "(SD3/Flux; repeat for several) [default: 1]."),
) -> None:
    """Plot alpha_bar(t), sqrt(1 - alpha_bar(t)) and log-SNR(t) to a PNG, and alpha_bar in the terminal.

    Examples:

      minidiff schedules plot cosine linear -o schedules.png

      minidiff schedules plot flow cosine --shift 1 --shift 3 -o shifts.png
    """
    from rich.console import Console

    from minidiff_cli import plugins
    from minidiff_cli.diffusion.schedule import get_schedule
    from minidiff_cli.files.atomic import atomic_write

    reg = plugins.registry()
    names = list(dict.fromkeys(names)) if names else reg.names("schedules")
    for name in names:
        reg.get("schedules", name)  # unknown names fail here, before torch is imported
    if output.exists() and not overwrite:  # fail before the slow part; atomic_write checks again
        raise MinidiffError(f"'{output}' already exists; pass --overwrite or choose another file with -o")
    if shift and "flow" not in names:
        raise MinidiffError("--shift is the flow schedule's; name flow among the schedules to plot")
    for value in shift:
        if not 0 < value <= 100:
            raise MinidiffError(f"--shift must be above 0 and at most 100 (got {value:g})")
    schedules = []
    for name in names:
        if name == "flow" and shift:  # one curve per shift, named by it
            for value in dict.fromkeys(shift):
                schedule = get_schedule(name, timesteps, shift=value)
                schedule.name = f"flow (shift {value:g})"
                schedules.append(schedule)
        else:
            schedules.append(get_schedule(name, timesteps))
    atomic_write(output, lambda tmp: _save_plot(schedules, tmp), overwrite=overwrite)
    console = Console()
    _terminal_chart(console, schedules)
    console.print(f"Wrote {output}")


def _sample_points(timesteps: int, count: int) -> list[int]:
    """About ``count`` timesteps from 0 to T - 1, evenly spaced, both ends included."""
    return sorted({round(i * (timesteps - 1) / (count - 1)) for i in range(count)})


def _save_plot(schedules, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none is assumed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    panels = [
        ("alpha_bar(t): signal variance kept", lambda s: s.alphas_cumprod, r"$\bar\alpha_t$"),
        ("sqrt(1 - alpha_bar(t)): noise std", lambda s: (1 - s.alphas_cumprod).sqrt(), r"$\sqrt{1-\bar\alpha_t}$"),
        ("log-SNR(t)", lambda s: s.log_snr(), r"$\log(\bar\alpha_t / (1-\bar\alpha_t))$"),
    ]
    for ax, (title, values, ylabel) in zip(axes, panels):
        for schedule in schedules:
            ax.plot(range(schedule.num_timesteps), values(schedule).numpy(), label=schedule.name)
        ax.set(title=title, xlabel="timestep t", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"noise schedules, T = {schedules[0].num_timesteps}")
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


COLOURS = ("cyan", "magenta", "yellow", "green", "red", "blue", "bright_white")
MARKERS = "•+x*o#%"  # distinct without colour too (pipes, NO_COLOR)


def _terminal_chart(console, schedules, width: int = 60, height: int = 12) -> None:
    """alpha_bar(t) of each schedule as coloured marks on a character grid, with a legend."""
    from rich.text import Text

    grid: list[list[tuple[str, str] | None]] = [[None] * width for _ in range(height)]
    for k, schedule in enumerate(schedules):
        abar = schedule.alphas_cumprod
        T = schedule.num_timesteps
        for col in range(width):
            value = abar[round(col * (T - 1) / (width - 1))].item()
            row = round((1 - value) * (height - 1))  # row 0 is alpha_bar = 1
            grid[row][col] = (MARKERS[k % len(MARKERS)], COLOURS[k % len(COLOURS)])
    text = Text("alpha_bar(t)\n")
    for r, cells in enumerate(grid):
        label = "1.0 ┤" if r == 0 else "0.0 ┤" if r == height - 1 else "    │"
        text.append(label)
        for cell in cells:
            text.append(" ") if cell is None else text.append(*cell)
        text.append("\n")
    T = schedules[0].num_timesteps
    text.append("    └" + "─" * width + "\n")
    text.append(f"     0{' ' * (width - len(str(T - 1)) - 1)}{T - 1}  t\n")
    for k, schedule in enumerate(schedules):
        text.append(f"     {MARKERS[k % len(MARKERS)]} ", style=COLOURS[k % len(COLOURS)])
        text.append(f"{schedule.name}\n")
    console.print(text, end="")

"""``minidiff plugins``: every plugin, where it came from, and what it registered."""

from __future__ import annotations

import json

import typer

from minidiff_cli.cli.app import app


@app.command("plugins")
def plugins_command(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
) -> None:
    """List installed plugins, their hooks, what they registered, and any that are broken.

    Example: minidiff plugins --json
    """
    from rich.console import Console
    from rich.table import Table

    from minidiff_cli import plugins

    reg = plugins.registry()
    infos = list(reg.plugins.values())
    if as_json:
        typer.echo(json.dumps([info.as_dict() for info in infos], indent=2))
        return
    table = Table(title="minidiff plugins")
    for column in ("plugin", "distribution", "hooks", "registered", "status"):
        # fold: a long name or error breaks onto the next line instead of ending in an ellipsis
        table.add_column(column, overflow="fold")
    for info in infos:
        dist = f"{info.distribution} {info.version}" if info.distribution else info.source
        registered = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.registered.items())
        status = "ok" if info.ok else "[red]broken[/red]: " + "; ".join(info.errors)
        table.add_row(info.name, dist, ", ".join(h.removeprefix("register_") for h in info.hooks),
                      registered, status)
    Console().print(table)

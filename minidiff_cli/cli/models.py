"""``minidiff models``: the shipped model and any in the user's model folder."""

from __future__ import annotations

import json

import typer

from minidiff_cli.cli.app import app


@app.command("models")
def models_command(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """List model files that --model NAME can use.

    Example: minidiff models
    """
    from minidiff_cli.models_dir import DEFAULT_MODEL, list_models, user_dir

    rows = [{"name": name, "path": str(path), "where": where, "default": name == DEFAULT_MODEL and where == "shipped"}
            for name, path, where in list_models()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no models found (user folder: {user_dir()})")
    for row in rows:
        mark = " (default)" if row["default"] else ""
        typer.echo(f"{row['name']}{mark}\t{row['where']}\t{row['path']}")

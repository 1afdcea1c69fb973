"""``minidiff models``: the shipped model, the user's model folder, and run folders under runs/."""

from __future__ import annotations

import json

import typer

from minidiff_cli.cli.app import app


@app.command("models")
def models_command(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """List model files that --model can use: shipped, user and run models.

    User models are the .safetensors files in $MINIDIFF_MODELS_DIR (default:
    $XDG_DATA_HOME/minidiff/models, else ~/.local/share/minidiff/models); copy a model
    there to use it by name, as --model NAME. Run models are runs/*/model.safetensors
    under the current folder, used as --model runs/NAME.

    Example: minidiff models
    """
    from minidiff_cli.files.models_dir import DEFAULT_MODEL, list_models, user_dir

    rows = [{"name": name, "path": str(path), "where": where, "default": name == DEFAULT_MODEL and where == "shipped",
             **_card(path)} for name, path, where in list_models()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no models found")
    for row in rows:
        mark = " (default)" if row["default"] else ""
        typer.echo(f"{row['name']}{mark}\t{row['where']}\t{row['path']}")
        if row.get("description"):
            typer.echo(f"    {row['description']}")
        if row.get("examples"):
            typer.echo("    try: " + ", ".join(json.dumps(e) for e in row["examples"][:4]))
    typer.echo(f"user folder: {user_dir()} (set MINIDIFF_MODELS_DIR to change it)")


def _card(path) -> dict:
    """A model file's description and example prompts, read from its header alone; {} when it has none."""
    from minidiff_cli.errors import MinidiffError
    from minidiff_cli.files.model_file import read_config

    try:
        card = read_config(path).get("card")
    except MinidiffError as exc:  # a damaged file in the user's folder: listed, with what is wrong
        return {"description": f"(unreadable: {exc})"}
    if not isinstance(card, dict):
        return {}
    out = {}
    if isinstance(card.get("description"), str):
        out["description"] = card["description"][:300]
    if isinstance(card.get("examples"), list):
        out["examples"] = [str(e)[:200] for e in card["examples"][:8]]
    return out

"""``minidiff info``: what is inside a model file or a generated PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@app.command("info")
def info_command(
    target: Optional[str] = typer.Argument(None, autocompletion=completion.models, help="A model (.safetensors path or name) or a PNG made by "
                                           "minidiff (or by AUTOMATIC1111 / stable-diffusion.cpp) "
                                           "[default: the shipped model]."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Show a model's config, or the parameters stored in a generated image.

    Examples:

      minidiff info

      minidiff info runs/shapes/model.safetensors --json

      minidiff info outputs/minidiff-00000.png
    """
    if target is not None and Path(target).suffix.lower() in IMAGE_SUFFIXES:
        _image_info(Path(target), as_json)  # other formats get a one-line "parameters live in PNGs"
    else:
        _model_info(target, as_json)


def _image_info(path: Path, as_json: bool) -> None:
    from minidiff_cli.files.png_parameters import format_parameters
    from minidiff_cli.inference.infotext import json_printable, printable, read_image

    params, foreign = read_image(path)
    if foreign is not None:
        _foreign_info(path, foreign, as_json)
        return
    # A stranger's PNG may hold terminal escapes, NUL or lone surrogates in its prompt: shown escaped.
    typer.echo(json_printable(json.dumps(params, indent=2, ensure_ascii=False)) if as_json
               else printable(format_parameters(params)))


def _foreign_info(path: Path, text: str, as_json: bool) -> None:
    """Another program's `parameters` text: shown as it is (escapes made visible), and split into fields."""
    from minidiff_cli.inference.infotext import parse, printable

    info = parse(text, path)  # refuses an oversized text
    if as_json:  # ASCII-escaped: no control character of a stranger's reaches the terminal
        typer.echo(json.dumps({"made_by_minidiff": False, "parameters_text": text, "prompt": info.prompt,
                               "negative_prompt": info.negative_prompt, "settings": info.settings}, indent=2))
        return
    print(f"minidiff: note: '{path}' was not made by minidiff; this is its 'parameters' text", file=sys.stderr)
    typer.echo(printable(text))


def _model_info(target: str | None, as_json: bool) -> None:
    from minidiff_cli.diffusion.model import DiffusionModel
    from minidiff_cli.files.model_file import file_hash, read_header
    from minidiff_cli.files.models_dir import resolve_model

    path = resolve_model(target)
    metadata, entries = read_header(path)
    if metadata.get("format") == "minidiff-vae":
        _vae_info(path, entries, as_json)
        return
    config = DiffusionModel.check_file(path)  # the same checks as loading, without reading the weights
    summary = {"file": str(path), "hash": file_hash(path), "bytes": path.stat().st_size,
               "tensors": len(entries), "parameters": _count(entries), "config": config}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print_model(summary)


def _image_row(config: dict[str, Any]) -> str:
    unet = config.get("unet", {})
    size, channels = unet.get("image_size"), unet.get("in_channels")
    vae = config.get("vae")
    if not isinstance(vae, dict):
        return f"{size}px, {channels} channels"
    factor = 2 ** (len(vae.get("config", {}).get("channel_mult", [0])) - 1)
    return (f"{size * factor}px RGB, drawn as {channels}x{size}x{size} latents of its VAE (factor {factor}; "
            f"shift {vae.get('shift'):.4f}, scale {vae.get('scale'):.4f}; VAE hash {vae.get('hash') or '-'})")


def _vae_info(path: Path, entries: dict[str, Any], as_json: bool) -> None:
    """A VAE file from `minidiff vae train`: its autoencoder and training."""
    from rich.console import Console
    from rich.table import Table

    from minidiff_cli.files.model_file import file_hash
    from minidiff_cli.vae.vae_file import check_vae_file

    cfg, meta = check_vae_file(path)
    summary = {"file": str(path), "hash": file_hash(path), "bytes": path.stat().st_size, "tensors": len(entries),
               "parameters": _count(entries), "config": meta}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    size = meta.get("image_size")
    side = f"{size}x{size} -> {cfg.latent_channels}x{size // cfg.factor}x{size // cfg.factor}" if size else ""
    table = Table(show_header=False, title=f"VAE {path}")
    for key, value in (("name", meta.get("name", "")), ("hash", summary["hash"]),
                       ("size", f"{summary['bytes'] / 1e6:.1f} MB, {summary['tensors']} tensors"),
                       ("parameters", ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in summary["parameters"].items())),
                       ("latents", f"{cfg.latent_channels} channels at 1/{cfg.factor} of the side; {side}"),
                       ("vae", json.dumps(cfg.to_dict())),
                       ("training", shortened_json(meta.get("training", {}), TRAINING_CHARS))):
        table.add_row(key, str(value))
    Console().print(table)


def _count(entries: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, entry in entries.items():
        n = 1
        for dim in entry["shape"]:
            n *= dim
        part = name.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + n
    return counts


def _student_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    """What a distilled student is (its teacher, method, adapter) and how it draws; [] for other models."""
    from minidiff_cli.diffusion.student import sampling_defaults, student_entry
    from minidiff_cli.errors import MinidiffError

    rows = []
    try:
        if "student" in config:
            entry = student_entry(config)
            guidance = f", guidance {entry['guidance']:g} folded in" if entry["guidance"] != 1 else ""
            rows.append(("student", f"of '{entry['teacher']['name']}' (hash {entry['teacher']['hash']}): "
                                    f"{entry['method']}, rank {entry['rank']} adapter{guidance}"))
        defaults = sampling_defaults(config)
        if defaults:
            rows.append(("draws with", ", ".join(f"{k} {v}" for k, v in defaults.items())))
    except MinidiffError as exc:  # info shows a damaged file's other rows; loading it says what is wrong
        rows.append(("student", f"invalid: {exc}"))
    return rows


def _print_model(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    config = summary["config"]
    table = Table(show_header=False, title=f"model {summary['file']}")
    rows = [
        ("name", config.get("name", "")),
        ("hash", summary["hash"]),
        ("size", f"{summary['bytes'] / 1e6:.1f} MB, {summary['tensors']} tensors"),
        ("parameters", ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in summary["parameters"].items())),
        ("image", _image_row(config)),
        ("prediction", config.get("prediction", "eps")),
        ("schedule", _schedule_row(config.get("schedule", {}))),
        ("conditioner", config.get("conditioner", {}).get("name", "")),
        ("unet", json.dumps(config.get("unet", {}))),
    ]
    rows += _student_rows(config)
    if config.get("class_names"):
        rows.append(("classes", ", ".join(config["class_names"])))
    card = config.get("card") if isinstance(config.get("card"), dict) else {}
    for key in ("description", "notice"):
        if isinstance(card.get(key), str) and card[key]:
            rows.append((key, card[key]))
    if isinstance(card.get("examples"), list) and card["examples"]:
        rows.append(("example prompts", "; ".join(map(str, card["examples"]))))
    if isinstance(config.get("vocabulary"), list):
        rows.append(("vocabulary", _vocabulary_row(config["vocabulary"])))
    if config.get("training"):
        rows.append(("training", shortened_json(config["training"], TRAINING_CHARS)))
    for key, value in rows:
        table.add_row(key, str(value))
    Console().print(table)


TRAINING_CHARS = 400  # the training record holds every flag; the table shows its start
VOCABULARY_SHOWN = 60


def _schedule_row(schedule: dict) -> str:
    """"flow over 1000 steps, shift 3.0", with its options and zero terminal SNR when the file has them."""
    parts = [f"{schedule.get('name')} over {schedule.get('num_timesteps')} steps"]
    parts += [f"{key} {value}" for key, value in (schedule.get("options") or {}).items()]
    if schedule.get("zero_terminal_snr"):
        parts.append("zero terminal SNR")
    return ", ".join(parts)


def _vocabulary_row(words: list) -> str:
    """The words of the training captions; a long list is cut, with the way to see all of it."""
    shown = ", ".join(map(str, words[:VOCABULARY_SHOWN]))
    rest = len(words) - VOCABULARY_SHOWN
    return f"{len(words):,} words: {shown}" + (f", ... ({rest:,} more: minidiff info --json)" if rest > 0 else "")


def shortened_json(value: Any, limit: int) -> str:
    """``value`` as JSON, cut after the last whole item that fits in ``limit`` characters,
    with an ellipsis that says where the rest is."""
    text = json.dumps(value)
    if len(text) <= limit:
        return text
    cut = text.rfind(", ", 0, limit)
    return f"{text[:cut if cut > 0 else limit]}, ... (all of it: minidiff info FILE --json)"

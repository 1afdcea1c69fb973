"""Shell completion of option values: registered names and model names.

Typer calls these only while the shell completes a word, so they may load the plugin
registry; they never import torch (built-in plugins register light factories).
"""

from __future__ import annotations


def _registered(kind: str, incomplete: str) -> list[str]:
    from minidiff_cli import plugins

    return [name for name in plugins.registry().names(kind) if name.startswith(incomplete)]


def samplers(incomplete: str) -> list[str]:
    return _registered("samplers", incomplete)


def schedules(incomplete: str) -> list[str]:
    return _registered("schedules", incomplete)


def conditioners(incomplete: str) -> list[str]:
    return _registered("conditioners", incomplete)


def datasets(incomplete: str) -> list[str]:
    return _registered("datasets", incomplete)


def models(incomplete: str) -> list[str]:
    """Model names and run folders (see `minidiff models`); a path is left to the shell."""
    from minidiff_cli.files.models_dir import list_models

    names = dict.fromkeys(name for name, _, _ in list_models())
    return [name for name in names if name.startswith(incomplete)]

"""Options several commands share, defined once so that their flags and help read the same."""

from __future__ import annotations

from typing import Optional

import typer

THREADS_HELP = ("torch CPU threads [default: auto, the cores no other process is busy on; also "
                "MINIDIFF_THREADS=N]. 0 is auto too.")


def int_list(text: str, key: str) -> list[int]:
    """``"1,2,2"`` -> [1, 2, 2] for the option ``key`` (``channel_mult``); anything else is one line."""
    from minidiff_cli.errors import MinidiffError

    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise MinidiffError(f"--{key.replace('_', '-')} takes whole numbers separated by commas (got '{text}')") from None


def threads_option() -> Optional[int]:
    return typer.Option(None, "--threads", help=THREADS_HELP, show_default=False)


def model_sampling_defaults(model: str | None, installed_only: bool = False) -> dict:
    """The sampler, steps and cfg a model's file asks for (a distilled student's few steps, say); {} where
    the file says nothing or cannot be read here (loading it later reports why)."""
    from minidiff_cli.diffusion.student import sampling_defaults
    from minidiff_cli.errors import MinidiffError
    from minidiff_cli.files.model_file import read_config
    from minidiff_cli.files.models_dir import resolve_model

    try:
        return sampling_defaults(read_config(resolve_model(model, installed_only=installed_only)))
    except (MinidiffError, OSError):
        return {}

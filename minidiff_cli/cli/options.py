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

"""Options several commands share, defined once so that their flags and help read the same."""

from __future__ import annotations

from typing import Optional

import typer

THREADS_HELP = ("torch CPU threads [default: auto, the cores no other process is busy on; also "
                "MINIDIFF_THREADS=N]. 0 is auto too.")


def threads_option() -> Optional[int]:
    return typer.Option(None, "--threads", help=THREADS_HELP, show_default=False)

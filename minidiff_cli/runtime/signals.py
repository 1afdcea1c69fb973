"""Stopping a long job cleanly: SIGTERM or Ctrl-C asks it to finish its step and save."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable


@contextmanager
def stop_signals(log: Callable[[str], None] | None):
    """SIGTERM (e.g. from a job scheduler) or Ctrl-C: finish the current step, save, stop.

    Stopping between steps keeps the checkpoint exactly resumable; a second Ctrl-C stops at
    once (the trainer still saves). Yields ``stop_asked() -> bool``; the previous handlers
    are restored on the way out.
    """
    asked = {"stop": False}

    def handler(signum, frame):
        if asked["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked["stop"] = True
        if log is not None:
            log("stopping after this step, then saving (Ctrl-C again to stop now)")

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread: signals stay as they are
        pass
    try:
        yield lambda: asked["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

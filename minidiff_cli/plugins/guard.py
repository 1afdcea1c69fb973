"""Running a plugin's code (its import, its hooks) so that whatever it does, minidiff goes on.

- ``SystemExit`` (``sys.exit`` at import), ``KeyboardInterrupt`` raised by the plugin itself and
  any other ``BaseException`` become ``PluginCodeExit``, an ordinary ``Exception``: the registry
  records the plugin as broken and every command still runs. A real Ctrl-C from the user is told
  apart by a SIGINT handler installed for the duration, and still stops minidiff.
- What the plugin prints goes to stderr, so it never corrupts stdout (``--json`` output).
- A plugin that takes long (an import that hangs on the network, say) is named on stderr after
  ``SLOW_SECONDS``. There is no timeout: Python cannot stop a thread that is importing, and
  killing the import would leave its half-run module behind; saying who is slow lets the user act
  (``MINIDIFF_LOAD_PLUGINS`` leaves it out).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

SLOW_SECONDS = 5.0


class PluginCodeExit(Exception):
    """A plugin raised a BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...)."""

    def __init__(self, exc: BaseException):
        detail = f" {exc}" if str(exc) else ""
        super().__init__(f"raised {type(exc).__name__}{detail}")


@contextlib.contextmanager
def plugin_code(plugin: str, what: str = "loading") -> Iterator[None]:
    """Run the block as a plugin's code: contained, quiet on stdout, named if slow."""
    ctrl_c = _UserInterrupt()
    timer = threading.Timer(SLOW_SECONDS, _say_slow, args=(plugin, what))
    timer.daemon = True
    timer.start()
    try:
        with ctrl_c, contextlib.redirect_stdout(sys.stderr):
            yield
    except KeyboardInterrupt as exc:
        if ctrl_c.pressed:
            raise
        raise PluginCodeExit(exc) from None
    except Exception:
        raise
    except BaseException as exc:  # SystemExit, GeneratorExit, a plugin's own BaseException subclass
        raise PluginCodeExit(exc) from None
    finally:
        timer.cancel()


def _say_slow(plugin: str, what: str) -> None:
    print(f"minidiff: {what} plugin '{plugin}' is taking more than {SLOW_SECONDS:.0f} s "
          "(MINIDIFF_LOAD_PLUGINS=... leaves installed plugins out)", file=sys.stderr, flush=True)


class _UserInterrupt:
    """Notes a real SIGINT while installed (main thread only), then interrupts as Python would."""

    def __init__(self) -> None:
        self.pressed = False
        self._installed = False
        self._previous = None

    def __enter__(self) -> "_UserInterrupt":
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):  # not allowed here (an embedded interpreter)
                pass
        return self

    def _handler(self, signum, frame) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def __exit__(self, *exc_info) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)

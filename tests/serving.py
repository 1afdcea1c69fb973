"""A real `minidiff serve` for the tests: started through the console script on a free port of
127.0.0.1, waited for (bounded), stopped with Ctrl-C (SIGINT) as a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import EMPTY_MODELS_DIR, USER_SETTINGS, cli_command

START_TIMEOUT_S = 180  # torch's import and the model's load on a busy 2-core machine


def hermetic(environ) -> dict:
    """``environ`` without the user's minidiff settings: a server a module shares may start before a
    test's own clean-up runs."""
    return {**{k: v for k, v in environ.items() if k not in USER_SETTINGS}, "MINIDIFF_MODELS_DIR": EMPTY_MODELS_DIR}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """``minidiff serve ARGS`` in ``cwd``; ``url`` once it answers."""

    def __init__(self, cwd: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+", encoding="utf-8")  # not in cwd: the server writes nothing there
        self.proc = subprocess.Popen([*cli_command(), "serve", "--port", str(self.port), *args], cwd=cwd,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**hermetic(os.environ), "COLUMNS": "200", **(env or {})})
        self._wait(args)

    def _wait(self, args) -> None:
        import requests

        headers = {"Authorization": f"Bearer {args[args.index('--token') + 1]}"} if "--token" in args else {}
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"minidiff serve exited with {self.proc.returncode}: {self.output()}")
            try:
                if requests.get(f"{self.url}/sdapi/v1/options", headers=headers, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"minidiff serve did not answer in {START_TIMEOUT_S} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 60) -> int:
        """Ctrl-C, then wait (bounded); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

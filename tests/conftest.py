"""Shared test helpers: run the real console script, as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The tests use tiny models, which run fastest on one thread; on a busy machine several
# threads per process spin against each other and a 0.02 s forward pass takes 0.3 s.
# Set before torch is imported, so it holds here and in every command the tests run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# If something imported torch before this file ran, the variable came too late: set it
# directly too, so in-process runs compute exactly like the subprocesses they are compared with.
if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def cli_command() -> list[str]:
    """The installed `minidiff` console script (falls back to python -m)."""
    exe = shutil.which("minidiff")
    return [exe] if exe else [sys.executable, "-m", "minidiff_cli"]


def run_cli(*args: str, env: dict | None = None, cwd: str | os.PathLike | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    for key, value in list(full_env.items()):
        if value is None:
            del full_env[key]
    return subprocess.run([*cli_command(), *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


def run_in_process(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``minidiff ARGS`` run in this process: no torch import per call."""
    import contextlib
    import io

    from minidiff_cli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, no traceback, one line on stderr that contains every fragment."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def toml(tmp_path) -> Path:
    """The config file that, with TINY_TRAIN's flags, trains a tiny model in seconds."""
    from tinymodels import TINY_TOML

    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The folder of a tiny class-conditional run trained by `minidiff train` (6 steps, seconds)."""
    from tinymodels import TINY_TOML, TINY_TRAIN

    folder = tmp_path_factory.mktemp("trained")
    toml = folder / "tiny.toml"
    toml.write_text(TINY_TOML)
    out = folder / "run"
    result = run_cli("train", "--data", "shapes", "--conditioner", "class", *TINY_TRAIN, "--config", str(toml),
                     "--max-steps", "6", "--save-every", "3", "--sample-every", "1000", "--log-every", "1",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Undo any thread count a test (or an in-process Trainer with --threads) left behind."""
    yield
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

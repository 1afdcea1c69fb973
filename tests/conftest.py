"""Shared test helpers: run the real console script, as a user would, or the CLI in this process; shared fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The tests use tiny models, which run fastest on one thread; on a busy machine several
# threads per process spin against each other and a 0.02 s forward pass takes 0.3 s.
# Set before torch is imported, so it holds here and in every command the tests run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
TEST_THREADS = int(os.environ["OMP_NUM_THREADS"])  # what every test is run at (a test may unset the variable)
# If something imported torch before this file ran, the variable came too late: set it
# directly too, so in-process runs compute exactly like the subprocesses they are compared with.
if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Hermetic: the user's settings must not change what the tests see (their models named like a
# test's, their plugins, a thread count). Cleared here, before any fixture (session ones too)
# and any command the tests run, and again before each test (``_hermetic_environment``).
USER_SETTINGS = ("MINIDIFF_MODELS_DIR", "XDG_DATA_HOME", "MINIDIFF_THREADS", "MINIDIFF_PLUGINS_DIR",
                 "MINIDIFF_LOAD_PLUGINS", "MINIDIFF_STRICT_PLUGINS", "MINIDIFF_KEEP_FREED_MEMORY")
EMPTY_MODELS_DIR = tempfile.mkdtemp(prefix="minidiff-test-models-")  # no user models; removed at exit
atexit.register(shutil.rmtree, EMPTY_MODELS_DIR, True)


def _clear_user_settings(setenv, delenv) -> None:
    for key in USER_SETTINGS:
        delenv(key)
    setenv("MINIDIFF_MODELS_DIR", EMPTY_MODELS_DIR)


_clear_user_settings(os.environ.__setitem__, lambda key: os.environ.pop(key, None))


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


def assert_error(result: tuple[int, str, str], *fragments: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, exactly one line on stderr holding every fragment; returns the line."""
    rc, out, err = result
    assert rc == code, result
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def timed_cli(*args, max_calls: int = 0) -> tuple[int, str, str]:
    """``run_in_process(*args)``, failing the test if the U-Net ran more than ``max_calls`` forward
    passes: a refusal comes before the work it refuses. Counted, not timed, so a busy machine
    cannot fail it and a slow refusal that does the work first cannot pass it."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from minidiff_cli.nets.unet import UNet

    calls = []
    handle = register_module_forward_pre_hook(lambda module, _: calls.append(1) if isinstance(module, UNet) else None)
    try:
        result = run_in_process(*args)
    finally:
        handle.remove()
    assert len(calls) <= max_calls, ("refused after the work", len(calls), args)
    return result


def train_args(toml: Path, out: Path, *more: str) -> list:
    """The arguments of a tiny class-conditional `minidiff train` into ``out`` (TINY_TRAIN, ``toml``)."""
    from tinymodels import TINY_TRAIN

    return ["train", "--data", "shapes", "--conditioner", "class", *TINY_TRAIN, "--config", toml,
            "--sample-every", "1000", "--out", out, *more]


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny class-conditional model file, made once per test module."""
    from tinymodels import tiny_model_file

    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", "class", seed=1)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A plugins folder for this process's registry (write the plugins before the first look-up)."""
    from minidiff_cli import plugins

    folder = tmp_path / "plugs"
    folder.mkdir()
    monkeypatch.setenv("MINIDIFF_PLUGINS_DIR", str(folder))
    monkeypatch.delenv("MINIDIFF_STRICT_PLUGINS", raising=False)
    plugins.reset()
    yield folder
    plugins.reset()


# The in-process twin of TINY_TRAIN + TINY_TOML: TrainConfig(**TINY, out=..., ...).
TINY = dict(data="shapes", conditioner="class", image_size=16, base_channels=8, channel_mult=[1, 2],
            attention_resolutions=[8], cross_attention_resolutions=[8], head_dim=8, class_dim=16, timesteps=100,
            batch_size=4, warmup=2, lr=1e-3, quiet=True, device="cpu", sample_every=1000, log_every=1)


@pytest.fixture(scope="module")
def trained_checkpoint_run(tmp_path_factory) -> Path:
    """A real (one-step) run to resume from, made once per test module; tests damage copies of it."""
    from minidiff_cli.training.config import TrainConfig
    from minidiff_cli.training.trainer import Trainer

    out = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(TrainConfig(**TINY, out=str(out), max_steps=1, save_every=1).validate(), log=lambda m: None).run()
    return out


@pytest.fixture(autouse=True)
def _hermetic_environment():
    """Each test starts, and leaves, without the user's minidiff settings (and an empty user model folder).

    Cleared directly, not through monkeypatch: monkeypatch would put a value one test leaked back
    after the next test, where module-scoped fixtures (a server the tests share) would inherit it."""
    _clear_user_settings(os.environ.__setitem__, lambda key: os.environ.pop(key, None))
    yield
    _clear_user_settings(os.environ.__setitem__, lambda key: os.environ.pop(key, None))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Undo any thread count a test (or an in-process Trainer with --threads) left behind."""
    yield
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(TEST_THREADS)

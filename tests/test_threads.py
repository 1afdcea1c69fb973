"""Thread choice: --threads / MINIDIFF_THREADS win; otherwise the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from conftest import assert_one_line_error, run_cli, run_in_process

from minidiff_cli.errors import MinidiffError
from minidiff_cli.runtime.threads import ENV, LoadMeter, auto_threads, requested_threads, usable_cores

BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def burners(count: int, seconds: float = 4.0) -> list[subprocess.Popen]:
    """CPU-bound processes that stop by themselves after ``seconds``."""
    return [subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)]) for _ in range(count)]


def test_the_flag_wins_over_the_environment_and_zero_means_auto(monkeypatch):
    monkeypatch.setenv(ENV, "3")
    assert requested_threads(2) == 2
    assert requested_threads(None) == 3
    assert requested_threads(0) is None
    monkeypatch.setenv(ENV, "auto")
    assert requested_threads(None) is None


@pytest.mark.parametrize("value", ["two", "-1", "5000"])
def test_a_bad_environment_value_is_an_error(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(MinidiffError, match=ENV):
        requested_threads(None)


def test_other_processes_count_as_busy_and_this_one_does_not():
    meter = LoadMeter()
    time.sleep(0.5)
    baseline = meter.others()
    end = time.process_time() + 0.5
    while time.process_time() < end:  # this process is busy: not "other" load
        pass
    assert meter.others() < baseline + 0.5
    procs = burners(1)
    try:
        time.sleep(0.3)
        meter.others()
        time.sleep(1.0)
        # (on a machine already full, other load cannot grow past the cores there are)
        assert meter.others() > min(baseline + 0.4, usable_cores() - 0.6)
    finally:
        for p in procs:
            p.kill()


def test_auto_takes_one_thread_when_every_core_is_busy():
    procs = burners(usable_cores())
    try:
        time.sleep(0.5)
        assert auto_threads(look_s=1.0) == 1
    finally:
        for p in procs:
            p.kill()


def test_threads_flag_sets_torch_threads_through_the_cli():
    before = torch.get_num_threads()
    try:
        code, out, err = run_in_process("schedules", "show", "linear", "--timesteps", "4", "--json")
        assert code == 0
        code, _, err = run_in_process("explain", "--threads", "2", "--json")
        assert code == 0, err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", [["explain"], ["generate", "a red circle", "--steps", "1"],
                                     ["eval", "-n", "1", "--runs", "ddim:1"]])
def test_bad_threads_are_one_line_errors(command):
    assert_one_line_error(run_cli(*command, "--threads", "-2"), "--threads must be from 1 to 1024")
    assert_one_line_error(run_cli(*command, env={ENV: "many"}), f"{ENV}='many' must be a whole number")


def test_the_python_api_chooses_threads_as_the_cli_does_once_and_overridably(monkeypatch, tmp_path):
    from tinymodels import tiny_model_file

    from minidiff_cli.inference.pipeline import Pipeline
    from minidiff_cli.runtime import threads

    model = tiny_model_file(tmp_path / "m.safetensors", "class")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(threads, "_chosen", False)  # a fresh Python process that never ran a command
    torch.set_num_threads(2)
    Pipeline.load(model, device="cpu")
    assert torch.get_num_threads() == 1  # MINIDIFF_THREADS, as the CLI reads it
    torch.set_num_threads(2)  # the user's own choice afterwards holds: the library chose once
    Pipeline.load(model, device="cpu")
    assert torch.get_num_threads() == 2
    Pipeline.load(model, device="cpu", threads=3)
    assert torch.get_num_threads() == 3
    monkeypatch.setattr(threads, "_chosen", False)
    monkeypatch.delenv(ENV)
    monkeypatch.setattr(threads, "auto_threads", lambda *a, **k: 1)  # auto, as a busy machine gives
    torch.set_num_threads(2)
    Pipeline.load(model, device="cpu")
    assert torch.get_num_threads() == 1

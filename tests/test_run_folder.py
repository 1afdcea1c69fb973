"""Run folders (minidiff_cli.training.run_folder): `train` writes only into a folder it owns, one process at a
time, and a resumed run removes only its own stale temporary files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import assert_error, run_in_process, snapshot, timed_cli, train_args


@pytest.mark.hostile
@pytest.mark.parametrize("foreign", ["loss.png", "samples/step-0000002.png", "metrics.jsonl", "notes.txt"])
def test_a_new_run_refuses_a_folder_holding_files_it_did_not_write(tmp_path, toml, foreign):
    out = tmp_path / "run"
    (out / foreign).parent.mkdir(parents=True)
    (out / foreign).write_text("someone else's\n")
    before = snapshot(out)
    first = foreign.split("/")[0]
    assert_error(timed_cli(*train_args(toml, out, "--max-steps", "2")), f"'{out}' is not empty ('{first}')",
                 "choose a new or empty --out")
    assert snapshot(out) == before


@pytest.mark.hostile
def test_a_folder_holding_only_this_runs_first_stage_is_this_runs(tmp_path, toml):
    from minidiff_cli.training.run_folder import check_contents

    out = tmp_path / "run"
    out.mkdir()
    (out / "clip.safetensors").write_bytes(b"")
    (out / "clip.checkpoint.safetensors").write_bytes(b"")
    check_contents(out, resume=False)  # no error


def _locked_by_someone(path: Path) -> bool:
    import fcntl
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@pytest.mark.hostile
def test_a_second_train_into_a_live_run_is_refused_and_a_crashed_runs_lock_is_stale(tmp_path, toml):
    """A real run holds the folder; a second is refused in one line; after SIGKILL the lock is gone."""
    import signal
    import subprocess

    from conftest import cli_command

    out = tmp_path / "run"
    args = [str(a) for a in train_args(toml, out, "--max-steps", "100000", "--save-every", "2", "--log-every", "1")]
    first = subprocess.Popen([*cli_command(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "checkpoint.safetensors").exists() and _locked_by_someone(out)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not get going"
            time.sleep(0.2)
        metrics = (out / "metrics.jsonl").read_bytes()
        line = assert_error(timed_cli(*train_args(toml, out, "--max-steps", "100000", "--resume")),
                            f"another minidiff train is writing into '{out}' (process {first.pid})")
        assert "wait for it to end" in line
        assert (out / "metrics.jsonl").read_bytes().startswith(metrics)  # only the first run's steps
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    from minidiff_cli.training.checkpoint import read_checkpoint_meta

    step = read_checkpoint_meta(out / "checkpoint.safetensors")["step"]
    rc, _, err = run_in_process("train", "--out", out, "--resume", "--max-steps", step + 1, "--quiet")
    assert rc == 0, err


@pytest.mark.hostile
def test_resume_removes_only_this_runs_stale_temporaries(tmp_path, toml, trained_run):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    stale = [out / ".checkpoint.safetensors.k2j4h5g6.tmp", out / ".metrics.jsonl.abcd_123.tmp",
             out / "samples" / ".step-0000004.png.zzzzzzzz.tmp"]
    kept = [out / ".notes.txt.abcdefgh.tmp", out / "samples" / ".holiday.png.abcdefgh.tmp"]
    for path in stale + kept:
        path.write_bytes(b"half a file")
    rc, _, err = run_in_process("train", "--out", out, "--resume", "--max-steps", "7", "--quiet")
    assert rc == 0, err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_failed_first_run_leaves_none_of_the_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "runs" / "x"
    assert_error(run_in_process("train", "--data", tmp_path / "missing", "--out", out, "--quiet", "--device", "cpu"),
                 "missing")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and list((tmp_path / "kept").iterdir()) == []

"""What `train` tells a user while it runs: lines when stderr is not a terminal, how long the run will take,
and a warm-up that fits the run (a note when it was shortened)."""

from __future__ import annotations

import pytest
from conftest import run_in_process, train_args

from minidiff_cli.training.config import TrainConfig
from minidiff_cli.training.optim import effective_warmup, lr_at, warmup_note


def test_without_a_terminal_train_prints_progress_lines_and_the_time_to_go(tmp_path, toml):
    args = [a for a in train_args(toml, tmp_path / "run", "--max-steps", "6", "--log-every", "2") if a != "--quiet"]
    code, out, err = run_in_process(*args)  # stderr is not a terminal here
    assert code == 0, err
    assert "step 2 of 6: about" in err and "to go at" in err, err
    assert [line.split()[1] for line in err.splitlines() if " loss " in line and line.startswith("step ")] == [
        "2", "4", "6"], err
    assert "done: step 6" in out


def test_a_run_shorter_than_its_warmup_warms_up_over_a_tenth_of_it():
    short = TrainConfig(lr=1e-3, warmup=500, max_steps=150)
    assert effective_warmup(500, 150) == 15
    assert lr_at(14, short) == pytest.approx(1e-3)  # the peak is reached, not 3% of it
    assert lr_at(0, short) == pytest.approx(1e-3 / 15)
    assert "warming up over 15 steps instead" in warmup_note(short)
    usual = TrainConfig(lr=1e-3, warmup=500, max_steps=2000)
    assert warmup_note(usual) is None and lr_at(249, usual) == pytest.approx(0.5e-3)  # unchanged


def test_train_says_when_it_shortened_the_warmup(tmp_path, toml):
    code, _, err = run_in_process(*train_args(toml, tmp_path / "run", "--max-steps", "2"))  # TINY_TRAIN: --warmup 2
    assert code == 0, err
    assert "note: --warmup 2 is not shorter than the learning-rate schedule (2 steps)" in err, err

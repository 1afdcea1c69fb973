"""Progress bars start with the work: an error found before the first step is the only line on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_error, run_in_process
from tinymodels import tiny_model_file


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", "class", seed=4)


@pytest.mark.parametrize("args, message", [
    (["--sampler", "dpm"], "dpm"),
    (["-O", "spacing=sideways"], "unknown spacing 'sideways'"),
])
def test_a_refusal_before_sampling_prints_no_progress_bar(model, tmp_path, args, message):
    line = assert_error(run_in_process("generate", "red circle", "--model", model, "--steps", "5", *args,
                                       "-o", tmp_path / "out"), message)
    assert "0/5" not in line


def test_the_bar_still_shows_the_steps_when_sampling_runs(model, tmp_path):
    code, _, err = run_in_process("generate", "red circle", "--model", model, "--steps", "5", "-o", tmp_path / "o")
    assert code == 0, err
    assert "5/5" in err, err

"""How a --model value becomes a file: a path, a run folder, or an installed name; a plain folder is named as one."""

from __future__ import annotations

import pytest
from conftest import assert_error, run_in_process

from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.models_dir import RUN_MODEL, resolve_model


def test_a_folder_without_a_model_says_what_it_lacks_and_what_to_give(tmp_path):
    with pytest.raises(MinidiffError, match=f"is a folder without {RUN_MODEL}: give a model's .safetensors file"):
        resolve_model(tmp_path)
    (tmp_path / RUN_MODEL).write_bytes(b"")
    assert resolve_model(tmp_path) == tmp_path / RUN_MODEL  # a run folder


def test_generate_with_a_folder_as_model_is_one_line_before_any_file(tmp_path):
    line = assert_error(run_in_process("generate", "red circle", "--model", tmp_path, "-q", "-o", tmp_path / "out"),
                        "is a folder without model.safetensors", "run folder")
    assert "is not a file" not in line
    assert list(tmp_path.iterdir()) == []

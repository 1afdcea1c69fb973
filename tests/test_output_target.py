"""What `generate -o` names: a folder (a trailing slash, an existing folder, no suffix) or one FILE.png."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_error, run_in_process
from tinymodels import tiny_model_file

from minidiff_cli.cli.generate import output_target
from minidiff_cli.errors import MinidiffError


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", "class", seed=3)


def test_a_trailing_slash_or_an_existing_folder_is_a_folder_whatever_its_suffix(tmp_path):
    (tmp_path / "existing.dir").mkdir()
    assert output_target(f"{tmp_path}/existing.dir/") == (tmp_path / "existing.dir", False)
    assert output_target(f"{tmp_path}/existing.dir") == (tmp_path / "existing.dir", False)
    assert output_target(f"{tmp_path}/run.v2/") == (tmp_path / "run.v2", False)
    assert output_target("outputs") == (Path("outputs"), False)
    assert output_target(f"{tmp_path}/pic.PNG") == (tmp_path / "pic.PNG", True)
    with pytest.raises(MinidiffError, match=r"must be a folder or a \.png file; .*end it with a slash"):
        output_target(f"{tmp_path}/run.v2")


@pytest.mark.parametrize("name", ["existing.dir", "run.v2"])
def test_generate_writes_into_a_folder_named_with_a_dot(model, tmp_path, name):
    if name == "existing.dir":
        (tmp_path / name).mkdir()
    code, out, err = run_in_process("generate", "red circle", "--model", model, "--steps", "1", "-q",
                                    "-o", f"{tmp_path}/{name}/")
    assert code == 0, err
    assert out.splitlines() == [str(tmp_path / name / "minidiff-00000.png")]
    assert (tmp_path / name / "minidiff-00000.png").is_file()


def test_a_new_dotted_name_without_slash_is_refused_before_anything_is_made(model, tmp_path):
    assert_error(run_in_process("generate", "red circle", "--model", model, "--steps", "1", "-q",
                                "-o", tmp_path / "new" / "run.v2"), "must be a folder or a .png file", "run.v2/")
    assert list(tmp_path.iterdir()) == []

"""Shell completion of option values, through the console script as bash asks for it."""

from __future__ import annotations

import pytest
from conftest import run_cli
from tinymodels import tiny_model_file


def complete(*words: str, cwd=None, env=None) -> list[str]:
    """What `minidiff` offers bash for the last of ``words`` (which may be partly typed)."""
    line = ["minidiff", *words]
    result = run_cli(env={"_MINIDIFF_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(line),
                          "COMP_CWORD": str(len(line) - 1), **(env or {})}, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("words, expected", [
    (("generate", "--sampler", "d"), ["ddim", "ddpm", "dpmpp-2m"]),  # dpmpp-2m: the solvers plugin's
    (("train", "--conditioner", ""), ["none", "class", "clip"]),
    (("train", "--schedule", "s"), ["scaled-linear", "sigmoid"]),
    (("train", "--data", "sh"), ["shapes"]),
    (("schedules", "show", "co"), ["cosine"]),
    (("noise", "photo.png", "--schedule", "lin"), ["linear"]),
])
def test_values_complete_from_the_registry(words, expected):
    assert sorted(complete(*words)) == sorted(expected)


def test_model_names_complete_from_every_model_folder(tmp_path):
    (tmp_path / "user").mkdir()
    tiny_model_file(tmp_path / "user" / "shapes-small.safetensors", "class")
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    tiny_model_file(tmp_path / "runs" / "mine" / "model.safetensors", "class")
    env = {"MINIDIFF_MODELS_DIR": str(tmp_path / "user")}
    assert complete("generate", "--model", "shapes", cwd=tmp_path, env=env) == ["shapes-clip", "shapes-fast", "shapes-small"]
    assert complete("info", "runs/", cwd=tmp_path, env=env) == ["runs/mine"]

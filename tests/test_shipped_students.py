"""The shipped few-step students (shapes-fast, emoji-fast): small adapters on the shipped teachers, found by
hash, drawing with their own sampler and steps; and every tracked file of the repository together stays small."""

from __future__ import annotations

import subprocess

import pytest
from conftest import ROOT, run_in_process

from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.evaluation.shapes_judge import score
from minidiff_cli.files.model_file import file_hash, read_config
from minidiff_cli.files.models_dir import SHIPPED_DIR, resolve_model
from minidiff_cli.files.png_parameters import read_parameters
from minidiff_cli.inference.pipeline import Generation, Pipeline

STUDENTS = {"shapes-fast": ("shapes-clip", 4), "emoji-fast": ("emoji", 4)}
MAX_TRACKED_BYTES = 55 * 1000 * 1000  # the device machine takes at most 64 MiB of working tree, wheels included


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_a_shipped_student_is_a_small_adapter_on_its_shipped_teacher(name):
    teacher, steps = STUDENTS[name]
    path, teacher_path = resolve_model(name), resolve_model(teacher)
    config = read_config(path)
    assert config["student"]["teacher"] == {"name": teacher, "hash": file_hash(teacher_path)}
    assert config["sampling"] == {"sampler": "lcm", "steps": steps, "cfg": 1.0}
    assert path.stat().st_size < 0.5 * teacher_path.stat().st_size
    assert DiffusionModel.check_file(path)["name"] == name


def test_every_tracked_file_together_stays_under_55_mb():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    total = sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())
    assert total < MAX_TRACKED_BYTES, f"{total / 1e6:.1f} MB tracked"
    shipped = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*.safetensors"))
    assert shipped < total


def test_shapes_fast_draws_the_prompted_shape_in_four_steps_by_default(tmp_path):
    rc, _, err = run_in_process("generate", "a red circle", "--model", "shapes-fast", "-o", tmp_path / "a.png",
                                "--quiet", "--device", "cpu")
    assert rc == 0, err
    params = read_parameters(tmp_path / "a.png")
    assert (params["model"], params["sampler"], params["steps"], params["cfg"]) == ("shapes-fast", "lcm", 4, 1.0)
    pipe = Pipeline.load("shapes-fast", device="cpu")
    images = pipe.sample_many(Generation("", steps=4, cfg=1.0, sampler="lcm", seed=0),
                              ["a red circle"] * 4 + ["a blue square"] * 4, list(range(8)))
    assert score(images[:4], "red", "circle")["both"] + score(images[4:], "blue", "square")["both"] >= 1.5

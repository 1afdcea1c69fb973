"""Every script in examples/ runs as a learner would run it, and leaves its picture or its number."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minidiff_cli.files.models_dir import DEFAULT_MODEL, SHIPPED_DIR

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHIPPED = SHIPPED_DIR / f"{DEFAULT_MODEL}.safetensors"
NEEDS_MODEL = {"05_samplers.py", "06_guidance.py", "07_text_conditioning.py", "08_img2img.py", "11_distill.py"}
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))

pytestmark = pytest.mark.slow


def run_example(name: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(EXAMPLES / name), "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_there_is_one_example_per_concept():
    assert SCRIPTS == ["01_forward_process.py", "02_unet_layers.py", "03_schedules.py", "04_training_loop.py",
                       "05_samplers.py", "06_guidance.py", "07_text_conditioning.py", "08_img2img.py",
                       "09_flow_matching.py", "10_latent_space.py", "11_distill.py"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs_and_writes_its_output(name, tmp_path):
    if name in NEEDS_MODEL and not SHIPPED.exists():
        pytest.skip(f"{name} samples the shipped model, and {SHIPPED} is not there yet")
    result = run_example(name, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if name == "02_unet_layers.py":  # its result is a number: the parameters, counted two ways
        counted, formula = re.search(r"parameters: ([\d,]+) counted, ([\d,]+) from the config", result.stdout).groups()
        assert counted == formula
        return
    png = tmp_path / name.replace(".py", ".png")
    assert png.is_file() and png.stat().st_size > 1000, result.stdout
    assert str(png) in result.stdout
    if name == "01_forward_process.py":  # by hand and NoiseSchedule.add_noise agree to float rounding
        difference = float(re.search(r"add_noise\| = (\S+)", result.stdout).group(1))
        assert difference < 1e-5
    if name == "09_flow_matching.py":  # Euler by hand and minidiff's DDIM take the same steps
        assert float(re.search(r"largest difference (\S+)", result.stdout).group(1)) < 1e-2

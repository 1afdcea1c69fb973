"""``minidiff schedules``, through the installed console script, as a user runs it."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

MINIDIFF = shutil.which("minidiff")
pytestmark = pytest.mark.skipif(MINIDIFF is None, reason="the minidiff console script is not installed")


def minidiff(*args, cwd=None):
    # Built-in plugins only, whatever else is installed, so that the listings are known exactly.
    env = {k: v for k, v in os.environ.items() if k != "MINIDIFF_PLUGINS_DIR"} | {"MINIDIFF_LOAD_PLUGINS": ""}
    return subprocess.run([MINIDIFF, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_list_shows_every_builtin_schedule_and_its_plugin():
    result = minidiff("schedules", "list")
    assert result.returncode == 0, result.stderr
    for name in ("linear", "cosine", "scaled-linear", "sigmoid", "flow"):
        assert name in result.stdout
    assert "minidiff.schedules" in result.stdout
    assert "alpha_bar(T/2)" in result.stdout


def test_show_json_gives_the_cosine_formula():
    result = minidiff("schedules", "show", "cosine", "--timesteps", "10", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"name", "timesteps", "betas", "alphas_cumprod"}
    assert data["name"] == "cosine" and data["timesteps"] == 10
    assert len(data["betas"]) == len(data["alphas_cumprod"]) == 10

    def f(t):  # Nichol & Dhariwal 2021, eq. 17, T = 10, s = 0.008
        return math.cos((t / 10 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in range(9):  # the last beta is clipped at 0.999
        assert data["alphas_cumprod"][t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert data["betas"][-1] == 0.999


def test_show_without_json_prints_a_table():
    result = minidiff("schedules", "show", "linear")
    assert result.returncode == 0, result.stderr
    assert "alpha_bar" in result.stdout and "999" in result.stdout


def test_plot_writes_a_png_and_never_overwrites_it(tmp_path):
    out = tmp_path / "tmp" / "x.png"
    result = minidiff("schedules", "plot", "cosine", "linear", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cosine" in result.stdout and "linear" in result.stdout  # the terminal chart's legend
    before = out.read_bytes()

    again = minidiff("schedules", "plot", "cosine", "-o", str(out))
    assert again.returncode == 2
    assert "already exists" in again.stderr and out.read_bytes() == before
    assert minidiff("schedules", "plot", "cosine", "-o", str(out), "--overwrite").returncode == 0
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]  # no temporary file left behind


def test_plot_draws_the_flow_path_at_each_shift(tmp_path):
    out = tmp_path / "shifts.png"
    result = minidiff("schedules", "plot", "flow", "cosine", "--shift", "1", "--shift", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "flow (shift 1)" in result.stdout and "flow (shift 3)" in result.stdout and out.is_file()
    refused = minidiff("schedules", "plot", "cosine", "--shift", "3", "-o", str(tmp_path / "no.png"))
    assert refused.returncode == 2 and "flow schedule's" in refused.stderr and not (tmp_path / "no.png").exists()


@pytest.mark.parametrize("args", [["show", "zigzag"], ["plot", "cosine", "zigzag", "-o", "never.png"]])
def test_unknown_schedule_is_one_line_and_exit_code_2(args, tmp_path):
    result = minidiff("schedules", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "unknown schedule 'zigzag'; available: cosine, flow, linear, scaled-linear, sigmoid" in result.stderr
    assert not (tmp_path / "never.png").exists()


def test_every_command_has_an_example_in_its_help():
    for command in ("list", "show", "plot"):
        result = minidiff("schedules", command, "--help")
        assert result.returncode == 0 and f"minidiff schedules {command}" in result.stdout


def test_builtin_plugins_and_the_command_module_do_not_import_torch():
    code = ("import sys, minidiff_cli.builtin.schedules, minidiff_cli.builtin.samplers, minidiff_cli.cli.schedules; "
            "sys.exit('torch' in sys.modules or 'matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

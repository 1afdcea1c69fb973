"""The read-only listings: `models`, `info`, `schedules list`, `plugins`."""

from __future__ import annotations

import json
import math

from conftest import assert_one_line_error, run_cli, run_in_process
from tinymodels import tiny_model_file


def test_models_lists_run_folders_and_model_takes_the_folder(tmp_path):
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    tiny_model_file(run / "model.safetensors", "class")
    (tmp_path / "runs" / "empty").mkdir()  # a run that never saved a model is not listed
    env = {"MINIDIFF_MODELS_DIR": str(tmp_path / "user")}
    rows = json.loads(run_cli("models", "--json", cwd=tmp_path, env=env).stdout)
    assert [r for r in rows if r["where"] == "run"] == [
        {"name": "runs/mine", "path": "runs/mine/model.safetensors", "where": "run", "default": False}]
    text = run_cli("models", cwd=tmp_path, env=env).stdout
    assert "runs/mine\trun\truns/mine/model.safetensors" in text
    assert f"user folder: {tmp_path / 'user'} (set MINIDIFF_MODELS_DIR to change it)" in text
    result = run_cli("generate", "a red circle", "--model", "runs/mine", "--steps", "2", "-q", "-o", "out",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(run_cli("info", "out/minidiff-00000.png", "--json", cwd=tmp_path).stdout)["model"] == "tiny-class"


def test_models_help_documents_the_user_folder():
    code, out, _ = run_in_process("models", "--help")
    assert code == 0 and "MINIDIFF_MODELS_DIR" in out and "runs/*/model.safetensors" in out


def test_info_shortens_the_training_record_at_an_item_with_an_ellipsis(trained_run):
    from minidiff_cli.files.model_file import read_config

    code, out, _ = run_in_process("info", trained_run / "model.safetensors")
    assert code == 0
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "│ training" in line)
    shown = "".join(line.split("│")[2] for line in lines[start:] if line.count("│") == 3).replace(" ", "")
    ending = ",...(allofit:minidiffinfoFILE--json)"
    assert shown.endswith(ending)
    full = json.dumps(read_config(trained_run / "model.safetensors")["training"]).replace(" ", "")
    body = shown.removesuffix(ending)
    assert full.startswith(body) and full[len(body)] == ","  # cut between two items, not inside one
    assert 300 < len(body) <= 400 < len(full)


def test_schedules_list_json_has_the_numbers_of_the_table():
    code, out, _ = run_in_process("schedules", "list", "--timesteps", "1000", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["cosine"]["plugin"] == "minidiff.schedules" and rows["cosine"]["error"] is None
    # the cosine schedule's alpha_bar at t = 500: cos^2 of just over pi/4, with the 0.008 offset
    assert math.isclose(rows["cosine"]["alpha_bar_half"], 0.4923, abs_tol=1e-4)
    assert math.isclose(rows["linear"]["alpha_bar_half"], 0.0778, abs_tol=1e-4)
    code, table, _ = run_in_process("schedules", "list")
    assert "0.4923" in table and "0.0778" in table


def test_plugins_table_wraps_names_and_errors_instead_of_cutting_them(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    reason = "this plugin needs the package frobnicator-extras-for-minidiff which is not installed here"
    (folder / "a_plugin_with_a_rather_long_module_name.py").write_text(f"raise ImportError({reason!r})\n")
    result = run_cli("--plugins-dir", str(folder), "plugins", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    rows = [line.split("│") for line in result.stdout.splitlines() if line.count("│") == 6]
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    names = "".join(cells[1].strip() for cells in rows)
    assert "a_plugin_with_a_rather_long_module_name" in names and "minidiff.conditioners" in names
    status = "".join(cells[5].strip() for cells in rows).replace(" ", "")
    assert reason.replace(" ", "") in status
    assert_one_line_error(run_cli("schedules", "list", "--json", "--timesteps", "1"), "timesteps must be at least 2")

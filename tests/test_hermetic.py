"""The tests do not depend on the user's environment: their minidiff settings are cleared for every test."""

from __future__ import annotations

import json
import os

from conftest import EMPTY_MODELS_DIR, USER_SETTINGS, run_in_process


def test_user_settings_are_cleared_and_the_user_model_folder_is_empty():
    assert [key for key in USER_SETTINGS if key != "MINIDIFF_MODELS_DIR" and key in os.environ] == []
    assert os.environ["MINIDIFF_MODELS_DIR"] == EMPTY_MODELS_DIR and os.listdir(EMPTY_MODELS_DIR) == []


def test_a_setting_one_test_makes_does_not_reach_the_next(monkeypatch):
    os.environ["MINIDIFF_THREADS"] = "7"  # a leak, as a careless test would leave it; the fixture undoes it
    monkeypatch.setenv("XDG_DATA_HOME", "/nonexistent")


def test_after_the_leak_the_environment_is_clean_again():
    assert "MINIDIFF_THREADS" not in os.environ and "XDG_DATA_HOME" not in os.environ


def test_the_commands_the_tests_run_see_no_user_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # and no run folders
    code, out, err = run_in_process("models", "--json")
    assert code == 0, err
    assert [row["where"] for row in json.loads(out) if row["where"] != "shipped"] == []

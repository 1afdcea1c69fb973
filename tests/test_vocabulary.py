"""Prompts a model never learned: generate warns about words its training captions never had."""

from __future__ import annotations

from conftest import run_cli

from minidiff_cli.data.vocabulary import unknown_words, vocabulary, words


def test_words_are_lowercase_runs_of_letters_and_digits():
    assert words("Thumbs-Up: keycap #1, piñata") == ["thumbs", "up", "keycap", "1", "piñata"]
    assert vocabulary(["a red circle", "A Red square"]) == ["a", "circle", "red", "square"]
    assert unknown_words("two blue circles, two", {"blue"}) == ["two", "circles"]


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("minidiff: warning:")]


def test_the_shipped_model_warns_about_words_it_never_saw(tmp_path):
    result = run_cli("generate", "a crimson circle", "--steps", "1", "-q", "-o", str(tmp_path / "a.png"))
    assert result.returncode == 0, result.stderr
    (line,) = warnings(result)
    assert "never saw 'crimson' in its training captions" in line
    result = run_cli("generate", "two blue circles", "--steps", "1", "-q", "-o", str(tmp_path / "b.png"))
    assert "'two', 'circles'" in warnings(result)[0]


def test_a_known_prompt_gets_no_warning_and_an_empty_one_is_explained(tmp_path):
    result = run_cli("generate", "a red circle", "--steps", "1", "-q", "-o", str(tmp_path / "a.png"))
    assert result.returncode == 0 and warnings(result) == []
    result = run_cli("generate", "", "--steps", "1", "-q", "-o", str(tmp_path / "b.png"))
    assert result.returncode == 0
    assert warnings(result) == ["minidiff: warning: the prompt is empty: the model draws what it learned "
                                "without a caption (unconditional)"]


def test_a_prompt_longer_than_the_context_is_reported_with_what_is_cut(tmp_path):
    long = "a red circle " + " ".join(["on a black background"] * 5)  # over the shipped encoder's 16 tokens
    result = run_cli("generate", long, "--steps", "1", "-q", "-o", str(tmp_path / "a.png"))
    assert result.returncode == 0, result.stderr
    (line,) = warnings(result)
    assert "longer than the text encoder's 16 tokens; ignored: 'background on a black background" in line


def test_info_lists_the_vocabulary_and_the_card():
    result = run_cli("info")
    assert result.returncode == 0
    assert "vocabulary" in result.stdout and "30 words: a, an, background" in result.stdout
    assert "example prompts" in result.stdout and "a red circle; a blue square" in result.stdout


def test_models_shows_what_each_model_draws_and_prompts_to_try(tmp_path):
    result = run_cli("models", cwd=tmp_path)
    assert result.returncode == 0
    assert "the built-in shapes world" in result.stdout and 'try: "a red circle", "a blue square"' in result.stdout


def test_the_unknown_word_hint_names_the_info_command_for_that_model():
    from types import SimpleNamespace

    from minidiff_cli.data.vocabulary import info_command, prompt_warnings

    assert info_command(None) == "minidiff info"  # the default model
    assert info_command("runs/my run") == "minidiff info 'runs/my run'"
    config, clip = {"vocabulary": ["a", "red", "circle"]}, SimpleNamespace(name="clip")
    (note,) = prompt_warnings("a crimson circle", config, clip, "emoji")
    assert note.endswith("`minidiff info emoji` lists the words it knows"), note
    (note,) = prompt_warnings("a crimson circle", config, clip)
    assert note.endswith("`minidiff info` lists the words it knows"), note

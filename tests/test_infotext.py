"""PNGs made by AUTOMATIC1111 or stable-diffusion.cpp: `info` shows their text, `generate --from` maps it."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_in_process
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tinymodels import tiny_model_file

from minidiff_cli.errors import ImageMetadataError
from minidiff_cli.files.png_parameters import format_parameters
from minidiff_cli.inference.infotext import MAX_INFOTEXT_CHARS, Infotext, parse, to_minidiff

A1111 = ("red circle\nNegative prompt: blue square\n"
         "Steps: 4, Sampler: DPM++ 2M Karras, CFG scale: 2.5, Seed: 12345, Size: 512x512, "
         "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.6.0")


def foreign_png(path: Path, text: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, pnginfo=info)
    return path


def in_process(*args) -> subprocess.CompletedProcess:
    """``run_in_process`` shaped like ``run_cli``'s result, for ``assert_one_line_error``."""
    code, out, err = run_in_process(*args)
    return subprocess.CompletedProcess(args, code, out, err)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", "class", seed=3)


# -- reading the text ---------------------------------------------------------------------------
def test_parse_splits_prompt_negative_prompt_and_settings():
    text = ('a red circle,\non white\nNegative prompt: blurry,\nugly\n'
            'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Lora hashes: "a: 1f, b: 2e", Size: 512x512')
    assert parse(text, "x.png") == Infotext(
        "a red circle,\non white", "blurry,\nugly",
        {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "1", "Lora hashes": "a: 1f, b: 2e",
         "Size": "512x512"})


def test_a_last_line_with_fewer_than_three_settings_is_prompt_text():
    assert parse("a cat\nSteps: 20, Seed: 3", "x.png") == Infotext("a cat\nSteps: 20, Seed: 3")


def test_minidiff_own_text_reads_back():
    params = {"prompt": "red circle", "negative_prompt": "blue", "steps": 7, "sampler": "dpmpp-2m", "cfg": 2.0,
              "seed": 9, "width": 16, "height": 16, "model": "m", "model_hash": "abc"}
    info = parse(format_parameters(params), "x.png")
    assert to_minidiff(info, "x.png") == {"prompt": "red circle", "negative_prompt": "blue", "steps": 7, "cfg": 2.0,
                                          "seed": 9, "sampler": "dpmpp-2m"}


@pytest.mark.parametrize("settings, sampler, options", [
    ("Sampler: DPM++ 2M Karras", "dpmpp-2m", {"karras": True}),
    ("Sampler: DPM++ 2M, Schedule type: Karras", "dpmpp-2m", {"karras": True}),   # AUTOMATIC1111 1.9+
    ("Sampler: DPM++ 2M, Schedule type: Automatic", "dpmpp-2m", None),
    ("Sampler: Euler a", "euler-ancestral", None),
    ("Sampler: Euler", "euler", None),
    ("Sampler: Heun Karras", "heun", {"karras": True}),
    ("Sampler: DDIM", "ddim", None),
    ("Sampler: euler_a, Schedule: karras", "euler-ancestral", {"karras": True}),  # stable-diffusion.cpp
    ("Sampler: dpm++2m", "dpmpp-2m", None),
    ("Sampler: ddim_trailing", "ddim", None),
])
def test_sampler_names_map_to_their_counterparts(settings, sampler, options):
    params = to_minidiff(parse(f"a\nSteps: 3, CFG scale: 7, Seed: 1, {settings}", "x.png"), "x.png")
    assert params["sampler"] == sampler and params.get("sampler_options") == options


@pytest.mark.parametrize("settings, message", [
    ("Sampler: LMS", "the sampler 'LMS', which has no counterpart in minidiff"),
    ("Sampler: DPM++ 2M SDE Karras", "the sampler 'DPM++ 2M SDE Karras', which has no counterpart"),
    ("Sampler: Euler, Schedule type: Exponential", "the schedule type 'Exponential', which has no counterpart"),
    ("Sampler: DDIM Karras", "which minidiff's ddim does not take"),
])
def test_samplers_without_a_counterpart_are_refused(settings, message):
    with pytest.raises(ImageMetadataError, match=re.escape(message)):
        to_minidiff(parse(f"a\nSteps: 3, CFG scale: 7, Seed: 1, {settings}", "x.png"), "x.png")


def test_hostile_text_is_scanned_in_linear_time_and_bounded():
    for line in ("a" * 60_000, "a:" * 30_000, 'k: "' + "\\" * 59_000, "a b" * 20_000 + ":"):
        start = time.perf_counter()
        parse(f"p\n{line}", "x.png")
        assert time.perf_counter() - start < 0.5
    with pytest.raises(ImageMetadataError, match=f"more than {MAX_INFOTEXT_CHARS:,}; refusing it"):
        parse("a" * (MAX_INFOTEXT_CHARS + 1), "x.png")


# -- `minidiff info` -----------------------------------------------------------------------------
def test_info_shows_the_text_of_an_image_made_elsewhere(tmp_path):
    image = foreign_png(tmp_path / "a1111.png", A1111)
    code, out, err = run_in_process("info", image)
    assert code == 0, err
    assert out == A1111 + "\n"
    assert "'a1111.png' was not made by minidiff" in err.replace(str(tmp_path) + "/", "")
    code, out, err = run_in_process("info", image, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["made_by_minidiff"] is False and shown["parameters_text"] == A1111
    assert shown["prompt"] == "red circle" and shown["negative_prompt"] == "blue square"
    assert shown["settings"]["Sampler"] == "DPM++ 2M Karras" and shown["settings"]["Size"] == "512x512"


def test_info_makes_terminal_escapes_in_a_strangers_text_visible(tmp_path):
    image = foreign_png(tmp_path / "evil.png", "a \x1b[2Jcat\u202e\nSteps: 2, Seed: 1, CFG scale: 3")
    result = run_cli("info", str(image))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a \\x1b[2Jcat\\u202e\nSteps: 2, Seed: 1, CFG scale: 3\n"


# -- `minidiff generate --from` ------------------------------------------------------------------
def test_from_an_a1111_image_carries_over_what_maps_and_names_the_rest(model, tmp_path):
    image = foreign_png(tmp_path / "a1111.png", A1111)
    result = run_cli("generate", "--from", str(image), "--model", str(model), "-o", str(tmp_path / "from.png"),
                     "-q", "--json")
    assert result.returncode == 0, result.stderr
    params = json.loads(result.stdout)["parameters"][0]
    assert {k: params[k] for k in ("prompt", "negative_prompt", "steps", "cfg", "seed", "sampler",
                                   "sampler_options")} == {
        "prompt": "red circle", "negative_prompt": "blue square", "steps": 4, "cfg": 2.5, "seed": 12345,
        "sampler": "dpmpp-2m", "sampler_options": {"karras": True}}
    note = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(note) == 1 and note[0].startswith(f"minidiff: note: '{image}' was not made by minidiff")
    assert note[0].endswith("not carried over: Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
                            "Version: v1.6.0 (minidiff draws with its own model and image size)")
    # the same image as the same settings given as flags
    flags = run_cli("generate", "red circle", "--negative", "blue square", "--steps", "4", "--cfg", "2.5",
                    "--seed", "12345", "--sampler", "dpmpp-2m", "-O", "karras=true", "--model", str(model),
                    "-o", str(tmp_path / "flags.png"), "-q")
    assert flags.returncode == 0, flags.stderr
    assert np.array_equal(pixels(tmp_path / "from.png"), pixels(tmp_path / "flags.png"))


def test_from_an_image_with_an_unmapped_sampler_is_refused_unless_sampler_is_given(model, tmp_path):
    image = foreign_png(tmp_path / "lms.png", "green triangle\nSteps: 3, Sampler: LMS, CFG scale: 2, Seed: 5")
    out = tmp_path / "out"
    result = in_process("generate", "--from", image, "--model", model, "-o", out, "-q")
    assert_one_line_error(result, str(image), "the sampler 'LMS', which has no counterpart", "--sampler NAME")
    assert not out.exists()
    code, stdout, stderr = run_in_process("generate", "--from", image, "--model", model, "--sampler", "ddim",
                                          "-o", out, "-q", "--json")
    assert code == 0, stderr
    params = json.loads(stdout)["parameters"][0]
    assert (params["prompt"], params["sampler"], params["steps"], params["seed"]) == ("green triangle", "ddim", 3, 5)
    assert "not carried over: Sampler: LMS" in stderr


@pytest.mark.parametrize("settings, message", [
    ("Steps: 1e9, Seed: 1, CFG scale: 7", "invalid Steps in its 'parameters' text: '1e9'"),
    ("Steps: 0, Seed: 1, CFG scale: 7", "invalid Steps in its 'parameters' text: '0'"),
    ("Steps: 3, Seed: -1, CFG scale: 7", "invalid Seed in its 'parameters' text: '-1'"),
    ("Steps: 3, Seed: " + "9" * 5000 + ", CFG scale: 7", "invalid Seed in its 'parameters' text: '999"),
    ("Steps: 3, Seed: 1, CFG scale: nan", "invalid CFG scale in its 'parameters' text: 'nan'"),
    ("Steps: 3, Seed: 1, CFG scale: 1e999", "invalid CFG scale in its 'parameters' text: '1e999'"),
    ("Steps: 3, Seed: 1, CFG scale: __import__('os')", "invalid CFG scale"),
])
def test_hostile_values_are_one_line_errors(model, tmp_path, settings, message):
    image = foreign_png(tmp_path / "bad.png", f"red circle\n{settings}")
    result = in_process("generate", "--from", image, "--model", model, "-o", tmp_path / "out", "-q")
    assert_one_line_error(result, str(image), message)


def test_oversized_text_is_refused_by_info_and_from(model, tmp_path):
    image = foreign_png(tmp_path / "big.png", "a" * (MAX_INFOTEXT_CHARS + 10) + "\nSteps: 3, Seed: 1, CFG scale: 2")
    for args in (("info", image), ("generate", "--from", image, "--model", model, "-o", tmp_path / "out", "-q")):
        assert_one_line_error(in_process(*args), str(image), "refusing it")


# -- third-party readers see minidiff's own PNGs --------------------------------------------------
def test_sd_parsers_reads_a_minidiff_png_as_an_automatic1111_image(model, tmp_path):
    sd_parsers = pytest.importorskip("sd_parsers")
    out = tmp_path / "mine.png"
    result = run_cli("generate", "blue square", "--negative", "red circle", "--model", str(model), "--steps", "3",
                     "--cfg", "2", "--seed", "4", "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    info = sd_parsers.ParserManager().parse(str(out))
    assert info is not None and info.generator == sd_parsers.data.Generators.AUTOMATIC1111
    (sampler,) = info.samplers
    assert sampler.name == "ddim" and [p.value for p in sampler.prompts] == ["blue square"]
    assert [p.value for p in sampler.negative_prompts] == ["red circle"]
    assert sampler.parameters == {"cfg_scale": "2.0", "seed": "4", "steps": "3"}
    assert sampler.model.name == "tiny-class" and len(sampler.model.hash) > 0

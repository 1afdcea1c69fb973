"""Sampling a model: guidance, seeds, PNG parameters, and `minidiff generate` / `info` / `models`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_error, assert_one_line_error, files_in, run_cli
from conftest import run_in_process as cli
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tinymodels import CLASS_NAMES, tiny_model, tiny_model_file

from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.diffusion.guidance import guided_denoiser
from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.model_file import file_hash
from minidiff_cli.files.models_dir import DEFAULT_MODEL, SHIPPED_DIR
from minidiff_cli.inference.pipeline import Generation, Pipeline


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(image.text)


# -- classifier-free guidance ---------------------------------------------------------------
@pytest.mark.parametrize("conditioner, prompts", [("class", ["red circle", "green triangle"]),
                                                  ("clip", ["a red circle", "a green triangle"])])
def test_guidance_scale_interpolates_between_unconditional_and_conditional(conditioner, prompts):
    model = tiny_model(conditioner, seed=7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([10, 40])
    with torch.no_grad():
        cond, uncond = model.conditioner.encode(prompts), model.conditioner.null(2)
        eps_c, eps_u = model.predict_eps(x, t, cond), model.predict_eps(x, t, uncond)
        assert (eps_c - eps_u).abs().max() > 1e-2  # the condition matters, or this test proves nothing
        guided = {w: guided_denoiser(model, cond, uncond, w, clip_x0=None)(x, t) for w in (0.0, 1.0, 3.0)}
    torch.testing.assert_close(guided[1.0], eps_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[0.0], eps_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[3.0], eps_u + 3 * (eps_c - eps_u), atol=1e-4, rtol=1e-4)


def test_unconditional_model_is_not_guided():
    model = tiny_model("none", seed=2)
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 45])
    with torch.no_grad():
        plain = model.predict_eps(x, t, Conditioning())
        assert torch.equal(guided_denoiser(model, Conditioning(), None, 7.0, clip_x0=None)(x, t), plain)


def test_clipping_keeps_the_implied_x0_in_range_and_leaves_the_rest_alone():
    model = tiny_model("class", seed=3)
    x = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 5, 25, 49])
    cond, uncond = model.conditioner.encode(["red circle"] * 4), model.conditioner.null(4)
    with torch.no_grad():
        raw = guided_denoiser(model, cond, uncond, 3.0, clip_x0=None)(x, t)
        clipped = guided_denoiser(model, cond, uncond, 3.0, clip_x0=1.0)(x, t)
    a = model.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x0_raw = (x - (1 - a).sqrt() * raw) / a.sqrt()
    x0_clipped = (x - (1 - a).sqrt() * clipped) / a.sqrt()
    assert x0_raw.abs().max() > 1.5  # something to clip
    assert x0_clipped.abs().max() <= 1 + 1e-3
    inside = x0_raw.abs() < 1
    torch.testing.assert_close(clipped[inside], raw[inside], atol=1e-4, rtol=1e-4)


# -- seeds and batches ------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_image_k_of_a_batch_is_the_single_image_of_seed_plus_k(sampler):
    pipe = Pipeline(tiny_model("class", seed=4), name="tiny")
    gen = Generation("red circle", steps=6, cfg=2.0, sampler=sampler, seed=11)
    batch = pipe.sample(gen, 3)
    one_at_a_time = pipe.sample(gen, 3, batch_size=1)
    singles = torch.cat([pipe.sample(Generation("red circle", steps=6, cfg=2.0, sampler=sampler, seed=11 + k), 1)
                         for k in range(3)])
    assert batch.shape == (3, 3, 8, 8) and batch.min() >= -1 and batch.max() <= 1
    torch.testing.assert_close(one_at_a_time, batch, atol=1e-5, rtol=0)
    torch.testing.assert_close(singles, batch, atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 0.05  # different seeds, different images
    again = pipe.sample(gen, 3)
    assert torch.equal(again, batch)


def test_python_api_returns_pil_images_with_their_parameters(tmp_path):
    path = tiny_model_file(tmp_path / "tiny.safetensors", "class", seed=5)
    pipe = Pipeline.load(path, device="cpu")
    images = pipe.generate("Blue Square", steps=4, cfg=2.0, seed=3, num_images=2)
    assert [im.size for im in images] == [(8, 8), (8, 8)] and all(im.mode == "RGB" for im in images)
    assert [im.info["minidiff"]["seed"] for im in images] == [3, 4]
    params = images[1].info["minidiff"]
    assert params == {"prompt": "Blue Square", "negative_prompt": "", "steps": 4, "sampler": "ddim", "cfg": 2.0,
                      "seed": 4, "eta": None, "width": 8, "height": 8, "model": "tiny-class",
                      "model_hash": file_hash(path)}
    expected = pipe.sample(Generation("blue square", steps=4, cfg=2.0, seed=3), 2)
    as_uint8 = ((expected + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.asarray(images[0]), as_uint8[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be between 1 and 50"), ({"steps": 51}, "steps must be between 1 and 50"),
    ({"cfg": -1}, "cfg must be 0 or more"), ({"num_images": 0}, "at least 1"),
    ({"sampler": "nope"}, "unknown sampler 'nope'; available: ddim, ddpm"),
])
def test_python_api_refuses_bad_numbers(kwargs, message):
    pipe = Pipeline(tiny_model("class"), name="tiny")
    with pytest.raises(Exception, match=message):
        pipe.generate("red circle", **{"steps": 2, **kwargs})


# -- `minidiff generate`: PNGs and their parameters ---------------------------------------------
@pytest.fixture(scope="module")
def generated(trained_run, tmp_path_factory):
    """Two images from `minidiff generate`, with every parameter set."""
    model = trained_run / "model.safetensors"
    out = tmp_path_factory.mktemp("generated")
    result = run_cli("generate", "red circle", "--model", str(model), "--steps", "4", "--cfg", "2.5", "--seed", "7",
                     "--negative", "blue square", "-n", "2", "-o", str(out), "-q", "--json")
    assert result.returncode == 0, result.stderr
    return model, out, json.loads(result.stdout)


def test_generate_writes_pngs_with_a1111_parameters(generated):
    model, out, printed = generated
    first, second = out / "minidiff-00000.png", out / "minidiff-00001.png"
    assert printed["images"] == [str(first), str(second)]
    assert sorted(p.name for p in out.iterdir()) == ["minidiff-00000.png", "minidiff-00001.png"]
    digest = file_hash(model)
    assert png_text(second)["parameters"] == (
        "red circle\n"
        "Negative prompt: blue square\n"
        f"Steps: 4, Sampler: ddim, CFG scale: 2.5, Seed: 8, Size: 16x16, Model: run, Model hash: {digest}")
    assert pixels(first).shape == (16, 16, 3)
    assert not np.array_equal(pixels(first), pixels(second))


def test_info_shows_the_parameters_of_an_image(generated):
    model, out, printed = generated
    image = out / "minidiff-00001.png"
    text = run_cli("info", str(image))
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() == png_text(image)["parameters"]
    as_json = run_cli("info", str(image), "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == {
        "prompt": "red circle", "negative_prompt": "blue square", "steps": 4, "sampler": "ddim", "cfg": 2.5,
        "seed": 8, "eta": None, "width": 16, "height": 16, "model": "run", "model_hash": file_hash(model)}
    assert json.loads(as_json.stdout) == printed["parameters"][1]


def test_generate_from_an_image_repeats_it_exactly_and_flags_override(generated, tmp_path):
    model, out, _ = generated
    source = out / "minidiff-00001.png"
    again = run_cli("generate", "--from", str(source), "--model", str(model), "-o", str(tmp_path / "same.png"), "-q")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels(tmp_path / "same.png"), pixels(source))
    assert png_text(tmp_path / "same.png") == png_text(source)

    other = run_cli("generate", "--from", str(source), "--model", str(model), "--seed", "100",
                    "-o", str(tmp_path / "other.png"), "-q", "--json")
    assert other.returncode == 0, other.stderr
    params = json.loads(other.stdout)["parameters"][0]
    assert params == {**json.loads(png_text(source)["minidiff"]), "seed": 100}
    assert not np.array_equal(pixels(tmp_path / "other.png"), pixels(source))


def test_generate_from_an_image_without_model_names_the_missing_model(generated, tmp_path):
    _, out, _ = generated
    result = run_cli("generate", "--from", str(out / "minidiff-00000.png"), "-o", str(tmp_path / "x"), "-q",
                     env={"MINIDIFF_MODELS_DIR": str(tmp_path / "no-models")})
    assert_one_line_error(result, "made with the model 'run'", "--model FILE.safetensors")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_numbered_outputs_never_overwrite_existing_files(trained_run, tmp_path):
    (tmp_path / "minidiff-00000.png").write_bytes(b"mine")
    (tmp_path / "minidiff-00002.png").write_bytes(b"also mine")
    (tmp_path / "grid-00000.png").write_bytes(b"my grid")
    result = run_cli("generate", "red circle", "--model", str(trained_run / "model.safetensors"), "--steps", "2",
                     "-n", "2", "-o", str(tmp_path), "--grid", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / n) for n in ("minidiff-00001.png", "minidiff-00003.png",
                                                                 "grid-00001.png")]
    assert (tmp_path / "minidiff-00000.png").read_bytes() == b"mine"
    assert (tmp_path / "minidiff-00002.png").read_bytes() == b"also mine"
    assert (tmp_path / "grid-00000.png").read_bytes() == b"my grid"
    with Image.open(tmp_path / "grid-00001.png") as grid:
        assert grid.size == (16 * 2 + 2, 16)


def test_output_file_that_exists_is_refused(trained_run, tmp_path):
    target = tmp_path / "picture.png"
    target.write_bytes(b"precious")
    result = run_cli("generate", "red circle", "--model", str(trained_run / "model.safetensors"), "-o", str(target))
    assert_one_line_error(result, str(target), "already exists")
    assert target.read_bytes() == b"precious" and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("where", ["folder", "file.png"])
def test_output_under_a_file_is_a_one_line_error_and_nothing_is_written(trained_run, tmp_path, where):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = run_cli("generate", "red circle", "--model", str(trained_run / "model.safetensors"),
                     "-o", str(blocker / "sub" / where), "-q")
    assert_one_line_error(result, "not-a-folder")
    assert sorted(tmp_path.iterdir()) == [blocker] and blocker.read_text() == "x"


def test_from_a_png_without_parameters_is_a_one_line_error(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    other = tmp_path / "other.png"
    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20")  # another program's text, without a settings line
    Image.new("RGB", (4, 4)).save(other, pnginfo=info)
    for image in (plain, other):
        result = run_cli("generate", "--from", str(image), "-o", str(tmp_path / "out"))
        assert_one_line_error(result, str(image), "has no minidiff parameters")
    assert_one_line_error(run_cli("info", str(plain)), str(plain), "has no minidiff parameters")
    shown = run_cli("info", str(other))  # another program's text is shown as it is (tests/test_infotext.py)
    assert shown.returncode == 0 and shown.stdout == "a cat\nSteps: 20\n", shown.stderr
    assert not (tmp_path / "out").exists()


def test_from_a_png_with_garbled_parameters_is_a_one_line_error(tmp_path):
    image = tmp_path / "odd.png"
    info = PngInfo()
    info.add_text("minidiff", json.dumps({"prompt": "red circle", "steps": "many"}))
    Image.new("RGB", (4, 4)).save(image, pnginfo=info)
    result = run_cli("generate", "--from", str(image), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, str(image), "invalid 'steps' parameter: 'many'")


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["--steps", "101"], "steps must be between 1 and 100 for this model (got 101)"),
    (["--cfg", "-1"], "--cfg must be 0 or more (got -1.0)"),
    (["-n", "0"], "--num-images must be at least 1 (got 0)"),
    (["--sampler", "nope"], "unknown sampler 'nope'; available: ddim, ddpm"),
])
def test_bad_generate_options_are_one_line_errors(trained_run, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_cli("generate", "red circle", "--model", str(trained_run / "model.safetensors"), *args,
                     "-o", str(out), "-q")
    assert_one_line_error(result, message)
    assert not out.exists() or not any(out.iterdir())


def test_class_model_lists_its_classes_for_an_unknown_prompt(trained_run, tmp_path):
    result = run_cli("generate", "a purple elephant", "--model", str(trained_run / "model.safetensors"),
                     "-o", str(tmp_path / "out"), "-q")
    assert_one_line_error(result, "'a purple elephant' is not a class of this model",
                          "red circle, red square, red triangle, orange circle")


def test_unconditional_model_warns_that_the_prompt_is_ignored(tmp_path):
    model = tiny_model_file(tmp_path / "plain.safetensors", "none", seed=1)
    result = run_cli("generate", "a red circle", "--model", str(model), "--steps", "2", "-o", str(tmp_path / "out"),
                     "-q")
    assert result.returncode == 0, result.stderr
    assert "warning: this model is unconditional; the prompt is ignored" in result.stderr
    assert result.stdout.split() == [str(tmp_path / "out" / "minidiff-00000.png")]


def test_models_lists_the_user_folder_and_names_work_as_model(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    tiny_model_file(folder / "tiny.safetensors", "class")
    env = {"MINIDIFF_MODELS_DIR": str(folder)}
    listed = run_cli("models", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {"name": "tiny", "path": str(folder / "tiny.safetensors"), "where": "user", "default": False} in rows
    text = run_cli("models", env=env)
    assert text.returncode == 0 and f"tiny\tuser\t{folder / 'tiny.safetensors'}" in text.stdout
    info = run_cli("info", "tiny", "--json", env=env)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["config"]["class_names"] == CLASS_NAMES
    assert_one_line_error(run_cli("info", "tinny", env=env), "unknown model 'tinny'", "tiny")


def test_info_without_argument_describes_the_default_model_or_says_it_is_missing(tmp_path):
    result = run_cli("info", env={"MINIDIFF_MODELS_DIR": str(tmp_path)})
    if (SHIPPED_DIR / f"{DEFAULT_MODEL}.safetensors").exists():
        assert result.returncode == 0 and DEFAULT_MODEL in result.stdout
    else:
        assert_one_line_error(result, f"the default model '{DEFAULT_MODEL}' is not installed",
                              "--model FILE.safetensors")


def test_png_parameters_keep_any_unicode_prompt(tmp_path):
    from minidiff_cli.files.png_parameters import read_parameters, save_png

    params = {"prompt": "un café ☕, ein Würfel", "negative_prompt": "ぼやけた", "steps": 3, "sampler": "ddim",
              "cfg": 1.5, "seed": 2, "eta": 0.5, "width": 8, "height": 8, "model": "m", "model_hash": "0123456789"}
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "u.png", params)
    assert read_parameters(path) == params
    assert png_text(path)["parameters"] == (
        "un café ☕, ein Würfel\nNegative prompt: ぼやけた\n"
        "Steps: 3, Sampler: ddim, CFG scale: 1.5, Seed: 2, Size: 8x8, Model: m, Model hash: 0123456789, Eta: 0.5")


def test_save_trajectory_writes_a_strip_and_a_gif_per_image(trained_run, tmp_path):
    result = run_cli("generate", "red circle", "--model", str(trained_run / "model.safetensors"), "--steps", "5",
                     "-n", "2", "-o", str(tmp_path), "--save-trajectory", "-q")
    assert result.returncode == 0, result.stderr
    for k in range(2):
        with Image.open(tmp_path / f"minidiff-0000{k}-trajectory.png") as strip:
            # 5 steps -> 5 columns of 2x-scaled 16px frames with 2px gaps; x_t and x0 rows plus a label line
            assert strip.size == (5 * 32 + 4 * 2, 2 * 32 + 2 + 12)
        with Image.open(tmp_path / f"minidiff-0000{k}-trajectory.gif") as gif:
            assert gif.n_frames == 5
            gif.seek(gif.n_frames - 1)
            last = np.asarray(gif.convert("RGB"))
    # the GIF's last x_t frame is the final image (up to GIF palette rounding)
    final = pixels(tmp_path / "minidiff-00001.png").astype(int)
    shown = last[:, :64][::4, ::4].astype(int)
    assert np.abs(shown - final).mean() < 12


def test_save_trajectory_refuses_to_overwrite_before_sampling(trained_run, tmp_path):
    (tmp_path / "minidiff-00000-trajectory.gif").write_bytes(b"mine")
    result = run_cli("generate", "red circle", "--model", str(trained_run / "model.safetensors"), "--steps", "2",
                     "-o", str(tmp_path), "--save-trajectory", "-q")
    assert_one_line_error(result, "minidiff-00000-trajectory.gif", "already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minidiff-00000-trajectory.gif"]


@pytest.mark.parametrize("steps, option, bad, message", [
    ("3", "spacing=leading", "nonsense", "KEY=VALUE"),
    ("2", "timesteps=89,49", "timesteps=89,49,9", "3 timesteps given for 2 steps"),  # a grid by hand
])
def test_sampler_options_reach_the_sampler_and_are_recorded(trained_run, tmp_path, steps, option, bad, message):
    model = str(trained_run / "model.safetensors")
    args = ("generate", "red circle", "--model", model, "--steps", steps, "-q", "--json")
    given = run_cli(*args, "-O", option, "-o", str(tmp_path / "a.png"))
    default = run_cli(*args, "-o", str(tmp_path / "b.png"))
    assert given.returncode == 0 and default.returncode == 0, given.stderr + default.stderr
    key, _, value = option.partition("=")
    assert json.loads(given.stdout)["parameters"][0]["sampler_options"] == {key: value}
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    again = run_cli("generate", "--from", str(tmp_path / "a.png"), "--model", model, "-o", str(tmp_path / "c.png"), "-q")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))
    assert_one_line_error(run_cli(*args, "-O", bad, "-o", str(tmp_path / "d.png")), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]


# -- sampler options and the Python API refuse what the CLI refuses -------------------------------
@pytest.mark.hostile
def test_sampler_options_that_clash_with_the_pipelines_own_arguments(tmp_path, tiny):
    out = tmp_path / "out"
    for option in ("generator=1", "callback=1", "steps=3", "x=1"):
        assert_error(cli("generate", "red circle", "--model", tiny, "-O", option, "-o", out, "-q"),
                     "is not a sampler option: the pipeline passes it itself")
    for option in ("eta=NaN", "eta=Infinity", "eta=1e999", "eta=[1e999]"):
        assert_error(cli("generate", "red circle", "--model", tiny, "-O", option, "-o", out, "-q"),
                     "--sampler-option eta")
    code, _, err = cli("generate", "red circle", "--model", tiny, "--steps", "2", "-O", "eta=0.5", "-o", out, "-q")
    assert code == 0, err  # -O eta=... is a plain sampler option, as --eta is
    assert files_in(out) == ["minidiff-00000.png"]


@pytest.mark.hostile
def test_the_python_api_refuses_what_the_cli_refuses():
    pipe = Pipeline(tiny_model("class"), name="tiny")
    bad = [dict(cfg=float("nan")), dict(cfg=float("inf")), dict(cfg=1e6), dict(eta=float("nan")),
           dict(seed=-1), dict(seed=2**64), dict(seed=1.5), dict(steps=2.5), dict(num_images=10**9),
           dict(batch_size=0), dict(prompt="\ud800"), dict(prompt="x" * 10_001), dict(negative="x" * 10_001),
           dict(generator=5), dict(schedule=1), dict(sampler="no-such-sampler")]
    for kwargs in bad:
        args = {"prompt": "red circle", "steps": 2, **kwargs}
        with pytest.raises(MinidiffError):
            pipe.generate(**args)

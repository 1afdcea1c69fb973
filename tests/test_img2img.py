"""Image-to-image and inpainting (minidiff_cli.inference.img2img), with known answers rather than pictures.

- strength 0, and a mask that keeps everything, give the input back exactly;
- outside the mask the output is the input (8-bit), for every sampler;
- with the exact Gaussian denoiser, SDEdit from samples of the data keeps their law at every strength,
  and inpainting one coordinate of independent Gaussian data draws it from its law;
- on the shipped model a red circle becomes a green circle at strength 0.7 (the shape classifier judges);
- the CLI: notes on fitting, PNG parameters, --from with the same or another init image, errors.
"""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli, run_in_process
from PIL import Image
from tinymodels import tiny_model, tiny_model_file

from minidiff_cli.diffusion.sampling import gaussian_denoiser, timesteps
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.errors import MinidiffError, PluginError
from minidiff_cli.inference.img2img.images import fit_image, fit_mask
from minidiff_cli.inference.img2img.run import sample_from
from minidiff_cli.inference.img2img.settings import ImageStart
from minidiff_cli.inference.pipeline import Pipeline
from minidiff_cli.plugins import get_sampler

# Every first-party sampler, with a step count that keeps its own discretisation error on Gaussian
# data within 3 %, Karras sigmas included: on the cosine schedule their curve starts at sigma = 80
# after a first step from the capped top level (minidiff-solvers' karras_grid; from the top level
# itself DPM-Solver++ 2M gave std 0.56 instead of 0.5 at 20 steps, with or without an init image).
GAUSSIAN = [("ddpm", 100, {}), ("ddim", 50, {}), ("ddim", 100, {"eta": 1.0}), ("dpmpp-2m", 20, {}),
            ("euler", 50, {}), ("heun", 25, {}), ("euler-ancestral", 100, {}), ("dpmpp-2m", 25, {"karras": True}),
            ("heun", 25, {"karras": True})]
SAMPLERS = GAUSSIAN + [("heun", 10, {"karras": True})]


def ids(cases):
    return [f"{c[0]}-{c[1]}{''.join(f'-{k}={v}' for k, v in c[2].items())}{f'-resample={c[3]}' if len(c) > 3 else ''}"
            for c in cases]


IDS = ids(SAMPLERS)
# Resampling jumps add a little of the sampler's discretisation error per jump: more steps.
INPAINT = [(*case, 0) for case in GAUSSIAN[:4]] + [("ddpm", 250, {}, 2), ("ddim", 250, {}, 2),
                                                   ("dpmpp-2m", 100, {}, 2), ("euler-ancestral", 250, {}, 1)]
MU, S, N = 0.5, 0.5, 20_000


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_model("class"), name="tiny")


def noise_picture(size=8, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def half_mask(size=8) -> Image.Image:
    """Repaint the right half (white), keep the left (black)."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 2, 0, size, size))
    return mask


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


# -- known answers on the tiny model ------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "euler-ancestral"])
def test_strength_0_returns_the_input(pipe, sampler):
    picture = noise_picture()
    images = pipe.generate("red circle", steps=10, sampler=sampler, num_images=2, init_image=picture, strength=0)
    assert all(np.array_equal(pixels(image), pixels(picture)) for image in images)


@pytest.mark.parametrize("sampler, steps, opts", SAMPLERS, ids=IDS)
def test_a_mask_that_keeps_everything_returns_the_input_exactly(pipe, sampler, steps, opts):
    picture = noise_picture(seed=1)
    image, = pipe.generate("blue square", steps=5, sampler=sampler, init_image=picture,
                           mask=Image.new("L", (8, 8), 0), **opts)
    assert np.array_equal(pixels(image), pixels(picture))


@pytest.mark.parametrize("sampler, steps, opts", SAMPLERS, ids=IDS)
def test_outside_the_mask_the_output_is_the_input_for_every_sampler(pipe, sampler, steps, opts):
    picture, last = noise_picture(seed=2), {}
    image, = pipe.generate("green triangle", steps=6, sampler=sampler, init_image=picture, mask=half_mask(),
                           seed=3, callback=lambda info: last.update(x=info["x"][0]), **opts)
    out, original = pixels(image), pixels(picture)
    assert np.array_equal(out[:, :4], original[:, :4])
    assert np.abs(out[:, 4:] - original[:, 4:]).mean() > 20  # the right half was redrawn
    # The pinning works through the sampler itself, not only the final paste: its own last x is
    # the original on the kept half, up to float rounding.
    kept = (last["x"][:, :, :4].clamp(-1, 1) + 1) * 127.5
    assert (kept - torch.from_numpy(original[:, :4]).permute(2, 0, 1)).abs().max() < 0.5


def test_image_k_of_a_batch_is_the_single_run_with_seed_plus_k(pipe):
    args = dict(steps=4, sampler="ddpm", init_image=noise_picture(seed=4), mask=half_mask(), resample=1)
    batch = pipe.generate("red circle", seed=5, num_images=3, **args)
    alone = pipe.generate("red circle", seed=7, **args)
    assert np.array_equal(pixels(batch[2]), pixels(alone[0]))
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))


def test_strength_runs_the_last_steps_of_the_grid(pipe):
    seen = []
    pipe.generate("red circle", steps=10, init_image=noise_picture(), strength=0.6,
                  callback=lambda info: seen.append(info["i"]))
    assert seen == [4, 5, 6, 7, 8, 9]
    assert [ImageStart(torch.zeros(3, 8, 8), s).first_step(10) for s in (0, 0.01, 0.5, 1)] == [10, 9, 5, 0]
    seen.clear()
    pipe.generate("red circle", steps=10, init_image=noise_picture(), strength=0.75,
                  callback=lambda info: seen.append(info["i"]))
    assert seen == [3, 4, 5, 6, 7, 8, 9]  # int(7.5) = 7 steps, as diffusers; rounding took 8


def diffusers_steps(steps, strength):
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps (0.42): the steps it runs."""
    init_timestep = min(int(steps * strength), steps)
    return steps - max(steps - init_timestep, 0)


def test_strength_takes_as_many_steps_as_diffusers():
    # diffusers truncates steps x strength; rounding took one step more for about half the pairs.
    def taken(steps, strength):
        return steps - ImageStart(torch.zeros(3, 8, 8), strength).first_step(steps)

    pairs = [(steps, k / 100) for steps in range(1, 101) for k in range(1, 101)]
    assert all(taken(n, s) == diffusers_steps(n, s) for n, s in pairs if diffusers_steps(n, s) > 0)
    # Pairs where truncating and rounding differ, with diffusers' counts frozen (0.29 x 100 is
    # 28.999999999999996 in floating point: diffusers runs 28, and so does minidiff).
    frozen = {(10, 0.75): 7, (20, 0.33): 6, (25, 0.7): 17, (50, 0.55): 27, (100, 0.29): 28, (4, 1.0): 4}
    assert {pair: taken(*pair) for pair in frozen} == frozen
    assert sum(round(s * n) != int(s * n) for n, s in pairs) > 0.45 * len(pairs)
    # Where diffusers would run no step (and fails or refuses), minidiff keeps its answers: 0 returns
    # the image, a strength too small for one step takes one.
    assert [taken(10, s) for s in (0.0, 0.01, 0.099, 0.1)] == [0, 1, 1, 1]
    assert diffusers_steps(10, 0.099) == 0 and ImageStart(torch.zeros(3, 8, 8), 0.099).steps_taken(10) == 1


def test_resample_takes_each_step_again_but_the_last(pipe):
    seen = []
    pipe.generate("red circle", steps=4, init_image=noise_picture(), mask=half_mask(), resample=2,
                  callback=lambda info: seen.append(info["t"]))
    t0, t1, t2, t3 = timesteps(50, 4).tolist()  # DDIM's grid on the tiny model's T = 50
    assert seen == [t0, t0, t0, t1, t1, t1, t2, t2, t2, t3]
    assert ImageStart(torch.zeros(3, 8, 8), 1.0, torch.ones(1, 8, 8), resample=2).steps_taken(4) == len(seen)


def test_a_sampler_that_cannot_start_part_way_is_refused_by_name(pipe):
    from minidiff_cli import plugins

    if "testplugin-onestep" not in plugins.registry().names("samplers"):
        pytest.skip("install the test plugin: pip install ./tests/plugin_dist")
    with pytest.raises(PluginError, match="sampler 'testplugin-onestep' \\(plugin 'testplugin'\\) cannot start from "
                                          "a partly noised image"):
        pipe.generate("red circle", steps=1, sampler="testplugin-onestep", init_image=noise_picture())


def test_settings_out_of_range_are_refused(pipe):
    picture = noise_picture()
    for kwargs, message in (({"strength": 1.5}, "strength must be a number from 0 to 1"),
                            ({"strength": float("nan")}, "strength must be a number from 0 to 1"),
                            ({"resample": 2}, "they need a mask"),
                            ({"mask": half_mask(16)}, "the mask is 16x16 but the init image is 8x8")):
        with pytest.raises(MinidiffError, match=message):
            pipe.generate("red circle", steps=2, init_image=picture, **kwargs)
    with pytest.raises(MinidiffError, match="need an init_image"):
        pipe.generate("red circle", steps=2, mask=half_mask())


# -- fitting pictures to the model -----------------------------------------------------------
def test_an_exif_rotated_jpeg_is_turned_upright():
    picture = Image.new("RGB", (8, 8), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 4, 8))  # left half red, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the stored left edge at the top
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif, quality=95)
    tensor, note = fit_image(Image.open(buffer), 8, 3)
    assert note == "turned upright by its EXIF orientation"
    assert tensor[0, 0].mean() > 0.8 and tensor[2, 0].mean() < -0.8  # top row red
    assert tensor[2, -1].mean() > 0.8 and tensor[0, -1].mean() < -0.8  # bottom row blue


def test_other_modes_and_sizes_are_fitted_with_a_note():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0  # index 0 transparent: it becomes white
    tensor, note = fit_image(palette, 8, 3)
    assert note == "transparency flattened onto white, palette converted to RGB" and (tensor == 1).all()
    tensor, note = fit_image(Image.new("RGB", (32, 16), (255, 255, 255)), 8, 1)
    assert note == "RGB converted to grey, 32x16 scaled and centre-cropped to 8x8" and tensor.shape == (1, 8, 8)
    assert fit_image(Image.new("L", (8, 8), 0), 8, 3)[1] == "grey converted to RGB"
    assert fit_image(noise_picture(), 8, 3)[1] is None


def test_a_mask_is_grey_levels_and_must_have_the_init_images_size():
    mask = Image.new("L", (3, 1))
    mask.putdata([0, 128, 255])
    assert fit_mask(mask.resize((3, 3), Image.NEAREST), (3, 3), 3)[0, 0].tolist() == pytest.approx([0, 128 / 255, 1])
    with pytest.raises(MinidiffError, match="the mask is 3x1 but the init image is 3x3"):
        fit_mask(mask, (3, 3), 3)


# -- Gaussian data: SDEdit keeps the data's law -------------------------------------------------
def gaussian_run(sampler, steps, opts, start, like):
    schedule, g = get_schedule("cosine", 1000), torch.Generator().manual_seed(11)

    def run(denoiser, x, run_opts):
        return get_sampler(sampler).sample(denoiser, x, schedule, steps, generator=g, **run_opts)

    return sample_from(start, get_sampler(sampler), sampler, gaussian_denoiser(schedule, MU, S), like, schedule,
                       steps, g, opts, run)


@pytest.mark.parametrize("sampler, steps, opts", GAUSSIAN, ids=ids(GAUSSIAN))
def test_sdedit_from_samples_of_the_data_keeps_their_law(sampler, steps, opts):
    x0 = MU + S * torch.randn(N, generator=torch.Generator().manual_seed(10))
    for strength in (0.3, 0.6, 0.9):
        x = gaussian_run(sampler, steps, opts, ImageStart(x0, strength), torch.empty(N))
        # sampling error of the mean: S / sqrt(N) = 0.0035; the std also carries the sampler's own
        # discretisation error (at most 3 % at these step counts)
        assert x.mean().item() == pytest.approx(x0.mean().item(), abs=0.01), strength
        assert x.std().item() == pytest.approx(S, rel=0.04), strength
        assert not torch.equal(x, x0)


@pytest.mark.parametrize("sampler, steps, opts, resample", INPAINT, ids=ids(INPAINT))
def test_inpainting_independent_gaussian_data_draws_the_hole_from_its_law(sampler, steps, opts, resample):
    # Two independent coordinates as a 1 x 2 "image": keep the first, repaint the second.
    x0 = MU + S * torch.randn(N, 1, 1, 2, generator=torch.Generator().manual_seed(12))
    mask = torch.tensor([[[0.0, 1.0]]])
    x = gaussian_run(sampler, steps, opts, ImageStart(x0, 1.0, mask, resample), torch.empty(N, 1, 1, 2))
    assert torch.equal(x[..., 0], x0[..., 0])
    hole = x[..., 1].flatten()
    assert hole.mean().item() == pytest.approx(MU, abs=0.015) and hole.std().item() == pytest.approx(S, rel=0.05)
    assert abs(torch.corrcoef(torch.stack([hole, x0[..., 1].flatten()]))[0, 1]) < 0.05  # drawn afresh


# -- the shipped model ------------------------------------------------------------------------------
def test_a_red_circle_becomes_a_green_circle_at_strength_0_7():
    from minidiff_cli.data.shapes import ShapeSpec, draw
    from minidiff_cli.evaluation.shape_classifier import classify

    pipe = Pipeline.load(device="cpu")
    red = draw(ShapeSpec("red", "circle", "white", 0.6, (0.5, 0.5), 0.0, "a red circle"), pipe.model.image_size)
    assert classify(red) == ("red", "circle")
    images = pipe.generate("a green circle", steps=20, cfg=3.0, seed=0, num_images=5, init_image=red, strength=0.7)
    assert [classify(image) for image in images] == [("green", "circle")] * 5


# -- the CLI -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img2img")
    tiny_model_file(folder / "tiny.safetensors")
    noise_picture(seed=5).save(folder / "in.png")
    noise_picture(16, seed=6).convert("RGBA").save(folder / "big.png")
    half_mask().save(folder / "mask.png")
    return folder


def cli(files, *args):
    """(exit code, stdout, stderr) of ``minidiff generate`` on the tiny model, in this process."""
    return run_in_process("generate", "--model", files / "tiny.safetensors", "--steps", "4", "-q", *args)


def test_the_cli_records_the_start_and_from_repeats_it_with_the_same_init_image(files, tmp_path):
    code, _, err = cli(files, "red circle", "--init-image", files / "big.png", "--strength", "0.5", "-o", tmp_path / "a.png")
    assert code == 0, err
    assert f"minidiff: note: init image '{files / 'big.png'}' (RGBA, 16x16): transparency flattened onto white, " \
           "16x16 scaled to 8x8" in err
    code, info, _ = run_in_process("info", tmp_path / "a.png")
    assert "Denoising strength: 0.5, Init image hash: " in info, info
    code, _, err = cli(files, "--from", tmp_path / "a.png", "--init-image", files / "big.png", "-o", tmp_path / "b.png")
    assert code == 0 and "differs" not in err, err
    assert np.array_equal(pixels(Image.open(tmp_path / "a.png")), pixels(Image.open(tmp_path / "b.png")))
    code, _, err = cli(files, "--from", tmp_path / "a.png", "--init-image", files / "in.png", "-o", tmp_path / "c.png")
    assert code == 0 and "the init image differs from the one" in err, err
    code, _, err = cli(files, "--from", tmp_path / "a.png", "-o", tmp_path / "d.png")
    assert code == 0 and "was made from an init image" in err and "draws from the prompt alone" in err, err


def test_the_cli_inpaints_and_saves_the_trajectory(files, tmp_path):
    result = run_cli("generate", "red circle", "--model", str(files / "tiny.safetensors"), "--steps", "4", "-q",
                     "--init-image", str(files / "in.png"), "--mask", str(files / "mask.png"), "--resample", "1",
                     "--sampler", "dpmpp-2m", "--save-trajectory", "--json", "-o", str(tmp_path / "a.png"))
    assert result.returncode == 0, result.stderr
    out, original = pixels(Image.open(tmp_path / "a.png")), pixels(Image.open(files / "in.png"))
    assert np.array_equal(out[:, :4], original[:, :4]) and not np.array_equal(out, original)
    with Image.open(tmp_path / "a-trajectory.gif") as gif:
        assert gif.n_frames == 4 + 3  # 4 steps, each but the last taken again once
    assert '"mask_hash": "' in result.stdout and '"resample": 1' in result.stdout


def test_a_third_party_sampler_without_partial_runs_is_refused_in_one_line(files, tmp_path):
    (tmp_path / "old_sampler.py").write_text(
        "from minidiff_cli import hookimpl\n\n"
        "class Old:\n    name = 'old-style'\n    default_steps = 1\n"
        "    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, **opts):\n"
        "        return x\n\n"
        "@hookimpl\ndef register_samplers(register):\n    register(Old())\n")
    result = run_cli("--plugins-dir", str(tmp_path), "generate", "red circle", "--model", str(files / "tiny.safetensors"),
                     "--sampler", "old-style", "--init-image", str(files / "in.png"), "-o", str(tmp_path / "a.png"))
    assert_one_line_error(result, "sampler 'old-style' (plugin 'old_sampler') cannot start from a partly noised image")
    assert not (tmp_path / "a.png").exists()


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("args, fragments", [
    (("--mask", "M"), ("--mask works on a picture; give it with --init-image FILE",)),
    (("--init-image", "I", "--strength", "1.5"), ("--strength must be from 0",)),
    (("--init-image", "I", "--strength", "nan"), ("--strength must be from 0",)),
    (("--init-image", "I", "--resample", "2"), ("--resample", "it needs --mask")),
    (("--init-image", "BIG", "--mask", "M"), ("the mask is 8x8 but the init image is 16x16",)),
    (("--init-image", "NOPE"), ("init image", "does not exist")),
    (("--init-image", "BOMB"), ("claims 100000x100000 pixels, more than Pillow's limit",)),
    (("--init-image", "TEXT"), ("is not a PNG, JPEG or WebP image",)),
])
def test_bad_init_flags_and_files_are_one_line_errors(files, tmp_path, args, fragments):
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    (tmp_path / "text.png").write_text("not a picture")
    names = {"I": files / "in.png", "M": files / "mask.png", "BIG": files / "big.png", "NOPE": tmp_path / "nope.png",
             "BOMB": tmp_path / "bomb.png", "TEXT": tmp_path / "text.png"}
    code, out, err = run_in_process("generate", "red circle", "--model", files / "tiny.safetensors", "-q",
                                    "-o", tmp_path / "out.png", *[names.get(a, a) for a in args])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(fragment in err for fragment in fragments), err
    assert not (tmp_path / "out.png").exists()


def test_init_image_does_not_combine_with_a_prompts_file(files, tmp_path):
    (tmp_path / "prompts.txt").write_text("red circle\n")
    code, _, err = run_in_process("generate", "--prompts", tmp_path / "prompts.txt", "--model",
                                  files / "tiny.safetensors", "--init-image", files / "in.png", "-o", tmp_path)
    assert code == 2 and "does not combine with --prompts" in err, err


# -- hostile pictures: tiny files that claim huge, thin pictures ------------------------------------
def thin_png(path, width: int, height: int):
    """A real PNG of width x height when it is small to make (a few MB), else only its header (a file whose
    pixels cannot be decoded: refusing it must not need them)."""
    if width * height <= 2_000_000:
        Image.new("RGB", (width, height), (200, 30, 30)).save(path)
    else:
        path.write_bytes(bomb_png(width, height))
    return path


THIN = [(89_000_000, 1), (2_000_000, 1), (89_000, 1), (1, 100_000), (33, 1)]


@pytest.mark.hostile
@pytest.mark.parametrize("flag", ["--init-image", "--mask"])
@pytest.mark.parametrize("width, height", THIN, ids=[f"{w}x{h}" for w, h in THIN])
def test_a_thin_strip_as_init_image_or_mask_is_one_line_before_any_pixel_is_decoded(files, tmp_path, flag, width,
                                                                                       height):
    import resource
    import time

    strip = thin_png(tmp_path / "strip.png", width, height)
    picture = ("--init-image", strip) if flag == "--init-image" else ("--init-image", files / "in.png", "--mask", strip)
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    code, _, err = cli(files, "red circle", *picture, "-o", tmp_path / "out.png")
    assert time.perf_counter() - start < 5 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"'{strip}' is {width}x{height} pixels, more than 32 times as long as it is wide" in err, err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.hostile
def test_fitting_refuses_thin_or_oversized_pictures_before_resizing_and_fits_a_panorama():
    from minidiff_cli.data.images import resize_center_crop

    with pytest.raises(MinidiffError, match="the init image is 89000x1 pixels, more than 32 times"):
        fit_image(Image.new("RGB", (89_000, 1)), 64, 3)  # through the Python API: a PIL image
    with pytest.raises(MinidiffError, match="the mask is 1x89000 pixels"):
        fit_mask(Image.new("L", (1, 89_000)), (1, 89_000), 64)
    with pytest.raises(MinidiffError, match=r"would scale it to 122880x4096 pixels, more than the 67,108,864"):
        resize_center_crop(Image.new("L", (30, 1)), 4096)  # thin enough to pass, too large once fitted
    with pytest.raises(MinidiffError, match="the size must be a whole number from 1"):
        resize_center_crop(Image.new("L", (8, 8)), -8)
    tensor, note = fit_image(Image.new("RGB", (320, 10), (0, 0, 255)), 8, 3)  # 32:1, the widest allowed
    assert tensor.shape == (3, 8, 8) and note == "320x10 scaled and centre-cropped to 8x8"

"""Learning mode: `minidiff noise` (the forward process on your image) and `minidiff explain` (a model's insides)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from PIL import Image
from tinymodels import tiny_config, tiny_model_file

from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.nets.unet import UNetConfig

SIZE = 64  # frames of 64 px are drawn as they are (smaller ones are enlarged for their labels)
DEFAULT_TIMESTEPS = [0, 100, 250, 500, 750, 999]


@pytest.fixture
def picture(tmp_path) -> Path:
    """A 64x64 RGB picture with structure in every channel: a gradient and a square."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 4, y * 4, np.full_like(x, 60)], axis=-1).astype(np.uint8)
    rgb[16:48, 16:48] = (230, 40, 40)
    path = tmp_path / "picture.png"
    Image.fromarray(rgb).save(path)
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


# -- minidiff noise -----------------------------------------------------------------------------
def test_noise_writes_one_labelled_frame_per_timestep_and_t0_is_the_input(picture, tmp_path):
    out = tmp_path / "strip.png"
    result = run_cli("noise", str(picture), "--image-size", str(SIZE), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    strip = pixels(out)
    assert strip.shape[1] == len(DEFAULT_TIMESTEPS) * SIZE  # frames side by side, no gaps
    assert strip.shape[0] > SIZE  # room for the labels under the frames

    frames = [strip[:SIZE, k * SIZE:(k + 1) * SIZE] for k in range(len(DEFAULT_TIMESTEPS))]
    source = pixels(picture)
    # t = 0 is x_0 with a little noise: std sqrt(1 - alpha_bar_0) in [-1, 1] units, i.e. x 127.5 in
    # pixel levels. Six of those standard deviations plus a level of rounding bounds every pixel.
    abar0 = get_schedule("cosine", 1000).alphas_cumprod[0].item()
    tolerance = 6 * 127.5 * (1 - abar0) ** 0.5 + 1
    assert np.abs(frames[0] - source).max() <= tolerance
    # Each later frame has less of the picture in it.
    distances = [np.abs(frame - source).mean() for frame in frames]
    assert distances == sorted(distances) and distances[-1] > 40


def test_noise_timesteps_schedule_and_small_frames(picture, tmp_path):
    out = tmp_path / "linear.png"
    result = run_cli("noise", str(picture), "--timesteps", "0,10,99", "--schedule", "linear",
                     "--num-timesteps", "100", "--image-size", "16", "-o", str(out))
    assert result.returncode == 0, result.stderr
    width, height = Image.open(out).size
    # 16 px frames are enlarged 4x (nearest neighbour) so that "abar=0.123" fits under each.
    assert width == 3 * 64 and height > 64


def test_noise_never_overwrites_unless_asked(picture, tmp_path):
    out = tmp_path / "strip.png"
    out.write_bytes(b"keep me")
    result = run_cli("noise", str(picture), "-o", str(out))
    assert_one_line_error(result, str(out), "already exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    result = run_cli("noise", str(picture), "--image-size", "32", "-o", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert pixels(out).shape[1] == len(DEFAULT_TIMESTEPS) * 64  # 32 px frames, enlarged 2x


@pytest.mark.parametrize("args, fragments", [
    (["--timesteps", "0,1000"], ["timestep 1000", "out of range", "[0, 999]"]),
    (["--timesteps", "-1"], ["timestep -1", "out of range"]),
    (["--timesteps", "0,ten"], ["--timesteps", "integers"]),
    (["--schedule", "nope"], ["unknown schedule 'nope'", "cosine"]),
    (["--num-timesteps", "1"], ["--num-timesteps", "at least 2"]),
    (["--image-size", "0"], ["--image-size"]),
])
def test_noise_bad_options_are_one_line_errors(picture, tmp_path, args, fragments):
    out = tmp_path / "strip.png"
    assert_one_line_error(run_cli("noise", str(picture), *args, "-o", str(out)), *fragments)
    assert not out.exists()


def test_noise_missing_or_unreadable_image_is_a_one_line_error(tmp_path):
    out = tmp_path / "strip.png"
    missing = tmp_path / "missing.png"
    assert_one_line_error(run_cli("noise", str(missing), "-o", str(out)), str(missing), "does not exist")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    assert_one_line_error(run_cli("noise", str(text), "-o", str(out)), str(text), "cannot read")
    assert not out.exists()


# -- minidiff explain ---------------------------------------------------------------------------
def assert_children_add_up(node: dict) -> None:
    """Every opened node's parameters are its children's (no module of a U-Net holds parameters directly)."""
    children = node.get("children")
    if children:
        assert sum(c["parameters"] for c in children) == node["parameters"], node["name"]
        for child in children:
            assert_children_add_up(child)


def test_explain_json_lists_blocks_whose_parameters_sum_to_the_unet(tmp_path):
    path = tiny_model_file(tmp_path / "tiny.safetensors", "class")
    result = run_cli("explain", str(path), "--json", "--depth", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    total = UNetConfig.from_dict(tiny_config("class")["unet"]).num_parameters()
    assert report["unet"]["parameters"] == total
    assert sum(block["parameters"] for block in report["blocks"]) == total
    assert_children_add_up(report["unet"]["tree"])

    blocks = {block["name"]: block for block in report["blocks"]}
    assert list(blocks)[:3] == ["time_mlp", "pooled_proj", "conv_in"] and list(blocks)[-1] == "conv_out"
    # tiny config: 8 px, base 8 channels, levels (1, 2): 8x8 then 4x4 with 16 channels.
    assert blocks["conv_in"]["output_shape"] == [1, 8, 8, 8]
    assert blocks["down.1"]["output_shape"] == [1, 16, 4, 4]
    assert blocks["mid_attn"]["output_shape"] == [1, 16, 4, 4]
    assert blocks["conv_out"]["output_shape"] == report["input"]["x"] == [1, 3, 8, 8]
    assert report["input"]["pooled"] == [1, 8] and report["input"]["context"] is None
    assert report["conditioner"]["name"] == "class"
    assert report["schedule"]["name"] == "cosine" and report["schedule"]["num_timesteps"] == 50
    assert report["model"]["file"] == str(path)


def test_explain_shows_a_tree_with_shapes_the_conditioner_and_the_schedule(tmp_path):
    path = tiny_model_file(tmp_path / "tiny.safetensors", "clip")
    result = run_cli("explain", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for fragment in ("UNet", "down.0", "mid_attn", "conv_out", "-> [1, 3, 8, 8]", "cross-attention",
                     "conditioner clip", "context [1, 12, 16]", "schedule cosine over T = 50"):
        assert fragment in out, fragment


def test_explain_missing_model_is_a_one_line_error(tmp_path):
    missing = tmp_path / "missing.safetensors"
    assert_one_line_error(run_cli("explain", str(missing)), str(missing))


@pytest.mark.hostile
@pytest.mark.parametrize("width, height", [(2_000_000, 1), (89_000, 1), (1, 33)])
def test_noise_refuses_a_thin_strip_before_decoding_or_scaling_it(tmp_path, width, height):
    import time

    from conftest import assert_error, run_in_process

    strip = tmp_path / "strip.png"
    Image.new("RGB", (width, height), (200, 30, 30)).save(strip)  # 5.9 KB for 2,000,000 x 1
    start = time.perf_counter()
    result = run_in_process("noise", strip, "--image-size", "1024", "-o", tmp_path / "out.png")
    assert time.perf_counter() - start < 5, "too slow to refuse"
    assert_error(result, f"image '{strip}' is {width}x{height} pixels, more than 32 times as long as it is wide")
    assert not (tmp_path / "out.png").exists()

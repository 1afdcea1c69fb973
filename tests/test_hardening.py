"""Hostile and broken input: every refusal is one line naming the file or plugin, and nothing is lost.

Most checks run the CLI in-process (``main([...])``, a few milliseconds each); the few that need a
real process (SIGKILL, SIGINT) start one. Complements test_model_file.py (hostile model files
through load / info / generate), test_plugins.py (import errors, hook errors, clashes) and
test_training.py (resuming after SIGKILL / SIGTERM).
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile, PngImagePlugin
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from conftest import cli_command, run_in_process
from minidiff_cli import plugins
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.files import atomic as fileio
from minidiff_cli.training.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, read_checkpoint_meta, restore
from minidiff_cli.cli.app import main
from minidiff_cli.errors import ImageMetadataError, MinidiffError, ModelFileError, PluginError
from minidiff_cli.files.atomic import atomic_write
from minidiff_cli.files.png_parameters import MAX_JSON_CHARS, read_parameters, save_png
from minidiff_cli.inference.pipeline import Pipeline
from minidiff_cli.training.config import TrainConfig
from minidiff_cli.training.trainer import CHECKPOINT, Trainer
from minidiff_cli.files.model_file import FORMAT_VERSION, save_model_file
from tinymodels import TINY_TRAIN, tiny_model, tiny_model_file


# -- helpers --------------------------------------------------------------------------------------
def cli(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``minidiff ARGS`` run in this process; anything else escaping is a bug."""
    return run_in_process(*args)


def assert_error(result: tuple[int, str, str], *fragments: str, code: int = 2) -> str:
    """Exit ``code``, no traceback, exactly one line on stderr holding every fragment; returns the line."""
    rc, out, err = result
    assert rc == code, result
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors", "class", seed=1)


@pytest.fixture(scope="module")
def made_png(tiny, tmp_path_factory) -> Path:
    """A PNG written by `minidiff generate`, with its parameters."""
    out = tmp_path_factory.mktemp("made") / "made.png"
    code, _, err = cli("generate", "red circle", "--model", tiny, "--steps", "2", "-o", out, "-q")
    assert code == 0, err
    return out


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A plugins folder for this process's registry (write the plugins before the first look-up)."""
    folder = tmp_path / "plugs"
    folder.mkdir()
    monkeypatch.setenv("MINIDIFF_PLUGINS_DIR", str(folder))
    monkeypatch.delenv("MINIDIFF_STRICT_PLUGINS", raising=False)
    plugins.reset()
    yield folder
    plugins.reset()


# -- PNGs written by hand --------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_chunk(key: str, value: str) -> bytes:
    return chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))


def ztxt_chunk(key: str, data: bytes) -> bytes:
    return chunk(b"zTXt", key.encode("latin-1") + b"\0\0" + zlib.compress(data, 9))


def itxt_chunk(key: str, data: bytes) -> bytes:
    # keyword, compressed flag 1, method 0, empty language and translated keyword, zlib data
    return chunk(b"iTXt", key.encode("latin-1") + b"\0\x01\x00\0\0" + zlib.compress(data, 9))


def png(*chunks: bytes, width: int = 4, height: int = 4, rows: int | None = None) -> bytes:
    """An 8-bit RGB PNG of black pixels; ``rows`` stores only that many rows of image data."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    data = zlib.compress((b"\0" + b"\0" * 3 * width) * (height if rows is None else rows))
    return PNG_SIGNATURE + ihdr + b"".join(chunks) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def params_png(value: str, **kwargs) -> bytes:
    return png(text_chunk("minidiff", value), **kwargs)


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="JPEG")
    return buffer.getvalue()


GOOD = json.dumps({"prompt": "red circle", "steps": 2, "sampler": "ddim", "cfg": 1.5, "seed": 3})
MEGABYTE = 1 << 20

# (file name, bytes or a maker, fragment of the one-line error); every case is refused by both
# `minidiff info FILE` and `minidiff generate --from FILE`. (Another program's `parameters` text,
# which `info` shows, and its hostile values are in tests/test_infotext.py.)
HOSTILE_PNGS = [
    ("no-parameters", "plain.png", png(), "has no minidiff parameters"),
    ("not-json", "odd.png", params_png("{prompt: red circle"), "garbled minidiff parameters (not JSON)"),
    ("json-array", "odd.png", params_png("[1, 2, 3]"), "not a parameter object"),
    ("json-string", "odd.png", params_png('"red circle"'), "not a parameter object"),
    ("prompt-is-an-object", "odd.png", params_png('{"prompt": {"text": "red circle"}}'), "not a parameter object"),
    ("nan", "odd.png", params_png('{"prompt": "red circle", "cfg": NaN}'), "garbled minidiff parameters"),
    ("infinity", "odd.png", params_png('{"prompt": "red circle", "cfg": 1e999}'), "'cfg' is not finite"),
    ("nested-too-deep", "odd.png", params_png("[" * 20_000 + "]" * 20_000), "garbled minidiff parameters"),
    ("integer-of-5000-digits", "odd.png", params_png('{"prompt": "x", "seed": 1' + "0" * 5000 + "}"),
     "garbled minidiff parameters"),
    ("parameters-too-long", "long.png", params_png(json.dumps({"prompt": "x" * (MAX_JSON_CHARS + 10)})),
     "has a parameter chunk of"),
    ("text-chunk-over-MAX_TEXT_CHUNK", "huge.png", png(text_chunk("minidiff", "x" * (MEGABYTE + 1))),
     f"tEXt chunk of {MEGABYTE + 1 + 9} bytes, more than Pillow's limit"),
    ("ztxt-bomb", "bomb.png", png(ztxt_chunk("minidiff", b" " * (8 * MEGABYTE)), text_chunk("minidiff", GOOD)),
     "beyond Pillow's limits"),
    ("itxt-bomb", "bomb.png", png(itxt_chunk("minidiff", b" " * (8 * MEGABYTE))), "beyond Pillow's limits"),
    ("pixel-bomb-over-twice-the-limit", "bomb.png", params_png(GOOD, width=20_000, height=20_000, rows=1),
     "claims 20000x20000 pixels, more than Pillow's limit"),
    ("pixel-bomb-pillow-only-warns-about", "bomb.png", params_png(GOOD, width=10_000, height=10_000, rows=1),
     "claims 10000x10000 pixels"),
    ("random-bytes", "noise.png", bytes(range(256)) * 8, "is not a PNG image"),
    ("empty", "empty.png", b"", "is empty, not a PNG image"),
    ("text-file", "notes.png", b"just some notes\n", "is not a PNG image"),
    ("jpeg-named-png", "photo.png", jpeg_bytes, "is a JPEG image; minidiff parameters live in PNGs"),
    ("jpeg", "photo.jpg", jpeg_bytes, "is a JPEG image; minidiff parameters live in PNGs"),
    ("truncated", "cut.png", lambda: params_png(GOOD)[:40], "is truncated"),
    ("signature-only", "cut.png", PNG_SIGNATURE, "is truncated"),
    ("chunk-larger-than-file", "cut.png", PNG_SIGNATURE + struct.pack(">I4s", 2**31 - 1, b"IHDR"), "does not fit"),
    ("no-ihdr-first", "odd.png", PNG_SIGNATURE + text_chunk("minidiff", GOOD) + chunk(b"IEND", b""),
     "does not start with an IHDR"),
    ("bad-crc", "crc.png", lambda: params_png(GOOD).replace(b"ddim", b"ddpm"), "not a readable PNG image"),
]


def write_hostile(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_bytes(data() if callable(data) else data)
    return path


@pytest.mark.parametrize("name, data, message", [case[1:] for case in HOSTILE_PNGS],
                         ids=[case[0] for case in HOSTILE_PNGS])
def test_hostile_png_is_a_one_line_error_for_info_and_from(tmp_path, tiny, name, data, message):
    path = write_hostile(tmp_path, name, data)
    assert_error(cli("info", path), f"'{path}'", message)
    out = tmp_path / "out"
    assert_error(cli("generate", "--from", path, "--model", tiny, "-o", out, "-q"), f"'{path}'", message)
    assert files_in(out) == []
    with pytest.raises(ImageMetadataError, match=re.escape(message)):
        read_parameters(path)


def test_png_limits_are_checked_without_decoding_pixels_or_printing_warnings(tmp_path, monkeypatch, made_png):
    """Pillow decodes pixels on `image.load()`; reading parameters must never get there."""
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert read_parameters(made_png)["prompt"] == "red circle"
    bomb = write_hostile(tmp_path, "bomb.png", params_png(GOOD, width=10_000, height=10_000, rows=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageMetadataError, match="decompression bomb"):
            read_parameters(bomb)
    assert caught == []


def test_pillow_pixel_limit_is_honoured_when_lowered(tmp_path, monkeypatch):
    path = write_hostile(tmp_path, "big.png", params_png(GOOD, width=64, height=64))
    assert read_parameters(path)["prompt"] == "red circle"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert_error(cli("info", path), f"'{path}'", "claims 64x64 pixels, more than Pillow's limit of 1000")


def test_total_text_beyond_max_text_memory_is_refused(tmp_path, monkeypatch):
    """Pillow's MAX_TEXT_MEMORY (64 MiB by default) caps all text chunks together; lowered here."""
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 100_000)
    chunks = [text_chunk(f"note{k}", "x" * 40_000) for k in range(3)] + [text_chunk("minidiff", GOOD)]
    path = write_hostile(tmp_path, "chatty.png", png(*chunks))
    assert_error(cli("info", path), f"'{path}'", "beyond Pillow's limits", "MAX_TEXT_MEMORY")


def test_text_chunks_after_the_image_data_are_not_read(tmp_path):
    """Text that only follows the pixels would need them decoded first; minidiff writes its own before."""
    data = png()
    iend = chunk(b"IEND", b"")
    path = write_hostile(tmp_path, "late.png", data[:-len(iend)] + text_chunk("minidiff", GOOD) + iend)
    with Image.open(path) as image:
        assert "minidiff" in image.text  # Pillow finds it, by decoding the pixels first
    assert_error(cli("info", path), "has no minidiff parameters")


def test_folder_and_missing_file_are_one_line_errors(tmp_path, tiny):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert_error(cli("info", folder), f"'{folder}' is not a file")
    assert_error(cli("generate", "--from", folder, "--model", tiny, "-o", tmp_path / "o"), "is not a file")
    missing = tmp_path / "missing.png"
    assert_error(cli("info", missing), f"image '{missing}' does not exist")
    assert_error(cli("generate", "--from", missing, "-o", tmp_path / "o"), "does not exist")
    assert files_in(tmp_path / "o") == []


@pytest.mark.parametrize("params, message", [
    ({"prompt": "red circle", "steps": 2.5}, "invalid 'steps' parameter: 2.5"),
    ({"prompt": "red circle", "steps": True}, "invalid 'steps' parameter: True"),
    ({"prompt": "red circle", "cfg": "3"}, "invalid 'cfg' parameter: '3'"),
    ({"prompt": "red circle", "sampler": ["ddim"]}, "invalid 'sampler' parameter"),
    ({"prompt": "red circle", "sampler_options": [1, 2]}, "invalid 'sampler_options' parameter"),
    ({"prompt": "red circle", "negative_prompt": 7}, "invalid 'negative_prompt' parameter: 7"),
    ({"prompt": "red circle", "seed": -5}, "--seed must be a whole number from 0"),
    ({"prompt": "red circle", "seed": 2**80}, "--seed must be a whole number from 0"),
    ({"prompt": "red circle", "cfg": 1e300}, "--cfg must be at most 1000"),
    ({"prompt": "red circle", "cfg": -1}, "--cfg must be 0 or more"),
    ({"prompt": "red circle", "eta": 7}, "--eta must be between 0 and 1"),
    ({"prompt": "red circle", "steps": 10**40}, "steps must be between 1 and 50"),
    ({"prompt": "x" * 10_001}, "longer than 10,000 characters"),
    ({"prompt": "red circle", "sampler_options": {"callback": 1}}, "'callback' is not a sampler option"),
    ({"prompt": "red circle", "sampler_options": {"eta": [1, 2]}}, "eta must be a number"),
    ({"prompt": "red circle", "sampler": "no-such-sampler"}, "unknown sampler 'no-such-sampler'"),
])
def test_parameters_of_the_wrong_type_or_range_in_a_png_are_one_line_errors(tmp_path, tiny, params, message):
    path = tmp_path / "odd.png"
    info = PngInfo()
    info.add_text("minidiff", json.dumps(params))
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    out = tmp_path / "out"
    assert_error(cli("generate", "--from", path, "--model", tiny, "-o", out, "-q"), message)
    assert files_in(out) == []
    code, text, err = cli("info", path)  # info shows what is there, whatever its types
    assert code == 0 and err == "", err


@pytest.mark.parametrize("model", ["../elsewhere/model.safetensors", "/etc/passwd", "~/models/m", ".hidden",
                                   "m.safetensors", "two\nlines"])
def test_a_png_cannot_choose_a_model_file_by_path(tmp_path, model):
    path = tmp_path / "odd.png"
    info = PngInfo()
    info.add_text("minidiff", json.dumps({"prompt": "red circle", "model": model}))
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    assert_error(cli("generate", "--from", path, "-o", tmp_path / "out", "-q"), f"'{path}' names its model",
                 "which is not a model name; pass --model")


def test_null_optional_parameters_are_taken_as_absent(tmp_path, tiny):
    path = tmp_path / "nulls.png"
    info = PngInfo()
    info.add_text("minidiff", json.dumps({"prompt": "red circle", "steps": 2, "negative_prompt": None,
                                          "model": None, "eta": None, "sampler_options": None}))
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    code, out, err = cli("generate", "--from", path, "--model", tiny, "-o", tmp_path / "again.png", "-q")
    assert code == 0, err
    assert read_parameters(tmp_path / "again.png")["negative_prompt"] == ""


def test_a_hostile_png_fails_the_same_way_in_a_real_process(tmp_path):
    from conftest import run_cli

    path = write_hostile(tmp_path, "bomb.png", params_png(GOOD, width=10_000, height=10_000, rows=1))
    result = run_cli("info", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"Error: '{path}' claims 10000x10000 pixels, more than Pillow's limit of {Image.MAX_IMAGE_PIXELS} "
        "(a decompression bomb?); refusing it"]


# -- model and checkpoint files through `train` ------------------------------------------------------------
def raw(data: bytes):
    def make(folder: Path) -> Path:
        path = folder / "bad.safetensors"
        path.write_bytes(data)
        return path
    return make


def safetensors_with(metadata: dict[str, str], tensors: dict | None = None):
    def make(folder: Path) -> Path:
        path = folder / "bad.safetensors"
        save_file(tensors or {"weight": torch.zeros(2, 2)}, str(path), metadata=metadata)
        return path
    return make


def truncated_copy(folder: Path) -> Path:
    good = tiny_model("class", seed=2).save(folder / "good.safetensors")
    path = folder / "bad.safetensors"
    path.write_bytes(good.read_bytes()[:-700])
    return path


def future_model(folder: Path) -> Path:
    model = tiny_model("class")
    path = folder / "bad.safetensors"
    meta = {"format": "minidiff", "format_version": str(FORMAT_VERSION + 1), "config": "{}"}
    save_file({k: v.contiguous() for k, v in model.tensors().items()}, str(path), metadata=meta)
    return path


def negative_shape(folder: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}).encode()
    return raw(struct.pack("<Q", len(header)) + header + b"\0" * 4)(folder)


HOSTILE_MODELS = [
    ("random-bytes", raw(bytes(range(256)) * 16), "truncated or not a safetensors file"),
    ("three-bytes", raw(b"\x01\x02\x03"), "not a safetensors file (only 3 bytes)"),
    ("truncated", truncated_copy, "truncated"),
    ("header-larger-than-file", raw(struct.pack("<Q", 10_000) + b"{}"), "header says 10000 bytes, file has 10"),
    ("header-not-json", raw(struct.pack("<Q", 8) + b"\xff\xfenot{" + b"\0" * 16), "header is not JSON"),
    ("header-nested-too-deep", raw(struct.pack("<Q", 100_000) + b"[" * 100_000), "header is not JSON"),
    ("negative-shape", negative_shape, "does not fit the file"),
    ("foreign-safetensors", safetensors_with({"format": "pt"}), "not a minidiff model"),
    ("no-metadata", safetensors_with({}), "not a minidiff model"),
    ("future-version", future_model, f"format version {FORMAT_VERSION + 1}, newer than this minidiff"),
    ("version-zero", safetensors_with({"format": "minidiff", "format_version": "0", "config": "{}"}),
     "unreadable format version"),
    ("config-not-json", safetensors_with({"format": "minidiff", "format_version": "1", "config": "[[[" * 9000}),
     "config is missing or not JSON"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in HOSTILE_MODELS], ids=[c[0] for c in HOSTILE_MODELS])
def test_hostile_init_from_file_is_a_one_line_error_and_nothing_is_written(tmp_path, toml, make, message):
    path = make(tmp_path)
    out = tmp_path / "run"
    result = cli("train", *TINY_TRAIN, "--config", toml, "--out", out, "--init-from", path, "--max-steps", "1")
    assert_error(result, f"'{path}'", message)
    assert not out.exists()
    with pytest.raises(ModelFileError, match="bad.safetensors"):  # the Python API: the same check, its own type
        Pipeline.load(path, device="cpu")


def test_init_from_a_missing_file_a_folder_or_a_checkpoint(tmp_path, toml, trained_checkpoint_run):
    out = tmp_path / "run"
    for target, message in ((tmp_path / "nothing.safetensors", "does not exist"), (tmp_path, "is not a file"),
                            (trained_checkpoint_run / CHECKPOINT, "not a minidiff model")):
        result = cli("train", *TINY_TRAIN, "--config", toml, "--out", out, "--init-from", target, "--max-steps", "1")
        assert_error(result, f"'{target}'", message)
    assert not out.exists()


# A real (one-step) run to resume from, made once; each test below damages a copy of it.
TINY = dict(data="shapes", conditioner="class", image_size=16, base_channels=8, channel_mult=[1, 2],
            attention_resolutions=[8], cross_attention_resolutions=[8], head_dim=8, class_dim=16, timesteps=100,
            batch_size=4, warmup=2, lr=1e-3, quiet=True, device="cpu", sample_every=1000, log_every=1)


@pytest.fixture(scope="module")
def trained_checkpoint_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    Trainer(TrainConfig(**TINY, out=str(out), max_steps=1, save_every=1).validate(), log=lambda m: None).run()
    return out


def rewrite_checkpoint(path: Path, change) -> None:
    meta, tensors = load_checkpoint(path)
    change(meta, tensors)
    save_model_file(path, tensors, meta, overwrite=True, format=CHECKPOINT_FORMAT)


def first_key(tensors: dict, prefix: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix))


def shrink_optimizer_state(meta, tensors):
    key = first_key(tensors, "optim.0.exp_avg")
    tensors[key] = torch.zeros(3, 1, 7)


def drop_exp_avg(meta, tensors):
    del tensors[first_key(tensors, "optim.0.exp_avg_sq")]


def integer_weights(meta, tensors):
    key = first_key(tensors, "net.unet.conv_in.weight")
    tensors[key] = tensors[key].long()


def nan_ema(meta, tensors):
    key = first_key(tensors, "ema.unet.conv_in.weight")
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")


CHECKPOINT_DAMAGE = [
    ("step-not-a-number", lambda m, t: m.__setitem__("step", "many"), "its step is 'many'"),
    ("negative-step", lambda m, t: m.__setitem__("step", -1), "its step is -1"),
    ("train-not-a-table", lambda m, t: m.__setitem__("train", [1, 2]), "lacks the step or the training config"),
    ("train-lr-not-a-number", lambda m, t: m["train"].__setitem__("lr", "fast"),
     "holds a training config this minidiff cannot use: --lr must be a finite number (got 'fast')"),
    ("train-lr-nan", lambda m, t: m["train"].__setitem__("lr", float("nan")), "--lr must be a finite number"),
    ("train-unknown-key", lambda m, t: m["train"].__setitem__("turbo", True), "unknown key(s)"),
    ("param-groups-missing", lambda m, t: m.pop("param_groups"), "optimizer settings are missing"),
    ("param-groups-garbage", lambda m, t: m["param_groups"][0].__setitem__("betas", "fast"),
     "optimizer setting 'betas' is 'fast'"),
    ("param-groups-out-of-range", lambda m, t: m["param_groups"][0].__setitem__("betas", [1.5, 0.9]),
     "optimizer setting 'betas'"),
    ("param-groups-other-parameters", lambda m, t: m["param_groups"][0].__setitem__("params", [0, 1]),
     "optimizer state for other parameters"),
    ("losses-garbage", lambda m, t: m.__setitem__("losses", 5), "loss history is not a list"),
    ("optimizer-state-wrong-shape", shrink_optimizer_state, "has shape (3, 1, 7), its parameter"),
    ("optimizer-state-missing-part", drop_exp_avg, "lacks exp_avg_sq"),
    ("optimizer-state-without-a-parameter", lambda m, t: t.__setitem__("optim.99999.exp_avg", torch.zeros(1)),
     "optimizer state optim.99999.exp_avg has no parameter"),
    ("optimizer-key-garbled", lambda m, t: t.__setitem__("optim.x", torch.zeros(1)), "has no parameter"),
    ("integer-weights", integer_weights, "is stored as torch.int64, expected torch.float32"),
    ("nan-weights", nan_ema, "holds NaN or infinite values"),
    ("stray-tensor", lambda m, t: t.__setitem__("vae.weight", torch.zeros(1)), "unexpected tensor vae.weight"),
    ("rng-garbage", lambda m, t: t.__setitem__("rng.torch", torch.zeros(3, dtype=torch.uint8)),
     "random-number state"),
]


def damaged(trained_checkpoint_run: Path, folder: Path, make) -> tuple[Path, Path]:
    out = folder / "run"
    shutil.copytree(trained_checkpoint_run, out)
    path = out / CHECKPOINT
    if isinstance(make, tuple):  # (kind, change) of the checkpoint's own content
        rewrite_checkpoint(path, make[1])
    else:  # a hostile file in place of the checkpoint
        path.unlink()
        make(out).rename(path)
    return out, path


RESUME_CASES = ([(name, make, message) for name, make, message in HOSTILE_MODELS
                 if name not in ("future-version", "version-zero", "foreign-safetensors", "no-metadata",
                                 "config-not-json")]
                + [("foreign-safetensors", safetensors_with({"format": "pt"}), "not a minidiff training checkpoint"),
                   ("a-model-file", lambda f: tiny_model("class").save(f / "m.safetensors"),
                    "not a minidiff training checkpoint"),
                   ("future-version", safetensors_with({"format": CHECKPOINT_FORMAT, "format_version": "99",
                                                        "config": "{}"}), "comes from a newer minidiff")]
                + [(name, ("change", change), message) for name, change, message in CHECKPOINT_DAMAGE])


@pytest.mark.parametrize("make, message", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_damaged_checkpoint_is_a_one_line_error_on_resume_and_the_run_is_left_as_it_was(
        tmp_path, trained_checkpoint_run, make, message):
    out, path = damaged(trained_checkpoint_run, tmp_path, make)
    before = snapshot(out)
    assert_error(cli("train", "--out", out, "--resume", "--max-steps", "3", "--quiet"), f"'{path}'", message)
    assert snapshot(out) == before


API_DAMAGE = [c for c in CHECKPOINT_DAMAGE if not c[0].startswith("train-")]  # only the CLI reads the recipe


@pytest.mark.parametrize("make, message", [c[1:] for c in API_DAMAGE], ids=[c[0] for c in API_DAMAGE])
def test_damaged_checkpoint_is_a_model_file_error_in_the_python_api(tmp_path, trained_checkpoint_run, make, message):
    out, path = damaged(trained_checkpoint_run, tmp_path, ("change", make))
    cfg = TrainConfig(**TINY, out=str(out), max_steps=3, save_every=1).validate()
    before = snapshot(out)
    with pytest.raises(ModelFileError) as caught:
        Trainer(cfg, resume=True, log=lambda m: None)
    assert f"'{path}'" in str(caught.value) and message in str(caught.value)
    assert snapshot(out) == before


def test_undamaged_checkpoint_still_resumes(tmp_path, trained_checkpoint_run):
    out = tmp_path / "run"
    shutil.copytree(trained_checkpoint_run, out)
    meta = read_checkpoint_meta(out / CHECKPOINT)
    assert meta["step"] == 1
    trainer = Trainer(TrainConfig(**TINY, out=str(out), max_steps=2, save_every=1).validate(), resume=True,
                      log=lambda m: None)
    assert trainer.step == 1
    trainer.run()
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 2


def test_resume_keeps_the_live_optimizer_kernels_whatever_the_file_says(tmp_path, trained_checkpoint_run):
    """fused / foreach say how this torch on this device computes; a file from elsewhere must not set them."""
    out = tmp_path / "run"
    shutil.copytree(trained_checkpoint_run, out)
    assert read_checkpoint_meta(out / CHECKPOINT)["param_groups"][0]["fused"] is True  # a CPU run is fused
    rewrite_checkpoint(out / CHECKPOINT, lambda meta, tensors: meta["param_groups"][0].update(fused=False,
                                                                                              foreach=True))
    trainer = Trainer(TrainConfig(**TINY, out=str(out), max_steps=2, save_every=1).validate(), resume=True,
                      log=lambda m: None)
    group = trainer.optimizer.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None
    assert group["lr"] == read_checkpoint_meta(out / CHECKPOINT)["param_groups"][0]["lr"]  # the state still loads
    trainer.run()
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 2


def test_restore_checks_everything_before_loading_anything(tmp_path, trained_checkpoint_run):
    """A mismatch found late must not leave the live model half-loaded with the file's weights."""
    trainer = Trainer(TrainConfig(**TINY, out=str(tmp_path / "fresh"), max_steps=1).validate(), log=lambda m: None)
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    meta, tensors = load_checkpoint(trained_checkpoint_run / CHECKPOINT)
    tensors["rng.torch"] = torch.zeros(3, dtype=torch.uint8)  # checked after the weights and the optimizer
    with pytest.raises(ModelFileError, match="random-number state"):
        restore(meta, tensors, trained_checkpoint_run / CHECKPOINT, modules={"net": trainer.net, "ema": trainer.ema},
                optimizer=trainer.optimizer)
    after = trainer.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.optimizer.state_dict()["state"] == {}


# -- plugins that return garbage -----------------------------------------------------------------------
GARBAGE_REGISTRATIONS = '''
from minidiff_cli import hookimpl


def fine(num_timesteps):
    import torch
    return torch.full((num_timesteps,), 0.01, dtype=torch.float64)


class NoSteps:
    name = "g-no-steps"
    def sample(self, *args, **kwargs):
        raise AssertionError


class ZeroSteps(NoSteps):
    name = "g-zero-steps"
    default_steps = 0


class Good(NoSteps):
    name = "g-good"
    default_steps = 3


@hookimpl
def register_schedules(register):
    register("g-not-callable", 42)
    register("", fine)
    register(None, fine)
    register("two\\nlines", fine)
    register("g-one-argument")
    register("g-fine", fine)


@hookimpl
def register_samplers(register):
    register(NoSteps())
    register(ZeroSteps())
    register("g-named", Good())
    register(object())
    register(Good())


@hookimpl
def register_datasets(register):
    register("g-data", "not a factory")


@hookimpl
def register_conditioners(register):
    register("g-conditioner", 3.5)
'''


def test_garbage_registrations_are_recorded_one_line_each_and_the_rest_registers(tmp_path):
    (tmp_path / "garbage.py").write_text(GARBAGE_REGISTRATIONS)
    warnings: list[str] = []
    reg = plugins.Registry(plugins_dir=tmp_path, load=[], warn=warnings.append).discover()
    info = reg.plugins["garbage"]
    assert info.registered == {"schedules": ["g-fine"], "samplers": ["g-good"]}
    errors = "\n".join(info.errors)
    for fragment in ("schedule 'g-not-callable' was registered with int, which cannot be called",
                     "needs a name (a short printable string) and a value (got 2 argument(s))",
                     "(got 1 argument(s))", "sampler 'g-no-steps' needs a 'default_steps' of at least 1 (got None)",
                     "sampler 'g-zero-steps' needs a 'default_steps' of at least 1 (got 0)",
                     "register(sampler) needs one object", "dataset 'g-data' was registered with str",
                     "conditioner 'g-conditioner' was registered with float"):
        assert fragment in errors, fragment
    assert len(info.errors) == 11 and len(warnings) == 11
    assert all("\n" not in w and w.startswith("plugin 'garbage' ") for w in warnings)
    assert reg.get("schedules", "g-fine")(4).tolist() == [0.01] * 4
    assert "ddim" in reg.names("samplers")  # the built-ins are untouched


def test_strict_mode_refuses_garbage_registrations_naming_the_plugin(tmp_path, plugin_dir, monkeypatch):
    (tmp_path / "garbage.py").write_text(GARBAGE_REGISTRATIONS)
    with pytest.raises(PluginError) as caught:
        plugins.Registry(plugins_dir=tmp_path, load=[], strict=True).discover()
    assert "plugin 'garbage'" in str(caught.value) and "MINIDIFF_STRICT_PLUGINS" in str(caught.value)

    (plugin_dir / "garbage.py").write_text(GARBAGE_REGISTRATIONS)
    monkeypatch.setenv("MINIDIFF_STRICT_PLUGINS", "1")
    plugins.reset()
    assert_error(cli("schedules", "list"), "plugin 'garbage'", "MINIDIFF_STRICT_PLUGINS is set")
    monkeypatch.delenv("MINIDIFF_STRICT_PLUGINS")
    plugins.reset()
    code, out, err = cli("schedules", "show", "g-fine", "-T", "4", "--json")
    assert code == 0 and json.loads(out)["betas"] == [0.01] * 4
    assert err.count("plugin 'garbage'") == 11  # one warning line per garbage registration


def test_register_with_keywords_is_reported_as_a_hook_failure(tmp_path):
    (tmp_path / "keywords.py").write_text(textwrap.dedent('''
        from minidiff_cli import hookimpl

        @hookimpl
        def register_schedules(register):
            register(name="k", fn=len)
    '''))
    reg = plugins.Registry(plugins_dir=tmp_path, load=[], warn=lambda m: None).discover()
    [error] = reg.plugins["keywords"].errors
    assert error.startswith("failed in register_schedules: TypeError: ")
    assert error.endswith("register() got an unexpected keyword argument 'name'")


GARBAGE_SCHEDULES = '''
import torch
from minidiff_cli import hookimpl


def short(num_timesteps):
    return torch.full((num_timesteps - 1,), 0.01, dtype=torch.float64)


def nan(num_timesteps):
    betas = torch.full((num_timesteps,), 0.01, dtype=torch.float64)
    betas[3] = float("nan")
    return betas


def too_big(num_timesteps):
    return torch.full((num_timesteps,), 1.5)


def text(num_timesteps):
    return "not betas"


def none(num_timesteps):
    return None


def matrix(num_timesteps):
    return torch.full((num_timesteps, 2), 0.01)


def boom(num_timesteps):
    raise RuntimeError("schedule exploded\\nsecond line")


@hookimpl
def register_schedules(register):
    for fn in (short, nan, too_big, text, none, matrix, boom):
        register(f"bad-{fn.__name__.replace('_', '-')}", fn)
'''

SCHEDULE_GARBAGE = [
    ("bad-short", "returned 999 betas for 1000 timesteps"),
    ("bad-nan", "returned unusable betas: betas must be finite"),
    ("bad-too-big", "returned unusable betas: every beta must lie in (0, 0.999]"),
    ("bad-text", "returned unusable betas: betas must be"),
    ("bad-none", "returned unusable betas: betas must be"),
    ("bad-matrix", "returned unusable betas: betas must be 1-D"),
    ("bad-boom", "failed: RuntimeError: schedule exploded"),
]


@pytest.mark.parametrize("name, message", SCHEDULE_GARBAGE, ids=[n for n, _ in SCHEDULE_GARBAGE])
def test_schedule_returning_garbage_is_an_error_naming_the_plugin_when_used(plugin_dir, tmp_path, toml, name,
                                                                             message):
    (plugin_dir / "garbage_schedules.py").write_text(GARBAGE_SCHEDULES)
    who = f"schedule '{name}' (plugin 'garbage_schedules')"
    with pytest.raises(PluginError) as caught:
        get_schedule(name, 1000)
    assert who in str(caught.value) and message in str(caught.value)
    assert_error(cli("schedules", "show", name), who, message)
    out = tmp_path / "run"
    assert_error(cli("train", *TINY_TRAIN, "--config", toml, "--out", out, "--schedule", name, "--timesteps", "1000",
                     "--max-steps", "1"), who)
    assert not out.exists()
    code, listing, err = cli("schedules", "list")  # every other schedule still shows
    assert code == 0 and "cosine" in listing and err == ""


def test_schedule_timesteps_are_checked_before_the_plugin_is_called(plugin_dir):
    for T in (0, 1, 2.5, "1000", True):
        with pytest.raises(MinidiffError, match="timesteps must be at least 2, a whole number"):
            get_schedule("cosine", T)
    with pytest.raises(MinidiffError, match="1000000000000 timesteps is more than the 100000 minidiff allows"):
        get_schedule("cosine", 10**12)  # would need 8 TB
    assert_error(cli("schedules", "show", "cosine", "-T", "1000000000000"), "is more than the 100000")


GARBAGE_SAMPLERS = '''
import torch
from minidiff_cli import hookimpl


class Garbage:
    default_steps = 2

    def __init__(self, kind):
        self.kind = kind
        self.name = f"bad-{kind}"

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, **opts):
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if self.kind == "model":
            return denoiser(x[:, :1], t)  # one channel where the model takes three
        denoiser(x, t)
        if self.kind == "shape":
            return x[:, :1]
        if self.kind == "nan":
            return torch.full_like(x, float("nan"))
        if self.kind == "inf":
            return torch.full_like(x, float("inf"))
        if self.kind == "none":
            return None
        if self.kind == "list":
            return x.tolist()
        if self.kind == "int":
            return x.long()
        if self.kind == "raise":
            raise ValueError("garbage in the sampler\\nsecond line")


@hookimpl
def register_samplers(register):
    for kind in ("model", "shape", "nan", "inf", "none", "list", "int", "raise"):
        register(Garbage(kind))
'''

SAMPLER_GARBAGE = [
    ("bad-shape", "returned a tensor of shape (1, 1, 8, 8), expected (1, 3, 8, 8)"),
    ("bad-nan", "returned NaN or infinite values"),
    ("bad-inf", "returned NaN or infinite values"),
    ("bad-none", "returned NoneType, not a tensor of shape (1, 3, 8, 8)"),
    ("bad-list", "returned list, not a tensor"),
    ("bad-int", "returned a torch.int64 tensor, not floats"),
    ("bad-raise", "failed: ValueError: garbage in the sampler"),
    ("bad-model", "failed in the model it called: ValueError: x must be [B, 3, H, W]"),
]


@pytest.mark.parametrize("name, message", SAMPLER_GARBAGE, ids=[n for n, _ in SAMPLER_GARBAGE])
def test_sampler_returning_garbage_is_an_error_naming_its_plugin_and_the_rest_works(plugin_dir, tmp_path, tiny,
                                                                                     name, message):
    (plugin_dir / "garbage_samplers.py").write_text(GARBAGE_SAMPLERS)
    who = f"sampler '{name}' (plugin 'garbage_samplers')"
    out = tmp_path / "out"
    assert_error(cli("generate", "red circle", "--model", tiny, "--sampler", name, "-o", out, "-q"), who, message)
    assert files_in(out) == []
    pipe = Pipeline.load(tiny, device="cpu")
    with pytest.raises(PluginError) as caught:
        pipe.generate("red circle", steps=2, sampler=name)
    assert who in str(caught.value) and message in str(caught.value) and "\n" not in str(caught.value)
    code, printed, err = cli("generate", "red circle", "--model", tiny, "--steps", "2", "-o", out, "-q")
    assert code == 0 and printed.split() == [str(out / "minidiff-00000.png")], err


def test_debug_shows_the_samplers_own_traceback(plugin_dir, tmp_path, tiny):
    (plugin_dir / "garbage_samplers.py").write_text(GARBAGE_SAMPLERS)
    with pytest.raises(PluginError) as caught:
        main(["--debug", "generate", "red circle", "--model", str(tiny), "--sampler", "bad-raise",
              "-o", str(tmp_path / "o"), "-q"])
    assert isinstance(caught.value.__cause__, ValueError)


# -- files: crashes, races, interrupts -------------------------------------------------------------------
def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("error", [ValueError("broken writer"), KeyboardInterrupt()], ids=["ValueError", "Ctrl-C"])
def test_a_writer_that_fails_leaves_no_file_and_no_temporary(tmp_path, error):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(tmp_path / "out.png", write, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_disk_errors_are_one_line_errors_naming_the_file(tmp_path):
    import errno

    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MinidiffError, match=r"could not write '.*out.png': No space left on device"):
        atomic_write(tmp_path / "out.png", full)
    assert list(tmp_path.iterdir()) == []


NO_LINK_MODES = ["link", "rename-noreplace", "claim-then-replace"]


@pytest.fixture(params=NO_LINK_MODES)
def publish_mode(request, monkeypatch):
    """How atomic_write gives a new file its name: hard link, or the fallbacks for filesystems without."""
    if request.param != "link":
        import errno

        def no_links(src, dst, *args, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(fileio.os, "link", no_links)
    if request.param == "rename-noreplace":
        if fileio._noreplace_call() is None:
            pytest.skip("no renameat2 / renamex_np here")

        def not_the_last_resort(tmp, path):
            raise AssertionError("the atomic no-replace rename was not used")

        monkeypatch.setattr(fileio, "_claim_then_replace", not_the_last_resort)
    if request.param == "claim-then-replace":
        monkeypatch.setattr(fileio, "_noreplace_call", lambda: None)
    return request.param


def test_new_file_gets_its_content_and_usual_permissions_in_every_mode(tmp_path, publish_mode):
    path = atomic_write(tmp_path / "new.bin", lambda tmp: tmp.write_bytes(b"content"), overwrite=False)
    assert path.read_bytes() == b"content" and leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_file_that_appears_while_writing_is_never_replaced(tmp_path, publish_mode):
    """Between the existence check and the final rename another process creates the file."""
    target = tmp_path / "picture.png"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"minidiff's image")
        target.write_bytes(b"someone else's file")

    with pytest.raises(MinidiffError, match="already exists"):
        atomic_write(target, write, overwrite=False)
    assert target.read_bytes() == b"someone else's file"
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_in_one_step(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and leftovers(tmp_path) == []


SLOW_PNG_WRITER = '''
import sys, time
from PIL import Image, PngImagePlugin  # importing the plugin registers its saver
from minidiff_cli.files import png_parameters as imagemeta

original = Image.SAVE["PNG"]

def slow(im, fp, filename, *args, **kwargs):
    original(im, fp, filename, *args, **kwargs)  # the whole image is in the temporary file...
    fp.flush()
    print("written", flush=True)
    time.sleep(120)  # ...and the process is killed before it is renamed

Image.SAVE["PNG"] = slow
imagemeta.save_png(Image.new("RGB", (256, 256), "red"), sys.argv[1], {"prompt": "x"}, overwrite=sys.argv[2] == "1")
'''


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "replacing"])
def test_sigkill_while_writing_a_png_leaves_no_partial_file_under_its_name(tmp_path, existing):
    target = tmp_path / "image.png"
    if existing:
        target.write_bytes(b"the previous version")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PNG_WRITER, str(target), "1" if existing else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline().strip() == "written", proc.stderr.read()
        temporary = [p for p in tmp_path.iterdir() if p.name.startswith(".image.png.") and p.name.endswith(".tmp")]
        assert len(temporary) == 1 and temporary[0].stat().st_size > 0
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    if existing:
        assert target.read_bytes() == b"the previous version"
    else:
        assert not target.exists()
    # what is left is a hidden temporary file, never mistaken for an image, and the next free name is unchanged
    assert fileio.next_free_path(tmp_path, "image", ".png").name == "image-00000.png"


SLOW_SAMPLER = '''
import os
import time

from minidiff_cli import hookimpl


class Slow:
    name = "slow"
    default_steps = 1

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, **opts):
        from minidiff_cli.diffusion.sampling import batch_t

        open(os.environ["MINIDIFF_TEST_MARKER"], "w").close()
        deadline = time.time() + 120
        while time.time() < deadline:
            denoiser(x, batch_t(0, x))
            time.sleep(0.02)
        return x


@hookimpl
def register_samplers(register):
    register(Slow())
'''


def test_ctrl_c_during_generate_exits_130_with_one_line_and_no_files(tmp_path, tiny):
    plugs = tmp_path / "plugs"
    plugs.mkdir()
    (plugs / "slow.py").write_text(SLOW_SAMPLER)
    marker, out = tmp_path / "sampling", tmp_path / "out"
    env = {**os.environ, "MINIDIFF_PLUGINS_DIR": str(plugs), "MINIDIFF_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([*cli_command(), "generate", "red circle", "--model", str(tiny), "--sampler", "slow",
                             "-n", "3", "-o", str(out), "-q"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=30)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "Interrupted; nothing half-written was left behind."]
    assert stdout == "" and files_in(out) == []


def test_ctrl_c_while_saving_keeps_the_finished_images_and_no_partial_one(tmp_path, tiny, monkeypatch):
    original, calls = Image.SAVE["PNG"], []

    def interrupted_second_save(im, fp, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            fp.write(b"\x89PNG half an image")
            raise KeyboardInterrupt
        return original(im, fp, filename, *args, **kwargs)

    monkeypatch.setitem(Image.SAVE, "PNG", interrupted_second_save)
    out = tmp_path / "out"
    result = cli("generate", "red circle", "--model", tiny, "--steps", "2", "-n", "3", "-o", out, "-q")
    assert_error(result, "Interrupted", code=130)
    assert files_in(out) == ["minidiff-00000.png"]
    assert read_parameters(out / "minidiff-00000.png")["seed"] == 0


# -- the remaining CLI paths -----------------------------------------------------------------------------
def test_output_names_the_filesystem_refuses_are_one_line_errors_before_sampling(tmp_path, tiny):
    long_name = "x" * 300
    for target in (tmp_path / long_name, tmp_path / f"{long_name}.png", tmp_path / long_name / "a.png"):
        line = assert_error(cli("generate", "red circle", "--model", tiny, "-o", target, "-q"))
        assert "too long" in line.lower(), line
    assert list(tmp_path.iterdir()) == []


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


def test_unicode_and_control_characters_in_prompts_survive_the_png(tmp_path):
    from minidiff_cli.files.png_parameters import format_parameters

    params = {"prompt": "tab\there\nnew line \x00 nul \x1b[31m escape \u202e rtl ☕", "negative_prompt": "\r",
              "steps": 1, "sampler": "ddim", "cfg": 0.0, "seed": 0}
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "u.png", params)
    assert read_parameters(path) == params
    assert format_parameters(params).startswith("tab\there")

"""The parameters in a PNG (minidiff_cli.files.png_parameters): hostile PNGs, chunks and values are refused in
one line by `info` and `generate --from`, read without decoding a pixel, and what is written reads back."""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from conftest import assert_error, files_in, run_in_process
from conftest import run_in_process as cli
from PIL import Image, ImageFile, PngImagePlugin
from PIL.PngImagePlugin import PngInfo

from minidiff_cli.errors import ImageMetadataError
from minidiff_cli.files.png_parameters import MAX_JSON_CHARS, read_parameters, save_png

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


@pytest.fixture(scope="module")
def made_png(tiny, tmp_path_factory) -> Path:
    """A PNG written by `minidiff generate`, with its parameters."""
    out = tmp_path_factory.mktemp("made") / "made.png"
    code, _, err = cli("generate", "red circle", "--model", tiny, "--steps", "2", "-o", out, "-q")
    assert code == 0, err
    return out


@pytest.mark.hostile
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


@pytest.mark.hostile
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


@pytest.mark.hostile
def test_pillow_pixel_limit_is_honoured_when_lowered(tmp_path, monkeypatch):
    path = write_hostile(tmp_path, "big.png", params_png(GOOD, width=64, height=64))
    assert read_parameters(path)["prompt"] == "red circle"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert_error(cli("info", path), f"'{path}'", "claims 64x64 pixels, more than Pillow's limit of 1000")


@pytest.mark.hostile
def test_total_text_beyond_max_text_memory_is_refused(tmp_path, monkeypatch):
    """Pillow's MAX_TEXT_MEMORY (64 MiB by default) caps all text chunks together; lowered here."""
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 100_000)
    chunks = [text_chunk(f"note{k}", "x" * 40_000) for k in range(3)] + [text_chunk("minidiff", GOOD)]
    path = write_hostile(tmp_path, "chatty.png", png(*chunks))
    assert_error(cli("info", path), f"'{path}'", "beyond Pillow's limits", "MAX_TEXT_MEMORY")


@pytest.mark.hostile
def test_text_chunks_after_the_image_data_are_not_read(tmp_path):
    """Text that only follows the pixels would need them decoded first; minidiff writes its own before."""
    data = png()
    iend = chunk(b"IEND", b"")
    path = write_hostile(tmp_path, "late.png", data[:-len(iend)] + text_chunk("minidiff", GOOD) + iend)
    with Image.open(path) as image:
        assert "minidiff" in image.text  # Pillow finds it, by decoding the pixels first
    assert_error(cli("info", path), "has no minidiff parameters")


@pytest.mark.hostile
def test_folder_and_missing_file_are_one_line_errors(tmp_path, tiny):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    assert_error(cli("info", folder), f"'{folder}' is not a file")
    assert_error(cli("generate", "--from", folder, "--model", tiny, "-o", tmp_path / "o"), "is not a file")
    missing = tmp_path / "missing.png"
    assert_error(cli("info", missing), f"image '{missing}' does not exist")
    assert_error(cli("generate", "--from", missing, "-o", tmp_path / "o"), "does not exist")
    assert files_in(tmp_path / "o") == []


@pytest.mark.hostile
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


@pytest.mark.hostile
@pytest.mark.parametrize("model", ["../elsewhere/model.safetensors", "/etc/passwd", "~/models/m", ".hidden",
                                   "m.safetensors", "two\nlines"])
def test_a_png_cannot_choose_a_model_file_by_path(tmp_path, model):
    path = tmp_path / "odd.png"
    info = PngInfo()
    info.add_text("minidiff", json.dumps({"prompt": "red circle", "model": model}))
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    assert_error(cli("generate", "--from", path, "-o", tmp_path / "out", "-q"), f"'{path}' names its model",
                 "which is not a model name; pass --model")


@pytest.mark.hostile
def test_null_optional_parameters_are_taken_as_absent(tmp_path, tiny):
    path = tmp_path / "nulls.png"
    info = PngInfo()
    info.add_text("minidiff", json.dumps({"prompt": "red circle", "steps": 2, "negative_prompt": None,
                                          "model": None, "eta": None, "sampler_options": None}))
    Image.new("RGB", (4, 4)).save(path, pnginfo=info)
    code, out, err = cli("generate", "--from", path, "--model", tiny, "-o", tmp_path / "again.png", "-q")
    assert code == 0, err
    assert read_parameters(tmp_path / "again.png")["negative_prompt"] == ""


@pytest.mark.hostile
def test_a_hostile_png_fails_the_same_way_in_a_real_process(tmp_path):
    from conftest import run_cli

    path = write_hostile(tmp_path, "bomb.png", params_png(GOOD, width=10_000, height=10_000, rows=1))
    result = run_cli("info", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"Error: '{path}' claims 10000x10000 pixels, more than Pillow's limit of {Image.MAX_IMAGE_PIXELS} "
        "(a decompression bomb?); refusing it"]


@pytest.mark.hostile
def test_unicode_and_control_characters_in_prompts_survive_the_png(tmp_path):
    from minidiff_cli.files.png_parameters import format_parameters

    params = {"prompt": "tab\there\nnew line \x00 nul \x1b[31m escape \u202e rtl ☕", "negative_prompt": "\r",
              "steps": 1, "sampler": "ddim", "cfg": 0.0, "seed": 0}
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "u.png", params)
    assert read_parameters(path) == params
    assert format_parameters(params).startswith("tab\there")


@pytest.fixture(scope="module")
def shipped_png(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("png")
    rc, stdout, err = run_in_process("generate", "a red circle", "--steps", "2", "-o", out / "a.png", "--quiet")
    assert rc == 0, err
    return out / "a.png"


def png_with(source: Path, path: Path, **changes) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from minidiff_cli.files.png_parameters import JSON_KEY, TEXT_KEY, read_parameters

    params = {**read_parameters(source), **changes}
    info = PngInfo()  # ASCII JSON: a lone surrogate travels as the escape \ud800, as a stranger's file may hold it
    info.add_text(TEXT_KEY, "a stranger's text")
    info.add_text(JSON_KEY, json.dumps(params))
    with Image.open(source) as image:
        image.save(path, format="PNG", pnginfo=info)
    return path


@pytest.mark.hostile
def test_info_shows_a_pngs_escapes_nul_and_lone_surrogates_escaped(tmp_path, shipped_png):
    png = png_with(shipped_png, tmp_path / "evil.png", prompt="a red circle\x1b[2J\x00\u202e\ud800")
    for args in ([], ["--json"]):
        rc, out, err = run_in_process("info", png, *args)
        assert rc == 0, err
        assert "\x1b" not in out and "\x00" not in out and "\u202e" not in out and "\ud800" not in out
    assert json.loads(out)["prompt"] == "a red circle\x1b[2J\x00\u202e\ud800"  # the JSON still says exactly it
    _, text, _ = run_in_process("info", png)
    assert "\\x1b[2J\\x00\\u202e\\ud800" in text


@pytest.mark.hostile
def test_a_model_name_from_a_png_never_resolves_to_a_file_in_the_working_directory(tmp_path, shipped_png,
                                                                                   monkeypatch):
    from minidiff_cli.files.png_parameters import read_parameters

    name = read_parameters(shipped_png)["model"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(b"not the model you asked for")
    rc, out, err = run_in_process("generate", "--from", shipped_png, "--steps", "2", "-o", tmp_path / "out", "--quiet")
    assert rc == 0, err

"""A folder's captions from metadata.jsonl, metadata.csv or NAME.txt beside NAME.png (data/captions.py):
the three give the same data set, disagreements and missing captions are one-line errors, and hostile
files get the treatment metadata.jsonl gets."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_error, run_cli, run_in_process, timed_cli
from PIL import Image
from tinymodels import TINY_TRAIN, tiny_clip_file

from minidiff_cli.data.captions import MAX_CAPTION_CHARS, MAX_LINE_CHARS
from minidiff_cli.data.image_folder import ImageFolderDataset
from minidiff_cli.data.sources import open_dataset
from minidiff_cli.errors import MinidiffError
from minidiff_cli.training.trainer import MODEL

# Every image extension the folder reader takes, a subfolder, and captions with commas and quotes.
CAPTIONS = {"a.png": "a red square", "b.jpg": "a blue, round thing", "c.jpeg": 'the "green" one',
            "sub/d.webp": "yellow", "sub/deeper/e.PNG": "a purple bar"}
FORMATS = ("jsonl", "csv", "txt")


def make_folder(root: Path, fmt: str, captions: dict[str, str] = CAPTIONS) -> Path:
    """``captions``' images (distinct colours) under ``root``, captioned in format ``fmt``."""
    for k, name in enumerate(captions):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 24), (40 * k, 200 - 30 * k, 90)).save(root / name)
    write_captions(root, fmt, captions)
    return root


def write_captions(root: Path, fmt: str, captions: dict[str, str]) -> None:
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n"
                                                     for n, c in captions.items()))
    elif fmt == "csv":
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file_name", "source", "text", "license"])  # other columns are ignored
            for name, caption in captions.items():
                writer.writerow([name, "made, here", caption, "CC0"])
    else:
        for name, caption in captions.items():
            (root / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


def items(dataset) -> list[tuple[str, str, int, torch.Tensor]]:
    return [(str(p.relative_to(dataset.root)), dataset.captions[i], dataset[i]["label"], dataset[i]["image"])
            for i, p in enumerate(dataset.files)]


# -- the three sources ------------------------------------------------------------------------
def test_the_three_formats_give_the_same_data_set(tmp_path):
    datasets = {fmt: ImageFolderDataset(make_folder(tmp_path / fmt, fmt), 8, require_captions=True)
                for fmt in FORMATS}
    reference = items(datasets["jsonl"])
    assert [(name, caption) for name, caption, _, _ in reference] == sorted(CAPTIONS.items())
    for fmt in ("csv", "txt"):
        other = items(datasets[fmt])
        assert [x[:3] for x in other] == [x[:3] for x in reference], fmt  # same images, captions, order
        assert all(torch.equal(a[3], b[3]) for a, b in zip(other, reference)), fmt
        assert datasets[fmt].all_captions() == datasets["jsonl"].all_captions()


def test_open_dataset_reads_them_for_every_command(tmp_path):
    for fmt in FORMATS:
        folder = make_folder(tmp_path / fmt, fmt)
        dataset = open_dataset(str(folder), image_size=8, holdout="", require_captions=True)
        assert sorted(dataset.captions) == sorted(CAPTIONS.values())
    assert len(open_dataset("shapes", image_size=8, require_captions=True)) > 0  # other data sets ignore it


def test_quoted_csv_fields_may_hold_commas_quotes_and_line_breaks(tmp_path):
    captions = {"a.png": 'a "red",\nround thing', "b.png": "two\r\nlines, here"}
    jsonl = ImageFolderDataset(make_folder(tmp_path / "jsonl", "jsonl", captions), 8)
    with_csv = ImageFolderDataset(make_folder(tmp_path / "csv", "csv", captions), 8)
    assert with_csv.captions == jsonl.captions == ['a "red",\nround thing', "two\r\nlines, here"]


def test_csv_takes_a_caption_column_a_byte_order_mark_and_blank_rows(tmp_path):
    folder = make_folder(tmp_path, "txt", {"a.png": "x"})
    (folder / "a.txt").unlink()
    (folder / "metadata.csv").write_bytes("\ufeffcaption,file_name\r\n\r\n\"  a red  square \",a.png\r\n"
                                          .encode("utf-8"))
    assert ImageFolderDataset(folder, 8).captions == ["a red  square"]  # stripped, as jsonl's are


def test_txt_captions_are_stripped_and_their_whitespace_made_one_space(tmp_path):
    folder = make_folder(tmp_path, "txt", {"a.png": "x", "sub/b.webp": "y"})
    (folder / "a.txt").write_text("\ufeff  a small\nred square \n")
    (folder / "sub" / "b.txt").write_bytes(b"in a\tsubfolder\r\n")
    assert ImageFolderDataset(folder, 8).captions == ["a small red square", "in a subfolder"]


def test_metadata_and_txt_may_both_caption_an_image_when_they_agree(tmp_path):
    folder = make_folder(tmp_path, "jsonl")
    write_captions(folder, "txt", {name: caption.replace(" ", "  ") for name, caption in CAPTIONS.items()})
    dataset = ImageFolderDataset(folder, 8, require_captions=True)
    assert sorted(dataset.captions) == sorted(CAPTIONS.values())  # the metadata's text


def test_metadata_and_txt_may_caption_different_images(tmp_path):
    folder = make_folder(tmp_path, "csv", {"a.png": "from the csv", "b.png": "from its txt"})
    write_captions(folder, "csv", {"a.png": "from the csv"})
    write_captions(folder, "txt", {"b.png": "from its txt"})
    assert ImageFolderDataset(folder, 8, require_captions=True).captions == ["from the csv", "from its txt"]


# -- disagreement and missing captions --------------------------------------------------------
def test_both_metadata_files_are_an_error(tmp_path):
    folder = make_folder(tmp_path, "jsonl")
    write_captions(folder, "csv", CAPTIONS)
    with pytest.raises(MinidiffError, match="holds both metadata.jsonl and metadata.csv; keep one") as error:
        ImageFolderDataset(folder, 8)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_txt_that_differs_from_the_metadata_is_an_error_naming_both(tmp_path, fmt):
    folder = make_folder(tmp_path, fmt)
    (folder / "sub" / "d.txt").write_text("not yellow at all\n")
    with pytest.raises(MinidiffError) as error:
        ImageFolderDataset(folder, 8)
    message = str(error.value)
    assert "two captions for 'sub/d.webp'" in message and "d.txt' says \"not yellow at all\"" in message
    assert f"metadata.{fmt}' line" in message and 'says "yellow"' in message and "\n" not in message


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_one_image_listed_twice_with_two_captions_is_an_error(tmp_path, fmt):
    folder = make_folder(tmp_path, "txt", {"a.png": "x"})
    (folder / "a.txt").unlink()
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "one"}\n'
                                               '{"file_name": "./a.png", "text": "one"}\n'
                                               '{"file_name": "a.png", "text": "two"}\n')
    else:
        (folder / "metadata.csv").write_text("file_name,text\na.png,one\n./a.png,one\na.png,two\n")
    with pytest.raises(MinidiffError, match=f"two captions for 'a.png': '.*metadata.{fmt}' line \\d says \"one\" but "
                                            f"'.*metadata.{fmt}' line {3 if fmt == 'jsonl' else 4} says \"two\"; keep one"):
        ImageFolderDataset(folder, 8)


def test_an_uncaptioned_folder_still_trains_without_captions(tmp_path):
    """Unconditional, class and VAE training never needed captions: an image without one is captioned ''."""
    for name in ("cat/1.png", "cat/2.png", "dog/3.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "cat" / "1.txt").write_text("a cat")  # even one captioned image leaves the rest ''
    dataset = ImageFolderDataset(tmp_path, 8, require_classes=True)
    assert dataset.captions == ["a cat", "", ""] and dataset.class_names == ["cat", "dog"]


def test_where_captions_are_required_a_missing_one_names_the_image(tmp_path):
    folder = make_folder(tmp_path, "jsonl")
    write_captions(folder, "jsonl", {name: c for name, c in CAPTIONS.items() if name not in ("b.jpg", "c.jpeg")})
    with pytest.raises(MinidiffError) as error:
        ImageFolderDataset(folder, 8, require_captions=True)
    message = str(error.value)
    assert message.startswith("image 'b.jpg' (and 1 other image(s))") and "has no caption" in message
    assert "metadata.jsonl or metadata.csv, or its caption in 'b.txt'" in message and "\n" not in message


def test_where_captions_are_required_a_folder_without_any_says_how_to_add_them(tmp_path):
    folder = make_folder(tmp_path, "txt")
    for name in CAPTIONS:
        (folder / name).with_suffix(".txt").unlink()
    with pytest.raises(MinidiffError, match="' has no captions, and this command learns or judges captions: add a "
                                            "metadata.jsonl or metadata.csv"):
        ImageFolderDataset(folder, 8, require_captions=True)


# -- through the command line --------------------------------------------------------------------
@pytest.fixture
def clip_file(tmp_path):
    return tiny_clip_file(tmp_path / "clip.safetensors")


@pytest.mark.parametrize("fmt", ["txt", "csv"])
def test_train_on_a_txt_or_csv_folder_through_the_cli(tmp_path, toml, clip_file, fmt):
    folder = make_folder(tmp_path / "data", fmt)
    out = tmp_path / "run"
    result = run_cli("train", *TINY_TRAIN, "--config", str(toml), "--data", str(folder), "--conditioner", "clip",
                     "--clip-weights", str(clip_file), "--max-steps", "2", "--sample-every", "1000", "--out", str(out))
    assert result.returncode == 0, result.stderr
    from minidiff_cli.files.model_file import read_config

    config = read_config(out / MODEL)
    assert {"purple", "round", "yellow"} <= set(config["vocabulary"])  # the captions were read


def _train(tmp_path, toml, clip_file, folder, *more):
    return timed_cli("train", *TINY_TRAIN, "--config", toml, "--data", folder, "--conditioner", "clip",
                     "--clip-weights", clip_file, "--max-steps", "1", "--out", tmp_path / "run", *more)


def test_disagreeing_sources_stop_train_in_one_line_before_anything_is_made(tmp_path, toml, clip_file):
    folder = make_folder(tmp_path / "data", "csv")
    (folder / "a.txt").write_text("a green square")
    assert_error(_train(tmp_path, toml, clip_file, folder), "two captions for 'a.png'", "a.txt", "metadata.csv")
    assert not (tmp_path / "run").exists()
    write_captions(folder, "jsonl", CAPTIONS)
    assert_error(_train(tmp_path, toml, clip_file, folder), "holds both metadata.jsonl and metadata.csv")
    assert not (tmp_path / "run").exists()


def test_a_missing_caption_stops_train_and_clip_train_in_one_line(tmp_path, toml, clip_file):
    folder = make_folder(tmp_path / "data", "txt")
    (folder / "sub" / "deeper" / "e.txt").unlink()
    assert_error(_train(tmp_path, toml, clip_file, folder), "image 'sub/deeper/e.PNG'", "has no caption",
                 "sub/deeper/e.txt")
    assert not (tmp_path / "run").exists()
    clip_out = tmp_path / "clip-run.safetensors"
    assert_error(timed_cli("clip", "train", "--data", folder, "--image-size", "16", "--out", clip_out, "--quiet"),
                 "image 'sub/deeper/e.PNG'", "has no caption")
    assert not clip_out.exists()


def test_class_training_on_a_partly_captioned_folder_is_unchanged(tmp_path, toml):
    for k, name in enumerate(("blue/1.png", "blue/2.png", "red/3.png", "red/4.png")):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (60 * k, 0, 0)).save(tmp_path / "data" / name)
    (tmp_path / "data" / "red" / "3.txt").write_text("a red thing")
    rc, _, err = run_in_process("train", *TINY_TRAIN, "--config", toml, "--data", tmp_path / "data",
                                "--conditioner", "class", "--max-steps", "1", "--sample-every", "1000",
                                "--out", tmp_path / "run")
    assert rc == 0, err


# -- hostile files ---------------------------------------------------------------------------------
def _one_image(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "a.png")
    return folder


@pytest.mark.hostile
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize("name, message", [
    ("../../etc/passwd", "which is outside"),
    ("sub/../../a.png", "which is outside"),
    ("/etc/passwd", "an absolute path"),
    ("/tmp/a.png", "an absolute path"),
    ("", "has an empty or unreadable \"file_name\""),
    ("a.png\0.txt", "has an empty or unreadable \"file_name\""),
    ("notes.txt", "which is not in"),
])
def test_a_file_name_outside_the_folder_or_not_an_image_is_one_line(tmp_path, toml, fmt, name, message):
    folder = _one_image(tmp_path)
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    else:
        with open(folder / "metadata.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["file_name", "text"], [name, "x"]])
    assert_error(timed_cli("train", "--data", folder, "--conditioner", "class", *TINY_TRAIN, "--config", toml,
                           "--max-steps", "1", "--out", tmp_path / "run"),
                 f"metadata.{fmt}' line {1 if fmt == 'jsonl' else 2}", message)
    assert not (tmp_path / "run").exists()


@pytest.mark.hostile
@pytest.mark.parametrize("content, message", [
    (b"", "is empty; its first row must name the columns file_name and text"),
    (b"name,text\na.png,x\n", "has no \"file_name\" column (its header: \"name,text\")"),
    (b"file_name,description\na.png,x\n", "has no \"text\" column"),
    (b"file_name,text\na.png\n", "line 2 has 1 field(s); the header names 2"),
    (b"file_name,text\na.png,caf\xe9\n", "is not UTF-8 text"),
    (b'file_name,text\na.png,"unclosed\n', "is not valid CSV"),
])
def test_a_hostile_metadata_csv_is_one_line(tmp_path, toml, content, message):
    folder = _one_image(tmp_path)
    (folder / "metadata.csv").write_bytes(content)
    assert_error(timed_cli("train", "--data", folder, "--conditioner", "class", *TINY_TRAIN, "--config", toml,
                           "--max-steps", "1", "--out", tmp_path / "run"), "metadata.csv", message)


@pytest.mark.hostile
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
@pytest.mark.parametrize("length", [MAX_CAPTION_CHARS + 1, 200_000])  # 200,000: past csv's own field limit
def test_a_caption_too_long_is_the_same_error_from_every_source(tmp_path, fmt, length):
    folder = _one_image(tmp_path)
    write_captions(folder, fmt, {"a.png": "word " * (length // 5 + 1)})
    with pytest.raises(MinidiffError, match=f"holds a caption longer than {MAX_CAPTION_CHARS:,} characters; "
                                            "shorten it") as error:
        ImageFolderDataset(folder, 8)
    assert "\n" not in str(error.value)
    (folder / "a.txt").unlink(missing_ok=True)
    write_captions(folder, fmt, {"a.png": "word " * (MAX_CAPTION_CHARS // 5)})  # at the bound: read
    assert len(ImageFolderDataset(folder, 8).captions[0]) <= MAX_CAPTION_CHARS


@pytest.mark.hostile
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_metadata_line_past_the_bound_is_refused_before_it_is_parsed(tmp_path, fmt):
    folder = _one_image(tmp_path)
    header = "file_name,text\n" if fmt == "csv" else ""
    (folder / f"metadata.{fmt}").write_text(header + "x" * (MAX_LINE_CHARS + 10) + "\n")
    with pytest.raises(MinidiffError, match=f"metadata.{fmt}' line {2 if header else 1} is longer than "
                                            f"{MAX_LINE_CHARS:,} characters"):
        ImageFolderDataset(folder, 8)


@pytest.mark.hostile
def test_a_huge_txt_is_refused_after_reading_its_first_bytes(tmp_path):
    folder = _one_image(tmp_path)
    with open(folder / "a.txt", "wb") as fh:  # 4 GiB, sparse: costs nothing unless it is read whole
        fh.truncate(4 << 30)
    with pytest.raises(MinidiffError, match="caption file '.*a.txt' holds a caption longer than"):
        ImageFolderDataset(folder, 8)


@pytest.mark.hostile
def test_a_txt_that_is_not_utf8_is_one_line(tmp_path, toml):
    folder = _one_image(tmp_path)
    (folder / "a.txt").write_bytes(b"caf\xe9")
    assert_error(timed_cli("train", "--data", folder, "--conditioner", "class", *TINY_TRAIN, "--config", toml,
                           "--max-steps", "1", "--out", tmp_path / "run"), "a.txt' is not UTF-8 text")


@pytest.mark.hostile
def test_a_txt_symlink_is_followed_like_a_metadata_symlink(tmp_path):
    """A link to a file is read (as a linked metadata.jsonl is), within the same bounds; a link to
    something that is not a file (a folder, nothing, a pipe) is one line, and nothing waits on a pipe."""
    folder = _one_image(tmp_path)
    (tmp_path / "elsewhere.txt").write_text("a linked caption")
    (folder / "a.txt").symlink_to(tmp_path / "elsewhere.txt")
    assert ImageFolderDataset(folder, 8).captions == ["a linked caption"]
    (tmp_path / "elsewhere.txt").write_bytes(b"x" * (8 * MAX_CAPTION_CHARS))
    with pytest.raises(MinidiffError, match="holds a caption longer than"):
        ImageFolderDataset(folder, 8)
    os.mkfifo(tmp_path / "pipe")
    for target in (tmp_path, tmp_path / "gone.txt", tmp_path / "pipe"):
        (folder / "a.txt").unlink()
        (folder / "a.txt").symlink_to(target)
        with pytest.raises(MinidiffError, match="a.txt' is not a regular file"):
            ImageFolderDataset(folder, 8)

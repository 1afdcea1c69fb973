"""The dataset contract (minidiff_cli.data.dataset) and the built-in data sets: shapes and imagefolder."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import assert_error, timed_cli
from PIL import Image
from tinymodels import TINY_TRAIN

from minidiff_cli import plugins
from minidiff_cli.data.dataset import caption_set, check_dataset
from minidiff_cli.data.holdout import parse_holdout
from minidiff_cli.data.images import pil_to_tensor, tensor_to_pil
from minidiff_cli.data.shapes import BACKGROUNDS, COLOURS, DEFAULT_SHAPES, SHAPES, ShapesDataset, backgrounds_for
from minidiff_cli.errors import MinidiffError


@pytest.fixture(scope="module")
def make_shapes():
    return plugins.get_dataset("shapes")


@pytest.fixture(scope="module")
def make_folder():
    return plugins.get_dataset("imagefolder")


# -- the contract's helpers ----------------------------------------------------------
def test_pil_to_tensor_maps_0_255_to_minus_one_one_and_back():
    image = Image.new("RGB", (3, 2), (0, 255, 51))
    tensor = pil_to_tensor(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    assert tensor_to_pil(tensor).getpixel((2, 1)) == (0, 255, 51)


def test_parse_holdout_reads_pairs_in_several_spellings():
    assert parse_holdout("purple triangle, Red-Square; blue:circle") == [
        ("purple", "triangle"), ("red", "square"), ("blue", "circle")]
    assert parse_holdout([("green", "star")]) == [("green", "star")]
    assert parse_holdout("") == [] and parse_holdout(None) == []
    assert parse_holdout("red circle, red circle") == [("red", "circle")]


def test_parse_holdout_rejects_an_item_that_is_not_a_pair():
    with pytest.raises(MinidiffError, match="colour shape"):
        parse_holdout("purple, triangle")


def test_the_datasets_plugin_imports_no_torch():
    code = ("import sys, minidiff_cli.builtin.datasets; "
            "sys.exit(1 if {'torch', 'PIL', 'numpy'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- shapes ------------------------------------------------------------------------
def test_shapes_keeps_the_dataset_contract(make_shapes):
    dataset = make_shapes(None, image_size=32)
    item = check_dataset(dataset, "shapes")
    assert len(dataset) == 100_000 and dataset.channels == 3 and dataset.image_size == 32
    assert dataset.class_names[item["label"]] in item["caption"]


def test_same_seed_and_index_give_the_same_item_in_any_order(make_shapes):
    first = make_shapes(None, image_size=32, seed=5)
    second = make_shapes(None, image_size=32, seed=5)
    backwards = [second[i] for i in reversed(range(20))][::-1]
    for i in range(20):
        a, b = first[i], backwards[i]
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["label"] == b["label"]


def test_different_index_or_seed_gives_a_different_image(make_shapes):
    dataset = make_shapes(None, image_size=32, seed=0)
    other_seed = make_shapes(None, image_size=32, seed=1)
    images = [dataset[i]["image"] for i in range(50)]
    assert all(not torch.equal(images[i], images[i + 1]) for i in range(49))
    assert all(not torch.equal(dataset[i]["image"], other_seed[i]["image"]) for i in range(20))


@pytest.mark.parametrize("size", [16, 32, 45, 64])
def test_images_have_the_asked_size_and_values_in_minus_one_one(make_shapes, size):
    dataset = make_shapes(None, image_size=size)
    for i in range(10):
        image = dataset[i]["image"]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1


def test_length_is_configurable_and_indices_past_it_fail(make_shapes):
    dataset = make_shapes(None, image_size=32, length="1_000")
    assert len(dataset) == 1000
    assert torch.equal(dataset[-1]["image"], dataset[999]["image"])
    with pytest.raises(IndexError):
        dataset[1000]


def test_class_names_are_colour_shape_pairs_in_colour_major_order(make_shapes):
    dataset = make_shapes(None, image_size=32)
    assert dataset.class_names == [f"{c} {s}" for c in COLOURS for s in DEFAULT_SHAPES]
    assert dataset.class_names[:2] == ["red circle", "red square"]


def test_every_class_appears(make_shapes):
    dataset = make_shapes(None, image_size=16, shapes="circle,square,triangle,star")
    seen = Counter(dataset[i]["label"] for i in range(1000))
    assert set(seen) == set(range(len(COLOURS) * len(SHAPES)))


def test_held_out_pairs_never_appear_but_keep_their_labels(make_shapes):
    full = make_shapes(None, image_size=16)
    dataset = make_shapes(None, image_size=16, holdout=[("purple", "triangle"), ("red", "circle")])
    assert dataset.class_names == full.class_names
    held = {full.class_names.index("purple triangle"), full.class_names.index("red circle")}
    labels = Counter()
    for i in range(2000):
        spec = dataset.spec(i)
        assert (spec.colour, spec.shape) not in {("purple", "triangle"), ("red", "circle")}
        labels[dataset.class_names.index(f"{spec.colour} {spec.shape}")] += 1
    assert set(labels) == set(range(len(full.class_names))) - held
    captions = dataset.all_captions()
    assert not any("purple triangle" in c or "red circle" in c for c in captions)
    assert any("purple circle" in c for c in captions)


def test_holdout_as_text_is_parsed(make_shapes):
    dataset = make_shapes(None, image_size=16, holdout="purple triangle")
    assert dataset.holdout == [("purple", "triangle")]


@pytest.mark.parametrize("holdout, message", [
    ([("violet", "triangle")], "unknown colour 'violet'.*red, orange, yellow"),
    ([("red", "hexagon")], "unknown shape 'hexagon'.*circle, square, triangle"),
])
def test_unknown_holdout_names_are_errors_listing_the_valid_ones(make_shapes, holdout, message):
    with pytest.raises(MinidiffError, match=message):
        make_shapes(None, image_size=32, holdout=holdout)


def test_holding_out_every_class_is_an_error(make_shapes):
    with pytest.raises(MinidiffError, match="no class"):
        make_shapes(None, image_size=32, colours="red", shapes="circle", holdout="red circle")


def test_unknown_option_is_an_error(make_shapes):
    with pytest.raises(MinidiffError, match="unknown option 'lenght'.*length"):
        make_shapes(None, image_size=32, lenght=5)


def _coverage(image, background):
    """Fraction of the picture covered by the shape, from each pixel's distance to the background."""
    pixels = (image.permute(1, 2, 0) + 1) * 127.5
    distance = (pixels - torch.tensor(background, dtype=torch.float32)).norm(dim=2)
    return float((distance / distance.max()).mean())


def test_captions_name_the_drawn_colour_shape_background_and_size():
    dataset = ShapesDataset(32, seed=3, shapes=SHAPES)
    areas = {(shape, word): [] for shape in SHAPES for word in ("small", "large")}
    for i in range(600):
        item, spec = dataset[i], dataset.spec(i)
        caption, image = item["caption"], item["image"]
        assert f"{spec.colour} {spec.shape}" in caption
        assert dataset.class_names[item["label"]] == f"{spec.colour} {spec.shape}"
        assert spec.background in backgrounds_for(spec.colour)
        # The background named is the one drawn: the picture's corner has its colour.
        corner = tuple(round(float(v)) for v in (image[:, 0, 0] + 1) * 127.5)
        assert corner == BACKGROUNDS[spec.background]
        if " background" in caption:
            assert caption.endswith(f" {spec.background} background")
        for word in ("small", "large"):
            if f" {word} " in f" {caption} ":
                areas[spec.shape, word].append(_coverage(image, BACKGROUNDS[spec.background]))
    for shape in SHAPES:  # every "small" shape is smaller than every "large" one
        assert areas[shape, "small"] and areas[shape, "large"]
        assert max(areas[shape, "small"]) < min(areas[shape, "large"])


def test_captions_use_the_right_article():
    dataset = ShapesDataset(32, colours="orange", shapes="circle")
    captions = dataset.all_captions()
    assert "an orange circle" in captions and "a photo of an orange circle" in captions
    assert "a large orange circle on a white background" in captions
    assert not any(" a orange" in f" {c}" for c in captions)


def test_all_captions_is_the_finite_set_items_come_from():
    dataset = ShapesDataset(32, seed=0)
    captions = set(dataset.all_captions())
    assert caption_set(dataset) == sorted(captions)
    assert all(dataset[i]["caption"] in captions for i in range(300))
    label = dataset.class_names.index("blue square")
    assert all("blue square" in c for c in dataset.captions_of_class(label))
    assert "a blue square" in dataset.captions_of_class(label)


def test_batches_collate_with_the_default_data_loader(make_shapes):
    loader = torch.utils.data.DataLoader(make_shapes(None, image_size=16), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["caption"]) == 4
    assert batch["label"].dtype == torch.int64


# -- imagefolder -------------------------------------------------------------------
def _save(path, colour=(200, 0, 0), size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def test_imagefolder_reads_captions_from_metadata_jsonl(tmp_path, make_folder):
    _save(tmp_path / "a.png")
    _save(tmp_path / "sub" / "b.jpg")
    lines = [{"file_name": "a.png", "text": "a red thing"}, {"file_name": "sub/b.jpg", "text": "another"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    dataset = make_folder(tmp_path, image_size=4)
    check_dataset(dataset, "imagefolder")
    assert sorted(dataset[i]["caption"] for i in range(len(dataset))) == ["a red thing", "another"]
    assert dataset.all_captions() == ["a red thing", "another"]


def test_imagefolder_reads_captions_from_txt_files_next_to_images(tmp_path, make_folder):
    _save(tmp_path / "one.png")
    (tmp_path / "one.txt").write_text("  a small\nred square \n")
    _save(tmp_path / "two.webp")
    dataset = make_folder(str(tmp_path), image_size=8)
    captions = {dataset.files[i].name: dataset[i]["caption"] for i in range(len(dataset))}
    assert captions == {"one.png": "a small red square", "two.webp": ""}


def test_imagefolder_finds_images_recursively_with_any_case_and_skips_hidden(tmp_path, make_folder):
    _save(tmp_path / "x" / "y" / "deep.PNG")
    _save(tmp_path / "top.JPEG")
    _save(tmp_path / ".cache" / "hidden.png")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = make_folder(tmp_path, image_size=8)
    assert sorted(p.name for p in dataset.files) == ["deep.PNG", "top.JPEG"]


def test_imagefolder_takes_classes_from_first_level_subfolders(tmp_path, make_folder):
    _save(tmp_path / "dog" / "1.png")
    _save(tmp_path / "cat" / "2.png")
    _save(tmp_path / "cat" / "inner" / "3.png")
    dataset = make_folder(tmp_path, image_size=8, require_classes=True)
    assert dataset.class_names == ["cat", "dog"]
    labels = {p.name: dataset[i]["label"] for i, p in enumerate(dataset.files)}
    assert labels == {"1.png": 1, "2.png": 0, "3.png": 0}


def test_imagefolder_without_subfolders_has_no_classes(tmp_path, make_folder):
    _save(tmp_path / "loose.png")
    _save(tmp_path / "cat" / "2.png")
    dataset = make_folder(tmp_path, image_size=8)
    assert dataset.class_names == [] and {dataset[i]["label"] for i in range(2)} == {-1}


def test_imagefolder_resizes_the_shorter_side_and_crops_the_centre(tmp_path, make_folder):
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 255, 0), (20, 0, 40, 20))
    image.save(tmp_path / "wide.png")
    item = make_folder(tmp_path, image_size=10)[0]
    assert item["image"].shape == (3, 10, 10)
    assert torch.allclose(item["image"][:, 5, 5], torch.tensor([-1.0, 1.0, -1.0]))
    # Only the green middle is left (LANCZOS lets a trace of red into the outer columns).
    assert item["image"][1].min() > 0.8 and item["image"][0, :, 2:-2].max() < -0.95


def test_imagefolder_puts_transparent_and_gray_images_on_rgb_white(tmp_path, make_folder):
    _save(tmp_path / "clear.png", colour=(0, 0, 0, 0), mode="RGBA")
    _save(tmp_path / "gray.png", colour=0, mode="L")
    dataset = make_folder(tmp_path, image_size=4)
    images = {p.name: dataset[i]["image"] for i, p in enumerate(dataset.files)}
    assert torch.all(images["clear.png"] == 1) and torch.all(images["gray.png"] == -1)
    assert images["gray.png"].shape == (3, 4, 4)


def test_imagefolder_skips_unreadable_images_and_counts_them(tmp_path, make_folder, capsys):
    _save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    truncated = (_save(tmp_path / "cut.png", size=(16, 16))).read_bytes()
    (tmp_path / "cut.png").write_bytes(truncated[:-20])
    dataset = make_folder(tmp_path, image_size=8)
    assert dataset.skipped == 2 and [p.name for p in dataset.files] == ["good.png"]
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("minidiff: warning: skipped 2 unreadable") and "\n" not in warning


def test_imagefolder_with_only_unreadable_images_is_an_error(tmp_path, make_folder, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(MinidiffError, match="none of the 1 images"):
        make_folder(tmp_path, image_size=8)


def _missing(tmp_path):
    return tmp_path / "nowhere"


def _a_file(tmp_path):
    return _save(tmp_path / "f.png")


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize("make_root, message", [
    (_missing, "'.*nowhere' does not exist"),
    (_a_file, "is not a folder"),
    (_empty, "no images .* found in"),
])
def test_imagefolder_bad_folders_are_one_line_errors(tmp_path, make_folder, make_root, message):
    with pytest.raises(MinidiffError, match=message) as error:
        make_folder(make_root(tmp_path), image_size=8)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("lines, message", [
    (['{"file_name": "a.png", "text": "ok"}', '{"file_name": "a.png", text}'], "line 2 is not valid JSON"),
    (['{"file_name": "gone.png", "text": "x"}'], "line 1 names 'gone.png', which is not in"),
    (['{"text": "x"}'], "line 1 has no \"file_name\""),
    (['{"file_name": "a.png"}'], "line 1 has no \"text\""),
])
def test_imagefolder_bad_metadata_is_an_error_naming_the_line(tmp_path, make_folder, lines, message):
    _save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MinidiffError, match=message) as error:
        make_folder(tmp_path, image_size=8)
    assert "metadata.jsonl" in str(error.value) and "\n" not in str(error.value)


def test_imagefolder_class_conditioning_needs_subfolders(tmp_path, make_folder):
    _save(tmp_path / "a.png")
    with pytest.raises(MinidiffError, match="one subfolder per class"):
        make_folder(tmp_path, image_size=8, require_classes="true")


def test_imagefolder_cannot_hold_out_pairs(tmp_path, make_folder):
    _save(tmp_path / "a.png")
    with pytest.raises(MinidiffError, match="holdout"):
        make_folder(tmp_path, image_size=8, holdout=[("red", "circle")])


# -- hostile captions ----------------------------------------------------------------
def captioned_folder(tmp_path: Path, metadata: bytes) -> Path:
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "a.png")
    (folder / "metadata.jsonl").write_bytes(metadata)
    return folder


@pytest.mark.hostile
@pytest.mark.parametrize("metadata, message", [
    (b'{"file_name": "a.png", "text": "caf\xe9"}\n', "is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1 is nested too deeply"),
])
def test_a_hostile_metadata_jsonl_is_one_line(tmp_path, toml, metadata, message):
    data = captioned_folder(tmp_path, metadata)
    assert_error(timed_cli("train", "--data", data, "--conditioner", "class", *TINY_TRAIN, "--config", toml,
                           "--max-steps", "1", "--out", tmp_path / "run"), "metadata.jsonl", message)


# -- hostile pictures ------------------------------------------------------------------------
@pytest.mark.hostile
def test_imagefolder_skips_thin_strips_and_bombs_from_their_headers(tmp_path, make_folder, capsys, monkeypatch):
    _save(tmp_path / "good.png")
    Image.new("RGB", (2_000_000, 1)).save(tmp_path / "strip.png")  # 5.9 KB; fitted to 8 px: 16,000,000 x 8
    Image.new("L", (40, 40)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: more than Pillow allows
    dataset = make_folder(tmp_path, image_size=8)
    assert dataset.skipped == 2 and [p.name for p in dataset.files] == ["good.png"]
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("minidiff: warning: skipped 2 unreadable image(s)") and "\n" not in warning
    assert "e.g. 'bomb.png' (" in warning and "more than Pillow's limit of 1000" in warning
    assert dataset[0]["image"].shape == (3, 8, 8)


@pytest.mark.hostile
def test_training_on_a_folder_of_thin_strips_is_one_line(tmp_path, toml):
    folder = tmp_path / "strips"
    folder.mkdir()
    for k in range(2):
        Image.new("RGB", (89_000, 1), (k, 0, 0)).save(folder / f"{k}.png")
    assert_error(timed_cli("train", "--data", folder, *TINY_TRAIN, "--out", tmp_path / "run"),
                 "none of the 2 images")
    assert not (tmp_path / "run").exists()

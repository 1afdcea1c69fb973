"""The heuristic judge of generated pictures: it must name clean dataset pictures almost always."""

import pytest
import torch
from PIL import Image, ImageFilter

from minidiff_cli.data.images import pil_to_tensor
from minidiff_cli.data.shapes import COLOURS, SHAPES, ShapesDataset, ShapeSpec, draw
from minidiff_cli.evaluation.shape_classifier import analyse, classify


def _accuracy(dataset, count, transform=lambda image: image):
    colour_hits = shape_hits = 0
    for i in range(count):
        spec = dataset.spec(i)
        colour, shape = classify(transform(draw(spec, dataset.image_size)))
        colour_hits += colour == spec.colour
        shape_hits += shape == spec.shape
    return colour_hits / count, shape_hits / count


def test_names_colour_and_shape_of_600_clean_32px_pictures_with_at_least_97_percent_accuracy():
    dataset = ShapesDataset(32, seed=2024, shapes=SHAPES)  # stars too, every class
    colour, shape = _accuracy(dataset, 600)
    assert colour >= 0.97 and shape >= 0.97, (colour, shape)


@pytest.mark.parametrize("size", [20, 64, 100])
def test_works_at_other_sizes(size):
    colour, shape = _accuracy(ShapesDataset(size, seed=size, shapes=SHAPES), 60)
    assert colour >= 0.97 and shape >= 0.97, (colour, shape)


def test_survives_the_blur_and_noise_of_a_model_output():
    noise = torch.Generator().manual_seed(0)

    def degrade(image):
        tensor = pil_to_tensor(image.filter(ImageFilter.GaussianBlur(0.8)))
        return (tensor + 0.1 * torch.randn(tensor.shape, generator=noise)).clamp(-1, 1)

    colour, shape = _accuracy(ShapesDataset(32, seed=9, shapes=SHAPES), 200, degrade)
    assert colour >= 0.95 and shape >= 0.95, (colour, shape)


def test_tensor_and_pil_inputs_agree():
    dataset = ShapesDataset(32, seed=4)
    for i in range(20):
        item = dataset[i]
        assert classify(item["image"]) == classify(draw(dataset.spec(i), 32))


@pytest.mark.parametrize("angle", [0, 15, 30, 45, 60, 75])
def test_a_square_is_a_square_at_any_rotation(angle):
    spec = ShapeSpec("green", "square", "white", 0.5, (0.5, 0.5), angle, "")
    assert classify(draw(spec, 32)) == ("green", "square")


def test_every_palette_colour_is_named_on_every_background_it_is_drawn_on():
    for colour in COLOURS:
        spec = ShapeSpec(colour, "circle", "black" if colour != "black" else "white", 0.6, (0.5, 0.5), 0, "")
        assert classify(draw(spec, 32))[0] == colour


def test_a_blank_picture_has_no_colour_and_no_shape():
    assert classify(Image.new("RGB", (32, 32), (200, 30, 30))) == (None, None)
    assert classify(torch.zeros(3, 32, 32)) == (None, None)
    result = analyse(torch.full((3, 32, 32), -1.0))
    assert result.colour is None and result.shape is None and result.background == (0.0, 0.0, 0.0)


def test_a_faint_smudge_is_not_a_shape():
    image = torch.zeros(3, 32, 32)
    image[:, 10:20, 10:20] += 0.1  # 13 levels of 255: nothing a viewer would call a shape
    assert classify(image) == (None, None)


def test_a_single_channel_tensor_is_read_as_gray():
    image = torch.full((1, 32, 32), -1.0)
    image[:, 8:24, 8:24] = 1.0
    assert classify(image)[1] == "square"

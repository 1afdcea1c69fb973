"""The ``shapes`` dataset: coloured shapes on plain backgrounds, drawn on the fly.

Item ``i`` of a dataset with seed ``s`` is drawn from its own random generator,
seeded from ``(s, i)`` alone, so any index can be produced in any order, by any
data-loader worker or rank, and always gives the same picture and caption. The
length is virtual (100 000 by default): nothing is stored.

Each picture is one shape (``SHAPES``) in one fixed palette colour (``COLOURS``)
on a plain background from a named palette (``BACKGROUNDS``), never one too close
to the shape's colour. Its size (the diameter of the circle that just holds it)
is 45-85 % of the image side, at a random position and rotation. Shapes are drawn
at 4x (less above 64 pixels) and box-filtered down, so edges are clean at 32x32.

Classes are ``"colour shape"`` pairs in colour-major order (``"red circle"``,
``"red square"``, ...); an item's label is its index in ``class_names``. Pairs
held out (``holdout=[("purple", "triangle")]``) are never drawn, but stay in
``class_names`` so that labels mean the same with and without a holdout.

Captions come from the templates in ``CAPTION_TEMPLATES``; the size word and the
background name in a caption always describe the picture.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from minidiff_cli.data.images import pil_to_tensor
from minidiff_cli.data.vocabulary import article
from minidiff_cli.errors import MinidiffError

# Fixed sRGB values, far apart so that a shape's colour is never in doubt.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 215),
    "blue": (35, 95, 230),
    "purple": (150, 50, 200),
    "pink": (245, 120, 190),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light gray": (190, 190, 190),
    "gray": (128, 128, 128),
    "dark gray": (60, 60, 60),
    "black": (15, 15, 15),
    "beige": (235, 220, 190),
    "navy": (20, 30, 70),
}

# Every shape this module can draw; DEFAULT_SHAPES is what the dataset uses unless told.
SHAPES = ("circle", "square", "triangle", "star")
DEFAULT_SHAPES = ("circle", "square", "triangle")
STAR_INNER_RATIO = 0.5  # inner / outer radius: a fat star keeps its points at 32x32

SIZE_RANGE = (0.45, 0.85)  # diameter of the enclosing circle, as a fraction of the side
SMALL_BELOW, LARGE_ABOVE = 0.58, 0.72  # size words only where the size is unmistakable
MIN_CONTRAST = 110.0  # least RGB distance between a shape and its background
SUPERSAMPLE = 4

# "{a}" is the article for the word after it ("a"/"an"), filled in by _render_caption.
PLAIN_TEMPLATES = ("{a} {colour} {shape}", "{colour} {shape}", "the {colour} {shape}",
                   "a photo of {a} {colour} {shape}", "a picture of {a} {colour} {shape}",
                   "a drawing of {a} {colour} {shape}", "an image of {a} {colour} {shape}")
SIZED_TEMPLATES = ("{a} {size} {colour} {shape}", "{a} {size} {colour} {shape} on {a} {background} background")
BACKGROUND_TEMPLATES = ("{a} {colour} {shape} on {a} {background} background",)
CAPTION_TEMPLATES = PLAIN_TEMPLATES + SIZED_TEMPLATES + BACKGROUND_TEMPLATES
# Chance of each kind of template, when the picture allows it (a size word needs a clear size).
TEMPLATE_WEIGHTS = {"plain": 0.5, "sized": 0.2, "background": 0.3}


def backgrounds_for(colour: str) -> list[str]:
    """The background names a shape of ``colour`` may be drawn on (enough contrast)."""
    rgb = COLOURS[colour]
    return [name for name, bg in BACKGROUNDS.items()
            if sum((a - b) ** 2 for a, b in zip(rgb, bg)) ** 0.5 >= MIN_CONTRAST]


def size_word(size: float) -> str | None:
    """"small", "large", or None for the middle sizes, which no caption names."""
    return "small" if size < SMALL_BELOW else "large" if size > LARGE_ABOVE else None


@dataclass(frozen=True)
class ShapeSpec:
    """Everything random about one item; ``draw`` turns it into a picture."""

    colour: str
    shape: str
    background: str
    size: float  # diameter of the enclosing circle / image side
    center: tuple[float, float]  # in fractions of the image side
    angle: float  # degrees
    caption: str

    @property
    def size_word(self) -> str | None:
        return size_word(self.size)


def draw(spec: ShapeSpec, image_size: int) -> Image.Image:
    """The RGB picture of ``spec``, ``image_size`` pixels square."""
    # Supersample small pictures 4x; big ones need less to look as smooth (and would be slow).
    scale = max(1, min(SUPERSAMPLE, 256 // image_size))
    side = image_size * scale
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[spec.background])
    pen = ImageDraw.Draw(canvas)
    cx, cy = spec.center[0] * side, spec.center[1] * side
    radius = spec.size * side / 2
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        pen.polygon(_polygon(spec.shape, cx, cy, radius, spec.angle), fill=fill)
    # A box filter averages each scale x scale block: exact anti-aliasing, no ringing.
    return canvas.resize((image_size, image_size), Image.BOX) if scale > 1 else canvas


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    import math

    if shape == "square":
        radii, first = [radius] * 4, 45.0
    elif shape == "triangle":
        radii, first = [radius] * 3, -90.0  # pointing up at angle 0 (y grows downwards)
    elif shape == "star":
        radii, first = [radius, radius * STAR_INNER_RATIO] * 5, -90.0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    step = 360.0 / len(radii)
    points = []
    for k, r in enumerate(radii):
        theta = math.radians(first + angle + k * step)
        points.append((cx + r * math.cos(theta), cy + r * math.sin(theta)))
    return points


def _render_caption(template: str, **words: str) -> str:
    """Fill a template, choosing each "{a}" by the word that follows it."""
    parts = template.split(" ")
    out = []
    for k, part in enumerate(parts):
        if part == "{a}":
            out.append(article(parts[k + 1].format(**words)))
        else:
            out.append(part.format(**words))
    return " ".join(out)


def captions_for(colour: str, shape: str) -> list[str]:
    """Every caption an item of class ``colour shape`` can get."""
    captions = [_render_caption(t, colour=colour, shape=shape) for t in PLAIN_TEMPLATES]
    for background in backgrounds_for(colour):
        captions += [_render_caption(t, colour=colour, shape=shape, background=background)
                     for t in BACKGROUND_TEMPLATES]
        for size in ("small", "large"):
            captions += [_render_caption(t, colour=colour, shape=shape, background=background, size=size)
                         for t in SIZED_TEMPLATES]
    return sorted(set(captions))


def _choose_caption(rng: random.Random, colour: str, shape: str, background: str, size: float) -> str:
    word = size_word(size)
    kinds = [kind for kind in TEMPLATE_WEIGHTS if kind != "sized" or word is not None]
    kind = rng.choices(kinds, weights=[TEMPLATE_WEIGHTS[k] for k in kinds])[0]
    templates = {"plain": PLAIN_TEMPLATES, "sized": SIZED_TEMPLATES, "background": BACKGROUND_TEMPLATES}[kind]
    template = templates[rng.randrange(len(templates))]
    return _render_caption(template, colour=colour, shape=shape, background=background, size=word or "")


class ShapesDataset(Dataset):
    """Procedural coloured shapes; see the module docstring."""

    def __init__(self, image_size: int = 32, *, seed: int = 0, holdout: Sequence[tuple[str, str]] = (),
                 length: int = 100_000, colours: Sequence[str] | None = None,
                 shapes: Sequence[str] | None = None):
        self.colours = _names(colours, COLOURS, "colour", tuple(COLOURS))
        self.shapes = _names(shapes, SHAPES, "shape", DEFAULT_SHAPES)
        if int(image_size) < 8:
            raise MinidiffError(f"image size {image_size} is too small for shapes; use at least 8")
        if int(length) < 1:
            raise MinidiffError(f"length must be at least 1, got {length}")
        self.image_size, self.channels = int(image_size), 3
        self.seed, self.length = int(seed), int(length)
        self.class_names = [f"{c} {s}" for c in self.colours for s in self.shapes]
        self.holdout = self._check_holdout(holdout)
        held = {f"{c} {s}" for c, s in self.holdout}
        self.allowed = [k for k, name in enumerate(self.class_names) if name not in held]
        if not self.allowed:
            raise MinidiffError("the holdout leaves no class to train on; hold out fewer pairs")

    def _check_holdout(self, holdout: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        pairs = []
        for colour, shape in holdout:
            colour, shape = colour.lower(), shape.lower()
            if colour not in self.colours:
                raise MinidiffError(f"unknown colour '{colour}' in holdout; valid colours: {', '.join(self.colours)}")
            if shape not in self.shapes:
                raise MinidiffError(f"unknown shape '{shape}' in holdout; valid shapes: {', '.join(self.shapes)}")
            pairs.append((colour, shape))
        return pairs

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> ShapeSpec:
        """What item ``index`` shows: drawn from a generator seeded by (seed, index) only."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a shapes dataset of length {self.length}")
        # A string seed is hashed with SHA-512: the same in every process, unlike hash().
        rng = random.Random(f"minidiff-shapes:{self.seed}:{index}")
        label = self.allowed[rng.randrange(len(self.allowed))]
        colour, shape = self.class_names[label].split(" ")
        background = rng.choice(backgrounds_for(colour))
        size = rng.uniform(*SIZE_RANGE)
        margin = 0.03 + size / 2  # the enclosing circle stays inside the picture
        center = (rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin))
        angle = rng.uniform(0.0, 360.0)
        caption = _choose_caption(rng, colour, shape, background, size)
        return ShapeSpec(colour, shape, background, size, center, angle, caption)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index < 0:
            index += self.length
        spec = self.spec(index)
        image = pil_to_tensor(draw(spec, self.image_size))
        return {"image": image, "caption": spec.caption, "label": self.class_names.index(f"{spec.colour} {spec.shape}")}

    def captions_of_class(self, label: int) -> list[str]:
        colour, shape = self.class_names[label].split(" ")
        return captions_for(colour, shape)

    def all_captions(self) -> list[str]:
        """The captions of every class that is drawn (held-out classes excluded)."""
        return sorted({c for label in self.allowed for c in self.captions_of_class(label)})


def _names(chosen: Sequence[str] | str | None, valid, kind: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if chosen is None:
        return default
    if isinstance(chosen, str):
        chosen = [c for c in chosen.replace(",", " ").split() if c]
    chosen = tuple(dict.fromkeys(c.lower() for c in chosen))
    if not chosen:
        raise MinidiffError(f"no {kind}s chosen; pick some of: {', '.join(valid)}")
    unknown = [c for c in chosen if c not in valid]
    if unknown:
        raise MinidiffError(f"unknown {kind} '{unknown[0]}'; valid {kind}s: {', '.join(valid)}")
    return chosen

"""Name the colour and shape in a picture: the judge of what a model drew.

``classify(image) -> (colour, shape)`` for a PIL image or a [C, H, W] tensor in
[-1, 1], of any size. No learning, only geometry, so it cannot share a
model's blind spots:

1. the background colour is the median of the border pixels;
2. each pixel's distance from it (in RGB, where an edge pixel is a linear mix
   of shape and background) is thresholded at half the largest distance, and
   the biggest 8-connected blob is the shape;
3. its colour is the core pixels' median, named by the nearest ``COLOURS``
   entry in CIELAB (distances there roughly follow perceived differences);
4. its shape comes from the radial profile r(theta): the distance from the
   centroid to the edge (found at sub-pixel precision on the blob's coverage
   map) over a full turn. A circle's profile is flat; a triangle's, square's and
   star's repeat 3, 4 and 5 times a turn, so the strongest of those Fourier
   harmonics names the shape, whatever its rotation.

Parts are None when nothing stands out from the background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minidiff_cli.data.shapes import COLOURS

MIN_CONTRAST = 40.0  # RGB distance below which nothing is foreground
MIN_AREA = 0.01  # least blob area, as a fraction of the picture (the smallest shapes cover 6 %)
CIRCLE_BELOW = 0.05  # a profile whose 3rd-5th harmonics are all weaker than this is round
HARMONIC_SHAPES = {3: "triangle", 4: "square", 5: "star"}
ANGLES = 120  # profile samples per turn
WORKING_SIZE = 64  # bigger pictures are box-filtered down to this: as accurate, much faster


@dataclass
class Analysis:
    """What ``analyse`` found; ``colour`` and ``shape`` are None when no shape stands out."""

    colour: str | None
    shape: str | None
    rgb: tuple[float, float, float] | None = None  # the shape's measured colour
    background: tuple[float, float, float] | None = None
    area: float = 0.0  # covered fraction of the picture
    harmonics: dict[int, float] | None = None  # relative amplitude of r(theta)'s k-th harmonic


def classify(image) -> tuple[str | None, str | None]:
    """``(colour, shape)`` of the main shape in ``image``; ``(None, None)`` on a blank picture."""
    result = analyse(image)
    return result.colour, result.shape


def analyse(image) -> Analysis:
    """``classify``, with the measurements behind its answer."""
    pixels = _as_rgb_array(image)
    height, width, _ = pixels.shape
    background = _border_median(pixels)
    distance = np.linalg.norm(pixels - background, axis=2)
    top = np.sort(distance.ravel())[-max(3, distance.size // 200):].mean()
    if top < MIN_CONTRAST:
        return Analysis(None, None, background=tuple(background))
    blob = _largest_component(distance > top / 2)
    if blob.sum() < max(3, MIN_AREA * height * width):
        return Analysis(None, None, background=tuple(background))

    core = blob & (distance > 0.75 * distance[blob].max())
    rgb = np.median(pixels[core], axis=0)
    colour = _nearest_colour(rgb)
    coverage = _coverage(pixels, background, rgb, _dilate(blob))
    harmonics = _profile_harmonics(coverage)
    strongest = max(HARMONIC_SHAPES, key=lambda k: harmonics[k])
    shape = "circle" if harmonics[strongest] < CIRCLE_BELOW else HARMONIC_SHAPES[strongest]
    return Analysis(colour, shape, tuple(float(v) for v in rgb), tuple(float(v) for v in background),
                    float(coverage.sum() / (height * width)), harmonics)


# -- input -------------------------------------------------------------------------
def _as_rgb_array(image) -> np.ndarray:
    """[H, W, 3] float64 in 0..255 from a PIL image or a [C, H, W] tensor in [-1, 1]."""
    from PIL import Image

    if not hasattr(image, "convert"):
        array = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        if array.ndim != 3 or array.shape[0] not in (1, 3):
            raise ValueError(f"expected an image tensor [C, H, W] with C = 1 or 3, got {tuple(array.shape)}")
        array = (np.clip(array, -1, 1) + 1) * 127.5
        array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array
        if max(array.shape[1:]) <= WORKING_SIZE:
            return array.transpose(1, 2, 0).astype(np.float64)
        image = Image.fromarray(np.round(array.transpose(1, 2, 0)).astype(np.uint8), mode="RGB")
    image = image.convert("RGB")
    if max(image.size) > WORKING_SIZE:
        scale = WORKING_SIZE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BOX)
    return np.asarray(image, dtype=np.float64)


def _border_median(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return np.median(border, axis=0)


# -- segmentation ------------------------------------------------------------------
def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The biggest 8-connected region of ``mask``: a flood fill over a plain list (pictures here are small)."""
    padded = np.pad(mask, 1)  # a False frame: no bounds checks in the fill
    width = padded.shape[1]
    todo = padded.ravel().tolist()  # list access is far faster than numpy's, one element at a time
    neighbours = (-width - 1, -width, -width + 1, -1, 1, width - 1, width, width + 1)
    best: list[int] = []
    for start in np.flatnonzero(padded).tolist():
        if not todo[start]:
            continue
        todo[start] = False
        region, stack = [], [start]
        while stack:
            here = stack.pop()
            region.append(here)
            for step in neighbours:
                if todo[here + step]:
                    todo[here + step] = False
                    stack.append(here + step)
        if len(region) > len(best):
            best = region
    blob = np.zeros(padded.size, dtype=bool)
    blob[best] = True
    return blob.reshape(padded.shape)[1:-1, 1:-1]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel in all 8 directions, to take in the blob's soft edge."""
    grown = mask.copy()
    padded = np.pad(mask, 1)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            grown |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return grown


def _coverage(pixels: np.ndarray, background: np.ndarray, colour: np.ndarray, region: np.ndarray) -> np.ndarray:
    """How much of each pixel the shape covers, 0..1: an edge pixel is a mix a*colour + (1-a)*background."""
    direction = colour - background
    alpha = ((pixels - background) @ direction) / max(float(direction @ direction), 1e-6)
    return np.where(region, np.clip(alpha, 0.0, 1.0), 0.0)


# -- colour ------------------------------------------------------------------------
def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB in 0..255 (any leading shape) to CIELAB under D65."""
    rgb = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


_PALETTE_NAMES = list(COLOURS)
_PALETTE_LAB = srgb_to_lab([COLOURS[name] for name in _PALETTE_NAMES])


def _nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE_LAB - srgb_to_lab(rgb), axis=1)))]


# -- shape -------------------------------------------------------------------------
def _profile_harmonics(coverage: np.ndarray) -> dict[int, float]:
    """Amplitudes of harmonics 1-6 of r(theta), relative to the mean radius."""
    height, width = coverage.shape
    ys, xs = np.mgrid[0:height, 0:width]
    total = coverage.sum()
    cy, cx = (coverage * ys).sum() / total, (coverage * xs).sum() / total
    theta = np.linspace(0, 2 * np.pi, ANGLES, endpoint=False)
    covered_y, covered_x = np.nonzero(coverage)
    reach = np.hypot(covered_y - cy, covered_x - cx).max() + 2  # every ray leaves the blob by then
    step = 0.25
    radii = np.arange(0, reach + step, step)
    # Sample the coverage along each ray; the edge is its first fall below one half,
    # placed between the two samples around it by linear interpolation.
    values = _bilinear(coverage, cy + np.sin(theta)[:, None] * radii, cx + np.cos(theta)[:, None] * radii)
    values[:, 0] = 1.0
    out = np.argmax(values < 0.5, axis=1)
    before, after = values[np.arange(ANGLES), out - 1], values[np.arange(ANGLES), out]
    profile = (out - 1 + (before - 0.5) / np.maximum(before - after, 1e-9)) * step
    spectrum = np.abs(np.fft.rfft(profile)) * 2 / ANGLES
    mean = max(profile.mean(), 1e-6)
    return {k: float(spectrum[k] / mean) for k in range(1, 7)}


def _bilinear(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``image`` at fractional pixel-centre coordinates; 0 outside."""
    padded = np.pad(image, 1)
    y, x = y + 1, x + 1
    valid = (y >= 0) & (y <= padded.shape[0] - 1) & (x >= 0) & (x <= padded.shape[1] - 1)
    y, x = np.clip(y, 0, padded.shape[0] - 1.001), np.clip(x, 0, padded.shape[1] - 1.001)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - y0, x - x0
    value = (padded[y0, x0] * (1 - fy) * (1 - fx) + padded[y0 + 1, x0] * fy * (1 - fx)
             + padded[y0, x0 + 1] * (1 - fy) * fx + padded[y0 + 1, x0 + 1] * fy * fx)
    return np.where(valid, value, 0.0)

"""``ImageStart``: what a generation starts from instead of pure noise, and how far it goes.

``strength`` s in [0, 1] runs the last int(s * steps) steps of the sampler's grid, truncated
as diffusers' img2img and inpainting pipelines do (``get_timesteps``: min(int(steps * strength),
steps)): 1 runs every step, from (almost) pure noise. Where diffusers would run no step (and
fails or refuses), minidiff keeps its own answer: 0 returns the image, and 0 < s < 1 / steps
runs one step. stable-diffusion.cpp runs one step more than diffusers below s = 1 (its t_enc
+ 1). ``resample`` adds RePaint's resampling jumps at each step but the last (inpainting only).
Its ``params`` go into the PNG: strength, resample and the hashes of the image and mask
(``images.pixel_hash``), so that ``--from`` can tell whether it is given the same picture.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from minidiff_cli.errors import MinidiffError

DEFAULT_STRENGTH = 0.8  # image-to-image: keeps the layout, redraws the details (diffusers' default)
INPAINT_STRENGTH = 1.0  # inpainting: the hole is drawn from noise; what is kept comes from the image
MAX_RESAMPLE = 100  # each jump costs one more model call per step


@dataclass
class ImageStart:
    """An init image [C, H, W] in [-1, 1] at the model's size, an optional mask [1, H, W] in [0, 1]
    (1 = repaint), and the settings of the run that starts from them."""

    image: Any
    strength: float = DEFAULT_STRENGTH
    mask: Any = None
    resample: int = 0
    image_hash: str = ""
    mask_hash: str | None = None
    notes: list[str] = field(default_factory=list)  # what was done to fit the files to the model

    def __post_init__(self) -> None:
        if not isinstance(self.strength, numbers.Real) or isinstance(self.strength, bool) \
                or not math.isfinite(self.strength) or not 0 <= self.strength <= 1:
            raise MinidiffError(f"strength must be a number from 0 to 1 (got {self.strength!r:.40})")
        self.strength = float(self.strength)
        if not isinstance(self.resample, int) or isinstance(self.resample, bool) \
                or not 0 <= self.resample <= MAX_RESAMPLE:
            raise MinidiffError(f"resample must be a whole number from 0 to {MAX_RESAMPLE} (got {self.resample!r:.40})")
        if self.resample and self.mask is None:
            raise MinidiffError("resample jumps harmonise a repainted region with the kept one; they need a mask")
        if self.mask is not None and tuple(self.mask.shape) != (1, *self.image.shape[-2:]):
            raise MinidiffError(f"the mask is {tuple(self.mask.shape)} but the image is {tuple(self.image.shape)}; "
                                "they must be the same size")

    def check_fits(self, channels: int, size: int) -> None:
        """The image must be the model's [channels, size, size] (``image_start`` makes it so)."""
        if tuple(self.image.shape) != (channels, size, size):
            raise MinidiffError(f"the init image is {tuple(self.image.shape)} but the model draws "
                                f"{(channels, size, size)}; fit it with Pipeline.image_start")

    def first_step(self, steps: int) -> int:
        """Index of the first step taken on a ``steps``-step grid (``steps`` when none is).

        diffusers' count, int(steps * strength) in floating point (so 0.29 x 100 takes 28 steps,
        as there), at least one for strength > 0."""
        taken = min(int(steps * self.strength), steps)
        return steps - (max(1, taken) if self.strength > 0 else 0)

    def steps_taken(self, steps: int) -> int:
        """How many sampler steps (callbacks) one batch takes, resampling jumps included."""
        run = steps - self.first_step(steps)
        return run + self.resample * max(0, run - 1)

    def params(self) -> dict[str, Any]:
        """What the PNG records of this start (``generate --from`` compares the hashes)."""
        return {"strength": self.strength, "resample": self.resample, "init_image_hash": self.image_hash,
                "mask_hash": self.mask_hash}


def image_start(init_image, *, size: int, channels: int, strength: float | None = None, mask=None,
                resample: int = 0) -> ImageStart:
    """An ``ImageStart`` from an init image and mask (file paths or PIL images) for a model of
    ``size`` x ``size`` pixels and ``channels`` channels. ``strength`` defaults to
    ``DEFAULT_STRENGTH``, or ``INPAINT_STRENGTH`` with a mask."""
    from minidiff_cli.inference.img2img.images import fit_image, fit_mask, open_image, pixel_hash, upright

    image = open_image(init_image, "init image")
    tensor, done = fit_image(image, size, channels)
    name = f" '{image.filename}'" if getattr(image, "filename", "") else ""
    notes = [f"init image{name} ({image.mode}, {image.width}x{image.height}): {done}"] if done else []
    mask_tensor, mask_hash = None, None
    if mask is not None:
        mask_image = open_image(mask, "mask")
        mask_tensor, mask_hash = fit_mask(mask_image, upright(image).size, size), pixel_hash(mask_image)
    if strength is None:
        strength = DEFAULT_STRENGTH if mask is None else INPAINT_STRENGTH
    return ImageStart(tensor, strength, mask_tensor, resample, pixel_hash(image), mask_hash, notes)

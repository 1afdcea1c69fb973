"""A checked request: what to draw, how, at which size, with which model, and the notes for ``info``.

Every client (AUTOMATIC1111's fields, OpenAI's, the page) becomes a ``Plan`` before any work, and
a ``Plan`` holds only values already in range. Sampler names are mapped as the PNG reader maps
another program's (``inference/infotext.py``'s tables); minidiff's own names are taken as they are.

Size: a model draws at its own size (32 or 64 pixels). A request for another width and height gets
the model's picture scaled to it (nearest neighbour, so each model pixel is a block and the
picture ``generate`` makes is recovered exactly by taking every block's first pixel), and the
answer's ``info`` says so. No width and height (or 0) is the model's own size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from minidiff_cli.errors import MinidiffError, shown
from minidiff_cli.server import limits
from minidiff_cli.server.catalogue import Entry


@dataclass
class Plan:
    """One request, checked: everything ``drawing.draw`` needs, and what the answer reports."""

    model: Entry
    prompt: str
    negative: str = ""
    steps: int | None = None         # None: the model's (a student's few), else 50
    cfg: float | None = None         # None: the model's, else 3
    sampler: str | None = None       # a registered minidiff sampler; None: the model's, else ddim
    sampler_options: dict[str, Any] = field(default_factory=dict)
    eta: float | None = None
    seed: int = 0
    batch_size: int = 1
    n_iter: int = 1
    width: int | None = None         # None: the model's own size
    height: int | None = None
    init_image: Any = None           # a PIL image (img2img), already bounded
    mask: Any = None                 # a PIL image, white repaints
    strength: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.batch_size * self.n_iter


def check_count(batch_size: int, n_iter: int) -> None:
    if batch_size * n_iter > limits.MAX_IMAGES:
        raise MinidiffError(f"batch_size x n_iter is {batch_size * n_iter}; at most {limits.MAX_IMAGES} images "
                            "per request")


def pick_seed(seed: int | None, count: int) -> int:
    """-1 (or none) draws a random seed, as AUTOMATIC1111 does; image k then has seed + k."""
    if seed is None or seed == -1:
        return random.randrange(2**32)
    if not 0 <= seed <= limits.MAX_SEED - count + 1:
        raise MinidiffError(f"seed must be -1 or a whole number from 0 to {limits.MAX_SEED - count + 1} (got {seed})")
    return seed


def check_size(width: int | None, height: int | None, count: int) -> tuple[int | None, int | None]:
    """(width, height) to scale to, or (None, None) for the model's own size."""
    width, height = width or None, height or None
    if (width is None) != (height is None):
        raise MinidiffError("give both width and height, or neither (the model's own size)")
    if width is not None and width * height * count > limits.MAX_OUTPUT_PIXELS:
        raise MinidiffError(f"{count} pictures of {width}x{height} are more than {limits.MAX_OUTPUT_PIXELS:,} pixels "
                            "in all; ask for fewer or smaller ones")
    return width, height


def size_note(plan: Plan, native: int) -> str | None:
    if plan.width is None or (plan.width, plan.height) == (native, native):
        return None
    how = "stretched" if plan.width != plan.height else "scaled"
    return (f"the model draws {native}x{native}; the pictures were {how} to {plan.width}x{plan.height} (nearest "
            "neighbour); their parameters record the size drawn")


def resolve_sampler(name: str | None, scheduler: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """(minidiff sampler, its options) for an AUTOMATIC1111 or minidiff sampler name and schedule type."""
    from minidiff_cli import plugins
    from minidiff_cli.inference.infotext import (
        KARRAS_SAMPLERS,
        PLAIN_SCHEDULES,
        SAMPLERS,
    )

    schedule = (scheduler or "").strip().lower()
    if not name:
        if schedule and schedule not in PLAIN_SCHEDULES:
            raise MinidiffError(f"scheduler {shown(scheduler)} needs a sampler_name (e.g. \"DPM++ 2M\")")
        return None, {}
    if not isinstance(name, str) or len(name) > limits.MAX_NAME_CHARS:
        raise MinidiffError(f"sampler_name must be a sampler's name (got {shown(name)})")
    installed = plugins.registry().names("samplers")
    base = " ".join(name.lower().split())
    karras = base.endswith(" karras") or schedule == "karras"
    base = base[:-len(" karras")] if base.endswith(" karras") else base
    sampler = name if name in installed else SAMPLERS.get(base)
    if sampler is None:
        raise MinidiffError(f"unknown sampler {shown(name)}; GET /sdapi/v1/samplers lists those minidiff has")
    if sampler not in installed:
        raise MinidiffError(f"sampler {shown(name)} is minidiff's {sampler}, which is not installed here "
                            "(pip install ./plugins/minidiff-solvers)")
    if schedule and schedule not in PLAIN_SCHEDULES and schedule != "karras":
        raise MinidiffError(f"scheduler {shown(scheduler)} has no counterpart in minidiff (automatic or karras)")
    if karras and sampler not in KARRAS_SAMPLERS:
        raise MinidiffError(f"sampler {shown(name)} does not take Karras sigmas in minidiff")
    return sampler, ({"karras": True} if karras else {})


def takes_eta(sampler: str) -> bool:
    from minidiff_cli import plugins

    return "eta" in getattr(plugins.get_sampler(sampler), "options", ())


# What AUTOMATIC1111 offers that minidiff has no counterpart for, with the value that means "off":
# a request that leaves these at their default gets no note about them.
QUIET_DEFAULTS: dict[str, Any] = {
    "hr_scale": 2, "hr_upscaler": None, "subseed": -1, "s_noise": 1, "send_images": True,
    "override_settings_restore_afterwards": True, "inpaint_full_res": True, "initial_noise_multiplier": 1,
    "mask_blur": 4, "image_cfg_scale": 1.5, "seed_resize_from_h": None, "seed_resize_from_w": None, "mask_round": True,
    "denoising_strength": None, "sampler_index": None, "resize_mode": 0, "scheduler": None, "mask_blur_x": 4,
    "mask_blur_y": 4, "n": None, "quality": None, "style": None, "user": None, "model": None,
}


def ignored_note(extra: dict[str, Any]) -> str | None:
    """One note naming the fields given a value that minidiff does not use."""
    names = [key for key, value in extra.items()
             if key in QUIET_DEFAULTS and QUIET_DEFAULTS[key] is not None and value != QUIET_DEFAULTS[key]
             or key not in QUIET_DEFAULTS and value not in (None, False, 0, "", [], {}, -1)]
    if not names:
        return None
    shown_names = ", ".join(sorted(names)[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return f"ignored (no counterpart in minidiff): {shown_names}"

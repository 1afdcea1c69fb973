"""``generate``'s --init-image / --mask path: flag checks, the files, and what --from repeats.

The files are opened (and their sizes checked) before the model is loaded, so a bad one fails
at once; they are fitted to the model after. Each thing done to make them fit, and each
difference from the run a --from PNG records, is one ``minidiff: note:`` line on stderr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minidiff_cli.errors import MinidiffError


@dataclass
class InitFiles:
    """The opened init image and mask of a run, with the flags that go with them."""

    image: Any  # PIL images
    mask: Any
    image_hash: str
    mask_hash: str | None


def open_init_files(init_image: Path | None, mask: Path | None, strength: float | None, resample: int | None,
                    prompts_file: Path | None, sampler: str) -> InitFiles | None:
    """The files of --init-image and --mask, opened, after checking the flags and that ``sampler`` can
    start part way; None without --init-image."""
    from minidiff_cli.inference.img2img.settings import MAX_RESAMPLE

    if init_image is None:
        given = [flag for flag, value in (("--mask", mask), ("--strength", strength), ("--resample", resample))
                 if value is not None]
        if given:
            raise MinidiffError(f"{given[0]} works on a picture; give it with --init-image FILE")
        return None
    if prompts_file is not None:
        raise MinidiffError("--init-image starts one prompt's images from a picture; it does not combine with --prompts")
    if strength is not None and not 0 <= strength <= 1:  # NaN fails both comparisons
        raise MinidiffError(f"--strength must be from 0 (keep the image) to 1 (redraw it from noise) (got {strength})")
    if resample is not None and not 0 <= resample <= MAX_RESAMPLE:
        raise MinidiffError(f"--resample must be from 0 to {MAX_RESAMPLE} (got {resample})")
    if resample and mask is None:
        raise MinidiffError("--resample harmonises a repainted region with the kept one; it needs --mask")
    from minidiff_cli import plugins
    from minidiff_cli.inference.img2img.images import open_image, pixel_hash
    from minidiff_cli.inference.img2img.run import require_partial
    from minidiff_cli.inference.pipeline import _who

    require_partial(plugins.get_sampler(sampler), _who(sampler))
    image = open_image(init_image, "init image")
    mask_image = open_image(mask, "mask") if mask is not None else None
    return InitFiles(image, mask_image, pixel_hash(image), pixel_hash(mask_image) if mask_image else None)


def settings_to_repeat(files: InitFiles | None, params: dict[str, Any], from_image: Path | None) -> dict[str, Any]:
    """strength and resample for this run: flags > --from's (with a note where the files differ) > defaults."""
    stored_hash, stored_mask = params.get("init_image_hash"), params.get("mask_hash")
    if files is None:
        if stored_hash:
            _note(f"'{from_image}' was made from an init image (hash {stored_hash}); without --init-image this run "
                  "draws from the prompt alone")
        return {}
    if stored_hash and stored_hash != files.image_hash:
        _note(f"the init image differs from the one '{from_image}' was made from (hash {files.image_hash}, not "
              f"{stored_hash}); its strength and resample are used on this one")
    if stored_mask and files.mask is None:
        _note(f"'{from_image}' was made with a mask (hash {stored_mask}); without --mask this run repaints the "
              "whole image")
    elif stored_mask and stored_mask != files.mask_hash:
        _note(f"the mask differs from the one '{from_image}' was made with (hash {files.mask_hash}, not {stored_mask})")
    resample = params.get("resample") if files.mask is not None else None
    return {"strength": params.get("strength"), "resample": resample or 0}


def image_start(pipe, files: InitFiles | None, params: dict[str, Any], from_image: Path | None):
    """The ``ImageStart`` of the run (None without --init-image): the files fitted to the loaded model,
    with a note per change and per difference from the --from PNG."""
    settings = settings_to_repeat(files, params, from_image)
    if files is None:
        return None
    start = pipe.image_start(files.image, settings.get("strength"), files.mask, settings.get("resample") or 0)
    for note in start.notes:
        _note(note)
    return start


def _note(text: str) -> None:
    print(f"minidiff: note: {text}", file=sys.stderr)

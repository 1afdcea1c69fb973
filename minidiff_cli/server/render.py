"""A finished job as PNGs: the parameters text and JSON ``generate`` writes, scaled to the asked size.

The PNG chunks are ``files.png_parameters.png_writer``'s, so a served picture reads back in
``minidiff info``, ``generate --from`` and AUTOMATIC1111's PNG Info as a generated one does. The
parameters record the size the model drew (``Size: 32x32``); a picture scaled up for a client
that asked for 512 x 512 says so in the answer's ``info``. Files are written only under
``--save-dir``, with the names ``generate`` gives (numbered, never replacing one).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from minidiff_cli.files.png_parameters import format_parameters, png_writer


def png_bytes(image, width: int | None, height: int | None) -> bytes:
    """``image`` as PNG bytes with its parameters, scaled (nearest neighbour) to width x height if given."""
    from PIL import Image

    params = image.info["minidiff"]
    shown = image if width is None or image.size == (width, height) else image.resize((width, height),
                                                                                     Image.Resampling.NEAREST)
    out = io.BytesIO()
    png_writer(shown, params)(out)
    return out.getvalue()


def encode(drawn, width: int | None, height: int | None, save_dir: Path | None = None) -> list[str]:
    """The base64 PNGs of a job (and, with --save-dir, the files written there)."""
    blobs = [png_bytes(image, width, height) for image in drawn.images]
    if save_dir is not None:
        from minidiff_cli.files.atomic import write_numbered

        for blob in blobs:
            write_numbered(save_dir, "minidiff", ".png", lambda tmp, blob=blob: Path(tmp).write_bytes(blob))
    return [base64.b64encode(blob).decode("ascii") for blob in blobs]


def infotexts(drawn) -> list[str]:
    return [format_parameters(image.info["minidiff"]) for image in drawn.images]


def preview_b64(job) -> str | None:
    """The running job's current guess of its first picture as a base64 PNG (None before its first step)."""
    from minidiff_cli.server.drawing import preview_pixels

    if job is None or job.preview is None:
        return None
    from PIL import Image

    x = preview_pixels(job)[0]
    array = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")

"""``minidiff noise``: the forward process q(x_t | x_0) applied to your own image.

One noise draw eps is shared by every frame, so the strip shows the same picture
sinking into the same noise: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
(Ho et al. 2020, eq. 4). torch is imported inside the command only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from minidiff_cli.cli import completion
from minidiff_cli.cli.app import app
from minidiff_cli.cli.options import threads_option
from minidiff_cli.errors import MinidiffError
from minidiff_cli.runtime.threads import apply_threads

# Fractions of T shown when --timesteps is not given: 0, 100, 250, 500, 750, 999 for T = 1000.
DEFAULT_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
MAX_FRAMES = 32
MAX_SIZE = 1024
MIN_FRAME = 64  # frames narrower than this are enlarged in the strip so that their labels fit


@app.command("noise")
def noise_command(
    image: Path = typer.Argument(..., help="A PNG, JPEG or WebP image to noise."),
    timesteps: Optional[str] = typer.Option(
        None, "--timesteps", "-t", help="Comma-separated timesteps, one frame each "
        "[default: 0,100,250,500,750,999 for T = 1000, the same fractions of other T]."),
    schedule: str = typer.Option("cosine", "--schedule", "-s", autocompletion=completion.schedules, help="Noise schedule (see `minidiff schedules list`)."),
    num_timesteps: int = typer.Option(1000, "--num-timesteps", "-T", help="Number of diffusion timesteps T."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise eps (one draw, shared by every frame)."),
    image_size: int = typer.Option(128, "--image-size", help="Side of each frame: the image is scaled and "
                                   f"centre-cropped to a square of this size (below {MIN_FRAME}, enlarged "
                                   "pixel by pixel in the strip so that the labels fit)."),
    output: Path = typer.Option(Path("noise.png"), "--output", "-o", help="PNG file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output file if it exists."),
    threads: Optional[int] = threads_option(),
) -> None:
    """Noise an image step by step, as training does: a labelled strip, one frame per timestep.

    Examples:

      minidiff noise photo.jpg -o noise.png

      minidiff noise photo.jpg --timesteps 0,50,100,200 --schedule linear -o linear.png
    """
    from minidiff_cli import plugins
    from minidiff_cli.diffusion.schedule import get_schedule

    # Every check that needs no torch comes first, so that a typo is reported at once.
    plugins.registry().get("schedules", schedule)
    if not 1 <= image_size <= MAX_SIZE:
        raise MinidiffError(f"--image-size must be between 1 and {MAX_SIZE} (got {image_size})")
    if num_timesteps < 2:
        raise MinidiffError(f"--num-timesteps must be at least 2 (got {num_timesteps})")
    ts = parse_timesteps(timesteps, num_timesteps)
    if output.exists() and not overwrite:  # atomic_write checks again when it writes
        raise MinidiffError(f"'{output}' already exists; pass --overwrite or choose another file with -o")
    picture = _read_image(image, image_size)
    apply_threads(threads)  # imports torch: after the checks that need none

    from minidiff_cli.data.images import pil_to_tensor

    sched = get_schedule(schedule, num_timesteps)
    frames, labels = noised_frames(pil_to_tensor(picture), sched, ts, seed)
    strip = labelled_strip(frames, labels)

    from minidiff_cli.files.atomic import atomic_write

    atomic_write(output, lambda tmp: strip.save(tmp, format="PNG"), overwrite=overwrite)
    _preview(frames, labels)
    typer.echo(f"Wrote {output}")


def parse_timesteps(text: str | None, num_timesteps: int) -> list[int]:
    """``"0,250,999"`` -> [0, 250, 999], each checked against [0, T - 1]; None gives the default fractions."""
    T = num_timesteps
    if text is None:
        return sorted({min(T - 1, round(f * T)) for f in DEFAULT_FRACTIONS})
    try:
        ts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MinidiffError(f"--timesteps must be comma-separated integers, e.g. 0,250,999 (got '{text}')") from None
    if not ts:
        raise MinidiffError("--timesteps needs at least one timestep, e.g. 0,250,999")
    if len(ts) > MAX_FRAMES:
        raise MinidiffError(f"--timesteps asks for {len(ts)} frames; at most {MAX_FRAMES} fit in a strip")
    bad = [t for t in ts if not 0 <= t < T]
    if bad:
        raise MinidiffError(f"timestep {bad[0]} is out of range: with T = {T} timesteps, t lies in [0, {T - 1}]")
    return ts


def _read_image(path: Path, size: int):
    """The image at ``path``, RGB, scaled and centre-cropped to ``size`` x ``size``; or a one-line error.

    Its size is checked from its header before any pixel is decoded (pixel count, sides at most 32 to
    one: ``data.images.check_fit``), as for every picture minidiff reads."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from minidiff_cli.data.images import check_fit, resize_center_crop, to_rgb

    if not path.exists():
        raise MinidiffError(f"image '{path}' does not exist")
    if not path.is_file():
        raise MinidiffError(f"'{path}' is not a file; pass an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_fit refuses it, in one line
            with Image.open(path) as img:
                check_fit(img.size, size, f"image '{path}'")
                img.load()
                rgb = to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = "not an image Pillow can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise MinidiffError(f"cannot read '{path}': {reason}") from None
    return resize_center_crop(rgb, size, f"image '{path}'")


def noised_frames(x0, schedule, ts: list[int], seed: int):
    """(PIL frames, labels): x0 noised to each t in ``ts`` with one shared eps drawn from ``seed``."""
    import torch

    from minidiff_cli.data.images import tensor_to_pil

    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    batch = x0.expand(len(ts), *x0.shape)
    xt = schedule.add_noise(batch, eps.expand_as(batch), torch.tensor(ts))
    abar = schedule.alphas_cumprod[ts].tolist()
    # x_t is unbounded (its variance is 1); clamping to [-1, 1] is only how it is shown.
    frames = [tensor_to_pil(x) for x in xt]
    labels = [(f"t={t}", f"abar={a:.3f}") for t, a in zip(ts, abar)]
    return frames, labels


def labelled_strip(frames, labels, background=(255, 255, 255), ink=(0, 0, 0)):
    """Frames side by side, each labelled underneath; no gaps, so the strip is len(frames) x width wide.

    Frames narrower than MIN_FRAME pixels are enlarged by a whole factor, so that labels fit.
    """
    from PIL import Image, ImageDraw

    if frames[0].width < MIN_FRAME:  # too narrow for a label: enlarge, nearest neighbour keeps pixels honest
        k = -(-MIN_FRAME // frames[0].width)
        frames = [f.resize((f.width * k, f.height * k), Image.NEAREST) for f in frames]
    w, h = frames[0].size
    lines = max(len(label) for label in labels)
    font = _font_to_fit([line for label in labels for line in label], w)
    line_h = _text_size(font, "Ag=0.9")[1] + 2
    strip = Image.new("RGB", (w * len(frames), h + lines * line_h + 4), background)
    draw = ImageDraw.Draw(strip)
    for k, (frame, label) in enumerate(zip(frames, labels)):
        strip.paste(frame.convert("RGB"), (k * w, 0))
        for j, line in enumerate(label):
            tw = _text_size(font, line)[0]
            draw.text((k * w + (w - tw) // 2, h + 2 + j * line_h), line, fill=ink, font=font)
    return strip


def _font_to_fit(texts: list[str], width: int):
    """Pillow's default font at the largest size (6..14 px) at which every text fits ``width``."""
    from PIL import ImageFont

    for size in range(14, 5, -1):
        try:
            font = ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):  # no FreeType: the fixed bitmap font
            return ImageFont.load_default()
        if all(_text_size(font, t)[0] <= width - 2 for t in texts):
            return font
    return font


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom


def _preview(frames, labels) -> None:
    """The strip in colour half-blocks, with the labels under it, when stdout is a terminal."""
    from minidiff_cli.cli.display import can_preview, image_to_text

    if not can_preview():
        return
    from PIL import Image
    from rich.console import Console

    console = Console()
    gap, n = 2, len(frames)
    side = max(4, min(24, (console.width - gap * (n - 1)) // n))
    sheet = Image.new("RGB", (n * (side + gap) - gap, side), (0, 0, 0))
    for k, frame in enumerate(frames):
        sheet.paste(frame.convert("RGB").resize((side, side), Image.LANCZOS), (k * (side + gap), 0))
    console.print(image_to_text(sheet, max_width=sheet.width), end="")
    for j in range(max(len(label) for label in labels)):
        console.print("".join(label[j][:side].ljust(side + gap) for label in labels).rstrip())

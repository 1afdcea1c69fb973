"""Watching a sampler work: x_t and the predicted x0 at every step, as a strip and a GIF.

A ``TrajectoryRecorder`` is a sampler callback: after each step it keeps a CPU copy of
the current sample x_t and of the model's estimate of the clean image x0 (for a latent model,
what they decode to). Early on, x_t
is almost pure noise while x0 is already a blurry guess of the final picture; the strip
shows how both converge.
"""

from __future__ import annotations

from typing import Any

import torch

STRIP_FRAMES = 10  # columns of the strip; the GIF has every step


class TrajectoryRecorder:
    """Collects (t, x_t, x0) per step for every image; use as ``callback=recorder``."""

    def __init__(self) -> None:
        self.steps: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, info: dict[str, Any]) -> None:
        start = info.get("batch_start", 0)
        x, x0 = info["x"], info.get("x0", info["x"])
        decode = info.get("decode")
        if decode is not None:  # a latent model: show what the latents decode to (x_t's noise included)
            x, x0 = decode(x), decode(x0)
        self.steps.setdefault(start, []).append((int(info["t"]), x.float().cpu(), x0.float().cpu()))

    def frames(self, index: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(t, x_t, x0) of image ``index`` (its position among all images), one per step."""
        starts = sorted(s for s in self.steps if s <= index)
        if not starts:
            return []
        start = starts[-1]
        return [(t, x[index - start], x0[index - start]) for t, x, x0 in self.steps[start]]


def _pil(x: torch.Tensor):
    from minidiff_cli.data.images import tensor_to_pil

    return tensor_to_pil(x.clamp(-1, 1))


def strip(frames, columns: int = STRIP_FRAMES, scale: int = 2):
    """Two rows (x_t above, predicted x0 below) at evenly spaced steps, labelled with t."""
    from PIL import Image, ImageDraw

    if not frames:
        raise ValueError("no trajectory frames were recorded")
    n = min(columns, len(frames))
    picks = sorted({round(i * (len(frames) - 1) / max(1, n - 1)) for i in range(n)})
    w, h = frames[0][1].shape[-1] * scale, frames[0][1].shape[-2] * scale
    label_h, gap = 12, 2
    sheet = Image.new("RGB", (len(picks) * (w + gap) - gap, 2 * h + gap + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for col, k in enumerate(picks):
        t, x, x0 = frames[k]
        left = col * (w + gap)
        sheet.paste(_pil(x).resize((w, h), Image.NEAREST), (left, 0))
        sheet.paste(_pil(x0).resize((w, h), Image.NEAREST), (left, h + gap))
        draw.text((left + 1, 2 * h + gap), f"t={t}", fill=(0, 0, 0))
    return sheet


def gif_frames(frames, scale: int = 4) -> list:
    """One GIF frame per step: x_t and predicted x0 side by side."""
    from PIL import Image

    out = []
    for _, x, x0 in frames:
        a, b = _pil(x), _pil(x0)
        w, h = a.width * scale, a.height * scale
        frame = Image.new("RGB", (2 * w + 2, h), (255, 255, 255))
        frame.paste(a.resize((w, h), Image.NEAREST), (0, 0))
        frame.paste(b.resize((w, h), Image.NEAREST), (w + 2, 0))
        out.append(frame)
    return out


def save(frames, png_path, gif_path, *, overwrite: bool = False) -> None:
    """Write the strip and the GIF atomically; neither replaces an existing file unless ``overwrite``."""
    from minidiff_cli.files.atomic import atomic_write

    sheet = strip(frames)
    atomic_write(png_path, lambda p: sheet.save(p, format="PNG"), overwrite=overwrite)
    images = gif_frames(frames)
    # Hold the last frame so the finished picture stays on screen before the loop restarts.
    durations = [80] * (len(images) - 1) + [1200]
    atomic_write(gif_path, lambda p: images[0].save(p, format="GIF", save_all=True, append_images=images[1:],
                                                    duration=durations, loop=0), overwrite=overwrite)

"""How well images match their captions, in a CLIP's embedding space.

- CLIP score (Hessel et al. 2021, as torchmetrics reports it): 100 x the cosine between
  an image's and its caption's embeddings, floored at 0, averaged over images.
- R-precision (Xu et al. 2018, AttnGAN; the text-to-image literature's retrieval test):
  each image ranks its own caption among ``candidates`` (its own and others drawn at
  random from the folder, the same draw for the same caption); the share of images whose own caption ranks first. Chance is
  1 / candidates.

Inputs are L2-normalised embeddings: images [N, D], texts [N, D] (row i is image i's caption).
"""

from __future__ import annotations

import torch


def clip_score(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean of 100 * max(cos(image_i, text_i), 0)."""
    cos = (images * texts).sum(dim=1)
    return float((100 * cos.clamp(min=0)).mean())


def r_precision(images: torch.Tensor, own: torch.Tensor, pool: torch.Tensor, own_rows: list[int], *,
                candidates: int = 100, seed: int = 0) -> float:
    """Share of images whose own caption beats ``candidates - 1`` others drawn from ``pool``.

    ``own`` [N, D]: each image's caption embedding; ``pool`` [P, D]: every caption of the
    folder; ``own_rows[i]``: the row of image i's caption in ``pool``, never drawn as a rival.
    """
    others = min(candidates - 1, len(pool) - 1)
    if others < 1:
        raise ValueError("R-precision needs at least two captions")
    hits = 0
    for i in range(len(images)):
        # The rivals depend on the caption (and seed) alone, so a subset of the images (the seen
        # or the held-out captions) is scored exactly as it was within the whole set.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + own_rows[i])
        rivals = torch.randperm(len(pool) - 1, generator=generator)[:others]
        rivals = rivals + (rivals >= own_rows[i]).long()  # skip the image's own row
        own_score = images[i] @ own[i]
        hits += int(bool((pool[rivals] @ images[i] < own_score).all()))
    return hits / len(images)

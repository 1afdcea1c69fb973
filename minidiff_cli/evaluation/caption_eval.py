"""The evaluation of a text-to-image model on a captioned folder (``minidiff eval --data DIR``).

1. A fixed set of the folder's captions: the first ``captions`` of all captions ordered
   by a (salted) SHA-256 of each, so the set depends on the folder alone (not on a seed, nor on the
   order of metadata.jsonl), and holds seen and held-out captions in their proportion.
2. One generated image per caption and seed (``per_caption`` seeds).
3. Their CLIP image embeddings (the CLIP trained on that folder) against
   - their captions: CLIP score, and R-precision among 100 captions (seen and
     held-out captions reported apart);
   - the real images: Frechet distance and KID against a reference set of the folder's
     images, precision / recall against the real images of the same captions;
   - the same numbers for the real images of those captions, side by side: the ceiling
     a model can reach with this CLIP and these sample counts.
4. Optionally the standard Inception FID, with the user's Inception weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from minidiff_cli.errors import MinidiffError


@dataclass
class CaptionEvalSettings:
    captions: int = 200
    per_caption: int = 1
    sampler: str = "ddim"
    steps: int = 50
    cfg: float = 3.0
    seed: int = 0
    batch_size: int = 64
    reference: int = 2000  # real images the distribution metrics compare with (a fixed spread)
    candidates: int = 100  # captions each image is ranked among for R-precision


PR_NEIGHBOURS = 3  # k of precision / recall, the paper's choice


def caption_key(caption: str) -> bytes:
    # Salted: an unsalted SHA-256 is also what decides a caption holdout (data.holdout.is_heldout),
    # and ordering by it would put every held-out caption first.
    return hashlib.sha256(b"minidiff-eval\0" + caption.encode("utf-8", "surrogatepass")).digest()


def fixed_captions(captions: list[str], count: int) -> list[str]:
    """The evaluation's captions: ``count`` of the distinct ``captions``, by hash order."""
    return sorted(set(captions), key=caption_key)[:count]


def _first_index(captions: list[str]) -> dict[str, int]:
    first: dict[str, int] = {}
    for index, caption in enumerate(captions):
        first.setdefault(caption, index)
    return first


def _embed(features, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _real_images(dataset, indices: list[int]) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in indices])


def scores(images_f: torch.Tensor, rows: list[int], pool: torch.Tensor, settings: CaptionEvalSettings,
           reference_f: torch.Tensor, paired_real_f: torch.Tensor) -> dict[str, Any]:
    """Every metric of one set of image embeddings (generated, or the real images themselves)."""
    from minidiff_cli.evaluation.distribution import frechet_distance, kernel_distance, precision_recall
    from minidiff_cli.evaluation.text_image import clip_score, r_precision

    own = pool[rows]
    kid_mean, kid_std = kernel_distance(reference_f, images_f, seed=settings.seed)
    result = {"clip_score": round(clip_score(images_f, own), 3),
              "r_precision": round(r_precision(images_f, own, pool, rows, candidates=settings.candidates,
                                               seed=settings.seed), 4),
              "fd_clip": round(frechet_distance(reference_f, images_f), 5),
              "kid_clip": round(kid_mean, 6), "kid_clip_std": round(kid_std, 6),
              "precision": None, "recall": None}
    if min(len(images_f), len(paired_real_f)) > PR_NEIGHBOURS:  # k neighbours need k + 1 points
        precision, recall = precision_recall(paired_real_f, images_f, k=PR_NEIGHBOURS)
        result.update(precision=round(precision, 4), recall=round(recall, 4))
    return result


def evaluate_captions(pipe, dataset, clip_features, settings: CaptionEvalSettings, *,
                      heldout: Callable[[str], bool] = lambda caption: False, inception=None,
                      progress: Optional[Callable[[dict], None]] = None,
                      on_images: Optional[Callable[[torch.Tensor, list[str]], None]] = None) -> dict[str, Any]:
    """The full report for ``pipe``'s model on ``dataset`` (a captioned data set); see the module doc.

    ``on_images(images, captions)`` receives the generated images (in [-1, 1]) and their captions.
    """
    from minidiff_cli.evaluation.distribution import frechet_distance
    from minidiff_cli.evaluation.text_image import r_precision
    from minidiff_cli.inference.pipeline import Generation

    item_captions = list(getattr(dataset, "captions", []) or [])
    if not item_captions or not any(item_captions):
        raise MinidiffError("this data set has no captions; the evaluation compares images with their captions "
                            "(metadata.jsonl, metadata.csv or .txt files next to the images)")
    chosen = fixed_captions([c for c in item_captions if c], settings.captions)
    if len(chosen) < 2:
        raise MinidiffError("the evaluation needs at least two distinct captions")
    all_captions = sorted(set(item_captions))
    row_of = {c: k for k, c in enumerate(all_captions)}
    first = _first_index(item_captions)

    prompts = [c for c in chosen for _ in range(settings.per_caption)]
    seeds = [settings.seed + k for _ in chosen for k in range(settings.per_caption)]
    gen = Generation("", steps=settings.steps, cfg=settings.cfg, sampler=settings.sampler, seed=settings.seed)
    generated = pipe.sample_many(gen, prompts, seeds, batch_size=settings.batch_size, callback=progress).cpu()
    if on_images is not None:
        on_images(generated, prompts)

    reference_idx = list(range(len(item_captions)))[:: max(1, -(-len(item_captions) // settings.reference))]
    reference = _real_images(dataset, reference_idx)
    paired = _real_images(dataset, [first[c] for c in chosen])
    pool = clip_features.encode_text(all_captions)
    gen_f, ref_f, paired_f = (_embed(clip_features, x) for x in (generated, reference, paired))
    rows = [row_of[c] for c in prompts]
    report: dict[str, Any] = {
        "captions": len(chosen), "per_caption": settings.per_caption, "images": len(generated),
        "reference_images": len(reference), "folder_captions": len(all_captions),
        "r_precision_candidates": min(settings.candidates, len(all_captions)),  # each image's caption among so many
        "heldout_captions": sum(heldout(c) for c in chosen),
        "sampler": settings.sampler, "steps": settings.steps, "cfg": settings.cfg, "seed": settings.seed,
        "generated": scores(gen_f, rows, pool, settings, ref_f, paired_f),
        "real": scores(paired_f, [row_of[c] for c in chosen], pool, settings, ref_f, paired_f),
    }
    for name, keep in (("seen", lambda c: not heldout(c)), ("heldout", heldout)):
        mask = [k for k, c in enumerate(prompts) if keep(c)]
        report["generated"][f"r_precision_{name}"] = (
            round(r_precision(gen_f[mask], pool[[rows[k] for k in mask]], pool, [rows[k] for k in mask],
                              candidates=settings.candidates, seed=settings.seed), 4) if mask else None)
    if inception is not None:
        report["generated"]["fid_inception"] = round(
            frechet_distance(_embed(inception, reference, 32), _embed(inception, generated, 32)), 3)
    return report


def _number(value) -> str:
    return "-" if value is None else f"{value + 0.0:.4g}"  # + 0.0: never "-0"


def describe(report: dict[str, Any]) -> list[str]:
    """The report as a few lines for a terminal."""
    g, r = report["generated"], report["real"]
    lines = [f"{report['images']} images for {report['captions']} captions of the folder "
             f"({report['heldout_captions']} held out of training), {report['sampler']} {report['steps']} steps, "
             f"cfg {report['cfg']}; reference: {report['reference_images']} real images",
             f"{'':24}{'generated':>12}{'real images':>14}"]
    for key, label in (("clip_score", "CLIP score"), ("r_precision", f"R-precision (of {report.get('r_precision_candidates', 100)})"),
                       ("fd_clip", "Frechet distance (CLIP)"), ("kid_clip", "KID (CLIP)"),
                       ("precision", "precision"), ("recall", "recall")):
        lines.append(f"{label:24}{_number(g[key]):>12}{_number(r[key]):>14}")
    seen, held = g.get("r_precision_seen"), g.get("r_precision_heldout")
    lines.append("R-precision of generated images: seen captions "
                 f"{'-' if seen is None else f'{seen:.3f}'}, held-out {'-' if held is None else f'{held:.3f}'}")
    if "fid_inception" in g:
        lines.append(f"Inception FID: {g['fid_inception']:.2f} ({report['images']} generated vs "
                     f"{report['reference_images']} real; FID needs thousands of samples to compare across papers)")
    return lines

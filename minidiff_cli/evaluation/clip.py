"""How good is a CLIP? Caption retrieval on a captioned folder, zero-shot accuracy on shapes.

Pairs or captions held out of training are reported apart: they show whether the text
encoder composes words it never saw together.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from minidiff_cli.clip.clip_file import encode_images
from minidiff_cli.clip.tokenizer import tokenizer_for
from minidiff_cli.data.holdout import holdout_fraction, parse_holdout
from minidiff_cli.data.sources import open_dataset
from minidiff_cli.data.vocabulary import article


def class_prompt(class_name: str) -> str:
    """``"orange square"`` -> ``"an orange square"``: the caption each class is ranked by."""
    return f"{article(class_name)} {class_name}"


def class_images(dataset, per_class: int, max_draws: int = 200_000) -> dict[int, torch.Tensor]:
    """``per_class`` images of every class that ``dataset`` draws, found by reading items in order."""
    found: dict[int, list[torch.Tensor]] = {}
    wanted = len(getattr(dataset, "allowed", dataset.class_names))
    for index in range(min(len(dataset), max_draws)):
        item = dataset[index]
        bucket = found.setdefault(item["label"], [])
        if len(bucket) < per_class:
            bucket.append(item["image"])
        if len(found) == wanted and all(len(b) == per_class for b in found.values()):
            break
    return {label: torch.stack(images) for label, images in sorted(found.items())}


@torch.no_grad()
def zero_shot_accuracy(model, class_names: list[str], images: dict[int, torch.Tensor],
                       heldout: set[str] = frozenset(), tokenizer=None) -> dict[str, Any]:
    """Rank the captions "a {colour} {shape}" of every class for each image, by cosine similarity.

    Returns top-1 accuracy over the seen classes and over the held-out ones, and
    how often the top caption has the right colour (first word) or the right
    shape (the rest), over all images.
    """
    device = next(model.parameters()).device
    tokenizer = tokenizer or tokenizer_for({"context_length": model.context_length})
    was_training = model.training
    model.eval()
    text = model.encode_text(tokenizer([class_prompt(n) for n in class_names]).to(device), normalize=True)
    colour = [n.split(" ", 1)[0] for n in class_names]
    shape = [n.split(" ", 1)[-1] for n in class_names]
    hits = {"seen": [], "heldout": [], "colour": [], "shape": []}
    for label, batch in images.items():
        features = encode_images(model, batch.to(device))
        predicted = (features @ text.T).argmax(dim=1).tolist()
        hits["heldout" if class_names[label] in heldout else "seen"] += [p == label for p in predicted]
        hits["colour"] += [colour[p] == colour[label] for p in predicted]
        hits["shape"] += [shape[p] == shape[label] for p in predicted]
    model.train(was_training)
    result: dict[str, Any] = {k: (round(sum(v) / len(v), 4) if v else None) for k, v in hits.items()}
    result["images_per_class"] = max((len(b) for b in images.values()), default=0)
    result["heldout_classes"] = sorted(heldout)
    return result


def evaluate(model, recipe) -> dict[str, Any]:
    """The evaluation of a CLIP trained by ``recipe`` (a ClipRecipe) on its data: caption retrieval for a folder, zero-shot classes for shapes.

    A data set that lists its items' captions (a captioned folder) is judged by retrieval:
    each image ranks every caption of the folder. A procedural one with classes (shapes)
    is judged by zero-shot accuracy on fresh images of every class.
    """
    dataset = open_dataset(recipe.data, image_size=recipe.image_size, seed=recipe.seed + 1_000_003, holdout=None,
                           require_captions=True)
    if isinstance(getattr(dataset, "captions", None), list):
        return caption_retrieval(model, dataset, holdout_fraction(recipe.holdout),
                                 max_images=recipe.eval_images)
    images = class_images(dataset, recipe.eval_images_per_class)
    heldout = {f"{c} {s}" for c, s in parse_holdout(recipe.holdout)}
    return zero_shot_accuracy(model, list(dataset.class_names), images, heldout)


@torch.no_grad()
def caption_retrieval(model, dataset, fraction: Optional[float], *, max_images: int = 1000,
                      batch_size: int = 256) -> dict[str, Any]:
    """Top-1 / top-5 retrieval of each image's own caption among all the folder's captions.

    Seen and held-out captions are reported apart; at most ``max_images`` seen images (a
    fixed spread) and every held-out one are ranked. Chance is 1 / number of captions.
    """
    from minidiff_cli.data.holdout import is_heldout

    device = next(model.parameters()).device
    tokenizer = tokenizer_for({"context_length": model.context_length})
    was_training = model.training
    model.eval()
    captions = list(dataset.captions)
    candidates = sorted(set(captions))
    row = {c: k for k, c in enumerate(candidates)}
    text = torch.cat([model.encode_text(tokenizer(candidates[i:i + batch_size]).to(device), normalize=True)
                      for i in range(0, len(candidates), batch_size)])
    held = [i for i, c in enumerate(captions) if fraction and is_heldout(c, fraction)]
    held_set = set(held)
    seen = [i for i in range(len(captions)) if i not in held_set]
    seen = seen[:: max(1, -(-len(seen) // max_images))]
    result: dict[str, Any] = {"captions": len(candidates), "chance_top1": round(1 / len(candidates), 5)}
    for name, indices in (("seen", seen), ("heldout", held)):
        top1 = top5 = 0
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            images = torch.stack([dataset[i]["image"] for i in chunk]).to(device)
            scores = encode_images(model, images) @ text.T
            best = scores.topk(min(5, len(candidates)), dim=1).indices
            truth = torch.tensor([row[captions[i]] for i in chunk], device=device)
            top1 += int((best[:, 0] == truth).sum())
            top5 += int((best == truth[:, None]).any(dim=1).sum())
        n = len(indices)
        result[f"{name}_top1"] = round(top1 / n, 4) if n else None
        result[f"{name}_top5"] = round(top5 / n, 4) if n else None
        result[f"{name}_images"] = n
    model.train(was_training)
    return result


def describe_accuracy(accuracy: dict) -> str:
    """The evaluation of ``evaluate`` in one line."""
    def pct(value):
        if value is None:
            return "n/a"
        return f"{100 * value:.1f}%" if value == 0 or value >= 0.01 else f"{100 * value:.2g}%"

    if "seen_top1" in accuracy:  # caption retrieval on a folder
        return (f"caption retrieval among {accuracy['captions']} captions (chance {pct(accuracy['chance_top1'])}): "
                f"seen top-1 {pct(accuracy['seen_top1'])}, top-5 {pct(accuracy['seen_top5'])} "
                f"({accuracy['seen_images']} images); held-out top-1 {pct(accuracy['heldout_top1'])}, "
                f"top-5 {pct(accuracy['heldout_top5'])} ({accuracy['heldout_images']} images)")

    held = ", ".join(accuracy.get("heldout_classes", [])) or "none"
    return (f"zero-shot top-1: seen pairs {pct(accuracy['seen'])}, held-out pairs {pct(accuracy['heldout'])} "
            f"({held}); colour {pct(accuracy['colour'])}, shape {pct(accuracy['shape'])}")

"""Train a small CLIP on captioned images, so the ``clip`` conditioner has a text encoder.

No pretrained weights can be downloaded here, so minidiff trains its own CLIP
(Radford et al. 2021) with open_clip: ``open_clip.CLIP`` with a small ViT image
tower and a small text transformer, open_clip's tokenizer and its symmetric
contrastive ``ClipLoss`` (Sec. 2.3: cross-entropy over the image-text cosine
similarities, scaled by a learned temperature, in both directions).

Pairs held out of the data set (``holdout``) are never seen in training; the
zero-shot evaluation reports them apart, to show whether the text encoder
composes a colour and a shape it never saw together.

The output file is an open_clip CLIP state dict in safetensors (float16):
the text tower under open_clip's names, the image tower under ``visual.``, and
metadata ``format = minidiff-clip``, ``config`` (embed_dim, text_cfg,
vision_cfg) and ``eval`` (the accuracies). ``minidiff train --conditioner clip
--clip-weights FILE`` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from minidiff_cli.clip.config import check_clip_model_config
from minidiff_cli.clip.text import FORMAT, FORMAT_VERSION, read_safetensors, tokenizer_for
from minidiff_cli.errors import MinidiffError, ModelFileError
from minidiff_cli.files.atomic import atomic_write

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clips the temperature so logits stay <= 100 (Sec. 2.5)


@dataclass
class ClipRecipe:
    """Everything ``minidiff clip train`` can set."""

    data: str = "shapes"
    image_size: int = 32
    holdout: str = "purple triangle,orange square"
    steps: int = 1200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    # text tower: the token embedding (49408 x width) is most of the file
    width: int = 64
    heads: int = 4
    layers: int = 2
    context_length: int = 16
    embed_dim: int = 64
    # image tower: "vit" (a small ViT) or "resnet" (open_clip's ModifiedResNet)
    # (on shapes a ResNet learns shape in far fewer steps than a ViT of the same cost)
    vision: str = "resnet"
    vision_width: int = 16
    vision_layers: int = 1  # ViT blocks, or ResNet blocks per stage
    patch_size: int = 8  # ViT only
    seed: int = 0
    device: str = "auto"  # auto: cuda if there is one, else cpu
    threads: int = 0  # torch CPU threads; 0 is auto (see threads.py)
    eval_images_per_class: int = 32  # shapes: fresh images of each class
    eval_images: int = 1000  # a folder: seen images ranked against every caption (plus all held-out ones)

    def check(self) -> "ClipRecipe":
        for name in ("steps", "batch_size", "width", "heads", "layers", "context_length", "embed_dim",
                     "vision_width", "vision_layers", "patch_size", "image_size", "eval_images_per_class"):
            if getattr(self, name) < 1:
                raise MinidiffError(f"{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.batch_size < 2:
            raise MinidiffError("batch-size must be at least 2: a contrastive loss needs negatives")
        if self.width % self.heads:
            raise MinidiffError(f"width {self.width} must be a multiple of heads {self.heads}")
        if self.context_length < 4:
            raise MinidiffError("context-length must be at least 4 (start and end tokens take two)")
        if self.vision not in ("vit", "resnet"):
            raise MinidiffError(f"unknown image tower '{self.vision}'; use vit or resnet")
        if self.image_size > 512:
            raise MinidiffError(f"image-size {self.image_size} is more than minidiff allows (512)")
        if self.threads < 0:
            raise MinidiffError(f"threads must be 0 (auto) or more (got {self.threads})")
        if self.lr <= 0:
            raise MinidiffError(f"lr must be positive (got {self.lr})")
        check_clip_model_config(self.model_config())  # the same bounds as a CLIP file's config
        return self

    def model_config(self) -> dict[str, Any]:
        """open_clip's CLIP config: embed_dim, text_cfg, vision_cfg."""
        return {
            "embed_dim": self.embed_dim,
            "text_cfg": {"context_length": self.context_length, "vocab_size": 49408, "width": self.width,
                         "heads": self.heads, "layers": self.layers},
            "vision_cfg": self._vision_cfg(),
            "quick_gelu": False,
        }


    @property
    def tower_size(self) -> int:
        """The image tower's input side: the data's size, rounded up to what the tower can take.

        The ResNet tower strides by 32 and a ViT by its patch size; smaller images (a 16x16
        model's data) are scaled up to it, so the CLIP judges images at the model's resolution.
        """
        step = 32 if self.vision == "resnet" else self.patch_size
        return -(-self.image_size // step) * step

    def _vision_cfg(self) -> dict[str, Any]:
        if self.vision == "resnet":  # 4 stages, total stride 32; attention pooling on top
            return {"image_size": self.tower_size, "width": self.vision_width,
                    "layers": [self.vision_layers] * 4, "head_width": 64}
        return {"image_size": self.tower_size, "patch_size": self.patch_size, "width": self.vision_width,
                "layers": self.vision_layers, "head_width": max(16, self.vision_width // 4)}


def build_clip(config: dict[str, Any]):
    """An untrained ``open_clip.CLIP`` for ``config`` (see ``ClipRecipe.model_config``)."""
    import open_clip

    return open_clip.CLIP(config["embed_dim"], vision_cfg=config["vision_cfg"], text_cfg=config["text_cfg"],
                          quick_gelu=config.get("quick_gelu", False))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MinidiffError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinidiffError("--device cuda was asked for, but this machine has no usable CUDA GPU")
    return device


# -- data ----------------------------------------------------------------------------
def fit_to_tower(images: torch.Tensor, model) -> torch.Tensor:
    """``images`` [B, 3, H, W] scaled (bilinear) to the side the CLIP's image tower takes."""
    visual = getattr(model, "visual", None)
    if visual is None:  # a CLIP-like model without open_clip's tower (an oracle in a test)
        return images
    size = visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def encode_images(model, images: torch.Tensor) -> torch.Tensor:
    """Normalised CLIP image features of ``images`` in [-1, 1], at any size."""
    return model.encode_image(fit_to_tower(images, model), normalize=True)


def default_holdout(data: str) -> str:
    """What ``clip train`` leaves out unless told: the shipped recipe's pairs on shapes, nothing elsewhere."""
    return ClipRecipe.holdout if data == "shapes" else ""


def make_dataset(name: str, image_size: int, seed: int, holdout):
    """A registered data set or a folder, with ``holdout`` (pairs, or a share of captions like "5%")."""
    from minidiff_cli.data.sources import open_dataset

    return open_dataset(name, image_size=image_size, seed=seed, holdout=holdout)


def batch_at(dataset, batch_size: int, seed: int, step: int):
    """The batch of ``step`` (images [B, 3, H, W], captions): random items, from a generator seeded by
    (seed, step), so a resumed run draws exactly the batches an uninterrupted one would have."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    indices = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
    items = [dataset[i] for i in indices]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


# -- training ------------------------------------------------------------------------
def _param_groups(model, weight_decay: float) -> list[dict]:
    """Decay the matrices only: not gains, biases, embeddings or the temperature (CLIP's practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, recipe: ClipRecipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_clip(recipe: ClipRecipe, callback: Optional[Callable[[dict], None]] = None,
               checkpoint: Optional[Path] = None, save_every: int = 250,
               on_start: Optional[Callable[[int], None]] = None):
    """Train a CLIP per ``recipe``; returns (model, summary).

    ``callback({"step", "loss", "smoothed", "lr"})`` runs each step; ``smoothed`` is the mean
    of the last 50 losses, the figure the summary reports. With ``checkpoint``, the state is
    saved there every ``save_every`` steps and on Ctrl-C / SIGTERM, and training continues
    from it when it exists. ``on_start(step)`` runs once the data is checked, before the first step.
    """
    import open_clip

    from minidiff_cli.training.trainer import stop_signals

    recipe.check()
    from minidiff_cli.runtime.threads import apply_threads

    apply_threads(recipe.threads or None)
    torch.manual_seed(recipe.seed)
    device = resolve_device(recipe.device)
    config = recipe.model_config()
    model = build_clip(config).to(device).train()
    tokenizer = tokenizer_for(config["text_cfg"])
    dataset = make_dataset(recipe.data, recipe.image_size, recipe.seed, recipe.holdout)
    captions = getattr(dataset, "captions", None)
    if isinstance(captions, list) and not any(captions):
        raise MinidiffError(f"'{recipe.data}' has no captions, and a CLIP learns from captions: add a "
                            "metadata.jsonl (file_name, text) or a .txt file next to each image")
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    step, losses = _resume_clip(checkpoint, model, optimizer, recipe)
    start, first_step = time.perf_counter(), step
    if on_start is not None:
        on_start(step)

    def save() -> None:
        if checkpoint is not None:
            _save_clip_checkpoint(checkpoint, model, optimizer, step, recipe, losses)

    with stop_signals(None) as stop_asked:
        try:
            while step < recipe.steps:
                losses.append(_clip_step(model, optimizer, loss_fn, tokenizer, dataset, recipe, step, device))
                step += 1
                if callback is not None:
                    callback({"step": step, "loss": losses[-1], "smoothed": _mean_tail(losses),
                              "lr": optimizer.param_groups[0]["lr"]})
                if step % save_every == 0 and step < recipe.steps:
                    save()
                if stop_asked() and step < recipe.steps:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            save()
            raise
    model.eval()
    summary = {"steps": recipe.steps, "wall_s": round(time.perf_counter() - start, 1),
               "resumed_at": first_step or None,
               "first_loss": round(losses[0], 4), "final_loss": round(_mean_tail(losses), 4),
               "recipe": dataclasses.asdict(recipe)}
    return model, summary


def _clip_step(model, optimizer, loss_fn, tokenizer, dataset, recipe: ClipRecipe, step: int, device) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, recipe)
    images, captions = batch_at(dataset, recipe.batch_size, recipe.seed, step)
    image_features, text_features, logit_scale = model(fit_to_tower(images.to(device), model),
                                                       tokenizer(captions).to(device))
    loss = loss_fn(image_features, text_features, logit_scale)
    if not torch.isfinite(loss):
        raise MinidiffError(f"the loss became {loss.item()} at step {step + 1}; lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return loss.item()


def _mean_tail(losses: list[float], n: int = 50) -> float:
    tail = losses[-min(n, len(losses)):]
    return sum(tail) / len(tail)


def _save_clip_checkpoint(path: Path, model, optimizer, step: int, recipe: ClipRecipe, losses) -> None:
    from minidiff_cli.training.checkpoint import save_checkpoint
    from minidiff_cli.files.atomic import ensure_writable_dir

    ensure_writable_dir(Path(path).parent)
    save_checkpoint(path, modules={"clip": model}, optimizer=optimizer, step=step,
                    train_config=dataclasses.asdict(recipe),
                    extra={"losses": [[step - len(losses) + k + 1, v] for k, v in enumerate(losses)][-5000:]})


def _resume_clip(path: Optional[Path], model, optimizer, recipe: ClipRecipe) -> tuple[int, list[float]]:
    """(step, losses) restored from the checkpoint at ``path``; (0, []) when there is none."""
    if path is None or not Path(path).exists():
        return 0, []
    from minidiff_cli.training.checkpoint import load_checkpoint, restore

    meta, tensors = load_checkpoint(path)
    stored = dict(meta["train"])
    mine = dataclasses.asdict(recipe)
    # The device, threads and length may change (a longer or shorter run goes on from here, on the
    # learning-rate schedule of the new length); anything else would train another model.
    free = ("device", "threads", "steps", "eval_images", "eval_images_per_class")
    changed = sorted(k for k in mine if k not in free and stored.get(k) != mine[k])
    if changed:
        raise MinidiffError(f"'{path}' was made with other settings ({', '.join(changed)}); resume with the "
                            "same ones or remove it to start again")
    step = restore(meta, tensors, Path(path), modules={"clip": model}, optimizer=optimizer)
    losses = [float(value) for _, value in meta.get("losses", [])]  # [step, loss] pairs, checked on load
    return step, losses or [float("nan")]


# -- evaluation ----------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def class_prompt(class_name: str) -> str:
    """``"orange square"`` -> ``"an orange square"``: the caption each class is ranked by."""
    return f"{_article(class_name)} {class_name}"


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


def evaluate(model, recipe: ClipRecipe) -> dict[str, Any]:
    """The CLIP's evaluation on its data: caption retrieval for a folder, zero-shot classes for shapes.

    A data set that lists its items' captions (a captioned folder) is judged by retrieval:
    each image ranks every caption of the folder. A procedural one with classes (shapes)
    is judged by zero-shot accuracy on fresh images of every class.
    """
    from minidiff_cli.data.dataset import parse_holdout
    from minidiff_cli.data.sources import holdout_fraction

    dataset = make_dataset(recipe.data, recipe.image_size, recipe.seed + 1_000_003, holdout=None)
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
    from minidiff_cli.data.sources import is_heldout

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


# -- the file ------------------------------------------------------------------------
def save_clip(path: str | os.PathLike, model, config: dict[str, Any], evaluation: dict[str, Any],
              training: dict[str, Any], *, include_vision: bool = True, overwrite: bool = False) -> Path:
    """Write the CLIP's tensors (float16, open_clip names) and metadata; never overwrites unless asked."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith("visual.") and not include_vision:
            continue
        value = value.detach().cpu()
        tensors[key] = (value.half() if value.is_floating_point() else value).contiguous()
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config),
                "eval": json.dumps(evaluation), "training": json.dumps(training),
                "contents": "text+vision" if include_vision else "text"}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)


def load_clip(path: str | os.PathLike):
    """(open_clip.CLIP in float32, metadata) from a ``minidiff clip train`` file with its image tower."""
    path = Path(path)
    metadata, tensors = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"'{path}' is not a minidiff-clip file (made by `minidiff clip train`)")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise ModelFileError(f"'{path}' has no readable CLIP config") from None
    if not isinstance(config, dict) or not isinstance(config.get("vision_cfg"), dict):
        raise ModelFileError(f"'{path}' holds no image tower (a text encoder only)")
    try:  # allow-listed and bounded before anything is built from it
        config = check_clip_model_config(config)
    except MinidiffError as exc:
        raise ModelFileError(f"'{path}' has an invalid CLIP config: {exc}") from None
    with torch.device("meta"):  # shapes first: a file that does not fit its config allocates nothing
        expected = {k: tuple(v.shape) for k, v in build_clip(config).state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in tensors.items()}:
        raise ModelFileError(f"'{path}' does not match its config, or holds no image tower "
                             "(it was saved with --no-vision)")
    model = build_clip(config)
    model.load_state_dict(tensors, strict=True)
    return model.float().eval(), metadata

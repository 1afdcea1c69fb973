"""Train a small CLIP on captioned images, so the ``clip`` conditioner has a text encoder.

No pretrained weights can be downloaded here, so minidiff trains its own CLIP
(Radford et al. 2021) with open_clip: ``open_clip.CLIP`` with a small ViT image
tower and a small text transformer, open_clip's tokenizer and its symmetric
contrastive ``ClipLoss`` (Sec. 2.3: cross-entropy over the image-text cosine
similarities, scaled by a learned temperature, in both directions).

Pairs held out of the data set (``holdout``) are never seen in training; the
zero-shot evaluation reports them apart, to show whether the text encoder
composes a colour and a shape it never saw together.

It writes a CLIP file (``clip/clip_file.py``: both towers, the config and the evaluation),
which ``minidiff train --conditioner clip --clip-weights FILE`` reads. The evaluation itself
(retrieval, zero-shot accuracy) is ``evaluation/clip.py``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from minidiff_cli.clip.clip_file import build_clip, fit_to_tower
from minidiff_cli.clip.config import check_clip_model_config
from minidiff_cli.clip.tokenizer import tokenizer_for
from minidiff_cli.data.sources import open_dataset
from minidiff_cli.errors import MinidiffError
from minidiff_cli.training.optim import warmup_cosine

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
    # watching it: the validation loss every val_every steps (and at the end); --log-with (tracking.py)
    val_every: int = 100
    log_with: str = "none"
    log_dir: Optional[str] = None

    def check(self) -> "ClipRecipe":
        for name in ("steps", "batch_size", "width", "heads", "layers", "context_length", "embed_dim",
                     "vision_width", "vision_layers", "patch_size", "image_size", "eval_images_per_class",
                     "val_every"):
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
        if self.log_with not in ("none", "tensorboard", "wandb"):
            raise MinidiffError(f"log-with must be tensorboard, wandb or none (got {self.log_with!r:.40})")
        if self.log_with != "none" and not self.log_dir:
            raise MinidiffError(f"log-with {self.log_with} needs a log-dir")
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


def default_holdout(data: str) -> str:
    """What ``clip train`` leaves out unless told: the shipped recipe's pairs on shapes, nothing elsewhere."""
    return ClipRecipe.holdout if data == "shapes" else ""


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
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    return warmup_cosine(step, recipe.lr, recipe.warmup, recipe.steps)


def train_clip(recipe: ClipRecipe, callback: Optional[Callable[[dict], None]] = None,
               checkpoint: Optional[Path] = None, save_every: int = 250,
               on_start: Optional[Callable[[int], None]] = None, name: str = "clip", tag_prefix: str = ""):
    """Train a CLIP per ``recipe``; returns (model, summary).

    ``callback({"step", "loss", "smoothed", "lr"})`` runs each step; ``smoothed`` is the mean
    of the last 50 losses, the figure the summary reports; every ``val_every`` steps and at the
    last, ``val_loss`` too (the contrastive loss on fixed held-out pairs, validation.py). With
    ``checkpoint``, the state is saved there every ``save_every`` steps and on Ctrl-C / SIGTERM, and
    training continues from it when it exists. ``on_start(step)`` runs once the data is checked,
    before the first step. ``recipe.log_with`` logs to TensorBoard or wandb as run ``name``, each tag
    after ``tag_prefix``.
    """
    import open_clip

    from minidiff_cli.runtime.signals import stop_signals

    recipe.check()
    from minidiff_cli.runtime.threads import apply_threads

    apply_threads(recipe.threads or None)
    torch.manual_seed(recipe.seed)
    device = resolve_device(recipe.device)
    config = recipe.model_config()
    model = build_clip(config).to(device).train()
    tokenizer = tokenizer_for(config["text_cfg"])
    dataset = open_dataset(recipe.data, image_size=recipe.image_size, seed=recipe.seed, holdout=recipe.holdout,
                           require_captions=True)
    captions = getattr(dataset, "captions", None)
    if isinstance(captions, list) and not any(captions):
        raise MinidiffError(f"'{recipe.data}' has no captions, and a CLIP learns from captions: add a "
                            "metadata.jsonl or metadata.csv (file_name, text) or a .txt file next to each image")
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    step, losses = _resume_clip(checkpoint, model, optimizer, recipe)
    start, first_step = time.perf_counter(), step
    if on_start is not None:
        on_start(step)
    watch = _Watch(recipe, name, model, tokenizer, dataset, device, loss_fn, tag_prefix)

    def save() -> None:
        if checkpoint is not None:
            _save_clip_checkpoint(checkpoint, model, optimizer, step, recipe, losses)

    with stop_signals(None) as stop_asked, watch:
        try:
            while step < recipe.steps:
                losses.append(_clip_step(model, optimizer, loss_fn, tokenizer, dataset, recipe, step, device,
                                         watch.norms))
                step += 1
                info = {"step": step, "loss": losses[-1], "smoothed": _mean_tail(losses),
                        "lr": optimizer.param_groups[0]["lr"], "it_s": (step - first_step) /
                        max(1e-9, time.perf_counter() - start)}
                watch.record(info, last=step == recipe.steps)
                if callback is not None:
                    callback(info)
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
    if watch.val_loss is not None:
        summary["val_loss"] = round(watch.val_loss, 4)
    return model, summary


def _clip_step(model, optimizer, loss_fn, tokenizer, dataset, recipe: ClipRecipe, step: int, device,
               norms: Optional[list] = None) -> float:
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
    if norms is not None:  # a tracker is on: the gradient norm, measured (max_norm inf clips nothing)
        norms[:] = [torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)]
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return loss.item()


class _Watch:
    """The validation loss every ``val_every`` steps, and what --log-with shows (a context: closes the tracker)."""

    def __init__(self, recipe: ClipRecipe, name: str, model, tokenizer, dataset, device, loss_fn, prefix: str = ""):
        from minidiff_cli.training.tracking import open_tracker

        self.recipe, self.model, self.loss_fn, self.prefix = recipe, model, loss_fn, prefix
        self.make = lambda: _clip_validation(recipe, model, tokenizer, dataset, device)
        self.validation, self.val_loss = None, None
        self.tracker = open_tracker(recipe.log_with, recipe.log_dir or ".", name=name,
                                    config=dataclasses.asdict(recipe))
        self.norms: Optional[list] = [] if self.tracker.active else None

    def record(self, info: dict, last: bool) -> None:
        step = info["step"]
        if step % self.recipe.val_every == 0 or last:
            if self.validation is None:
                self.validation = self.make()
                info["validation"] = self.validation.description  # what it is measured on, said once
            value = self.validation.loss(self.model, self.loss_fn)
            if value is not None:
                info["val_loss"] = self.val_loss = value
        if self.tracker.active:
            from minidiff_cli.training.tracking import log_record

            if self.norms:
                info["grad_norm"] = float(self.norms[0])
            log_record(self.tracker, info, extra=lambda r: {"train/logit_scale": float(self.model.logit_scale.detach().exp())},
                       prefix=self.prefix)

    def __enter__(self) -> "_Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.tracker.close()


def _clip_validation(recipe: ClipRecipe, model, tokenizer, dataset, device):
    from minidiff_cli.training.validation import ClipValidation

    def reopen():  # without the held-out pairs' holdout: their images exist there
        return open_dataset(recipe.data, image_size=recipe.image_size, seed=recipe.seed, holdout="")

    return ClipValidation(model, tokenizer, dataset, reopen, device)


def _mean_tail(losses: list[float], n: int = 50) -> float:
    tail = losses[-min(n, len(losses)):]
    return sum(tail) / len(tail)


def _save_clip_checkpoint(path: Path, model, optimizer, step: int, recipe: ClipRecipe, losses) -> None:
    from minidiff_cli.files.atomic import ensure_writable_dir
    from minidiff_cli.training.checkpoint import save_checkpoint

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
    free = ("device", "threads", "steps", "eval_images", "eval_images_per_class", "val_every", "log_with", "log_dir")
    changed = sorted(k for k in mine if k not in free and stored.get(k) != mine[k])
    if changed:
        raise MinidiffError(f"'{path}' was made with other settings ({', '.join(changed)}); resume with the "
                            "same ones or remove it to start again")
    step = restore(meta, tensors, Path(path), modules={"clip": model}, optimizer=optimizer)
    losses = [float(value) for _, value in meta.get("losses", [])]  # [step, loss] pairs, checked on load
    return step, losses or [float("nan")]


# -- evaluation ----------------------------------------------------------------------


# -- the file ------------------------------------------------------------------------



"""The validation loss: a run's loss on images it does not train on, comparable from step to step.

Every sample step, ``train``, ``clip train`` and ``vae train`` measure their loss on a fixed set of
up to VAL_IMAGES images: those of the held-out captions (``--holdout 5%``), or of the held-out
colour-shape pairs (shapes with a text conditioner; a class embedding of a held-out pair never
trains, so a class-conditional run falls back to the next case), or else a fixed, evenly spread
slice of the training images, which the run's log then says. The inputs are made once, from their
own generator: for diffusion the timesteps are spread evenly over the schedule (image k at
(k + 1/2) T / n) with fixed noise, so a change in the number is a change in the weights. The
weights being trained are measured (as the training loss is), in eval mode and without gradients;
no random state of the run is touched, so runs resume bit for bit as before.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

VAL_IMAGES = 32
VAL_SEED = 0x5EED_0FF  # the validation noise's generator, offset from the run's seed
SCAN_LIMIT = 400  # items looked at per wanted image when picking a held-out pair's images


def validation_items(dataset, reopen: Callable[[], Any] | None = None,
                     limit: int = VAL_IMAGES) -> tuple[Any, list[int], str]:
    """(the data set to read them from, its item indices, what they are) for the validation loss.

    ``reopen()`` opens the data set without its holdout (for held-out pairs); None skips that case."""
    inner, held = getattr(dataset, "dataset", None), getattr(dataset, "heldout_captions", None)
    if inner is not None and held:
        from minidiff_cli.data.holdout import item_captions

        held = set(held)
        indices = [i for i, caption in enumerate(item_captions(inner)) if caption in held]
        if indices:
            return inner, spread(indices, limit), "images of held-out captions"
    pairs = getattr(dataset, "holdout", None)
    if pairs and reopen is not None and not isinstance(pairs, str):
        full = reopen()
        names = {f"{c} {s}" for c, s in pairs}
        indices = []
        for i in range(min(len(full), SCAN_LIMIT * limit)):
            if _class_name(full, i) in names:
                indices.append(i)
                if len(indices) == limit:
                    break
        if indices:
            return full, indices, "images of held-out pairs"
    return dataset, spread(range(len(dataset)), limit), "training images (the data has no held-out images)"


def _class_name(dataset, index: int) -> str | None:
    spec = getattr(dataset, "spec", None)
    if spec is not None:  # shapes: what an item shows, without drawing it
        s = spec(index)
        return f"{s.colour} {s.shape}"
    names = getattr(dataset, "class_names", None) or []
    label = dataset[index].get("label")
    return names[label] if isinstance(label, int) and 0 <= label < len(names) else None


def spread(indices, limit: int) -> list[int]:
    """Up to ``limit`` of ``indices``, evenly spaced over them."""
    indices = list(indices)
    n = min(limit, len(indices))
    return [indices[k * len(indices) // n] for k in range(n)]


def described(n: int, what: str) -> str:
    return f"validation loss on {n} {what}, at fixed timesteps and noise"


class DiffusionValidation:
    """The diffusion loss of ``trainer``'s objective on fixed images, timesteps, noise and conditions."""

    def __init__(self, trainer):
        from minidiff_cli.data.sources import open_dataset
        from minidiff_cli.training.captions import _fresh

        cfg, model, device = trainer.cfg, trainer.model, trainer.device

        def reopen():  # the data without its held-out pairs' holdout, as the trainer opened it otherwise
            return open_dataset(cfg.data, image_size=cfg.image_size, seed=cfg.seed, holdout="")

        class_labels = trainer.net.conditioner is not None and hasattr(trainer.net.conditioner, "encode_labels")
        source, indices, what = validation_items(trainer.dataset, None if class_labels else reopen)
        items = [source[i] for i in indices]
        self.description = described(len(items), what)
        trainer.log(self.description)
        g = torch.Generator().manual_seed(VAL_SEED + cfg.seed)
        x0 = torch.stack([it["image"] for it in items]).to(device)
        with torch.no_grad():
            if model.latent is not None:
                posterior = model.latent.autoencoder.encode(x0)
                x0 = model.latent.normalise(posterior.sample(torch.randn(posterior.mean.shape, generator=g)
                                                             .to(posterior.mean)))
            n, T = len(items), model.schedule.num_timesteps
            self.t = ((torch.arange(n) + 0.5) * T / n).long().clamp(max=T - 1).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            self.x_in, self.target = trainer._input_and_target(x0, noise, self.t)
            self.weights = trainer._weights(self.t)
            conditioner = model.conditioner
            if conditioner.name == "none":
                self.inputs: dict[str, torch.Tensor] = {}
            elif class_labels:
                labels = torch.tensor([it["label"] for it in items], device=device)
                self.inputs = {"labels": labels, "keep": torch.ones(n, dtype=torch.bool, device=device)}
            else:
                captions = [it["caption"] for it in items]
                cond = _fresh(conditioner, lambda: conditioner.encode(captions)).to(device)
                self.inputs = {"context": cond.context, "pooled": cond.pooled}
        self.chunk = max(1, cfg.batch_size // trainer.dist.world)  # no more at once than a training step

    def loss(self, net: torch.nn.Module, autocast: Callable[[], Any]) -> float:
        """The weighted mean squared error of ``net`` (unwrapped, not DDP) on the fixed inputs."""
        was_training = net.training
        net.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(self.t), self.chunk):
                    rows = slice(start, start + self.chunk)
                    inputs = {k: (v[rows] if v is not None else None) for k, v in self.inputs.items()}
                    with autocast():
                        out = net(self.x_in[rows], self.t[rows], **inputs)
                    per_row = F.mse_loss(out.float(), self.target[rows], reduction="none").mean(dim=(1, 2, 3))
                    total += float((per_row * self.weights[rows]).sum())
        finally:
            net.train(was_training)
        return total / len(self.t)


class ClipValidation:
    """The contrastive loss of a CLIP on fixed image-caption pairs (held out where the data holds some out)."""

    def __init__(self, model, tokenizer, dataset, reopen: Callable[[], Any] | None, device):
        from minidiff_cli.clip.clip_file import fit_to_tower

        source, indices, what = validation_items(dataset, reopen)
        items = [source[i] for i in indices]
        self.description = described(len(items), what).replace(", at fixed timesteps and noise", "")
        self.images = fit_to_tower(torch.stack([it["image"] for it in items]).to(device), model)
        self.tokens = tokenizer([it["caption"] for it in items]).to(device)

    def loss(self, model, loss_fn) -> float | None:
        if len(self.tokens) < 2:  # a contrastive loss needs a negative
            return None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(loss_fn(*model(self.images, self.tokens)))
        finally:
            model.train(was_training)


class VAEValidation:
    """The VAE's training loss without its adversarial term (L1 reconstruction + weighted KL) on the
    check images, with fixed posterior noise."""

    def __init__(self, images: torch.Tensor, autoencoder, seed: int, what: str):
        f, c = autoencoder.config.factor, autoencoder.config.latent_channels
        g = torch.Generator().manual_seed(VAL_SEED + seed)
        self.x = images
        self.noise = torch.randn((len(images), c, images.shape[2] // f, images.shape[3] // f),
                                 generator=g).to(images.device)
        self.description = f"validation loss on {len(images)} {what}, with fixed noise"

    def loss(self, autoencoder, kl_weight: float, chunk: int) -> float:
        was_training = autoencoder.training
        autoencoder.eval()
        total = 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(self.x), chunk):
                    x, noise = self.x[start:start + chunk], self.noise[start:start + chunk]
                    recon, posterior = autoencoder(x, noise)
                    rec = (recon - x).abs().flatten(1).mean(1)
                    kl = posterior.kl() / x[0].numel()  # per image, as the training loss weighs it
                    total += float((rec + kl_weight * kl).sum())
        finally:
            autoencoder.train(was_training)
        return total / len(self.x)

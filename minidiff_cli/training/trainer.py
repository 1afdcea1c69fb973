"""The trainer: noise-prediction training with EMA, guidance dropout, checkpoints, DDP.

One step (Ho et al. 2020, Algorithm 1): take clean images x0, draw t and noise,
make x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, and regress the network's
output on the noise (or on v, Salimans & Ho 2022), optionally weighted by
min-SNR-gamma (Hang et al. 2023). A fraction ``cfg_dropout`` of the rows see the
null condition, which is what classifier-free guidance needs at sampling time.

Reproducible and resumable by construction: the data order, the timesteps and
the noise of step s on rank r come from generators seeded by (seed, s, r), so a
resumed run sees exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from minidiff_cli import plugins
from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.atomic import append_line, atomic_write, ensure_writable_dir
from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.diffusion.timestep_sampling import draw_timesteps
from minidiff_cli.training.config import RESUMABLE, TrainConfig
from minidiff_cli.data.vocabulary import vocabulary
from minidiff_cli.data.dataset import EpochShuffle, caption_set

# The run folder's names live in runfolder.py (which checks whose a folder is); imported from here too.
from minidiff_cli.training.run_folder import CHECKPOINT, MODEL, check_contents, check_creatable  # noqa: E402,F401

RUN_CONFIG = "train_config.json"
POSTERIOR_CACHE_BYTES = 512 * 1024**2  # a latent model's posteriors of every item, kept if they fit
METRICS = "metrics.jsonl"


# -- distributed ------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def start_training(cfg) -> tuple[torch.device, Dist, Any]:
    """(device, Dist, AutoThreads) of a training run (`train`, `vae train`): the thread count set,
    torchrun's process group joined, each rank on its own GPU; a batch too small to share refused."""
    from minidiff_cli.inference.pipeline import pick_device
    from minidiff_cli.runtime.threads import AutoThreads, apply_threads

    device = pick_device(cfg.device)
    apply_threads(cfg.threads or None)
    auto_threads = AutoThreads(cfg.threads or None)  # follows other work during a long run
    dist = init_distributed(device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if cfg.batch_size < dist.world:
        raise MinidiffError(f"--batch-size {cfg.batch_size} is smaller than the {dist.world} processes; "
                            "each needs at least one image per step")
    return device, dist, auto_threads


def wrap_ddp(module: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under torchrun; itself in a single process."""
    if dist.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


# -- the network being trained ------------------------------------------------------------
class TrainNet(torch.nn.Module):
    """The U-Net plus a trainable conditioner, as one module (what DDP wraps)."""

    def __init__(self, model: DiffusionModel):
        super().__init__()
        self.unet = model.unet
        self.conditioner = model.conditioner if getattr(model.conditioner, "trainable", False) else None

    def forward(self, x, t, context=None, pooled=None, labels=None, keep=None):
        if labels is not None:  # a trainable class embedding, looked up inside forward for DDP
            cond = self.conditioner.encode_labels(labels)
            if keep is not None:
                cond = cond.where(keep, self.conditioner.null(1))
            pooled = cond.pooled
        return self.unet(x, t, context=context, pooled=pooled)


def ema_update(ema: list[torch.Tensor], net: list[torch.Tensor], decay: float) -> None:
    """ema <- ema + (1 - decay) (net - ema), over matching lists of parameters, in one op.

    One multi-tensor op for the ~300 tensors instead of one op each: on a GPU that is one
    launch instead of hundreds, which for a small U-Net cost more than the arithmetic. The
    lists are built once by the caller: walking the modules for them costs ~1 ms a step.
    """
    with torch.no_grad():
        torch._foreach_lerp_(ema, net, 1 - decay)


def adamw(params: list[torch.Tensor], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors) where this torch has that for the device.

    For the shipped U-Net on a 2-core CPU the optimizer step took 7.4 ms unfused and 1.4 ms
    fused; on a GPU it is one launch instead of several per tensor.
    """
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=device.type in ("cpu", "cuda"))
    except RuntimeError:  # a torch without fused AdamW for this device (CPU before 2.4)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at lr_decay_steps (else max_steps), then flat."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    horizon = cfg.lr_decay_steps or cfg.max_steps
    progress = min(1.0, (step - cfg.warmup) / max(1, horizon - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- the trainer -------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print):
        if not cfg.lr_decay_steps:  # fixed now, so that resuming with more steps keeps the schedule
            cfg = dataclasses.replace(cfg, lr_decay_steps=cfg.max_steps)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.log = log
        self.device, self.dist, self.auto_threads = start_training(cfg)
        self._check_run_dir(resume)
        self.resuming = resume
        self.dataset = self._dataset()
        self.model = self._model()
        self.model.unet.config.check_activations(max(1, cfg.batch_size // self.dist.world))  # before a step runs
        self.net = TrainNet(self.model).to(self.device)
        self.ema = self._ema_copy()
        self.ema_params, self.net_params = list(self.ema.parameters()), list(self.net.parameters())
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = adamw(params, cfg, self.device)
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.caption_rows: dict[str, int] = {}  # caption -> its row in caption_table
        self.caption_table: Conditioning | None = None
        if resume:
            self._resume()
        self.ddp = self._wrap_ddp()
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16" and self.device.type == "cuda")

    # -- set-up --------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool) -> None:
        check_contents(self.out, resume)
        if self.dist.main:
            check_creatable(self.out)

    def _dataset(self):
        from minidiff_cli.data.sources import open_dataset

        cfg = self.cfg
        opts = {"require_classes": True} if self._conditioner_name() == "class" else {}
        return open_dataset(cfg.data, image_size=cfg.image_size, seed=cfg.seed, holdout=cfg.holdout, **opts)

    def _conditioner_name(self) -> str:
        """--conditioner, or the conditioner of the --init-from model, which brings its own."""
        if self.cfg.init_from:
            from minidiff_cli.files.model_file import read_config

            return str(read_config(self.cfg.init_from).get("conditioner", {}).get("name"))
        return self.cfg.conditioner

    def _conditioner(self):
        cfg = self.cfg
        cls = plugins.get_conditioner(cfg.conditioner)
        if cfg.conditioner == "class":
            if not self.dataset.class_names:
                raise MinidiffError("--conditioner class needs a data set with classes (subfolders for a folder)")
            return cls.from_options(class_names=list(self.dataset.class_names), dim=cfg.class_dim)
        if cfg.conditioner == "clip":
            opts = {k: v for k, v in (("weights", cfg.clip_weights), ("arch", cfg.clip_arch),
                                      ("pretrained", cfg.clip_pretrained)) if v}
            if not opts:
                raise MinidiffError("--conditioner clip needs --clip-weights FILE (e.g. from `minidiff clip train`) "
                                    "or --clip-arch NAME --clip-pretrained TAG_OR_FILE")
            return cls.from_options(**opts)
        return cls.from_options()

    def _model(self) -> DiffusionModel:
        cfg = self.cfg
        if cfg.init_from:
            if cfg.vae:
                raise MinidiffError("the --init-from model brings its own latent space (or none); drop --vae")
            model = DiffusionModel.load(cfg.init_from)
            if model.image_size != cfg.image_size:
                raise MinidiffError(f"--init-from model is {model.image_size}px but --image-size is {cfg.image_size}")
            if model.channels != self.dataset.channels:
                raise MinidiffError(f"--init-from model has {model.channels} channels but the data has "
                                    f"{self.dataset.channels}")
            names = getattr(model.conditioner, "class_names", None)
            if names is not None and list(names) != list(self.dataset.class_names):
                raise MinidiffError("the --init-from model was trained on other classes than the data has; "
                                    "its class labels would mean other things")
            if model.prediction == "flow" and cfg.min_snr_gamma:
                raise MinidiffError("--min-snr-gamma weights eps and v losses, and the --init-from model "
                                    "predicts a flow velocity")
            model.config["init_from"] = {"file": str(cfg.init_from), "hash": model.hash}
            return model
        latent, vae_entry = self._latent_space()
        torch.manual_seed(cfg.seed)  # the same initial weights (class embeddings too) on every rank and every run
        conditioner = self._conditioner()
        size, channels = cfg.image_size, self.dataset.channels
        if latent is not None:  # the U-Net works on the VAE's latents
            size, channels = size // latent.factor, latent.channels
        config = {
            "name": cfg.name or self.out.name,
            "unet": {"image_size": size, "in_channels": channels,
                     "out_channels": channels, "base_channels": cfg.base_channels,
                     "channel_mult": list(cfg.channel_mult), "num_res_blocks": cfg.num_res_blocks,
                     "attention_resolutions": list(cfg.attention_resolutions),
                     "cross_attention_resolutions": list(cfg.cross_attention_resolutions),
                     "context_dim": conditioner.context_dim, "pooled_dim": conditioner.pooled_dim,
                     "head_dim": cfg.head_dim, "dropout": cfg.dropout},
            "schedule": schedule_entry(cfg),
            "conditioner": {"name": conditioner.name, "config": conditioner.config()},
            "prediction": cfg.prediction,
            "class_names": list(self.dataset.class_names),
        }
        if vae_entry is not None:
            config["vae"] = vae_entry
        model = DiffusionModel.build(config, conditioner=conditioner)
        if latent is not None:
            model.latent = latent  # the trained VAE, not the fresh one build() made from its config
        return model

    def _latent_space(self):
        """(LatentSpace, its config entry) of --vae, its shift and scale measured on the data; (None, None)
        for a pixel model."""
        cfg = self.cfg
        if not cfg.vae:
            return None, None
        from minidiff_cli.vae.latent_space import LatentSpace, measure
        from minidiff_cli.vae.vae_file import load_vae

        vae = load_vae(cfg.vae, self.device)
        self._check_same_vae(vae.hash)
        vae.autoencoder.check_size(cfg.image_size)
        if vae.config.in_channels != self.dataset.channels:
            raise MinidiffError(f"the VAE takes {vae.config.in_channels}-channel pictures but the data has "
                                f"{self.dataset.channels} channels")
        order = EpochShuffle(len(self.dataset), cfg.seed).batch(0, min(len(self.dataset), 512))

        def images(start: int, stop: int) -> torch.Tensor:
            return torch.stack([self.dataset[i]["image"] for i in order[start:stop]]).to(self.device)

        shift, scale, count = measure(vae.autoencoder, images, len(order), seed=cfg.seed)
        latent = LatentSpace(vae.autoencoder, shift, scale)
        if self.dist.main:
            self.log(f"latent space of {cfg.vae}: {latent.channels} channels at 1/{latent.factor} of the side; "
                     f"shift {shift:.4f}, scale {scale:.4f} (1 / std), measured on {count} training images")
        return latent, latent.entry(vae.hash, str(vae.meta.get("name", "")))

    def _ema_copy(self) -> TrainNet:
        import copy

        ema = copy.deepcopy(self.net).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
        return ema

    def _wrap_ddp(self):
        return wrap_ddp(self.net, self.dist, self.device)

    def _resume(self) -> None:
        from minidiff_cli.training.checkpoint import load_checkpoint, restore

        path = self.out / CHECKPOINT
        meta, tensors = load_checkpoint(path)
        self.step = restore(meta, tensors, path, modules={"net": self.net, "ema": self.ema},
                            optimizer=self.optimizer)
        self.losses = [tuple(x) for x in meta.get("losses", [])]
        if self.step >= self.cfg.max_steps:
            raise MinidiffError(f"the run in '{self.out}' already reached step {self.step}; "
                                f"raise --max-steps above it to train further")
        self._forget_metrics_after(self.step)

    def _check_same_vae(self, vae_hash: str) -> None:
        """A latent run resumes only with the VAE it started with: another one with the same shapes
        would load without complaint and make the U-Net's latents mean something else."""
        if not self.resuming or not (self.out / MODEL).is_file():
            return
        from minidiff_cli.files.model_file import read_config

        before = (read_config(self.out / MODEL).get("vae") or {}).get("hash")
        if before and before != vae_hash:
            raise MinidiffError(f"--vae {self.cfg.vae} is not the VAE this run started with (hash {vae_hash}, "
                                f"the run's is {before}); restore that file, or start a new run")

    # -- data ----------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int]:
        """This rank's share of the global batch of ``step``: epoch-wise shuffles, stateless."""
        if not hasattr(self, "_shuffle"):
            self._shuffle = EpochShuffle(len(self.dataset), self.cfg.seed)
        return self._shuffle.batch(step, self.cfg.batch_size, self.dist.rank, self.dist.world)

    def load_batch(self, step: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """(what the U-Net learns to draw, captions, labels) of ``step``: the images, or a latent model's
        latents of them."""
        indices = self.batch_indices(step)
        items = [self.dataset[i] for i in indices]
        labels = torch.tensor([it["label"] for it in items], device=self.device)
        captions = [it["caption"] for it in items]
        if self.model.latent is not None and self._posterior_table() is not None:
            return self._latents(step, indices, None), captions, labels
        images = torch.stack([it["image"] for it in items]).to(self.device)
        if self.model.latent is not None:
            return self._latents(step, indices, images), captions, labels
        return images, captions, labels

    def _latents(self, step: int, indices: list[int], images: torch.Tensor | None) -> torch.Tensor:
        """Posterior samples of the batch's latents, normalised. Their noise has its own generator, so a
        pixel model's stream of timesteps and noise is the same with or without this code."""
        from minidiff_cli.vae.autoencoder import Posterior

        latent = self.model.latent
        table = self._posterior_table()
        with torch.no_grad():
            if table is not None:
                rows = torch.tensor(indices, device=table.mean.device)
                posterior = Posterior(table.mean[rows], table.logvar[rows])
            else:
                posterior = latent.autoencoder.encode(images)
            g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 1_013 + self.dist.rank + 7)
            noise = torch.randn(posterior.mean.shape, generator=g).to(posterior.mean)
            return latent.normalise(posterior.sample(noise))

    def _posterior_table(self):
        """Every item's posterior (mean, log-variance), encoded once per run in fixed batches, where that
        pays: the run sees each item at least twice (over its fixed decay horizon) and the latents fit in
        POSTERIOR_CACHE_BYTES. None otherwise: each batch is encoded at its step."""
        if hasattr(self, "_posteriors"):
            return self._posteriors
        self._posteriors = None
        n, (c, h, w) = len(self.dataset), self.model.latent_shape
        if n * c * h * w * 8 > POSTERIOR_CACHE_BYTES or 2 * n > self.cfg.lr_decay_steps * self.cfg.batch_size:
            return None
        from minidiff_cli.vae.autoencoder import Posterior

        if self.dist.main:
            self.log(f"encoding the {n:,} training images into latents once for the run")
        means, logvars = [], []
        with torch.no_grad():
            for start in range(0, n, 64):
                x = torch.stack([self.dataset[i]["image"] for i in range(start, min(n, start + 64))]).to(self.device)
                posterior = self.model.latent.autoencoder.encode(x)
                means.append(posterior.mean)
                logvars.append(posterior.logvar)
        self._posteriors = Posterior(torch.cat(means), torch.cat(logvars))
        return self._posteriors

    def encode_captions(self, captions: list[str]) -> Conditioning:
        """A frozen conditioner's output, each distinct caption encoded once per run.

        Encoded captions are rows of one table on the training device, so a batch is one
        gather, not a concatenation of a row per caption.
        """
        missing = sorted({c for c in captions if c not in self.caption_rows})
        if missing:
            with torch.no_grad():
                enc = self.model.conditioner.encode(missing).to(self.device)
            first = len(self.caption_rows)
            self.caption_rows.update((caption, first + k) for k, caption in enumerate(missing))
            self.caption_table = enc if self.caption_table is None else Conditioning.cat(self.caption_table, enc)
        rows = torch.tensor([self.caption_rows[c] for c in captions], device=self.device)
        return self.caption_table[rows]

    # -- one step ------------------------------------------------------------------------
    def loss(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        x0, captions, labels = self.load_batch(step)
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + self.dist.rank)
        b = x0.shape[0]
        schedule = self.model.schedule
        t = draw_timesteps(cfg.timestep_sampling, schedule.num_timesteps, b, g, cfg.logit_mean,
                           cfg.logit_std).to(self.device)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        keep = (torch.rand(b, generator=g) >= cfg.cfg_dropout).to(self.device)
        x_in, target = self._input_and_target(x0, noise, t)
        kwargs = self._condition_inputs(captions, labels, keep)
        autocast = self._autocast()
        with autocast:
            out = self.ddp(x_in, t, **kwargs)
        per_row = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))
        return (per_row * self._weights(t)).mean()

    def _input_and_target(self, x0, noise, t) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network sees at timestep t and what it should answer, per prediction type."""
        schedule, prediction = self.model.schedule, self.model.prediction
        x_t = schedule.add_noise(x0, noise, t)
        if prediction == "flow":  # x = (1 - t) x0 + t eps and its velocity eps - x0 (schedule.py)
            return schedule.to_flow(x_t, t), noise - x0
        return x_t, schedule.v_target(x0, noise, t) if prediction == "v" else noise

    def _condition_inputs(self, captions, labels, keep) -> dict[str, Any]:
        name = self.model.conditioner.name
        if name == "none":
            return {}
        if self.net.conditioner is not None and hasattr(self.net.conditioner, "encode_labels"):
            return {"labels": labels, "keep": keep}
        cond = self.encode_captions(captions)
        cond = cond.where(keep, self.null_condition())
        return {"context": cond.context, "pooled": cond.pooled}

    def null_condition(self) -> Conditioning:
        if not hasattr(self, "_null"):
            with torch.no_grad():
                self._null = self.model.conditioner.null(1).to(self.device)
        return self._null

    def _weights(self, t: torch.Tensor) -> torch.Tensor:
        gamma = self.cfg.min_snr_gamma
        if not gamma:
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.model.schedule.snr(t).float().to(t.device)
        clipped = snr.clamp(max=gamma)
        return clipped / (snr + 1) if self.model.prediction == "v" else clipped / snr

    def _autocast(self):
        mp = self.cfg.mixed_precision
        if mp == "no":
            return nullcontext()
        dtype = torch.bfloat16 if mp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        loss = self.loss(self.step)
        if not torch.isfinite(loss):
            raise MinidiffError(f"the loss became {loss.item()} at step {self.step}; lower --lr or use "
                                "--mixed-precision no")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # Early in training a full decay would keep the EMA near random weights for too long.
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema_update(self.ema_params, self.net_params, decay)
        self.step += 1
        return loss.item()

    # -- files ---------------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint, then the EMA model file; both atomic, rank 0 only."""
        if not self.dist.main:
            return
        from minidiff_cli.training.checkpoint import save_checkpoint

        ensure_writable_dir(self.out)
        save_checkpoint(self.out / CHECKPOINT, modules={"net": self.net, "ema": self.ema},
                        optimizer=self.optimizer, step=self.step, train_config=self.cfg.to_dict(),
                        extra={"losses": self.losses[-5000:]})
        self.export_model().save(self.out / MODEL, overwrite=True)
        atomic_write(self.out / RUN_CONFIG, lambda p: p.write_text(json.dumps(self.cfg.to_dict(), indent=2)))
        self._plot_losses()

    def export_model(self) -> DiffusionModel:
        """The EMA weights as a normal model file, with a "training" section in its config."""
        ema_unet = self.ema.unet
        conditioner = self.ema.conditioner if self.ema.conditioner is not None else self.model.conditioner
        config = dict(self.model.config)
        captions = caption_set(self.dataset)
        if captions is not None:  # the words it trained on, so that generate can flag the others
            config["vocabulary"] = vocabulary(captions)
        config["card"] = model_card(self.cfg, captions)
        config["training"] = {"step": self.step, "data": self.cfg.data, "holdout": self.cfg.holdout,
                              "world_size": self.dist.world, "global_batch": self.cfg.batch_size,
                              "flags": self.cfg.to_dict(),
                              "final_loss": self.smoothed_loss()}
        return DiffusionModel(ema_unet, conditioner, self.model.schedule, config, latent=self.model.latent)

    def smoothed_loss(self) -> float | None:
        recent = [loss for _, loss in self.losses[-100:]]
        return sum(recent) / len(recent) if recent else None

    def _plot_losses(self) -> None:
        if len(self.losses) < 2:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, values = zip(*self.losses)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, values, lw=0.6, alpha=0.4, label="loss")
        window = max(1, len(values) // 50)
        smooth = [sum(values[max(0, i - window):i + 1]) / len(values[max(0, i - window):i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        atomic_write(self.out / "loss.png", lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)

    def sample_grid(self) -> dict[str, Any] | None:
        """Samples for fixed prompts with the EMA weights; a grid PNG and, on shapes, adherence."""
        if not self.dist.main:
            return None
        from minidiff_cli.evaluation.shapes_judge import default_prompts, sample_and_score

        prompts = self.cfg.sample_prompts or default_prompts(self.dataset, self.cfg.holdout)
        model = self.export_model()
        model.unet.eval()
        path = ensure_writable_dir(self.out / "samples") / f"step-{self.step:07d}.png"
        result = sample_and_score(model, prompts, path, shapes=self.cfg.data == "shapes")
        result.update(self.caption_metrics(model))
        return result

    def caption_metrics(self, model: DiffusionModel, captions: int = 100, steps: int = 25) -> dict[str, float]:
        """On a captioned folder whose CLIP (with its image tower) is at hand: the headline metrics of
        ``eval --data`` on a fixed set of ``captions`` captions; {} otherwise."""
        features = self._metric_clip()
        full = getattr(self.dataset, "dataset", self.dataset)  # with the held-out captions
        if features is None or not isinstance(getattr(full, "captions", None), list):
            return {}
        from minidiff_cli.evaluation.caption_eval import CaptionEvalSettings, evaluate_captions
        from minidiff_cli.inference.pipeline import Pipeline

        held = set(getattr(self.dataset, "heldout_captions", []))
        settings = CaptionEvalSettings(captions=captions, steps=steps, batch_size=50)
        report = evaluate_captions(Pipeline(model), full, features, settings, heldout=held.__contains__)
        g = report["generated"]
        keys = ("r_precision", "r_precision_seen", "r_precision_heldout", "clip_score", "fd_clip", "precision",
                "recall")
        return {key: g[key] for key in keys if g.get(key) is not None}

    def _metric_clip(self):
        """The run's CLIP with its image tower (stage 1's file, or --clip-weights when it has one), or None."""
        if not hasattr(self, "_clip_features"):
            from minidiff_cli.errors import ModelFileError
            from minidiff_cli.evaluation.features import load_clip_features

            self._clip_features = None
            weights = self.cfg.clip_weights
            if self.cfg.conditioner == "clip" and weights and Path(weights).is_file():
                try:
                    self._clip_features = load_clip_features(weights)
                except ModelFileError:  # a text-only file, or open_clip weights of another layout
                    self._clip_features = None
        return self._clip_features

    # -- the loop ------------------------------------------------------------------------
    def run(self, progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        start_step, start_time = self.step, time.time()
        self.net.train()
        last: dict[str, Any] = {}
        with stop_signals(self.log if self.dist.main else None) as stop_asked:
            try:
                while self.step < cfg.max_steps:
                    self.auto_threads.tick()
                    loss = self.train_step()
                    self.losses.append((self.step, loss))
                    last = {"step": self.step, "loss": loss, "smoothed": self.smoothed_loss(),
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "it_s": (self.step - start_step) / max(1e-9, time.time() - start_time)}
                    if self.step % cfg.sample_every == 0 or self.step == cfg.max_steps:
                        last["samples"] = self.sample_grid()
                        self.net.train()
                    if self.dist.main and (self.step % cfg.log_every == 0 or "samples" in last):
                        self._append_metrics(last)  # before the save: a checkpoint's own step is logged
                    if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                        self.save()
                    if progress is not None and self.dist.main:
                        progress(last)
                    if self.step < cfg.max_steps and self._any_rank(stop_asked()):
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                self.save()  # nothing lost: the interrupted step count is resumable
                raise
        self.check_replicas()
        return last

    def _any_rank(self, flag: bool) -> bool:
        return any_rank(flag, self.dist, self.device)

    def check_replicas(self) -> None:
        """DDP keeps every rank's weights identical; check it, so that a silent divergence cannot
        pass unnoticed (each rank hashes its weights and the hashes are compared)."""
        if self.dist.world == 1:
            return
        import torch.distributed as dist

        mine = torch.tensor([weights_fingerprint(self.net, self.ema)], device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.dist.world)]
        dist.all_gather(every, mine)
        differ = [rank for rank, value in enumerate(every) if value.item() != every[0].item()]
        if differ:
            raise MinidiffError(f"rank(s) {', '.join(map(str, differ))} ended with weights that differ from "
                                "rank 0's; the processes went out of sync")
        if self.dist.main:
            self.log(f"checked: all {self.dist.world} processes hold identical weights")

    def _forget_metrics_after(self, step: int) -> None:
        """A run killed after its last checkpoint logged steps that it will now redo: drop them."""
        path = self.out / METRICS
        if not self.dist.main or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if _record_step(line) <= step]
        if len(keep) != len(lines):
            atomic_write(path, lambda p: p.write_text("".join(keep)))

    def _append_metrics(self, record: dict[str, Any]) -> None:
        append_line(ensure_writable_dir(self.out) / METRICS, json.dumps({k: v for k, v in record.items() if v is not None}))


def any_rank(flag: bool, dist_info: Dist, device: torch.device) -> bool:
    """True on every rank if it is True on one: ranks must stop at the same step, or the
    others would wait forever in the next gradient all-reduce."""
    if dist_info.world == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def schedule_entry(cfg: TrainConfig) -> dict[str, Any]:
    """The model file's schedule: the flow schedule's shift, and zero terminal SNR only when asked for."""
    entry: dict[str, Any] = {"name": cfg.schedule, "num_timesteps": cfg.timesteps, "options": {}}
    if cfg.schedule == "flow":
        entry["options"]["shift"] = cfg.shift
    if cfg.zero_terminal_snr:
        entry["zero_terminal_snr"] = True
    return entry


def model_card(cfg: TrainConfig, captions: list[str] | None) -> dict[str, Any]:
    """What `info` and `models` say about a trained model: its description, example prompts, notice."""
    import hashlib

    examples = sorted((c for c in captions or [] if c), key=lambda c: hashlib.sha256(c.encode()).digest())[:6]
    card: dict[str, Any] = {"description": cfg.description or f"trained on {cfg.data}", "examples": examples}
    if cfg.notice:
        card["notice"] = cfg.notice
    return card


def _record_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by the kill


def weights_fingerprint(*modules: torch.nn.Module) -> int:
    """A 63-bit hash of the exact bytes of every tensor in ``modules``' state dicts."""
    import hashlib

    digest = hashlib.sha256()
    for module in modules:
        for key, value in module.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


@contextmanager
def stop_signals(log: Callable[[str], None] | None):
    """SIGTERM (e.g. from a job scheduler) or Ctrl-C: finish the current step, save, stop.

    Stopping between steps keeps the checkpoint exactly resumable; a second Ctrl-C stops at
    once (the trainer still saves). Yields ``stop_asked() -> bool``; the previous handlers
    are restored on the way out.
    """
    asked = {"stop": False}

    def handler(signum, frame):
        if asked["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked["stop"] = True
        if log is not None:
            log("stopping after this step, then saving (Ctrl-C again to stop now)")

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread: signals stay as they are
        pass
    try:
        yield lambda: asked["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def check_resume_flags(stored: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """On --resume the stored recipe stands; only RESUMABLE flags may change."""
    values = stored.to_dict()
    for key, value in given.items():
        if value is None or values.get(key) == value:
            continue
        if key not in RESUMABLE:
            raise MinidiffError(f"--{key.replace('_', '-')} cannot change when resuming "
                                f"(the run used {values.get(key)!r})")
        values[key] = value
    return TrainConfig.from_dict(values)

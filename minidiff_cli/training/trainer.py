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
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from minidiff_cli import plugins
from minidiff_cli.data.dataset import EpochShuffle, caption_set
from minidiff_cli.data.vocabulary import vocabulary
from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.diffusion.timestep_sampling import draw_timesteps
from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.atomic import atomic_write, ensure_writable_dir
from minidiff_cli.runtime.devices import to_device
from minidiff_cli.runtime.distributed import any_rank, check_replicas, start_training, wrap_ddp
from minidiff_cli.training.captions import CaptionTable
from minidiff_cli.training.config import TrainConfig
from minidiff_cli.training.loop import METRICS, forget_metrics_after, loss_error, run_steps, smoothed  # noqa: F401 (METRICS: the run file's name, imported from here too)
from minidiff_cli.training.latents import draw_latents, open_latent_space, posterior_table
from minidiff_cli.training.loss_plot import plot_losses
from minidiff_cli.training.model_card import model_card, schedule_entry
from minidiff_cli.training.optim import adamw, ema_update, lr_at
from minidiff_cli.training.run_folder import CHECKPOINT, MODEL, check_contents, check_creatable
from minidiff_cli.training.tracking import NULL as NULL_TRACKER

RUN_CONFIG = "train_config.json"
LOSS_HINT = "lower --lr or use --mixed-precision no"


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


# -- the trainer -------------------------------------------------------------------------
class Trainer:
    """One diffusion training run, from its recipe to a run folder: ``Trainer(cfg).run()``.

    It opens the data, builds the model (or loads ``--init-from``), and trains the U-Net (and a
    trainable class embedding) to predict noise, v or flow velocity, with an EMA copy that is
    what the model file holds. Every ``save_every`` steps it writes an exactly resumable
    checkpoint and the model file; every ``sample_every`` steps it draws samples and measures
    them. Under torchrun each rank trains its share of every batch through DDP. ``Ctrl-C`` or
    SIGTERM finishes the step and saves; ``Trainer(cfg, resume=True)`` goes on from there.
    """

    loss_hint = LOSS_HINT  # what the one line of a non-finite loss advises (loop.PendingLosses reads it too)

    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print):
        if not cfg.lr_decay_steps:  # fixed now, so that resuming with more steps keeps the schedule
            cfg = dataclasses.replace(cfg, lr_decay_steps=cfg.max_steps)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.log = log
        self.device, self.dist, self.auto_threads = start_training(cfg)
        if cfg.compile:
            from minidiff_cli.training.compiled import check_can_compile

            check_can_compile(self.device)
        self._check_run_dir(resume)
        self.resuming = resume
        self.dataset = self._dataset()
        self.model = self._model()
        self.model.unet.config.check_activations(max(1, cfg.batch_size // self.dist.world))  # before a step runs
        if cfg.sample_prompts:  # each line must fit the schedule and the conditioner, before a step runs
            from minidiff_cli.training.sample_prompts import check_against

            check_against(cfg.sample_prompts, self.model)
        # The whole model to the device, a latent model's VAE too: --init-from and --resume load it on the CPU.
        self.net = TrainNet(self.model.to(self.device))
        self.ema = self._ema_copy()
        self.ema_params, self.net_params = list(self.ema.parameters()), list(self.net.parameters())
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = adamw(params, cfg, self.device)
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.captions: CaptionTable | None = None  # a frozen conditioner's encoded captions, made at first use
        self.tracker, self.grad_norm = NULL_TRACKER, None  # --log-with's, opened by run(); the last step's norm
        if resume:
            self._resume()
        self.ddp = self._wrap_ddp()
        if cfg.compile:  # the plain self.net is what checkpoints and the EMA see (compiled.py)
            from minidiff_cli.training.compiled import CompiledForward

            self.ddp = CompiledForward(self.ddp)
        # On CUDA a step's loss stays on the device and the loop reads it at log, sample and save steps
        # (loop.PendingLosses): reading it every step made the host wait for the GPU every step.
        self.defer_loss_check = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.mixed_precision == "fp16" and self.device.type == "cuda")

    # -- set-up --------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool) -> None:
        check_contents(self.out, resume)
        if self.dist.main:
            check_creatable(self.out)

    def _dataset(self):
        from minidiff_cli.data.sources import open_dataset

        cfg = self.cfg
        name = self._conditioner_name()  # a text conditioner learns from captions: every image needs one
        opts = {"require_classes": True} if name == "class" else {} if name == "none" else {"require_captions": True}
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
        """(LatentSpace, its config entry) of --vae, measured on the data; (None, None) for a pixel model."""
        if not self.cfg.vae:
            return None, None
        return open_latent_space(self.cfg, self.dataset, self.device, self.log if self.dist.main else None,
                                 resumed_from=self.out / MODEL if self.resuming else None)

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
        if self.dist.main:
            forget_metrics_after(self.out, self.step)

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
        if self.model.latent is not None and self._posterior_table() is not None:
            # The latents come from the table: the items' pictures are not needed, only their text and class.
            captions, labels = self._captions_and_labels(indices)
            return self._latents(step, indices, None), captions, labels
        items = [self.dataset[i] for i in indices]
        labels = to_device(torch.tensor([it["label"] for it in items]), self.device)
        captions = [it["caption"] for it in items]
        images = to_device(torch.stack([it["image"] for it in items]), self.device)
        if self.model.latent is not None:
            return self._latents(step, indices, images), captions, labels
        return images, captions, labels

    def _latents(self, step: int, indices: list[int], images: torch.Tensor | None) -> torch.Tensor:
        return draw_latents(self.model.latent, self._posterior_table(), indices, images,
                            seed=self.cfg.seed, step=step, rank=self.dist.rank)

    def _captions_and_labels(self, indices: list[int]) -> tuple[list[str], torch.Tensor]:
        """The captions and labels of ``indices``, read from each item once per run: an item is the same
        whenever it is asked for (the data set contract), and reading it again at every step decoded a
        picture that a latent run with a posterior table never uses."""
        if not hasattr(self, "_item_text"):
            items = (self.dataset[i] for i in range(len(self.dataset)))
            self._item_text = [(it["caption"], it["label"]) for it in items]
        captions = [self._item_text[i][0] for i in indices]
        return captions, to_device(torch.tensor([self._item_text[i][1] for i in indices]), self.device)

    def _posterior_table(self):
        if not hasattr(self, "_posteriors"):
            self._posteriors = posterior_table(self.model.latent, self.dataset, self.model.latent_shape, self.cfg,
                                               self.device, self.log if self.dist.main else None)
        return self._posteriors

    def encode_captions(self, captions: list[str]) -> Conditioning:
        """A frozen conditioner's output, each distinct caption encoded once per run, in batches fixed by the
        data set alone (training/captions.py): a resumed run conditions on the same bits."""
        return self._caption_table().encode(captions)

    def _caption_table(self) -> CaptionTable:
        if self.captions is None:
            self.captions = CaptionTable(self.model.conditioner, self.device, caption_set(self.dataset))
        return self.captions

    # -- one step ------------------------------------------------------------------------
    def loss(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        x0, captions, labels = self.load_batch(step)
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + self.dist.rank)
        b = x0.shape[0]
        schedule = self.model.schedule
        # Drawn on the CPU from the step's generator (so the numbers are the same on any device), then
        # queued to the device without waiting for it (to_device). The schedule's coefficients are looked
        # up with the CPU copy of t: looking them up with a GPU tensor would read it back, a wait per step.
        t_cpu = draw_timesteps(cfg.timestep_sampling, schedule.num_timesteps, b, g, cfg.logit_mean, cfg.logit_std)
        noise = to_device(torch.randn(x0.shape, generator=g), self.device)
        keep = to_device(torch.rand(b, generator=g) >= cfg.cfg_dropout, self.device)
        t = to_device(t_cpu, self.device)
        x_in, target = self._input_and_target(x0, noise, t_cpu)
        kwargs = self._condition_inputs(captions, labels, keep)
        autocast = self._autocast()
        with autocast:
            out = self.ddp(x_in, t, **kwargs)
        per_row = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))
        return (per_row * to_device(self._weights(t_cpu), self.device)).mean()

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
        return self._caption_table().null()

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

    def train_step(self) -> float | torch.Tensor:
        """One optimiser step; its loss as a float, or with ``defer_loss_check`` as a tensor on the device,
        which the loop reads and checks later (loop.PendingLosses)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        loss = self.loss(self.step)
        if not self.defer_loss_check and not torch.isfinite(loss):
            raise loss_error(loss.item(), self.step, self.loss_hint)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip or self.tracker.active:  # the norm is free where it clips; inf only measures
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # Early in training a full decay would keep the EMA near random weights for too long.
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema_update(self.ema_params, self.net_params, decay)
        self.step += 1
        return loss.detach() if self.defer_loss_check else loss.item()

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
        return smoothed(self.losses)

    def _plot_losses(self) -> None:
        plot_losses(self.losses, self.out / "loss.png")

    def sample_grid(self) -> dict[str, Any] | None:
        """Samples for fixed prompts with the EMA weights; a grid PNG and, on shapes, adherence."""
        if not self.dist.main:
            return None
        from minidiff_cli.evaluation.shapes_judge import default_prompts, sample_and_score
        from minidiff_cli.training.sample_prompts import draw

        model = self.export_model()
        model.unet.eval()
        path = ensure_writable_dir(self.out / "samples") / f"step-{self.step:07d}.png"
        if self.cfg.sample_prompts:  # --sample-prompts: each line its own row and settings
            result = draw(model, self.cfg.sample_prompts, path, shapes=self.cfg.data == "shapes")
        else:
            prompts = default_prompts(self.dataset, self.cfg.holdout)
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

    def validation_loss(self) -> float | None:
        """The loss on fixed held-out images, timesteps and noise (training/validation.py); rank 0's."""
        from minidiff_cli.training.validation import DiffusionValidation

        if self.dist.main and not hasattr(self, "_validation"):
            self._validation = DiffusionValidation(self)
        return self._validation.loss(self.net, self._autocast) if self.dist.main else None

    # -- the loop ------------------------------------------------------------------------
    def run(self, progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
        from minidiff_cli.training.tracking import open_tracker

        self.net.train()
        if self.dist.main:
            self.tracker = open_tracker(self.cfg.log_with, self.cfg.logs_folder(),
                                        name=self.cfg.name or self.out.name, config=self.cfg.to_dict())
        try:
            last = run_steps(self, progress, after_sample=self.net.train)
        finally:
            self.tracker.close()
            self.tracker = NULL_TRACKER
        self.check_replicas()
        return last

    @property
    def main(self) -> bool:
        return self.dist.main

    def any_rank(self, flag: bool) -> bool:
        return any_rank(flag, self.dist, self.device)

    def check_replicas(self) -> None:
        check_replicas(self.dist, self.device, (self.net, self.ema), self.log)

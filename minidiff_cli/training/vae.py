"""``minidiff vae train``: the autoencoder trained on a data set, resumable, with held-out checks.

The loss per image (Rombach et al. 2022, sec. 3 and appendix G, without the perceptual term,
whose pretrained network cannot be downloaded here):

    mean |x - D(z)|  +  kl_weight * KL(q(z|x) || N(0, 1)) / pixel values   [+ disc_weight * -P(D(z))]

kl_weight is on latent diffusion's scale (a sum of the KL over the latent against a sum of the
L1 over the pixels; 1e-6 in the paper), so the same number means the same here. A PatchGAN
term joins from ``disc_start`` when it is set.

As with ``minidiff train``: step s's images and noise come from generators seeded by (seed, s,
rank), so a resumed run equals an uninterrupted one; checkpoints are safetensors in the run
folder, with reconstructions of held-out images and the validation loss (training/validation.py)
every ``sample_every`` steps, and the EMA weights in the VAE file (``--out``) at every save.
``--log-with`` sends the metrics and the reconstruction grids to TensorBoard or wandb (tracking.py).

The VAE file lies outside the run folder, whose lock does not cover it: a new run claims its
name before it trains, by publishing the untrained file at step 0 only if the name is free (as
``generate`` claims names), so a second run given the same ``--out`` is refused instead of
replacing the first run's weights at its saves.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from minidiff_cli.data.dataset import EpochShuffle
from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.atomic import append_line, atomic_write, ensure_writable_dir
from minidiff_cli.training.tracking import NULL as NULL_TRACKER
from minidiff_cli.vae.autoencoder import Autoencoder, VAEConfig

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
RUN_CONFIG = "vae_config.json"
RUN_FILES = (CHECKPOINT, METRICS, RUN_CONFIG)
RESUMABLE = ("max_steps", "save_every", "sample_every", "log_every", "quiet", "device", "threads", "log_with",
             "log_dir")
EVAL_IMAGES = 64  # held-out images checked at each sample step


@dataclass
class VAETrainConfig:
    data: str = "shapes"
    image_size: int = 64
    holdout: str = "5%"  # of the images (of the captions, on a captioned folder): never trained on
    # the autoencoder
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # 3 levels: factor 4
    num_res_blocks: int = 1
    latent_channels: int = 4
    # the loss
    kl_weight: float = 1e-6
    disc_start: Optional[int] = None  # the step the PatchGAN term joins; None: no discriminator
    disc_weight: float = 0.1
    # optimisation
    max_steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    lr_decay_steps: int = 0  # 0: max_steps (fixed at the start, so resuming with more steps keeps it)
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    # files and display
    out: str = "vae.safetensors"
    run_dir: Optional[str] = None  # None: "<out without .safetensors>-run" beside it
    name: str = ""
    save_every: int = 250
    sample_every: int = 500
    log_every: int = 50
    device: str = "auto"
    threads: int = 0
    quiet: bool = False
    log_with: str = "none"  # tensorboard, wandb or none (tracking.py)
    log_dir: Optional[str] = None  # None: the run folder's logs/

    def __post_init__(self):
        self.channel_mult = list(self.channel_mult)
        self.validate()

    def vae_config(self) -> VAEConfig:
        return VAEConfig(3, self.base_channels, tuple(self.channel_mult), self.num_res_blocks, self.latent_channels)

    def run_folder(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        out = Path(self.out)
        stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
        return out.with_name(f"{stem}-run")

    def logs_folder(self) -> Path:
        return Path(self.log_dir) if self.log_dir else self.run_folder() / "logs"

    def validate(self) -> None:
        checks = [
            (8 <= self.image_size <= 512, f"--image-size {self.image_size} must be from 8 to 512"),
            (1 <= self.max_steps <= 10**9, f"--max-steps {self.max_steps} must be from 1 to 10^9"),
            (1 <= self.batch_size <= 4096, f"--batch-size {self.batch_size} must be from 1 to 4096"),
            (0 < self.lr < 1, f"--lr {self.lr} must be above 0 and below 1"),
            (self.warmup >= 0 and self.lr_decay_steps >= 0, "--warmup and --lr-decay-steps cannot be negative"),
            (0 <= self.kl_weight <= 1, f"--kl-weight {self.kl_weight} must be from 0 to 1"),
            (0 <= self.disc_weight <= 10, f"--disc-weight {self.disc_weight} must be from 0 to 10"),
            (self.disc_start is None or self.disc_start >= 0, "--disc-start cannot be negative"),
            (0 <= self.ema_decay < 1, f"--ema-decay {self.ema_decay} must be from 0 to below 1"),
            (self.grad_clip >= 0 and self.weight_decay >= 0, "--grad-clip and --weight-decay cannot be negative"),
            (min(self.save_every, self.sample_every, self.log_every) >= 1,
             "--save-every, --sample-every and --log-every must be at least 1"),
            (str(self.out).endswith(".safetensors"), f"--out '{self.out}' must be a .safetensors file name"),
            (self.log_with in ("none", "tensorboard", "wandb"),
             f"--log-with must be tensorboard, wandb or none (got {self.log_with!r:.40})"),
        ]
        for ok, message in checks:
            if not ok:
                raise MinidiffError(message)
        factor = self.vae_config().factor  # validates the autoencoder's settings too
        if self.image_size % factor:
            raise MinidiffError(f"--image-size {self.image_size} is not a multiple of the VAE's factor {factor} "
                                f"({len(self.channel_mult)} levels of --channel-mult)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VAETrainConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise MinidiffError(f"unknown VAE training setting '{unknown[0]!s:.40}'")
        try:
            return cls(**data)
        except TypeError as exc:
            raise MinidiffError(f"bad VAE training settings: {exc}") from None


class VAETrainer:
    def __init__(self, cfg: VAETrainConfig, resume: bool = False, log: Callable[[str], None] = print):
        from minidiff_cli.runtime.distributed import start_training, wrap_ddp
        from minidiff_cli.training.optim import adamw

        if not cfg.lr_decay_steps:
            cfg = dataclasses.replace(cfg, lr_decay_steps=cfg.max_steps)
        self.cfg, self.log, self.run_dir = cfg, log, cfg.run_folder()
        self.device, self.dist, self.auto_threads = start_training(cfg)
        # This rank's share of a batch must fit, before anything is built (as the U-Net trainer checks).
        cfg.vae_config().check_size(cfg.image_size, max(1, cfg.batch_size // self.dist.world), "--image-size")
        self.dataset, self.train_items, self.heldout_items = self._data()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run
        self.autoencoder = Autoencoder(cfg.vae_config()).to(self.device)
        self.disc = None
        if cfg.disc_start is not None:
            from minidiff_cli.vae.discriminator import PatchDiscriminator

            self.disc = PatchDiscriminator(3).to(self.device)
        self.ema = copy.deepcopy(self.autoencoder).eval().requires_grad_(False)
        self.ema_params, self.net_params = list(self.ema.parameters()), list(self.autoencoder.parameters())
        groups = [{"params": list(self.autoencoder.parameters())}]
        if self.disc is not None:
            groups.append({"params": list(self.disc.parameters())})
        self.optimizer = adamw(groups, cfg, self.device)
        self.shuffle = EpochShuffle(len(self.train_items), cfg.seed)
        self.step, self.losses = 0, []
        self.tracker, self.grad_norm, self.validation = NULL_TRACKER, None, None
        self.claimed = resume  # whether the VAE file's name is this run's (a resumed run claimed it when it began)
        if resume:
            self._resume()
        self.net = wrap_ddp(self.autoencoder, self.dist, self.device)
        self.disc_net = None if self.disc is None else wrap_ddp(self.disc, self.dist, self.device)

    # -- set-up --------------------------------------------------------------------------
    def _data(self):
        from minidiff_cli.data.holdout import holdout_fraction, split_items
        from minidiff_cli.data.sources import open_dataset

        cfg = self.cfg
        fraction = holdout_fraction(cfg.holdout)
        if cfg.holdout and fraction is None:
            raise MinidiffError(f"--holdout for a VAE is a share of the images, such as 5% (got {cfg.holdout!r:.40})")
        dataset = open_dataset(cfg.data, image_size=cfg.image_size, seed=cfg.seed, holdout="")
        if getattr(dataset, "channels", 3) != 3:
            raise MinidiffError("the VAE trains on RGB pictures; this data set is not RGB")
        train, held = split_items(dataset, fraction)
        return dataset, train, held

    def _modules(self) -> dict[str, torch.nn.Module]:
        modules = {"net": self.autoencoder, "ema": self.ema}
        if self.disc is not None:
            modules["disc"] = self.disc
        return modules

    def _resume(self) -> None:
        from minidiff_cli.training.checkpoint import load_checkpoint, restore

        path = self.run_dir / CHECKPOINT
        meta, tensors = load_checkpoint(path)
        self.step = restore(meta, tensors, path, modules=self._modules(), optimizer=self.optimizer)
        self.losses = [tuple(x) for x in meta.get("losses", [])]
        if self.step >= self.cfg.max_steps:
            raise MinidiffError(f"the VAE run in '{self.run_dir}' already reached step {self.step}; "
                                "raise --max-steps above it to train further")

    # -- one step ------------------------------------------------------------------------
    def images(self, items: list[int]) -> torch.Tensor:
        return torch.stack([self.dataset[i]["image"] for i in items]).to(self.device)

    def losses_of(self, step: int) -> dict[str, torch.Tensor]:
        """The loss terms of ``step`` (each a scalar), with the images and noise of that step."""
        cfg = self.cfg
        x = self.images([self.train_items[k] for k in
                         self.shuffle.batch(step, cfg.batch_size, self.dist.rank, self.dist.world)])
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + self.dist.rank)
        f, c = self.autoencoder.config.factor, self.autoencoder.config.latent_channels
        noise = torch.randn((x.shape[0], c, x.shape[2] // f, x.shape[3] // f), generator=g).to(self.device)
        recon, posterior = self.net(x, noise)
        terms = {"rec": (recon - x).abs().mean(), "kl": posterior.kl().mean() / x[0].numel()}
        terms["loss"] = terms["rec"] + cfg.kl_weight * terms["kl"]
        if self.disc is not None and step >= cfg.disc_start:
            terms["g"] = -self.disc_net(recon).mean()
            terms["loss"] = terms["loss"] + cfg.disc_weight * terms["g"]
            terms["recon"], terms["x"] = recon, x
        return terms

    def train_step(self) -> dict[str, float]:
        from minidiff_cli.training.optim import ema_update, lr_at

        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        terms = self.losses_of(self.step)
        if not torch.isfinite(terms["loss"]):
            raise MinidiffError(f"the VAE loss became {terms['loss'].item()} at step {self.step}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if "g" in terms:  # the decoder's adversarial term also reached the discriminator: not its own loss
            from minidiff_cli.vae.discriminator import hinge_d_loss

            for p in self.disc.parameters():
                p.grad = None
            scores = self.disc_net(torch.cat([terms["x"], terms["recon"].detach()]))
            real, fake = scores.chunk(2)
            terms["d"] = hinge_d_loss(real, fake)
            terms["d"].backward()
        if self.cfg.grad_clip or self.tracker.active:  # the norm comes free with clipping; inf only measures
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.autoencoder.parameters(),
                                                            self.cfg.grad_clip or math.inf)
        self.optimizer.step()
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema_update(self.ema_params, self.net_params, decay)
        self.step += 1
        return {k: v.item() for k, v in terms.items() if v.dim() == 0}

    # -- checks and files ----------------------------------------------------------------
    def check_images(self) -> list[int]:
        """Up to EVAL_IMAGES fixed images the run never trains on (training images without a holdout)."""
        return (self.heldout_items or self.train_items)[:EVAL_IMAGES]

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """PSNR / SSIM of the EMA weights on the check images, and a grid of them (top: original)."""
        from minidiff_cli.evaluation.vae import reconstruct, reconstruction_grid, summarise

        items = self.check_images()
        x = self.images(items)
        recon = reconstruct(self.ema, x)
        report = summarise(recon, x)
        report["on"] = "held-out" if self.heldout_items else "training"
        path = ensure_writable_dir(self.run_dir / "samples") / f"step-{self.step:07d}.png"
        reconstruction_grid(x[:8], recon[:8], path)
        report["grid"] = str(path)
        return report

    def validation_loss(self) -> float:
        """The training loss less its adversarial term, on the check images with fixed noise (validation.py)."""
        if self.validation is None:
            from minidiff_cli.training.validation import VAEValidation

            what = "held-out images" if self.heldout_items else "training images (no images are held out)"
            self.validation = VAEValidation(self.images(self.check_images()), self.autoencoder, self.cfg.seed, what)
            self.log(self.validation.description)
        chunk = max(1, self.cfg.batch_size // self.dist.world)
        return self.validation.loss(self.autoencoder, self.cfg.kl_weight, chunk)

    def smoothed_loss(self) -> float | None:
        recent = [loss for _, loss in self.losses[-100:]]
        return sum(recent) / len(recent) if recent else None

    def save(self, claim: bool = False) -> None:
        """Checkpoint, then the VAE file (EMA weights); both atomic, rank 0 only.

        ``claim``: a new run's first save; the VAE file comes first and only under a free name, so that a
        run whose --out another run took is refused before it writes anything."""
        if not self.dist.main:
            return
        from minidiff_cli.files.atomic import NameTaken
        from minidiff_cli.training.checkpoint import save_checkpoint
        from minidiff_cli.vae.vae_file import save_vae

        meta = {"name": self.cfg.name or Path(self.cfg.out).stem, "image_size": self.cfg.image_size,
                "training": {"step": self.step, "data": self.cfg.data, "holdout": self.cfg.holdout,
                             "flags": self.cfg.to_dict(), "final_loss": self.smoothed_loss()}}
        if claim:
            try:
                save_vae(self.cfg.out, self.ema, meta, overwrite=False)
            except NameTaken:
                raise MinidiffError(f"'{self.cfg.out}' appeared after this run started (another run writing it?); "
                                    "choose another --out (a new run never replaces a file)") from None
        ensure_writable_dir(self.run_dir)
        save_checkpoint(self.run_dir / CHECKPOINT, modules=self._modules(), optimizer=self.optimizer,
                        step=self.step, train_config=self.cfg.to_dict(), extra={"losses": self.losses[-5000:]})
        if not claim:
            save_vae(self.cfg.out, self.ema, meta, overwrite=True)
        atomic_write(self.run_dir / RUN_CONFIG, lambda p: p.write_text(json.dumps(self.cfg.to_dict(), indent=2)))

    def claim(self) -> None:
        """A new run's first save, at step 0, which takes the VAE file's name (run() does it if not done)."""
        if not self.claimed:
            self.save(claim=True)
            self.claimed = True

    # -- the loop ------------------------------------------------------------------------
    def run(self, progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
        from minidiff_cli.runtime.distributed import any_rank
        from minidiff_cli.runtime.signals import stop_signals

        from minidiff_cli.training.tracking import log_record, open_tracker

        cfg, start_step, start_time = self.cfg, self.step, time.time()
        self.claim()
        self.autoencoder.train()
        last: dict[str, Any] = {}
        if self.dist.main:
            self.tracker = open_tracker(cfg.log_with, cfg.logs_folder(), name=cfg.name or Path(cfg.out).stem,
                                        config=cfg.to_dict())
        with stop_signals(self.log if self.dist.main else None) as stop_asked:
            try:
                while self.step < cfg.max_steps:
                    self.auto_threads.tick()
                    terms = self.train_step()
                    self.losses.append((self.step, terms["loss"]))
                    last = {"step": self.step, **terms, "smoothed": self.smoothed_loss(),
                            "lr": self.optimizer.param_groups[0]["lr"],
                            "it_s": (self.step - start_step) / max(1e-9, time.time() - start_time)}
                    done = self.step == cfg.max_steps
                    if self.dist.main and (self.step % cfg.sample_every == 0 or done):
                        last["check"] = self.evaluate()
                        last["val_loss"] = self.validation_loss()
                        self.autoencoder.train()
                    if self.dist.main and (self.step % cfg.log_every == 0 or "check" in last):
                        if self.grad_norm is not None:
                            last["grad_norm"] = float(self.grad_norm)
                        record = {k: v for k, v in last.items() if k != "check"}
                        record.update({f"check_{k}": v for k, v in last.get("check", {}).items() if k != "grid"})
                        append_line(ensure_writable_dir(self.run_dir) / METRICS, json.dumps(record))
                        log_record(self.tracker, last, image_tag="reconstructions", extra=_vae_scalars)
                    if self.step % cfg.save_every == 0 or done:
                        self.save()
                    if progress is not None and self.dist.main:
                        progress(last)
                    if not done and any_rank(stop_asked(), self.dist, self.device):
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                self.save()
                raise
            finally:
                self.tracker.close()
                self.tracker = NULL_TRACKER
        return last


def _vae_scalars(record: dict[str, Any]) -> dict[str, Any]:
    """The VAE's own terms and checks, beside the common tags (tracking.step_scalars)."""
    values = {f"train/{k}": record.get(k) for k in ("rec", "kl", "g", "d")}
    values.update({f"eval/{k}": v for k, v in (record.get("check") or {}).items() if k != "images"})
    return values


def check_new_run(cfg: VAETrainConfig, resume: bool) -> None:
    """Refuse, before anything is built: a new run over an existing VAE file or run, a resume of nothing."""
    out, run_dir = Path(cfg.out), cfg.run_folder()
    has_checkpoint = (run_dir / CHECKPOINT).is_file()
    if resume:
        if not has_checkpoint:
            raise MinidiffError(f"nothing to resume: '{run_dir / CHECKPOINT}' does not exist")
        return
    if has_checkpoint:
        raise MinidiffError(f"'{run_dir}' already holds a VAE run; pass --resume to continue it or choose another --out")
    if out.exists():
        raise MinidiffError(f"'{out}' already exists; choose another --out (a new run never replaces a file)")
    if run_dir.is_dir() and any(p.name not in (*RUN_FILES, "samples", "logs") and not p.name.startswith(".")
                                for p in run_dir.iterdir()):
        raise MinidiffError(f"'{run_dir}' holds files that are not a VAE run's; choose another --run-dir")


def resumed_config(cfg: VAETrainConfig, given: set[str]) -> VAETrainConfig:
    """On --resume the stored recipe stands; only RESUMABLE settings may change."""
    from minidiff_cli.training.checkpoint import read_checkpoint_meta

    stored = read_checkpoint_meta(cfg.run_folder() / CHECKPOINT)["train"]
    values = VAETrainConfig.from_dict({k: v for k, v in stored.items() if k in VAETrainConfig.__dataclass_fields__})
    merged = values.to_dict()
    for key in given:
        new = getattr(cfg, key)
        if merged.get(key) == new:
            continue
        if key not in RESUMABLE:
            raise MinidiffError(f"--{key.replace('_', '-')} cannot change when resuming (the run used {merged.get(key)!r})")
        merged[key] = new
    return VAETrainConfig.from_dict(merged)

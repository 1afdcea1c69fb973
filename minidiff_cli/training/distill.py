"""``minidiff distill``: a few-step student of a trained model, as a low-rank adapter on its U-Net.

The method is latent consistency distillation with a LoRA student (Song et al. 2023, consistency
distillation; Luo et al. 2023, LCM and LCM-LoRA), with classifier-free guidance folded in
(Meng et al. 2023). One step, for a batch of training images x_0:

1. draw a timestep t_n on the teacher's solver grid (``solver_steps`` points, k = T / solver_steps
   apart) and its neighbour s = t_n - k; noise x_0 to x_t;
2. the teacher (the same U-Net with the adapters off) takes one guided DDIM step from t to s:
   eps = eps_u + w (eps_c - eps_u), x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps;
3. the student's x_0 guess at (x_t, t) is pulled towards its own guess at (x_s, s), computed
   without gradients (at s < 0, the boundary, towards x_s itself), with the pseudo-Huber loss.

``--method mcm`` is multistep consistency distillation (Heek, Hoogeboom & Salimans 2024): the
student's own sampling grid (``steps`` points) cuts the trajectory into segments, and within a
segment the student's guess is consistent not at x_0 but at the segment's end, the next grid
point b, reached by a deterministic DDIM step: y = sqrt(abar_b) x0_hat + sqrt(1 - abar_b) eps_hat
(x_0 itself in the last segment). Each segment only has to learn a piece of the teacher's ODE,
and the student then samples with plain DDIM at exactly those steps. The loss is measured on y,
where the DDIM step carries the eps error with a gain g; rows count min(1, gain_cap / g).

``--target-ema MU`` computes the targets (the student's guess from x_s) with an exponential moving
average of the adapter's weights instead of the live ones (the "target network" of Song et al. 2023,
sec. 3): the target then moves slowly, which steadied mcm on shapes (see benchmarks/RESULTS.md).
The student file holds the live weights; the average lives in the checkpoint, so resume is exact.

``--method lct`` is consistency training instead (Song et al. 2023, sec. 5): x_s is x_0 noised with
the same noise to level s, no teacher is called (each step costs half as much), and no guidance
is folded in (the student samples with cfg, two network calls per step).

The student's x_0 guesses along the trajectory become consistent, so the ``lcm`` sampler can jump
from noise to x_0 in one to four steps. The student predicts eps like its teacher (v and flow
teachers convert through ``DiffusionModel.predict_eps``), so nothing else in minidiff changes.
Reproducible and resumable like ``train``: step s draws its batch, timesteps and noise from
generators seeded by (seed, s); checkpoints hold the adapter and AdamW's state.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from minidiff_cli.data.dataset import EpochShuffle, caption_set
from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.diffusion.student import ADAPTER, ADAPTER_DTYPE, HASH, METHODS, SHARED
from minidiff_cli.errors import MinidiffError, is_int
from minidiff_cli.files.atomic import ensure_writable_dir
from minidiff_cli.files.model_file import save_model_file
from minidiff_cli.nets import lora
from minidiff_cli.runtime.distributed import start_training
from minidiff_cli.training.captions import CaptionTable
from minidiff_cli.training.config import resumed_values
from minidiff_cli.training.loop import forget_metrics_after, loss_error, run_steps, smoothed
from minidiff_cli.training.optim import ema_update, warmup_cosine
from minidiff_cli.training.run_folder import CHECKPOINT, MODEL, check_contents, check_creatable

RESUMABLE = ("max_steps", "save_every", "sample_every", "log_every", "quiet", "device", "threads", "out")


@dataclass
class DistillConfig:
    """The recipe of a ``minidiff distill`` run; ``validate()`` refuses impossible values in one line each."""

    teacher: str = "shapes-clip"  # a model name or file
    method: str = "lcm"  # lcm: consistency distillation (the teacher's guided ODE step); mcm: multistep
    # consistency distillation (consistent at the next point of the student's grid); lct: consistency training
    out: str = "runs/distill"
    data: Optional[str] = None  # default: what the teacher was trained on
    holdout: Optional[str] = None  # default: the teacher's
    steps: int = 4  # the student's sampling steps, written into its file
    guidance: float = 3.0  # the teacher's cfg folded into the student (1: no guidance)
    rank: int = 16
    alpha: Optional[float] = None  # default: rank (scale 1)
    lr: float = 1e-3
    warmup: int = 50
    max_steps: int = 1000
    lr_decay_steps: int = 0  # the cosine decay's length, fixed at the start (0: max_steps)
    batch_size: int = 32
    solver_steps: int = 50  # the teacher's DDIM grid the consistency steps skip along
    huber_c: float = 0.001
    gain_cap: float = 1.0  # the x_0 error at t counts min(1, gain_cap sqrt(abar_t)): 1 is as x_t carries it
    target_ema: float = 0.0  # the targets' weights: 0 the live adapter, MU an average moving by 1 - MU a step
    seed: int = 0
    save_every: int = 250
    sample_every: int = 250
    log_every: int = 25
    device: str = "auto"
    threads: int = 0
    quiet: bool = False
    name: Optional[str] = None

    def validate(self) -> "DistillConfig":
        counts = {"steps": (1, 64), "rank": (1, lora.MAX_RANK), "warmup": (0, 10**6), "max_steps": (1, 10**7),
                  "lr_decay_steps": (0, 10**7),
                  "batch_size": (1, 4096), "solver_steps": (2, 1000), "seed": (0, 2**63 - 1),
                  "save_every": (1, 10**7), "sample_every": (1, 10**7), "log_every": (1, 10**7), "threads": (0, 1024)}
        for key, (low, high) in counts.items():
            value = getattr(self, key)
            if not is_int(value) or not low <= value <= high:
                raise MinidiffError(f"--{key.replace('_', '-')} must be a whole number from {low} to {high} "
                                    f"(got {value!r:.40})")
        reals = {"guidance": (0.0, 100.0), "lr": (1e-8, 1.0), "huber_c": (0.0, 1.0), "gain_cap": (1.0, 1e6),
                 "target_ema": (0.0, 0.9999)}
        for key, (low, high) in reals.items():
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise MinidiffError(f"--{key.replace('_', '-')} must be a number from {low:g} to {high:g} "
                                    f"(got {value!r:.40})")
        if self.method not in METHODS:
            raise MinidiffError(f"--method must be one of {', '.join(METHODS)} (got {self.method!r:.40})")
        if self.alpha is None:
            self.alpha = float(self.rank)
        if not self.lr_decay_steps:  # fixed now, so that resuming with more steps keeps the schedule
            self.lr_decay_steps = self.max_steps
        lora.check_rank(self.rank, self.alpha)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DistillConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MinidiffError(f"unknown distill setting '{unknown[0]:.40}'")
        return cls(**values).validate()


class Distiller:
    """One distillation run into a run folder: ``Distiller(cfg).run()``; ``resume=True`` goes on."""

    def __init__(self, cfg: DistillConfig, resume: bool = False, log: Callable[[str], None] = print):
        self.cfg, self.out, self.log = cfg.validate(), Path(cfg.out), log
        self.device, self.dist, self.auto_threads = start_training(cfg)
        if self.dist.world > 1:
            raise MinidiffError("distill runs in one process; start it without torchrun")
        check_contents(self.out, resume)
        check_creatable(self.out)
        self.model, self.teacher_path = self._teacher()
        self.grid = self._segment_grid()
        self.dataset = self._dataset()
        torch.manual_seed(cfg.seed)  # the adapters' first weights: the same in every run of this recipe
        self.adapters = lora.add_adapters(self.model.unet, cfg.rank, float(cfg.alpha))
        self.live = list(lora.trainable(self.adapters))
        self.optimizer = torch.optim.AdamW(self.live, lr=cfg.lr, weight_decay=0.0)
        self.target = self._target_copy()
        self.order = EpochShuffle(len(self.dataset), cfg.seed)
        self.step, self.losses = 0, []
        # A frozen conditioner's encodings in batches fixed by the data set: resumed runs get the same bits.
        self.captions = CaptionTable(self.model.conditioner, self.device, caption_set(self.dataset))
        if resume:
            self._resume()

    # -- set-up --------------------------------------------------------------------------
    def _teacher(self) -> tuple[DiffusionModel, Path]:
        from minidiff_cli.files.models_dir import resolve_model

        path = resolve_model(self.cfg.teacher)
        model = DiffusionModel.load(path, device=self.device)
        if "student" in model.config:
            raise MinidiffError(f"'{path}' is itself a distilled student; distill its teacher instead")
        if not HASH.fullmatch(model.hash):
            raise MinidiffError(f"'{path}' has no usable hash to name it by")
        model.unet.eval()  # teacher and student run without dropout: the targets must be deterministic
        return model, path

    def _segment_grid(self) -> torch.Tensor:
        """The student's sampling grid, ascending, as the ends of --method mcm's segments (empty otherwise)."""
        from minidiff_cli.diffusion.sampling import timesteps

        if self.cfg.method != "mcm":
            return torch.zeros(0, dtype=torch.long)
        T = self.model.schedule.num_timesteps
        grid = timesteps(T, self.cfg.steps, "trailing").flip(0)
        if not _lands_on(grid, T // self.cfg.solver_steps):
            fits = [n for n in range(1, T + 1) if T % n == 0 and _lands_on(grid, T // n)]  # T itself always fits
            below = [n for n in fits if n < self.cfg.solver_steps][-1:]
            above = [n for n in fits if n > self.cfg.solver_steps][:1]
            raise MinidiffError(f"--method mcm needs the student's {self.cfg.steps} steps on the teacher's solver grid "
                                f"({self.cfg.solver_steps} points): choose --solver-steps "
                                f"{' or '.join(map(str, below + above))}")
        return grid.to(self.device)

    def _dataset(self):
        from minidiff_cli.data.sources import open_dataset

        trained = self.model.config.get("training", {})
        data = self.cfg.data or trained.get("data")
        if not data:
            raise MinidiffError(f"'{self.teacher_path}' does not say what it was trained on; pass --data")
        holdout = self.cfg.holdout if self.cfg.holdout is not None else trained.get("holdout", "")
        opts = {"require_classes": True} if hasattr(self.model.conditioner, "encode_labels") else {}
        return open_dataset(data, image_size=self.model.image_size, seed=self.cfg.seed, holdout=holdout, **opts)

    def _resume(self) -> None:
        from minidiff_cli.training.checkpoint import load_checkpoint, restore

        path = self.out / CHECKPOINT
        meta, tensors = load_checkpoint(path)
        if meta.get("teacher_hash") != self.model.hash:
            raise MinidiffError(f"the run in '{self.out}' distilled another teacher (hash {meta.get('teacher_hash')}); "
                                "start a new run")
        self.step = restore(meta, tensors, path, modules=self._saved_modules(), optimizer=self.optimizer)
        self.losses = [tuple(x) for x in meta.get("losses", [])]
        forget_metrics_after(self.out, self.step)
        if self.step >= self.cfg.max_steps:
            raise MinidiffError(f"the run in '{self.out}' already reached step {self.step}; "
                                "raise --max-steps above it to distill further")

    def _adapter_module(self) -> torch.nn.Module:
        return torch.nn.ModuleDict({name.replace(".", "/"): a for name, a in self.adapters.items()})

    def _target_copy(self) -> torch.nn.ParameterDict | None:
        """--target-ema: the average of the adapter's weights, in the order of ``self.live`` (None without it)."""
        if not self.cfg.target_ema:
            return None
        copies = [(f"{name.replace('.', '/')}/{part}", torch.nn.Parameter(getattr(a, part).weight.detach().clone(),
                                                                           requires_grad=False))
                  for name, a in self.adapters.items() for part in lora.TENSORS]
        return torch.nn.ParameterDict(copies)  # pairs, not a dict, which ParameterDict would sort

    def _saved_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"adapter": self._adapter_module()}
        if self.target is not None:
            modules["target"] = self.target
        return modules

    @contextmanager
    def _target_weights(self) -> Iterator[None]:
        """The adapter with the target's weights for the time of the block (the live ones without --target-ema)."""
        if self.target is None:
            yield
            return
        saved = [p.detach().clone() for p in self.live]
        with torch.no_grad():
            torch._foreach_copy_(self.live, list(self.target.values()))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, saved)

    # -- one step ------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, Conditioning]:
        """(x_0 as the U-Net sees it, its conditioning) of ``step``: the images, or a latent model's latents."""
        items = [self.dataset[i] for i in self.order.batch(step, self.cfg.batch_size)]
        images = torch.stack([it["image"] for it in items]).to(self.device)
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 1_013 + 7)
        noise = torch.randn((len(items), *self.model.latent_shape), generator=g).to(self.device)
        conditioner = self.model.conditioner
        with torch.no_grad():
            x0 = self.model.encode(images, noise) if self.model.latent is not None else images
            if hasattr(conditioner, "encode_labels"):
                cond = conditioner.encode_labels(torch.tensor([it["label"] for it in items], device=self.device))
            else:
                cond = self.captions.encode([it["caption"] for it in items])
        return x0, cond.to(self.device)

    def loss(self, step: int) -> torch.Tensor:
        cfg, schedule = self.cfg, self.model.schedule
        x0, cond = self.batch(step)
        b, T = x0.shape[0], schedule.num_timesteps
        skip = T // cfg.solver_steps
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009)
        n = torch.randint(1, cfg.solver_steps + 1, (b,), generator=g)
        t = (n * skip - 1).to(self.device)  # the grid t_n = n k - 1 ends at T - 1 (trailing)
        s = t - skip  # -1 on the first point: the boundary, where the answer is x_s itself
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        x_t = schedule.add_noise(x0, noise, t)
        abar = schedule.alphas_cumprod.to(self.device, torch.float32)
        abar_t, abar_s = _level(abar, t, x0), _level(abar, s, x0)
        with torch.no_grad():
            if cfg.method == "lct":  # consistency training: the same x_0 and noise at s, no teacher call (and no guidance)
                x_s = abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * noise
            else:  # one guided DDIM step of the teacher (the adapters off) from t to s
                with lora.disabled(self.adapters):
                    eps = self._guided_eps(x_t, t, cond)
                x_s = _ddim_jump(x_t, eps, abar_t, abar_s)
        if cfg.method == "mcm":
            return self._segment_loss(x_t, t, abar_t, x_s, s, abar_s, cond)
        with torch.no_grad(), self._target_weights():
            target = _x0(x_s, self.model.predict_eps(x_s, s.clamp(min=0), cond), abar_s)
            target = torch.where(_rows(s >= 0, x0), target, x_s)
        pred = _x0(x_t, self.model.predict_eps(x_t, t, cond), abar_t)
        # Near t = T an eps model's x_0 is its eps error magnified by 1 / sqrt(abar_t) (some 200x at the
        # capped cosine's last step), which would drown every other timestep's gradient: the x_0 error
        # counts min(1, gain_cap sqrt(abar_t)), as x_t carries it at gain_cap 1, plain x_0 error at large ones.
        weight = (cfg.gain_cap * abar_t.sqrt()).clamp(max=1.0)
        return self._huber(weight * (pred.float() - target.float()))

    def _segment_loss(self, x_t, t, abar_t, x_s, s, abar_s, cond: Conditioning) -> torch.Tensor:
        """--method mcm: the student's DDIM jump from t to its segment's end b, pulled towards its jump
        from s (without gradients), or towards x_s itself where s is b."""
        b = segment_ends(self.grid, t)
        abar_b = _level(self.model.schedule.alphas_cumprod.to(self.device, torch.float32), b, x_t)
        with torch.no_grad(), self._target_weights():
            target = _ddim_jump(x_s, self.model.predict_eps(x_s, s.clamp(min=0), cond), abar_s, abar_b)
            target = torch.where(_rows(s == b, x_s), x_s, target)
        pred = _ddim_jump(x_t, self.model.predict_eps(x_t, t, cond), abar_t, abar_b)
        # The jump carries the eps error times g = sqrt(abar_b (1 - abar_t) / abar_t) - sqrt(1 - abar_b), some
        # 150x from t = T to the middle of the capped cosine: as in lcm, rows count min(1, gain_cap / g), so
        # that no error counts more than the eps error behind it and the top of the grid does not drown the rest.
        gain = (abar_b * (1 - abar_t) / abar_t).sqrt() - (1 - abar_b).sqrt()
        weight = (self.cfg.gain_cap / gain.clamp(min=1e-12)).clamp(max=1.0)
        return self._huber(weight * (pred.float() - target.float()))

    def _huber(self, diff: torch.Tensor) -> torch.Tensor:
        """The pseudo-Huber loss sqrt(d^2 + c^2) - c (Song & Dhariwal 2023), averaged."""
        c = self.cfg.huber_c
        return ((diff ** 2 + c * c).sqrt() - c).mean()

    def _guided_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The teacher's eps with guidance ``w``: eps_u + w (eps_c - eps_u), both halves in one batch."""
        w = self.cfg.guidance
        if w == 1.0:
            return self.model.predict_eps(x, t, cond)
        null = self.captions.null().expand(x.shape[0])
        both = self.model.predict_eps(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat(cond, null))
        eps_c, eps_u = both.chunk(2)
        return eps_u + w * (eps_c - eps_u)

    def train_step(self) -> float:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_cosine(self.step, cfg.lr, cfg.warmup, cfg.lr_decay_steps)
        loss = self.loss(self.step)
        if not torch.isfinite(loss):
            raise loss_error(loss.item(), self.step, "lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.target is not None:
            ema_update(list(self.target.values()), self.live, cfg.target_ema)
        self.step += 1
        return loss.item()

    # -- files ---------------------------------------------------------------------------
    def student_config(self) -> dict[str, Any]:
        """The student file's config: the teacher's shared parts, its card, and what makes it a student."""
        teacher = self.model.config
        config = {key: teacher[key] for key in SHARED if key in teacher}
        for key in ("class_names", "vocabulary", "card"):
            if key in teacher:
                config[key] = teacher[key]
        config["name"] = self.cfg.name or self.out.name
        folded = self.cfg.method != "lct"  # consistency training has no teacher to fold guidance from
        config["student"] = {"teacher": {"name": self._teacher_name(), "hash": self.model.hash},
                             "method": self.cfg.method, "rank": self.cfg.rank, "alpha": float(self.cfg.alpha),
                             "guidance": float(self.cfg.guidance) if folded else 1.0}
        config["sampling"] = {"sampler": self.sampler(), "steps": self.cfg.steps,
                              "cfg": 1.0 if folded else self.cfg.guidance}
        config["training"] = {"step": self.step, "data": self.cfg.data or teacher.get("training", {}).get("data"),
                              "holdout": self._holdout(), "flags": self.cfg.to_dict(), "final_loss": self.smoothed_loss()}
        return config

    def sampler(self) -> str:
        """The sampler the student is made for: DDIM along its grid for mcm, consistency jumps otherwise."""
        return "ddim" if self.cfg.method == "mcm" else "lcm"

    def _teacher_name(self) -> str:
        """The name ``--model`` knows the teacher by: a shipped or user model's stem, a run's folder."""
        from minidiff_cli.files.models_dir import list_models

        for stem, path, _ in list_models():
            if path.resolve() == self.teacher_path.resolve():
                return stem
        path = self.teacher_path.resolve()
        return path.parent.name if path.name == MODEL else path.stem

    def _holdout(self) -> str:
        trained = self.model.config.get("training", {})
        return self.cfg.holdout if self.cfg.holdout is not None else trained.get("holdout", "")

    def save(self) -> None:
        """Checkpoint, then the student file; both atomic."""
        from minidiff_cli.training.checkpoint import save_checkpoint

        ensure_writable_dir(self.out)
        save_checkpoint(self.out / CHECKPOINT, modules=self._saved_modules(), optimizer=self.optimizer,
                        step=self.step, train_config=self.cfg.to_dict(),
                        extra={"losses": self.losses[-5000:], "teacher_hash": self.model.hash})
        tensors = {f"{ADAPTER}.{k}": v.to(ADAPTER_DTYPE).cpu() for k, v in lora.adapter_tensors(self.adapters).items()}
        save_model_file(self.out / MODEL, tensors, self.student_config(), overwrite=True)

    def smoothed_loss(self) -> float | None:
        return smoothed(self.losses)

    def sample_grid(self) -> dict[str, Any]:
        """The student's samples at its steps for fixed prompts (adherence on shapes), with the adapters live."""
        from minidiff_cli.evaluation.shapes_judge import default_prompts, sample_and_score

        self.model.unet.eval()
        saved = self.model.config
        self.model.config = {**saved, "training": {**saved.get("training", {}), "holdout": self._holdout()}}
        try:
            path = ensure_writable_dir(self.out / "samples") / f"step-{self.step:07d}.png"
            cfg = 1.0 if self.cfg.method != "lct" else self.cfg.guidance
            return sample_and_score(self.model, default_prompts(self.dataset, self._holdout()), path,
                                    shapes=self._data() == "shapes", steps=self.cfg.steps, cfg=cfg,
                                    sampler=self.sampler())
        finally:
            self.model.config = saved

    def _data(self) -> str:
        return self.cfg.data or self.model.config.get("training", {}).get("data", "")

    # -- the loop ------------------------------------------------------------------------
    def run(self, progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
        return run_steps(self, progress)


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row value [B] shaped to broadcast over ``like`` [B, C, H, W]."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def segment_ends(grid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """For each timestep t, the end of its segment: the largest point of ``grid`` below t, or -1 (x_0)."""
    below = grid.unsqueeze(0) < t.unsqueeze(1)
    return torch.where(below, grid.unsqueeze(0), -1).amax(dim=1)


def _level(abar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar at each row's timestep, 1 at t = -1 (x_0), shaped to broadcast over ``like``."""
    return _rows(torch.where(t >= 0, abar[t.clamp(min=0)], 1.0), like)


def _ddim_jump(x: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """A deterministic DDIM step from level abar to abar_to (Song et al. 2021, eq. 12, sigma 0); x_0 at abar_to 1."""
    return abar_to.sqrt() * _x0(x, eps, abar) + (1 - abar_to).sqrt() * eps


def _x0(x: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (Ho et al. 2020, eq. 4 solved for x_0)."""
    return (x - (1 - abar).sqrt() * eps) / abar.sqrt()


def check_resume_flags(stored: DistillConfig, given: dict[str, Any]) -> DistillConfig:
    """On --resume the stored recipe stands; only RESUMABLE flags may change."""
    return DistillConfig.from_dict(resumed_values(stored.to_dict(), given, RESUMABLE))


def _lands_on(grid: torch.Tensor, skip: int) -> bool:
    """Whether every segment end of the student's grid is a point the teacher's steps of ``skip`` land on."""
    return all((int(g) + 1) % skip == 0 for g in grid)

"""The training recipe: every ``minidiff train`` flag, also readable from a TOML file.

Precedence: a flag given on the command line > the TOML file (``--config``) >
the defaults below. Keys in the TOML file use the flag names with ``_`` or
``-`` (``max_steps`` or ``max-steps``); an unknown key is an error, so a typo
never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from minidiff_cli.diffusion.timestep_sampling import TIMESTEP_SAMPLING
from minidiff_cli.errors import MinidiffError, is_int

# Flags that may change when a run is resumed; anything else must stay as it was.
RESUMABLE = ("max_steps", "save_every", "sample_every", "log_every", "quiet", "device", "threads", "out",
             "description", "notice", "clip_steps", "log_with", "log_dir", "sample_prompts", "compile")


@dataclass
class TrainConfig:
    """The recipe of a ``minidiff train`` run: every flag (or TOML key), with checked bounds.

    ``validate()`` refuses impossible values in one line each; ``to_dict``/``from_dict`` are how a
    run folder stores it (train_config.json, the checkpoint), so that ``--resume`` continues
    with the same recipe and only the ``RESUMABLE`` flags may change.
    """

    # data
    data: str = "shapes"
    holdout: str = ""
    image_size: int = 32
    # conditioning
    conditioner: str = "class"
    clip_weights: Optional[str] = None  # a file from `minidiff clip train`, or open_clip weights (safetensors)
    clip_arch: Optional[str] = None  # an open_clip architecture name, with clip_pretrained
    clip_pretrained: Optional[str] = None
    class_dim: int = 128
    # Without clip_weights, `--conditioner clip` first trains a CLIP on the data (see clip_stage.py):
    # clip_steps steps, with any other ClipRecipe setting from the `clip` table of a TOML file.
    clip_steps: int = 2000
    clip: dict = field(default_factory=dict)
    cfg_dropout: float = 0.1
    # model
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    # None: the U-Net's lowest resolution (8 at the default 32 px and 3 levels), so a default follows
    # --image-size and --channel-mult instead of naming a size that may not exist there.
    attention_resolutions: Optional[list[int]] = None
    cross_attention_resolutions: Optional[list[int]] = None
    head_dim: int = 32
    dropout: float = 0.0
    schedule: Optional[str] = None  # None: "flow" for --prediction flow, else "cosine"
    timesteps: int = 1000
    prediction: str = "eps"  # or "v", or "flow" (rectified flow's velocity, see schedule.py)
    min_snr_gamma: float = 0.0  # 0 turns min-SNR weighting off; 5 is the paper's choice
    # Which timesteps training draws (timestep_sampling.py): None is "logit-normal" for flow, else "uniform".
    timestep_sampling: Optional[str] = None
    logit_mean: float = 0.0  # SD3's m and s of the logit-normal; (0, 1) is their best
    logit_std: float = 1.0
    shift: float = 1.0  # the flow schedule's timestep shift (SD3 / Flux); 1 is none
    zero_terminal_snr: bool = False  # rescale a VP schedule to end at zero SNR (Lin et al. 2023); v or flow
    init_from: Optional[str] = None  # a model file whose (EMA) weights start training
    vae: Optional[str] = None  # a VAE file (`minidiff vae train`): train a latent model on its latents
    # optimisation
    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 500
    # Steps of the cosine decay; 0 means the first run's max_steps. It is fixed when a run starts, so a
    # run resumed with a higher --max-steps goes on at the final rate, and a run stopped early and
    # resumed follows the same schedule as one that never stopped.
    lr_decay_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # no, bf16, fp16
    compile: bool = False  # the training forward through torch.compile (compiled.py): how a run goes, not what it learns
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 is auto: the cores no other process is busy on (threads.py)
    # output
    out: str = "runs/train"
    save_every: int = 500
    sample_every: int = 500
    log_every: int = 50
    # What the sample grids draw (lines of a `generate --prompts` file, training/sample_prompts.py); with
    # any, the first grid is drawn at step 0. Empty: a spread of the data's classes or captions.
    sample_prompts: list[str] = field(default_factory=list)
    log_with: str = "none"  # tensorboard, wandb or none (training/tracking.py); metrics.jsonl is kept anyway
    log_dir: Optional[str] = None  # None: OUT/logs
    name: str = ""
    # The model card stored in the file (shown by `info` and `models`): what it draws, and the
    # attribution its training images ask for (e.g. a licence's NOTICE), if any.
    description: str = ""
    notice: str = ""
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise MinidiffError(f"unknown key(s) in {where}: {', '.join(unknown)}")
        return cls(**clean).validate()

    def validate(self) -> "TrainConfig":
        """Raise MinidiffError (one line) unless every value has its type and lies in its range.

        Values may come from a TOML file or a checkpoint, so types are checked too, and
        floats must be finite: NaN fails every comparison, so ``nan < 0`` alone lets it through.
        """
        self._check_types()
        self._fill_derived_defaults()
        positive = ("image_size", "max_steps", "batch_size", "save_every", "sample_every", "log_every",
                    "base_channels", "num_res_blocks", "head_dim", "timesteps", "class_dim", "clip_steps")
        for name in positive:
            value = getattr(self, name)
            if value < 1:
                raise MinidiffError(f"--{name.replace('_', '-')} must be a positive whole number (got {value!r})")
        checks = [
            (self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (self.weight_decay >= 0, f"weight_decay must be 0 or more (got {self.weight_decay})"),
            (self.warmup >= 0, f"--warmup must be 0 or more (got {self.warmup})"),
            (self.lr_decay_steps >= 0, f"--lr-decay-steps must be 0 or more (got {self.lr_decay_steps})"),
            (0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1) (got {self.ema_decay})"),
            (0 <= self.cfg_dropout < 1, f"--cfg-dropout must be in [0, 1) (got {self.cfg_dropout})"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "--mixed-precision must be no, bf16 or fp16"),
            (self.prediction in PREDICTIONS, f"--prediction must be eps, v or flow (got {self.prediction})"),
            (self.min_snr_gamma >= 0, "--min-snr-gamma must be 0 (off) or positive"),
            *self._objective_checks(),
            (self.grad_clip >= 0, "--grad-clip must be 0 (off) or positive"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (self.image_size <= 512, f"--image-size {self.image_size} is too large for minidiff (at most 512)"),
            (self.batch_size <= MAX_BATCH,
             f"--batch-size {self.batch_size} is more than minidiff allows ({MAX_BATCH})"),
            (self.max_steps <= MAX_STEPS, f"--max-steps {self.max_steps} is more than minidiff allows ({MAX_STEPS:,})"),
            (self.class_dim <= 65536, f"class_dim {self.class_dim} is more than minidiff allows (65536)"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be a whole number from 0 to {MAX_SEED} (got {self.seed})"),
            (0 <= self.threads <= 1024, f"--threads must be from 0 (auto) to 1024 (got {self.threads})"),
            (self.log_with in ("none", "tensorboard", "wandb"),
             f"--log-with must be tensorboard, wandb or none (got {self.log_with!r:.40})"),
        ]
        for ok, message in checks:
            if not ok:
                raise MinidiffError(message)
        if self.sample_prompts:
            from minidiff_cli.training.sample_prompts import parse_sample_prompts

            parse_sample_prompts(self.sample_prompts)
        return self

    def logs_folder(self) -> Path:
        """Where --log-with writes: --log-dir, or the run folder's logs/."""
        return Path(self.log_dir) if self.log_dir else Path(self.out) / "logs"

    def _objective_checks(self) -> list[tuple[bool, str]]:
        """The flow matching and zero-SNR settings, which only make sense in some combinations."""
        return [
            (self.timestep_sampling in TIMESTEP_SAMPLING,
             f"--timestep-sampling must be uniform or logit-normal (got {self.timestep_sampling})"),
            (abs(self.logit_mean) <= 10, f"--logit-mean must be from -10 to 10 (got {self.logit_mean})"),
            (0 < self.logit_std <= 10, f"--logit-std must be above 0 and at most 10 (got {self.logit_std})"),
            (0 < self.shift <= 100, f"--shift must be above 0 and at most 100 (got {self.shift})"),
            (self.shift == 1 or self.schedule == "flow", "--shift is the flow schedule's; add --schedule flow"),
            (not (self.prediction == "flow" and self.min_snr_gamma),
             "--min-snr-gamma weights eps and v losses; flow matching uses --timestep-sampling instead"),
            (not (self.zero_terminal_snr and self.prediction == "eps"),
             "--zero-terminal-snr needs --prediction v or flow: at zero SNR the noise is x_t itself, "
             "and an eps model cannot recover x0 from it"),
            (not (self.zero_terminal_snr and self.schedule == "flow"),
             "--zero-terminal-snr rescales VP schedules; the flow schedule already ends at pure noise"),
        ]

    def lowest_resolution(self) -> int:
        """The side of the U-Net's smallest feature map: image_size (divided by a --vae's factor) halved
        once per extra level."""
        size = self.image_size
        if self.vae:
            from minidiff_cli.vae.vae_file import vae_factor

            size = max(1, size // vae_factor(self.vae))
        return max(1, size >> max(0, len(self.channel_mult) - 1))

    def _fill_derived_defaults(self) -> None:
        """Attention sizes the user did not set follow the image size (see the field comment)."""
        for name in ("attention_resolutions", "cross_attention_resolutions"):
            if getattr(self, name) is None:
                setattr(self, name, [self.lowest_resolution()])
        flow = self.prediction == "flow"
        if self.schedule is None:
            self.schedule = "flow" if flow else "cosine"
        if self.timestep_sampling is None:
            self.timestep_sampling = "logit-normal" if flow else "uniform"

    def _check_types(self) -> None:
        """Each field holds what its annotation says; ints are accepted (and kept) for floats."""
        for f in dataclasses.fields(self):
            value, kind, flag = getattr(self, f.name), str(f.type), f"--{f.name.replace('_', '-')}"
            if kind == "int":
                ok, what = is_int(value), "a whole number"
            elif kind == "float":
                ok, what = _is_real(value) and math.isfinite(value), "a finite number"
            elif kind == "bool":
                ok, what = isinstance(value, bool), "true or false"
            elif kind == "str":
                ok, what = isinstance(value, str), "text"
            elif kind == "Optional[str]":
                ok, what = value is None or isinstance(value, str), "text"
            elif kind == "Optional[list[int]]" and value is None:
                ok, what = True, ""
            elif kind in ("list[int]", "Optional[list[int]]"):
                ok, what = isinstance(value, list) and all(is_int(v) and v > 0 for v in value), \
                    "a list of positive whole numbers"
            elif kind == "dict":
                ok, what = isinstance(value, dict) and all(isinstance(k, str) for k in value), "a table of settings"
            elif kind == "list[str]":
                ok, what = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of texts"
            else:  # a field added without a check here
                ok, what = True, ""
            if not ok:
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise MinidiffError(f"{flag} must be {what} (got {shown})")


MAX_BATCH = 65536
MAX_STEPS = 1_000_000_000  # per-step seeds (seed, step, rank) must fit torch's 64-bit seed
PREDICTIONS = ("eps", "v", "flow")  # model.PREDICTIONS; not imported from there, which needs torch
MAX_SEED = 2**32 - 1  # the trainer derives per-step seeds from it; they must fit torch's 64-bit seeds


def _is_real(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:  # an int beyond float's range
        return False
    return True


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        raise MinidiffError(f"config file '{path}' does not exist")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MinidiffError(f"config file '{path}' is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level: thousands of nested arrays
        raise MinidiffError(f"config file '{path}' is nested too deeply to be a train config") from None
    # A [train] table is allowed, so the file can hold other sections later.
    table = data.get("train", data)
    if not isinstance(table, dict):
        raise MinidiffError(f"config file '{path}': 'train' must be a table of settings")
    return table


def merge(flags: dict[str, Any], config_file: str | Path | None) -> TrainConfig:
    """Defaults, then the TOML file, then the flags that were actually given."""
    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    where = f"config file '{config_file}'" if config_file else "config"
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig.from_dict(values, where=where)


def check_resume_flags(stored: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """On --resume the stored recipe stands; only RESUMABLE flags may change."""
    return TrainConfig.from_dict(resumed_values(stored.to_dict(), given, RESUMABLE))


def resumed_values(stored: dict[str, Any], given: dict[str, Any], resumable: tuple[str, ...]) -> dict[str, Any]:
    """A stored recipe with the flags given now, which may only be ``resumable`` ones (or unchanged)."""
    values = dict(stored)
    for key, value in given.items():
        if value is None or values.get(key) == value:
            continue
        if key not in resumable:
            raise MinidiffError(f"--{key.replace('_', '-')} cannot change when resuming "
                                f"(the run used {values.get(key)!r})")
        values[key] = value
    return values

"""A diffusion model: the U-Net, its conditioner and its noise schedule, as one object.

The model file (see ``files/model_file.py``) stores this object's config and tensors;
``DiffusionModel.load`` rebuilds it and refuses a file whose tensors do not
match the config it declares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minidiff_cli import plugins
from minidiff_cli.diffusion import student
from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.diffusion.schedule import MAX_TIMESTEPS, NoiseSchedule, get_schedule
from minidiff_cli.errors import MinidiffError, ModelFileError
from minidiff_cli.files.model_file import (
    ModelFile,
    check_entries,
    check_finite,
    load_model_file,
    read_model_header,
    save_model_file,
)
from minidiff_cli.nets.unet import UNet, UNetConfig

PREDICTIONS = ("eps", "v", "flow")  # what the network outputs; predict_eps turns each into eps


@dataclass
class DiffusionModel:
    """A trained diffusion model: U-Net, conditioner, noise schedule and (for a latent model) the
    VAE's latent space, with the config that rebuilds them from a model file.

    ``load(path)`` reads and checks a model file, ``save(path)`` writes one; ``predict_eps``
    turns whatever the network predicts (eps, v or a flow velocity) into the eps the samplers
    use. The pipeline samples with it; the trainer trains its parts.
    """

    unet: UNet
    conditioner: Any  # a Conditioner (see conditioning.py)
    schedule: NoiseSchedule
    config: dict[str, Any]
    hash: str = ""
    latent: Any = None  # a vae.latent_space.LatentSpace for a latent model: the U-Net works on its latents

    # -- building -------------------------------------------------------------
    @classmethod
    def build(cls, config: dict[str, Any], conditioner: Any | None = None) -> "DiffusionModel":
        """Fresh weights for ``config``; pass ``conditioner`` to reuse one already built."""
        schedule = _schedule(config)
        unet, conditioner, latent = _modules(config, conditioner)
        return cls(unet, conditioner, schedule, config, latent=latent)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "DiffusionModel":
        """Load and check a model file; a mismatch names the file and the problem.

        A student file (``diffusion/student.py``) loads its teacher and merges its adapter into it.
        """
        config, entries = read_model_header(path)
        if student.is_student(config):
            student.check_student_file(Path(path), config, entries)
            teacher = cls.load(student.find_teacher(config, Path(path)), device="cpu")
            model = student.merge_into_teacher(teacher, Path(path), config)
            _check_sampling(path, config, model.schedule)
            return model.to(device).eval()
        config, schedule, (unet, conditioner, latent) = _checked(path, build=True)
        _check_sampling(path, config, schedule)
        mf = load_model_file(path)
        model = cls(unet, conditioner, schedule, config, latent=latent)
        check_finite(mf.path, mf.tensors)
        model._load_tensors(mf)
        model.hash = mf.hash
        return model.to(device).eval()

    @staticmethod
    def check_file(path: str | os.PathLike) -> dict[str, Any]:
        """The config of a model file whose tensors fit it, checked without reading the weights
        (a student's adapter is checked against the U-Net its config names, not its teacher's file)."""
        config, entries = read_model_header(path)
        if student.is_student(config):
            student.check_student_file(Path(path), config, entries)
            return config
        return _checked(path, build=False)[0]

    def _load_tensors(self, mf: ModelFile) -> None:
        for prefix, module in (("unet", self.unet), ("conditioner", self.conditioner)):
            module.load_state_dict(mf.section(prefix), strict=True)
        if self.latent is not None:
            self.latent.autoencoder.load_state_dict(mf.section("vae"), strict=True)

    # -- using ----------------------------------------------------------------
    @property
    def prediction(self) -> str:
        return self.config.get("prediction", "eps")

    @property
    def image_size(self) -> int:
        """The side of the pictures it draws, in pixels (a latent model's U-Net works smaller)."""
        factor = self.latent.factor if self.latent is not None else 1
        return self.unet.config.image_size * factor

    @property
    def channels(self) -> int:
        """Channels of the pictures it draws (3 for RGB)."""
        return self.latent.image_channels if self.latent is not None else self.unet.config.in_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of what the sampler works on: the picture itself, or a latent model's latent."""
        size = self.unet.config.image_size
        return (self.unet.config.in_channels, size, size)

    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Pictures [B, C, H, W] in [-1, 1] -> what the U-Net works on (a latent model's normalised
        latents: a posterior sample with ``noise``, else the mean; the pictures themselves otherwise)."""
        return images if self.latent is None else self.latent.encode(images, noise)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """What the sampler produced -> pictures in [-1, 1] (a latent model decodes with its VAE)."""
        return x if self.latent is None else self.latent.decode(x.float())

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "DiffusionModel":
        """The whole model onto ``device``: U-Net, conditioner and a latent model's VAE together, the one
        move every path makes (load, and so generate and img2img; train, --init-from, --resume). Moving
        the U-Net alone left an --init-from VAE on the CPU to meet CUDA images. ``dtype`` casts the U-Net."""
        self.unet.to(device=device, dtype=dtype)
        self.conditioner.to(device=device)
        if self.latent is not None:  # the VAE stays float32: it is small, and decodes once per image
            self.latent.autoencoder.to(device=device)
        return self

    def eval(self) -> "DiffusionModel":
        self.unet.eval()
        self.conditioner.eval()
        if self.latent is not None:
            self.latent.autoencoder.eval()
        return self

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The noise prediction in x's dtype, whatever the network was trained to output.

        The network runs in its own dtype (bfloat16, say); what comes out is cast back, so the
        sampler's arithmetic stays in x's (float32) precision.
        A flow model's network lives on the path (1 - t) x0 + t eps and outputs a velocity: x is
        rescaled onto that path on the way in and the velocity turned into eps on the way out, so
        that samplers, guidance and img2img see the same eps world for every model (design.md).
        """
        dtype = self.unet.conv_in.weight.dtype
        cond = cond.to(dtype=dtype)  # absent fields stay None
        x_in = self.schedule.to_flow(x, t) if self.prediction == "flow" else x
        out = self.unet(x_in.to(dtype), t, context=cond.context, pooled=cond.pooled).to(x.dtype)
        if self.prediction == "v":
            return self.schedule.eps_from_v(x, out, t)
        if self.prediction == "flow":
            return self.schedule.eps_from_flow(x, out, t)
        return out

    # -- saving ---------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return _tensors(self.unet, self.conditioner, unet_storage(self.config), self.latent)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False, unet_dtype: str | None = None) -> Path:
        """Write the model file. ``unet_dtype="float16"`` stores the U-Net's weights in half precision
        (half the bytes, for shipping; they are float32 again once loaded)."""
        config = dict(self.config)
        config["conditioner"] = {"name": self.conditioner.name, "config": self.conditioner.config()}
        config["unet"] = self.unet.config.to_dict()
        if self.latent is not None:
            old = config.get("vae") or {}
            config["vae"] = self.latent.entry(old.get("hash", ""), old.get("name", ""))
        else:
            config.pop("vae", None)
        if unet_dtype is not None:
            if unet_dtype not in UNET_STORAGE:
                raise MinidiffError(f"unet_dtype must be one of {', '.join(UNET_STORAGE)} (got {unet_dtype!r})")
            config["unet_storage"] = unet_dtype
        tensors = _tensors(self.unet, self.conditioner, unet_storage(config), self.latent)
        return save_model_file(path, tensors, config, overwrite=overwrite)


def _schedule(config: dict[str, Any]) -> NoiseSchedule:
    sched = config["schedule"]
    T = sched["num_timesteps"]
    if isinstance(T, int) and T > MAX_TIMESTEPS:
        raise MinidiffError(f"{T} timesteps is more than the {MAX_TIMESTEPS} minidiff allows")
    schedule = get_schedule(sched["name"], T, **sched.get("options", {}))
    zero_snr = sched.get("zero_terminal_snr", False)
    if not isinstance(zero_snr, bool):
        raise MinidiffError(f"schedule.zero_terminal_snr must be true or false (got {zero_snr!r:.40})")
    return schedule.with_zero_terminal_snr() if zero_snr else schedule


def _modules(config: dict[str, Any], conditioner: Any | None = None) -> tuple[UNet, Any, Any]:
    """The U-Net, the conditioner and the latent space (None for a pixel model) ``config`` describes,
    with fresh weights."""
    unet_config = UNetConfig.from_dict(config["unet"])  # validated: an absurd size fails here
    if conditioner is None:
        cond = config["conditioner"]
        conditioner = plugins.get_conditioner(cond["name"]).from_config(cond.get("config", {}))
    if config.get("prediction", "eps") not in PREDICTIONS:
        raise MinidiffError(f"unknown prediction type '{config.get('prediction')!s:.40}'; use eps, v or flow")
    _check_dims(unet_config, conditioner)
    return UNet(unet_config), conditioner, _latent_space(config.get("vae"), unet_config)


def _latent_space(entry: Any, unet_config: UNetConfig):
    """A latent model's LatentSpace from its config's ``vae`` entry (fresh weights), checked against
    the U-Net: it must work on exactly the VAE's latent channels."""
    if entry is None:
        return None
    from minidiff_cli.vae.autoencoder import Autoencoder, VAEConfig
    from minidiff_cli.vae.latent_space import LatentSpace, check_normalisation

    if not isinstance(entry, dict):
        raise MinidiffError("vae must be a JSON object")
    vae_config = VAEConfig.from_dict(entry.get("config"))
    vae_config.check_size(unet_config.image_size * vae_config.factor, what="its picture size")  # what decode runs at
    shift, scale = check_normalisation(entry)
    channels = vae_config.latent_channels
    if unet_config.in_channels != channels or unet_config.out_channels != channels:
        raise MinidiffError(f"the U-Net takes {unet_config.in_channels} channels but the VAE's latents have {channels}")
    return LatentSpace(Autoencoder(vae_config), shift, scale)


UNET_STORAGE = ("float32", "float16")  # how a model file may store its U-Net (config key unet_storage)


def unet_storage(config: dict[str, Any]) -> str:
    value = config.get("unet_storage", "float32")
    if value not in UNET_STORAGE:
        raise MinidiffError(f"unknown unet_storage {value!r:.40}; use {' or '.join(UNET_STORAGE)}")
    return value


def _tensors(unet: UNet, conditioner: Any, unet_dtype: str = "float32", latent: Any = None) -> dict[str, torch.Tensor]:
    """Every tensor of the model file, named and typed as it is stored (a latent model's VAE as
    "vae.encoder.*" and "vae.decoder.*", float32)."""
    cast = getattr(torch, unet_dtype)
    out = {f"unet.{k}": v.to(cast) if v.is_floating_point() else v for k, v in unet.state_dict().items()}
    storage = getattr(torch, getattr(conditioner, "storage_dtype", None) or "float32")
    for k, v in conditioner.state_dict().items():
        out[f"conditioner.{k}"] = v.to(storage) if v.is_floating_point() else v
    if latent is not None:
        out.update({f"vae.{k}": v for k, v in latent.autoencoder.state_dict().items()})
    return out


def _check_dims(unet_config: UNetConfig, conditioner: Any) -> None:
    for attr in ("context_dim", "pooled_dim"):
        want, have = getattr(unet_config, attr), getattr(conditioner, attr, None)
        if want != have:
            raise MinidiffError(f"the U-Net's {attr} ({want}) does not match the "
                                f"'{conditioner.name}' conditioner's ({have})")


def _checked(path: str | os.PathLike, build: bool) -> tuple[dict[str, Any], NoiseSchedule, Any]:
    """(config, schedule, the modules if ``build``) of a model file whose tensors fit its config.

    The tensors the config implies are worked out on the meta device and compared with the
    file's header, so a config that does not fit its tensors (an absurd one included) is refused
    before any memory is allocated for it or any weight is read.
    """
    config, entries = read_model_header(path)
    where = f"'{Path(path)}'"
    try:
        schedule = _schedule(config)
        try:
            with torch.device("meta"):
                unet, conditioner, latent = _modules(config)
                expected = _tensors(unet, conditioner, unet_storage(config), latent)
        except (NotImplementedError, RuntimeError):  # a plugin conditioner that cannot live on meta
            expected = None
        if expected is not None:
            check_entries(where, expected, entries)
        modules = _modules(config) if build or expected is None else None
    except ModelFileError:
        raise
    except (MinidiffError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{where} has an invalid config: {_describe(exc)}") from None
    if expected is None:
        unet, conditioner, latent = modules
        check_entries(where, _tensors(unet, conditioner, unet_storage(config), latent), entries)
    return config, schedule, modules


def _check_sampling(path, config: dict[str, Any], schedule: NoiseSchedule) -> None:
    """The sampling defaults a file asks for are usable with its schedule (a hostile file's are refused)."""
    try:
        student.sampling_defaults(config, schedule.num_timesteps)
    except MinidiffError as exc:
        raise ModelFileError(f"'{Path(path)}' has an invalid config: {exc}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc}"
    return str(exc)

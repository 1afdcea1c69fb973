"""A diffusion model: the U-Net, its conditioner and its noise schedule, as one object.

The model file (see ``weights.py``) stores this object's config and tensors;
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
from minidiff_cli.conditioning import Conditioning
from minidiff_cli.errors import MinidiffError, ModelFileError
from minidiff_cli.schedule import NoiseSchedule
from minidiff_cli.unet import UNet, UNetConfig
from minidiff_cli.weights import ModelFile, load_model_file, save_model_file

PREDICTIONS = ("eps", "v")


@dataclass
class DiffusionModel:
    unet: UNet
    conditioner: Any  # a Conditioner (see conditioning.py)
    schedule: NoiseSchedule
    config: dict[str, Any]
    hash: str = ""

    # -- building -------------------------------------------------------------
    @classmethod
    def build(cls, config: dict[str, Any], conditioner: Any | None = None) -> "DiffusionModel":
        """Fresh weights for ``config``; pass ``conditioner`` to reuse one already built."""
        unet_config = UNetConfig.from_dict(config["unet"])
        unet_config.validate()
        sched = config["schedule"]
        schedule = plugins.get_schedule(sched["name"], sched["num_timesteps"], **sched.get("options", {}))
        if conditioner is None:
            cond = config["conditioner"]
            conditioner = plugins.get_conditioner(cond["name"]).from_config(cond.get("config", {}))
        if config.get("prediction", "eps") not in PREDICTIONS:
            raise MinidiffError(f"unknown prediction type '{config.get('prediction')}'; use eps or v")
        _check_dims(unet_config, conditioner)
        return cls(UNet(unet_config), conditioner, schedule, config)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "DiffusionModel":
        """Load and check a model file; a mismatch names the file and the problem."""
        mf = load_model_file(path)
        try:
            model = cls.build(mf.config)
        except ModelFileError:
            raise
        except (MinidiffError, KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"'{mf.path}' has an invalid config: {_describe(exc)}") from None
        model._load_tensors(mf)
        model.hash = mf.hash
        return model.to(device).eval()

    def _load_tensors(self, mf: ModelFile) -> None:
        known = ("unet.", "conditioner.")
        extra = [k for k in mf.tensors if not k.startswith(known)]
        if extra:
            raise ModelFileError(f"'{mf.path}' has unexpected tensors: {', '.join(sorted(extra)[:3])}")
        for prefix, module in (("unet", self.unet), ("conditioner", self.conditioner)):
            _load_strict(mf.path, prefix, module, mf.section(prefix))

    # -- using ----------------------------------------------------------------
    @property
    def prediction(self) -> str:
        return self.config.get("prediction", "eps")

    @property
    def image_size(self) -> int:
        return self.unet.config.image_size

    @property
    def channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "DiffusionModel":
        self.unet.to(device=device, dtype=dtype)
        self.conditioner.to(device=device)
        return self

    def eval(self) -> "DiffusionModel":
        self.unet.eval()
        self.conditioner.eval()
        return self

    def predict_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The noise prediction, whatever the network was trained to output."""
        out = self.unet(x, t, context=cond.context, pooled=cond.pooled)
        if self.prediction == "v":
            return self.schedule.eps_from_v(x, out, t)
        return out

    # -- saving ---------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        storage = getattr(torch, getattr(self.conditioner, "storage_dtype", None) or "float32")
        for k, v in self.conditioner.state_dict().items():
            out[f"conditioner.{k}"] = v.to(storage) if v.is_floating_point() else v
        return out

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        config = dict(self.config)
        config["conditioner"] = {"name": self.conditioner.name, "config": self.conditioner.config()}
        config["unet"] = self.unet.config.to_dict()
        return save_model_file(path, self.tensors(), config, overwrite=overwrite)


def _check_dims(unet_config: UNetConfig, conditioner: Any) -> None:
    for attr in ("context_dim", "pooled_dim"):
        want, have = getattr(unet_config, attr), getattr(conditioner, attr, None)
        if want != have:
            raise MinidiffError(f"the U-Net's {attr} ({want}) does not match the "
                                f"'{conditioner.name}' conditioner's ({have})")


def _load_strict(path: Path, prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {prefix}.{missing[0]}" if missing else f"unexpected {prefix}.{extra[0]}"
        raise ModelFileError(f"'{path}' does not match its config: {what} "
                             f"({len(missing)} missing, {len(extra)} unexpected tensors)")
    for key, value in tensors.items():
        ref = expected[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise ModelFileError(f"'{path}' does not match its config: {prefix}.{key} has shape "
                                 f"{tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.is_floating_point() != ref.is_floating_point():
            raise ModelFileError(f"'{path}' does not match its config: {prefix}.{key} has dtype {value.dtype}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ModelFileError(f"'{path}' is corrupt: {prefix}.{key} holds NaN or infinite values")
    module.load_state_dict(tensors, strict=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing key {exc}"
    return str(exc)

"""The VAE file: one safetensors file with the autoencoder's tensors and a JSON config.

Layout::

    tensors   "encoder.<param>", "decoder.<param>"
    metadata  "format" = "minidiff-vae", "format_version" = "1",
              "config" = JSON: {"vae": VAEConfig, "image_size": the size it trained at,
                                "name": ..., "training": {...}}

A file from a stranger is hostile: the header is read and checked by hand (``files/model_file.py``), the
config is validated against bounds before any module is built (its ``image_size`` too: at most
1024 px, and the activations of one picture at that size within ``VAEConfig.check_size``'s cap),
and the tensors the config implies are compared with the header (names, shapes, dtypes) before
any weight is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minidiff_cli.errors import MinidiffError, ModelFileError
from minidiff_cli.files.model_file import file_hash, load_finite_tensors, read_model_header, save_model_file
from minidiff_cli.vae.autoencoder import Autoencoder, VAEConfig

VAE_FORMAT = "minidiff-vae"


@dataclass
class VAEFile:
    """A loaded VAE: the autoencoder, the config it was stored with, and the file's short hash."""

    autoencoder: Autoencoder
    meta: dict[str, Any] = field(default_factory=dict)
    hash: str = ""

    @property
    def config(self) -> VAEConfig:
        return self.autoencoder.config


def vae_tensors(autoencoder: Autoencoder, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in autoencoder.state_dict().items()}


def expected_entries(cfg: VAEConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors a VAE of ``cfg`` has, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return vae_tensors(Autoencoder(cfg), prefix)


def check_vae_file(path: str | os.PathLike) -> tuple[VAEConfig, dict[str, Any]]:
    """(config, metadata) of a VAE file whose tensors fit its config, without reading the weights."""
    from minidiff_cli.files.model_file import check_entries

    path = Path(path)
    meta, entries = read_model_header(path, VAE_FORMAT, "minidiff VAE file")
    try:
        cfg = VAEConfig.from_dict(meta.get("vae"))
        size = meta.get("image_size")
        if size is not None:  # a size it can run at: bounded, and its activations at one picture too
            cfg.check_size(size, what="image_size")
    except (MinidiffError, TypeError) as exc:
        raise ModelFileError(f"'{path}' has an invalid VAE config: {exc}") from None
    check_entries(f"'{path}'", expected_entries(cfg), entries)
    return cfg, meta


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu") -> VAEFile:
    """Load and check a VAE file; a mismatch or a corrupt tensor names the file."""
    path = Path(path)
    cfg, meta = check_vae_file(path)
    tensors = load_finite_tensors(path)
    autoencoder = Autoencoder(cfg)
    autoencoder.load_state_dict(tensors, strict=True)
    return VAEFile(autoencoder.to(device).eval(), meta, file_hash(path))


def save_vae(path: str | os.PathLike, autoencoder: Autoencoder, meta: dict[str, Any] | None = None,
             *, overwrite: bool = False) -> Path:
    """Write the VAE file atomically; ``meta`` adds keys (name, image_size, training) to its config."""
    config = {**(meta or {}), "vae": autoencoder.config.to_dict()}
    return save_model_file(path, vae_tensors(autoencoder), config, overwrite=overwrite, format=VAE_FORMAT)


def vae_factor(path: str | os.PathLike) -> int:
    """The downsampling factor of a VAE file, from its header alone (no weights read)."""
    meta, _ = read_model_header(Path(path), VAE_FORMAT, "minidiff VAE file")
    try:
        return VAEConfig.from_dict(meta.get("vae")).factor
    except (MinidiffError, TypeError) as exc:
        raise ModelFileError(f"'{path}' has an invalid VAE config: {exc}") from None

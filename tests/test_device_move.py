"""A latent model moves as one: U-Net, conditioner and VAE follow ``DiffusionModel.to`` on every path.

The bug this guards: ``train --init-from LATENT.safetensors --device cuda`` moved the U-Net to the GPU
and left the VAE on the CPU, so the first posterior table met CUDA images with CPU weights. There is
no second CPU device to catch that on, but there is torch's ``meta`` device: a module left behind
reports ``cpu`` there, and an operation mixing the two fails as the CUDA run did. tests/test_cuda.py
runs the same paths on a GPU with the shipped emoji model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tinymodels import tiny_config

from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.training.config import TrainConfig
from minidiff_cli.vae.autoencoder import VAEConfig

META = torch.device("meta")


def tiny_latent_file(path: Path, conditioner: str = "none") -> Path:
    """A latent model: a U-Net on 4x4x4 latents of a factor-2 VAE (8 px pictures), fresh weights."""
    config = tiny_config(conditioner)
    config["unet"].update(image_size=4, in_channels=4, out_channels=4)
    if conditioner == "class":  # the classes of the ``pictures`` folder
        config["class_names"] = config["conditioner"]["config"]["class_names"] = ["circle", "square"]
    config["vae"] = {"config": VAEConfig(base_channels=8, channel_mult=(1, 2)).to_dict(), "shift": 0.0,
                     "scale": 1.0, "hash": "", "name": "tiny-vae"}
    torch.manual_seed(0)
    DiffusionModel.build(config).save(path)
    return path


def devices(model: DiffusionModel) -> dict[str, set[str]]:
    """The device types of every parameter and buffer of each part of ``model``."""
    parts = {"unet": model.unet, "conditioner": model.conditioner, "vae": model.latent.autoencoder}
    return {name: {t.device.type for t in [*part.parameters(), *part.buffers()]} for name, part in parts.items()}


@pytest.fixture
def latent_file(tmp_path):
    return tiny_latent_file(tmp_path / "latent.safetensors", conditioner="class")


@pytest.fixture
def pictures(tmp_path) -> Path:
    folder = tmp_path / "pictures"
    for k, name in enumerate(("circle/1.png", "circle/2.png", "square/3.png", "square/4.png")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (60 * k, 100, 0)).save(folder / name)
    return folder


def test_to_moves_the_unet_the_conditioner_and_the_vae(latent_file):
    model = DiffusionModel.load(latent_file)
    assert devices(model) == {"unet": {"cpu"}, "conditioner": {"cpu"}, "vae": {"cpu"}}
    assert model.to(META) is model
    assert devices(model) == {"unet": {"meta"}, "conditioner": {"meta"}, "vae": {"meta"}}
    assert model.device == META
    assert model.encode(torch.zeros(2, 3, 8, 8, device=META)).device == META  # img2img's init image
    assert model.decode(torch.zeros(2, 4, 4, 4, device=META)).device == META  # every sampling run's end


def test_load_on_a_device_moves_the_whole_model(latent_file, monkeypatch):
    """generate and img2img load through Pipeline.load -> DiffusionModel.load(device=...)."""
    from minidiff_cli.inference import pipeline

    monkeypatch.setattr(pipeline, "pick_device", lambda device: META)  # the CLI's devices are cpu, cuda, mps
    pipe = pipeline.Pipeline.load(latent_file)
    assert devices(pipe.model) == {"unet": {"meta"}, "conditioner": {"meta"}, "vae": {"meta"}}


def _trainer_on_meta(monkeypatch, cfg: TrainConfig, resume: bool = False):
    from minidiff_cli.training import trainer

    real = trainer.start_training
    monkeypatch.setattr(trainer, "start_training", lambda c: (META, *real(c)[1:]))
    return trainer.Trainer(cfg, resume=resume, log=lambda message: None)


def _cfg(tmp_path: Path, pictures: Path, latent_file: Path, **changes) -> TrainConfig:
    base = {"data": str(pictures), "conditioner": "class", "image_size": 8, "init_from": str(latent_file),
            "batch_size": 2, "timesteps": 50, "quiet": True, "device": "cpu", "out": str(tmp_path / "run"),
            "max_steps": 4, "save_every": 4, "sample_every": 1000}
    return TrainConfig(**{**base, **changes}).validate()


@pytest.mark.parametrize("steps", [4, 1])  # 4 pictures seen twice: encoded once for the run; else at each step
def test_init_from_a_latent_model_puts_its_vae_on_the_training_device(tmp_path, pictures, latent_file, monkeypatch,
                                                                      steps):
    trainer = _trainer_on_meta(monkeypatch, _cfg(tmp_path, pictures, latent_file, max_steps=steps))
    assert devices(trainer.model) == {"unet": {"meta"}, "conditioner": {"meta"}, "vae": {"meta"}}
    assert {p.device.type for p in [*trainer.net.parameters(), *trainer.ema.parameters()]} == {"meta"}
    assert (trainer._posterior_table() is not None) == (steps == 4)  # the table is where the CUDA run crashed
    latents, _, _ = trainer.load_batch(0)
    assert latents.device == META and latents.shape == (2, 4, 4, 4)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # restoring into meta: a no-op
def test_resuming_an_init_from_latent_run_puts_its_vae_on_the_training_device(tmp_path, pictures, latent_file,
                                                                              monkeypatch):
    from minidiff_cli.training.trainer import Trainer

    cfg = _cfg(tmp_path, pictures, latent_file)
    Trainer(cfg, log=lambda message: None).run()  # on the CPU: a checkpoint at step 4
    trainer = _trainer_on_meta(monkeypatch, _cfg(tmp_path, pictures, latent_file, max_steps=6), resume=True)
    assert trainer.step == 4
    assert devices(trainer.model) == {"unet": {"meta"}, "conditioner": {"meta"}, "vae": {"meta"}}
    assert trainer.load_batch(4)[0].device == META


def test_on_the_cpu_init_from_trains_a_latent_model_as_before(tmp_path, pictures, latent_file):
    from minidiff_cli.training.trainer import MODEL, Trainer

    cfg = _cfg(tmp_path, pictures, latent_file)
    trainer = Trainer(cfg, log=lambda message: None)
    assert devices(trainer.model) == {"unet": {"cpu"}, "conditioner": {"cpu"}, "vae": {"cpu"}}
    trainer.run()
    config = json.loads(json.dumps(DiffusionModel.check_file(Path(cfg.out) / MODEL)))
    assert config["vae"]["name"] == "tiny-vae" and config["training"]["step"] == 4

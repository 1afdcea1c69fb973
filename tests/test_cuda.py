"""The CUDA paths: sampling, the CLI, mixed-precision training and moving runs between devices.

Skipped where no CUDA GPU is present (CI has none); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``. Initial noise is drawn on the CPU with one generator
per image, so a GPU run of a seed must give the CPU run's image up to float rounding.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_cli
from PIL import Image
from tinymodels import TINY_TRAIN, tiny_model_file, without

from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.files.models_dir import SHIPPED_DIR
from minidiff_cli.inference.pipeline import Generation, Pipeline
from minidiff_cli.training.checkpoint import read_checkpoint_meta
from minidiff_cli.training.trainer import CHECKPOINT, METRICS, MODEL
from minidiff_cli.vae.vae_file import save_vae

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TRAIN = without(TINY_TRAIN, "--device")  # TINY_TRAIN runs on the CPU; these runs name their device


@pytest.fixture
def clip_file(tmp_path):
    return tiny_model_file(tmp_path / "tiny-clip.safetensors", conditioner="clip", seed=3)


def samples(path, device: str, dtype: str = "auto", **kwargs) -> torch.Tensor:
    pipe = Pipeline.load(path, device=device, dtype=dtype)
    assert pipe.device.type == device
    return pipe.sample(Generation("a red circle", steps=20, cfg=3.0, seed=7, **kwargs), num_images=3)


def test_one_denoising_step_on_cuda_matches_the_cpu(clip_file):
    model = DiffusionModel.load(clip_file)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 10, 30, 49])
    cond = model.conditioner.encode(["a red circle", "a blue square", "", "a green triangle"])
    with torch.no_grad():
        cpu = model.predict_eps(x, t, cond)
        model.to("cuda")
        cuda = model.predict_eps(x.cuda(), t.cuda(), cond.to("cuda")).cpu()
    # cuDNN convolutions may run in TF32 (torch's default for them): ~1e-3 relative, not 1e-7.
    assert (cuda - cpu).norm() / cpu.norm() < 1e-2


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_cuda_samples_equal_cpu_samples(clip_file, sampler):
    cpu, cuda = samples(clip_file, "cpu", sampler=sampler), samples(clip_file, "cuda", sampler=sampler)
    assert cuda.device.type == "cpu" and cuda.dtype == torch.float32  # the pipeline hands back CPU tensors
    # Noise (ddpm adds fresh noise each step) is drawn on the CPU for both: the runs follow the same
    # path. Rounding differences grow over 20 guided steps of this random-weight model in a few
    # pixels (seen on an H100 with ddim: mean 0.0007, one value of 576 off by 0.22), so the test
    # bounds the mean and the share of pixels that moved, not the single worst one.
    diff = (cuda - cpu).abs()
    assert diff.mean() < 2e-3 and (diff > 0.05).float().mean() < 0.01, (diff.mean(), diff.max())


def test_bfloat16_on_cuda_stays_near_float32(clip_file):
    full, half = samples(clip_file, "cuda"), samples(clip_file, "cuda", dtype="bfloat16")
    assert torch.isfinite(half).all()
    assert (half - full).abs().mean() < 0.05  # bfloat16 keeps ~3 significant digits


def test_float16_on_cuda_is_allowed_and_finite(clip_file):
    assert torch.isfinite(samples(clip_file, "cuda", dtype="float16")).all()


def test_generate_cli_on_cuda_writes_the_cpu_image(clip_file, tmp_path):
    pixels = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        result = run_cli("generate", "a red circle", "--model", str(clip_file), "--steps", "10", "--seed", "5",
                         "--device", device, "-q", "-o", str(out))
        assert result.returncode == 0, result.stderr
        (png,) = out.glob("*.png")
        with Image.open(png) as image:
            pixels[device] = torch.tensor(list(image.convert("RGB").tobytes()), dtype=torch.int16)
            assert json.loads(image.info["minidiff"])["seed"] == 5
    assert (pixels["cuda"] - pixels["cpu"]).abs().max() <= 2  # 8-bit levels: rounding at most


def test_device_out_of_range_is_a_one_line_error(clip_file, tmp_path):
    result = run_cli("generate", "a red circle", "--model", str(clip_file), "--device",
                     f"cuda:{torch.cuda.device_count()}", "-o", str(tmp_path))
    assert result.returncode == 2 and "numbered from 0" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_training_on_cuda_learns_and_saves_cpu_loadable_files(tmp_path, toml, precision):
    out = tmp_path / "run"
    result = run_cli("train", *TRAIN, "--device", "cuda", "--mixed-precision", precision, "--config", str(toml),
                     "--max-steps", "30", "--save-every", "30", "--sample-every", "1000", "--log-every", "1",
                     "--lr", "3e-3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    losses = [json.loads(line)["loss"] for line in (out / METRICS).read_text().splitlines()]
    assert len(losses) == 30 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])  # it learns, in every precision
    model = DiffusionModel.load(out / MODEL)  # saved from the GPU, loaded on the CPU
    assert model.device.type == "cpu"
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())  # mixed precision keeps float32 weights


def test_a_run_started_on_cuda_resumes_on_the_cpu(tmp_path, toml):
    out = tmp_path / "run"
    first = run_cli("train", *TRAIN, "--device", "cuda", "--config", str(toml), "--max-steps", "4",
                    "--save-every", "4", "--sample-every", "1000", "--out", str(out))
    assert first.returncode == 0, first.stderr
    resumed = run_cli("train", "--out", str(out), "--resume", "--max-steps", "8", "--device", "cpu", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 8


# -- latent models on CUDA: the U-Net, the conditioner and the VAE move together (DiffusionModel.to) -----------
# `train --init-from emoji --device cuda` once left the emoji model's VAE on the CPU and crashed in the first
# posterior table ("Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor)"); these run every
# path that puts a latent model on a device, with the shipped emoji model and tiny step counts.
# tests/test_device_move.py checks the same paths without a GPU, on torch's meta device.
EMOJI = SHIPPED_DIR / "emoji.safetensors"
EMOJI_CLIP = SHIPPED_DIR / "clip" / "emoji.safetensors"
EMOJI_SAMPLE = ROOT / "tests" / "data" / "emoji-sample"  # 12 emoji at 64 px with metadata.jsonl captions
EMOJI_DATA = ["--data", str(EMOJI_SAMPLE), "--image-size", "64", "--batch-size", "4", "--sample-every", "1000",
              "--quiet"]


def _on(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def test_the_emoji_latent_model_loads_whole_onto_cuda():
    model = Pipeline.load(EMOJI, device="cuda").model
    assert model.latent is not None
    assert _on(model.unet) == _on(model.conditioner) == _on(model.latent.autoencoder) == {"cuda"}


def test_train_with_the_emoji_vae_on_cuda(tmp_path, toml):
    vae = save_vae(tmp_path / "emoji-vae.safetensors", DiffusionModel.load(EMOJI).latent.autoencoder,
                   {"name": "emoji-vae", "image_size": 64})
    out = tmp_path / "run"
    result = run_cli("train", *without(TRAIN, "--image-size", "--batch-size"), *EMOJI_DATA, "--config", str(toml),
                     "--conditioner", "clip", "--clip-weights", str(EMOJI_CLIP), "--vae", str(vae), "--device", "cuda",
                     "--max-steps", "2", "--save-every", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert DiffusionModel.load(out / MODEL).latent is not None


def test_init_from_the_emoji_model_trains_and_resumes_on_cuda(tmp_path):
    out = tmp_path / "run"
    first = run_cli("train", "--init-from", str(EMOJI), *EMOJI_DATA, "--device", "cuda", "--max-steps", "2",
                    "--save-every", "2", "--out", str(out))
    assert first.returncode == 0, first.stderr  # was: "Input type (torch.cuda.FloatTensor) and weight type ..."
    resumed = run_cli("train", "--out", str(out), "--resume", "--max-steps", "4", "--device", "cuda", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert read_checkpoint_meta(out / CHECKPOINT)["step"] == 4
    model = DiffusionModel.load(out / MODEL)  # saved from the GPU, VAE included, loaded on the CPU
    assert model.latent is not None and model.config["init_from"]["file"] == str(EMOJI)
    assert _on(model.latent.autoencoder) == {"cpu"}


def _pixels(path) -> torch.Tensor:
    with Image.open(path) as image:
        assert image.size == (64, 64)
        return torch.tensor(list(image.convert("RGB").tobytes()), dtype=torch.float32)


@pytest.mark.parametrize("start", ["noise", "img2img", "inpaint"])
def test_the_emoji_model_generates_on_cuda_as_on_the_cpu(tmp_path, start):
    init = EMOJI_SAMPLE / "images" / "1f34e.png"
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 0).save(mask)
    Image.new("L", (32, 64), 255).save(tmp_path / "half.png")
    with Image.open(mask) as m, Image.open(tmp_path / "half.png") as half:
        m.paste(half, (0, 0))
        m.save(mask)
    extra = {"noise": [], "img2img": ["--init-image", str(init), "--strength", "0.5"],
             "inpaint": ["--init-image", str(init), "--mask", str(mask)]}[start]
    pixels = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.png"
        result = run_cli("generate", "red apple", "--model", str(EMOJI), "--steps", "4", "--seed", "3", *extra,
                         "--device", device, "-q", "-o", str(out))
        assert result.returncode == 0, result.stderr
        pixels[device] = _pixels(out)
    # The VAE decodes on the device too; TF32 convolutions make small differences, not another picture.
    assert (pixels["cuda"] - pixels["cpu"]).abs().mean() < 8

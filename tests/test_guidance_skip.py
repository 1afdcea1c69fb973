"""cfg 1 (plain conditioning) and cfg 0 (unconditional) run the network on B rows, not 2B."""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import run_in_process
from PIL import Image
from tinymodels import tiny_model, tiny_model_file

from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.diffusion.guidance import clipped, combine, guided_denoiser
from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.diffusion.sampling import sample
from minidiff_cli.nets.unet import UNet


@contextmanager
def unet_batch_sizes():
    """The batch size of every U-Net forward pass in this process, through torch's global module hook."""
    sizes: list[int] = []

    def hook(module, args):
        if isinstance(module, UNet):
            sizes.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield sizes
    finally:
        handle.remove()


def two_batch_guidance(model, cond: Conditioning, uncond: Conditioning, cfg: float):
    """The guided denoiser as it was before: both halves as one batch of 2B, then combined."""
    both = Conditioning.cat(cond, uncond)

    def denoiser(x, t):
        eps_cond, eps_uncond = model.predict_eps(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return combine(eps_cond, eps_uncond, cfg)

    return denoiser


@pytest.mark.parametrize("conditioner, prompt", [("class", "blue square"), ("clip", "a blue square")])
@pytest.mark.parametrize("cfg", [1.0, 0.0])
def test_cfg_one_and_zero_equal_the_full_guidance_formula_with_half_the_batch(conditioner, prompt, cfg):
    model = tiny_model(conditioner, seed=9)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([3, 20, 44])
    with torch.no_grad():
        cond, uncond = model.conditioner.encode([prompt] * 3), model.conditioner.null(3)
        reference = two_batch_guidance(model, cond, uncond, cfg)(x, t)
        with unet_batch_sizes() as sizes:
            skipped = guided_denoiser(model, cond, uncond, cfg, clip_x0=None)(x, t)
        full = guided_denoiser(model, cond, uncond, 2.0, clip_x0=None)(x, t)
    assert sizes == [3]  # one pass over B rows, not 2B
    torch.testing.assert_close(skipped, reference, atol=1e-5, rtol=1e-5)
    assert (full - skipped).abs().max() > 1e-2  # the other scale differs: the comparison is not vacuous


def test_generate_at_cfg_one_calls_the_network_on_half_the_batch_and_draws_the_same_images(tmp_path):
    model_file = tiny_model_file(tmp_path / "tiny.safetensors", "class", seed=6)
    runs = {}
    for cfg in ("1", "3"):
        out = tmp_path / f"cfg{cfg}"
        with unet_batch_sizes() as sizes:
            code, stdout, stderr = run_in_process("generate", "green triangle", "--model", model_file, "--steps", "5",
                                                  "--cfg", cfg, "-n", "3", "--seed", "2", "-o", out, "-q", "--json",
                                                  "--device", "cpu")
        assert code == 0, stderr
        runs[cfg] = (sizes, json.loads(stdout)["images"])
    assert runs["1"][0] == [3] * 5  # five steps, each one pass over the three images
    assert runs["3"][0] == [6] * 5  # guided: conditional and unconditional halves together

    # The images at cfg 1 are those the two-half formula gives, to float precision.
    model = DiffusionModel.load(model_file, device="cpu")
    with torch.no_grad():
        cond, uncond = model.conditioner.encode(["green triangle"] * 3), model.conditioner.null(3)
        denoiser = clipped(two_batch_guidance(model, cond, uncond, 1.0), model.schedule, 1.0)
        x0 = sample(denoiser, (3, 3, 8, 8), schedule=model.schedule, sampler="ddim", steps=5, seed=2)
    expected = ((x0.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    for k, path in enumerate(runs["1"][1]):
        with Image.open(path) as image:
            got = np.asarray(image.convert("RGB")).astype(float)
        assert np.abs(got - expected[k]).max() <= 0.5 + 1e-3  # the same uint8 rounding of the same values

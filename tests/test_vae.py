"""The VAE and latent models: formulas, files, training through the CLI, and every path of a latent model."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image
from tinymodels import TINY_TOML, TINY_TRAIN, without

from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.errors import MinidiffError, ModelFileError
from minidiff_cli.evaluation.reconstruction import bytes_per_image, psnr, ssim
from minidiff_cli.vae.autoencoder import Autoencoder, Posterior, VAEConfig
from minidiff_cli.vae.latent_space import LatentSpace, measure
from minidiff_cli.vae.vae_file import check_vae_file, load_vae, save_vae, vae_factor

TINY_VAE = ["--image-size", "16", "--base-channels", "8", "--channel-mult", "1,2", "--batch-size", "4",
            "--warmup", "2", "--device", "cpu", "--quiet"]


def tiny_vae(seed: int = 0, **kw) -> Autoencoder:
    torch.manual_seed(seed)
    return Autoencoder(VAEConfig(3, 8, (1, 2), 1, kw.get("latent_channels", 4))).eval()


# -- formulas --------------------------------------------------------------------------------
def test_factor_and_shapes_follow_the_levels():
    for mult, factor in (((1, 2), 2), ((1, 2, 2), 4), ((1, 2, 2, 4), 8)):
        ae = Autoencoder(VAEConfig(3, 8, mult, 1, 3))
        assert ae.config.factor == factor
        posterior = ae.encode(torch.zeros(2, 3, 32, 32))
        assert posterior.mean.shape == (2, 3, 32 // factor, 32 // factor)
        assert ae.decode(posterior.mean).shape == (2, 3, 32, 32)


def test_kl_of_a_diagonal_gaussian_has_its_closed_form():
    zero = Posterior(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2))
    assert zero.kl().item() == 0.0  # N(0, 1) itself
    mean, logvar = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), math.log(0.25))
    # KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1 - ln s^2) / 2
    expected = (4 + 0.25 - 1 - math.log(0.25)) / 2
    assert Posterior(mean, logvar).kl().item() == pytest.approx(expected, rel=1e-6)
    noise = torch.ones(1, 1, 1, 1)
    assert Posterior(mean, logvar).sample(noise).item() == pytest.approx(2.5)  # m + s * noise


def test_psnr_and_ssim_known_answers():
    x = torch.rand(3, 3, 16, 16) * 1.6 - 0.8
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 3)
    shifted = x + 0.2  # 0.1 in [0, 1] units everywhere: MSE 0.01, PSNR 20 dB
    assert psnr(shifted, x).tolist() == pytest.approx([20.0] * 3, abs=1e-4)
    assert ssim(x[..., :8, :8], x[..., :8, :8]) is None  # below the 11-pixel window
    b = bytes_per_image((4, 16, 16), (3, 64, 64))
    assert (b["pixels_uint8"], b["latent_float16"], b["compression"]) == (12288, 2048, 12.0)


def test_measured_shift_and_scale_normalise_the_latents():
    ae = tiny_vae()
    images = torch.rand(40, 3, 16, 16) * 2 - 1
    shift, scale, used = measure(ae, lambda a, b: images[a:b], len(images), batch_size=16, seed=3)
    assert used == 40
    with torch.no_grad():
        mean = ae.encode(images).mean
    assert shift == pytest.approx(mean.mean().item(), abs=0.05 / scale)  # sampling noise is small
    space = LatentSpace(ae, shift, scale)
    g = torch.Generator().manual_seed(3)
    noise = torch.cat([torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 4, 8, 8, generator=g),
                       torch.randn(8, 4, 8, 8, generator=g)])
    with torch.no_grad():
        z = space.encode(images, noise)  # the same draws as measure's: exactly unit spread, zero mean
        assert z.mean().item() == pytest.approx(0.0, abs=1e-5)
        assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
        assert torch.allclose(space.decode(space.encode(images)), ae.decode(mean).clamp(-1, 1), atol=1e-5)


def test_vae_config_bounds_are_one_line_errors():
    for bad in ({"base_channels": 12}, {"base_channels": 4096}, {"channel_mult": [1]}, {"channel_mult": [1] * 9},
                {"latent_channels": 0}, {"num_res_blocks": True}, {"surprise": 1}):
        with pytest.raises(MinidiffError):
            VAEConfig.from_dict({**VAEConfig().to_dict(), **bad})


# -- the VAE file ----------------------------------------------------------------------------
def test_vae_file_round_trip_and_hostile_files(tmp_path):
    ae = tiny_vae(1)
    path = save_vae(tmp_path / "v.safetensors", ae, {"name": "t", "image_size": 16})
    loaded = load_vae(path)
    assert loaded.meta["name"] == "t" and loaded.config == ae.config and vae_factor(path) == 2
    for key, value in ae.state_dict().items():
        assert torch.equal(loaded.autoencoder.state_dict()[key], value)
    with pytest.raises(MinidiffError, match="already exists"):
        save_vae(path, ae)

    def rewrite(name: str, edit) -> Path:
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        edit(header)
        text = json.dumps(header).encode()
        out = tmp_path / name
        out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        return out

    def config(edit):
        def apply(header):
            meta = json.loads(header["__metadata__"]["config"])
            edit(meta)
            header["__metadata__"]["config"] = json.dumps(meta)
        return apply

    huge = rewrite("huge.safetensors", config(lambda m: m["vae"].update(base_channels=1 << 20)))
    with pytest.raises(ModelFileError, match="invalid VAE config"):
        check_vae_file(huge)
    wider = rewrite("wider.safetensors", config(lambda m: m["vae"].update(latent_channels=5)))
    with pytest.raises(ModelFileError, match="does not match its config"):
        load_vae(wider)
    other = rewrite("other.safetensors", lambda h: h["__metadata__"].update(format="minidiff"))
    with pytest.raises(ModelFileError, match="not a minidiff VAE file"):
        load_vae(other)
    nan = ae.state_dict()
    nan["decoder.conv_out.bias"] = torch.full_like(nan["decoder.conv_out.bias"], float("nan"))
    bad = Autoencoder(ae.config)
    bad.load_state_dict(nan)
    with pytest.raises(ModelFileError, match="NaN"):
        load_vae(save_vae(tmp_path / "nan.safetensors", bad))


# -- vae train through the CLI ---------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory) -> Path:
    """A tiny VAE trained on shapes at 16 px by `minidiff vae train` (100 steps, seconds)."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    result = run_cli("vae", "train", "--data", "shapes", *TINY_VAE, "--max-steps", "100", "--lr", "1e-2",
                     "--ema-decay", "0.9", "--save-every", "50", "--sample-every", "50", "--log-every", "10",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "held-out PSNR" in result.stdout
    return out


def test_vae_train_learns_saves_and_checks_held_out_images(vae_run):
    run_dir = vae_run.with_name("vae-run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in records if "check_psnr" in r]
    assert [r["step"] for r in checks] == [50, 100] and all(r["check_on"] == "held-out" for r in checks)
    untrained = tiny_vae()
    from minidiff_cli.data.holdout import split_items
    from minidiff_cli.data.sources import open_dataset
    from minidiff_cli.evaluation.vae import reconstruct, summarise

    dataset = open_dataset("shapes", image_size=16, holdout="")
    train, held = split_items(dataset, 0.05)
    assert set(train).isdisjoint(held) and 0.04 < len(held) / len(dataset) < 0.06
    x = torch.stack([dataset[i]["image"] for i in held[:32]])
    before = summarise(reconstruct(untrained, x), x)["psnr"]
    after = summarise(reconstruct(load_vae(vae_run).autoencoder, x), x)["psnr"]
    assert after > before + 2, (before, after)  # 100 steps already learn colours and layout
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-0000050.png", "step-0000100.png"]
    assert Image.open(run_dir / "samples" / "step-0000100.png").size[1] == 2 * 16 + 3  # originals over reconstructions


def test_vae_train_resume_equals_an_uninterrupted_run(tmp_path, cli):
    first = tmp_path / "a.safetensors"
    flags = ["vae", "train", "--data", "shapes", *TINY_VAE, "--lr", "3e-3", "--save-every", "20", "--sample-every", "40"]
    assert cli(*flags, "--max-steps", "20", "--out", str(first)).returncode == 0
    resumed = cli("vae", "train", "--out", str(first), "--resume", "--max-steps", "40", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    from minidiff_cli.training.vae import VAETrainConfig, VAETrainer

    stored = json.loads((first.with_name("a-run") / "vae_config.json").read_text())
    assert stored["lr_decay_steps"] == 20 and stored["max_steps"] == 40  # the decay was fixed by the first run
    straight = VAETrainConfig.from_dict({**stored, "out": str(tmp_path / "c.safetensors"), "run_dir": None})
    VAETrainer(straight).run()
    a = load_vae(first).autoencoder.state_dict()
    c = load_vae(tmp_path / "c.safetensors").autoencoder.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)  # stopped and resumed == never stopped


def test_vae_train_refuses_to_replace_and_bad_settings(tmp_path, cli, vae_run):
    assert_one_line_error(cli("vae", "train", "--data", "shapes", *TINY_VAE, "--out", str(vae_run)),
                          "already holds a VAE run")
    other = tmp_path / "x.safetensors"
    other.write_bytes(b"mine")
    assert_one_line_error(cli("vae", "train", "--data", "shapes", *TINY_VAE, "--out", str(other)), "already exists")
    assert other.read_bytes() == b"mine"
    assert_one_line_error(cli("vae", "train", "--data", "shapes", *without(TINY_VAE, "--image-size"),
                              "--image-size", "17", "--out", str(tmp_path / "y.safetensors")), "multiple of the VAE's factor")
    assert_one_line_error(cli("vae", "train", "--out", str(tmp_path / "none.safetensors"), "--resume"),
                          "nothing to resume")
    assert_one_line_error(cli("vae", "train", "--out", str(vae_run), "--resume", "--latent-channels", "8"),
                          "cannot change when resuming")
    assert not (tmp_path / "y-run").exists() and not (tmp_path / "y.safetensors").exists()


def test_vae_reconstruct_and_eval(tmp_path, cli, vae_run):
    picture = tmp_path / "p.png"
    Image.new("RGB", (20, 16), (200, 30, 30)).save(picture)
    out, latents = tmp_path / "round.png", tmp_path / "lat.png"
    result = cli("vae", "reconstruct", str(picture), str(picture), "--vae", str(vae_run), "-o", str(out),
                 "--latents", str(latents))
    assert result.returncode == 0, result.stderr
    assert "latents 4x8x8" in result.stdout and "PSNR" in result.stdout
    assert Image.open(out).size == (2 * 16 + 3, 2 * 16 + 3)
    assert Image.open(latents).mode == "L"
    assert_one_line_error(cli("vae", "reconstruct", str(picture), "--vae", str(vae_run), "-o", str(out)),
                          "already exists")
    report = cli("vae", "eval", "--vae", str(vae_run), "--data", "shapes", "--limit", "40", "--json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["images"] == 40 and data["on"] == "held-out" and data["latent_shape"] == [4, 8, 8]
    assert data["psnr"] > 10 and 0 < data["ssim"] <= 1 and data["bytes_per_image"]["latent_float16"] == 512
    info = cli("info", str(vae_run))
    assert info.returncode == 0 and "4 channels at 1/2 of the side" in info.stdout


# -- latent models ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, vae_run) -> Path:
    """A tiny class-conditional latent model on the tiny VAE (16 px pictures, 4x8x8 latents)."""
    from conftest import run_cli

    folder = tmp_path_factory.mktemp("latent")
    toml = folder / "tiny.toml"
    toml.write_text(TINY_TOML)
    out = folder / "run"
    flags = [*without(TINY_TRAIN, "--attention-resolutions", "--cross-attention-resolutions"), "--config", str(toml)]
    result = run_cli("train", "--data", "shapes", "--conditioner", "class", *flags, "--vae", str(vae_run),
                     "--max-steps", "4", "--save-every", "2", "--sample-every", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "latent space of" in result.stderr and "measured on 512 training images" in result.stderr
    return out


def test_latent_model_file_holds_its_vae_and_draws_pixels(latent_run, vae_run, cli, tmp_path):
    model = DiffusionModel.load(latent_run / "model.safetensors")
    assert model.latent_shape == (4, 8, 8) and model.image_size == 16 and model.channels == 3
    assert list(model.unet.config.attention_resolutions) == [4]  # the default follows the latent size
    vae = load_vae(vae_run).autoencoder.state_dict()
    assert all(torch.equal(model.latent.autoencoder.state_dict()[k], v) for k, v in vae.items())
    entry = model.config["vae"]
    assert entry["hash"] == load_vae(vae_run).hash and 0 < entry["scale"] and math.isfinite(entry["shift"])
    out = tmp_path / "red.png"
    result = cli("generate", "a red circle", "-m", str(latent_run / "model.safetensors"), "--steps", "4",
                 "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (16, 16) and Image.open(out).mode == "RGB"
    assert "latents" in cli("info", str(latent_run / "model.safetensors")).stdout
    assert cli("explain", str(latent_run / "model.safetensors")).returncode == 0
    assert (latent_run / "samples" / "step-0000004.png").is_file()


def test_every_sampler_draws_a_latent_model(latent_run):
    from minidiff_cli import plugins
    from minidiff_cli.inference.pipeline import Pipeline

    pipe = Pipeline.load(str(latent_run / "model.safetensors"), device="cpu")
    for name in plugins.registry().names("samplers"):
        x = pipe.sample(pipe_generation(name), 2)
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all(), name


def pipe_generation(sampler: str):
    from minidiff_cli.inference.pipeline import Generation

    return Generation("a red circle", steps=4, cfg=2.0, sampler=sampler, seed=5)


def test_latent_inpainting_keeps_the_kept_pixels_exactly(latent_run, tmp_path):
    from minidiff_cli.inference.pipeline import Pipeline

    pipe = Pipeline.load(str(latent_run / "model.safetensors"), device="cpu")
    init = Image.new("RGB", (16, 16), (20, 200, 40))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (5, 5, 11, 11))  # repaint a 6x6 hole, not aligned with the 2-pixel latent cells
    for sampler in ("ddim", "ddpm"):
        images = pipe.generate("a red circle", steps=6, sampler=sampler, init_image=init, mask=mask, num_images=2)
        for image in images:
            pixels = image.load()
            kept = [(i, j) for i in range(16) for j in range(16) if not (5 <= i < 11 and 5 <= j < 11)]
            assert all(pixels[p] == (20, 200, 40) for p in kept), sampler
    strength0 = pipe.generate("a red circle", steps=6, init_image=init, strength=0.0)[0]
    assert strength0.size == (16, 16)  # strength 0: the VAE's round trip of the picture


def test_latent_model_refusals(tmp_path, cli, vae_run, latent_run, toml):
    flags = ["train", "--data", "shapes", *TINY_TRAIN, "--config", str(toml), "--max-steps", "2"]
    assert_one_line_error(cli(*flags, "--vae", str(vae_run), "--init-from", str(latent_run / "model.safetensors"),
                              "--out", str(tmp_path / "a")), "brings its own latent space")
    assert_one_line_error(cli(*without(flags, "--image-size"), "--image-size", "17", "--vae", str(vae_run),
                              "--out", str(tmp_path / "b")), "not a multiple of the VAE's factor")
    assert_one_line_error(cli(*flags, "--vae", str(latent_run / "model.safetensors"), "--out", str(tmp_path / "c")),
                          "not a minidiff VAE file")
    # a model file whose U-Net does not take the VAE's latent channels is refused on load
    model = DiffusionModel.load(latent_run / "model.safetensors")
    model.config["vae"]["config"]["latent_channels"] = 3
    with pytest.raises(MinidiffError):
        DiffusionModel.build(model.config)


def test_flow_matching_on_latents(tmp_path, cli, vae_run, toml):
    out = tmp_path / "flow"
    flags = [*without(TINY_TRAIN, "--attention-resolutions", "--cross-attention-resolutions"), "--config", str(toml)]
    result = cli("train", "--data", "shapes", *flags, "--vae", str(vae_run), "--prediction", "flow",
                 "--max-steps", "2", "--sample-every", "1000", "--out", str(out))
    assert result.returncode == 0, result.stderr
    model = DiffusionModel.load(out / "model.safetensors")
    assert model.prediction == "flow" and model.latent is not None


def test_unconditional_latent_model(tmp_path, cli, vae_run, toml):
    out = tmp_path / "none"
    flags = [*without(TINY_TRAIN, "--attention-resolutions", "--cross-attention-resolutions"), "--config", str(toml)]
    result = cli("train", "--data", "shapes", "--conditioner", "none", *flags, "--vae", str(vae_run),
                 "--max-steps", "2", "--sample-every", "1000", "--out", str(out))
    assert result.returncode == 0, result.stderr
    picture = tmp_path / "any.png"
    assert cli("generate", "", "-m", str(out / "model.safetensors"), "--steps", "3", "-o", str(picture),
               "-q").returncode == 0
    assert Image.open(picture).size == (16, 16)


def torchrun(*args: str, timeout: float = 600):
    import os
    import shutil
    import subprocess
    import sys

    runner = shutil.which("torchrun")
    launcher = [runner] if runner else [sys.executable, "-m", "torch.distributed.run"]
    return subprocess.run([*launcher, "--standalone", "--nproc-per-node", "2", "-m", "minidiff_cli", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_vae_train_and_latent_train_under_torchrun(tmp_path, toml):
    vae = tmp_path / "vae.safetensors"
    result = torchrun("vae", "train", "--data", "shapes", *TINY_VAE, "--max-steps", "4", "--save-every", "2",
                      "--sample-every", "4", "--out", str(vae))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cpu x2" in result.stderr and load_vae(vae).meta["training"]["step"] == 4
    flags = [*without(TINY_TRAIN, "--attention-resolutions", "--cross-attention-resolutions"), "--config", str(toml)]
    out = tmp_path / "latent"
    result = torchrun("train", "--data", "shapes", *flags, "--vae", str(vae), "--max-steps", "4",
                      "--sample-every", "1000", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checked: all 2 processes hold identical weights" in result.stderr
    assert DiffusionModel.load(out / "model.safetensors").latent is not None


def test_a_latent_run_resumes_only_with_its_own_vae(tmp_path, cli, vae_run, toml):
    import shutil

    vae = tmp_path / "vae.safetensors"
    shutil.copy(vae_run, vae)
    flags = ["train", "--data", "shapes", *without(TINY_TRAIN, "--attention-resolutions", "--cross-attention-resolutions"),
             "--config", str(toml), "--vae", str(vae), "--sample-every", "1000", "--out", str(tmp_path / "run")]
    assert cli(*flags, "--max-steps", "2").returncode == 0
    assert cli("train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "3").returncode == 0
    other = tiny_vae(7)
    vae.unlink()
    save_vae(vae, other, {"image_size": 16})  # the same shapes, other weights
    assert_one_line_error(cli("train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "4"),
                          "not the VAE this run started with")


def test_the_patchgan_term_trains_saves_and_resumes(tmp_path, cli):
    from minidiff_cli.training.checkpoint import load_checkpoint

    out = tmp_path / "gan.safetensors"
    flags = ["vae", "train", "--data", "shapes", *TINY_VAE, "--disc-start", "2", "--save-every", "3",
             "--sample-every", "100", "--log-every", "1", "--out", str(out)]
    assert cli(*flags, "--max-steps", "3").returncode == 0
    meta, tensors = load_checkpoint(out.with_name("gan-run") / "checkpoint.safetensors")
    assert any(k.startswith("disc.") for k in tensors)
    records = [json.loads(line) for line in (out.with_name("gan-run") / "metrics.jsonl").read_text().splitlines()]
    assert "g" not in records[0] and "d" not in records[0]  # step 1 (index 0): before --disc-start
    assert math.isfinite(records[-1]["g"]) and records[-1]["d"] >= 0  # hinge losses are never negative
    resumed = cli("vae", "train", "--out", str(out), "--resume", "--max-steps", "5", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert load_vae(out).meta["training"]["step"] == 5
    assert not any(k.startswith("disc") for k in load_vae(out).autoencoder.state_dict())  # the VAE file has no critic


# -- hostile VAE files, latent models and pictures ------------------------------------------------
def vae_file(path: Path, image_size=16, in_channels: int = 3) -> Path:
    """A VAE file (base 8, two levels: 111 KB) whose config says ``image_size`` (save_vae writes what it is told)."""
    torch.manual_seed(0)
    return save_vae(path, Autoencoder(VAEConfig(in_channels, 8, (1, 2), 1, 4)), {"name": "t", "image_size": image_size})


def with_config(source: Path, out: Path, edit) -> Path:
    """A copy of a safetensors file whose JSON config ``edit(config)`` changed (the tensors left as they are)."""
    raw = source.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    config = json.loads(header["__metadata__"]["config"])
    edit(config)
    header["__metadata__"]["config"] = json.dumps(config)
    text = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return out


def latent_model_file(path: Path, in_channels: int = 3) -> Path:
    """A tiny class-conditional latent model (an 8x8x4 latent U-Net on a factor-2 VAE: 16 px pictures)."""
    from tinymodels import tiny_config

    config = tiny_config("class")
    config["unet"].update(in_channels=4, out_channels=4)
    config["vae"] = {"config": VAEConfig(in_channels, 8, (1, 2), 1, 4).to_dict(), "shift": 0.1, "scale": 2.0,
                     "hash": "", "name": "v"}
    torch.manual_seed(0)
    return DiffusionModel.build(config).save(path)


def picture_file(path: Path, size=(20, 16)) -> Path:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


@pytest.mark.hostile
def test_a_vae_file_saying_a_huge_image_size_is_refused_before_anything_runs(tmp_path):
    from conftest import assert_error, timed_cli

    bomb = vae_file(tmp_path / "bomb.safetensors", image_size=4096)  # 111 KB: 8.6 GB and a traceback before
    assert bomb.stat().st_size < 120_000
    message = "image_size 4096 is not a size minidiff handles: a whole number of pixels from 1 to 1024"
    with pytest.raises(ModelFileError, match=message):
        check_vae_file(bomb)
    picture = picture_file(tmp_path / "p.png")
    assert_error(timed_cli("vae", "reconstruct", picture, "--vae", bomb, "-o", tmp_path / "r.png"), f"'{bomb}'",
                 message)
    assert_error(timed_cli("vae", "eval", "--vae", bomb, "--data", "shapes", "--limit", "2"), message)
    # within the size, a config whose activations would not fit: refused from the header, before the tensors
    wide = with_config(vae_file(tmp_path / "v.safetensors", image_size=1024), tmp_path / "wide.safetensors",
                       lambda c: c["vae"].update(base_channels=512, channel_mult=[1, 1, 1, 1], num_res_blocks=8))
    assert_error(timed_cli("vae", "reconstruct", picture, "--vae", wide, "-o", tmp_path / "r.png"),
                 "this VAE would need about 279 GiB of activations for one picture of 1024x1024, more than the 64 GiB")
    assert not (tmp_path / "r.png").exists()
    assert VAEConfig(3, 8, (1, 2), 1, 4).activation_bytes(512) < 400 << 20  # 390 MB measured for a training pass


@pytest.mark.hostile
def test_a_vae_train_whose_batch_would_not_fit_is_one_line(tmp_path):
    from conftest import assert_error, timed_cli

    out = tmp_path / "v.safetensors"
    assert_error(timed_cli("vae", "train", "--data", "shapes", *without(TINY_VAE, "--image-size", "--base-channels",
                                                                         "--batch-size"),
                           "--image-size", "512", "--base-channels", "256", "--batch-size", "4096", "--out", out),
                 "GiB of activations for 4096 pictures of 512x512, more than the 64 GiB allowed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.hostile
@pytest.mark.parametrize("size", ["-8", "0", "17", "4096", "1000000000000"])
def test_a_bad_image_size_for_vae_reconstruct_and_eval_is_one_line(tmp_path, size):
    from conftest import assert_error, timed_cli

    vae, picture = vae_file(tmp_path / "v.safetensors"), picture_file(tmp_path / "p.png")
    fragment = "not a multiple of the VAE's factor 2; use 16" if size == "17" else "not a size minidiff handles"
    assert_error(timed_cli("vae", "reconstruct", picture, "--vae", vae, "--image-size", size, "-o", tmp_path / "r.png"),
                 f"--image-size {size}", fragment)
    assert_error(timed_cli("vae", "eval", "--vae", vae, "--data", "shapes", "--image-size", size), fragment)
    assert not (tmp_path / "r.png").exists()


@pytest.mark.hostile
@pytest.mark.parametrize("channels", [1, 2, 4])
def test_vae_reconstruct_and_eval_fit_pictures_to_grey_or_refuse_other_channels_in_one_line(tmp_path, channels):
    from conftest import assert_error, run_in_process

    vae, picture = vae_file(tmp_path / "v.safetensors", in_channels=channels), picture_file(tmp_path / "p.png")
    sources = [vae]
    if channels == 2:
        sources.append(latent_model_file(tmp_path / "latent.safetensors", in_channels=2))  # a latent model's VAE
    for source in sources:
        out = tmp_path / f"r-{source.stem}.png"
        reconstructed = run_in_process("vae", "reconstruct", picture, "--vae", source, "-o", out)
        evaluated = run_in_process("vae", "eval", "--vae", source, "--data", "shapes", "--limit", "4", "--json")
        if channels == 1:  # grey: fitted as init images are, and measured on grey pictures of the data
            assert reconstructed[0] == 0, reconstructed
            assert "RGB converted to grey" in reconstructed[2] and Image.open(out).size == (16 + 2, 2 * 16 + 3)
            report = json.loads(evaluated[1])
            assert evaluated[0] == 0 and report["bytes_per_image"]["pixels_uint8"] == 16 * 16 and report["psnr"] > 0
        else:
            message = f"this VAE takes {channels}-channel pictures; minidiff fits pictures to grey (1 channel) or RGB"
            assert_error(reconstructed, message)
            assert_error(evaluated, message)
            assert not out.exists()


@pytest.mark.hostile
@pytest.mark.parametrize("size", [(2_000_000, 1), (89_000, 1)], ids=["2000000x1", "89000x1"])
def test_vae_reconstruct_refuses_a_thin_strip_before_decoding_or_scaling_it(tmp_path, size):
    from conftest import assert_error, timed_cli

    vae, strip = vae_file(tmp_path / "v.safetensors"), picture_file(tmp_path / "strip.png", size)
    assert_error(timed_cli("vae", "reconstruct", strip, "--vae", vae, "-o", tmp_path / "r.png"),
                 f"picture '{strip}' is {size[0]}x{size[1]} pixels, more than 32 times as long as it is wide")
    assert not (tmp_path / "r.png").exists()


SHIFTS = [
    ("shift-1e308", {"shift": 1e308}, "vae.shift 1e+308 lies more than 10000 spreads of the latents (1 / vae.scale "
                                      "= 0.5) from zero"),
    ("shift-beyond-float32", {"shift": 5e4, "scale": 1.0}, "vae.shift 50000 lies more than 10000 spreads"),
    ("shift-swallows-the-spread", {"shift": 1.0, "scale": 1e5}, "vae.shift 1 lies more than 10000 spreads"),
    ("scale-too-small", {"scale": 1e-9}, "vae.scale must be between 1e-06 and 1e+06"),
    ("shift-nan", {"shift": float("nan")}, "vae.shift must be a finite number"),
    ("scale-a-string", {"scale": "2"}, "vae.scale must be a finite number"),
]


@pytest.mark.hostile
@pytest.mark.parametrize("change, message", [c[1:] for c in SHIFTS], ids=[c[0] for c in SHIFTS])
def test_a_latent_model_whose_shift_or_scale_no_measurement_gives_is_refused(tmp_path, change, message):
    from conftest import assert_error, timed_cli

    good = latent_model_file(tmp_path / "good.safetensors")
    bad = with_config(good, tmp_path / "bad.safetensors", lambda c: c["vae"].update(change))
    with pytest.raises(ModelFileError, match=re_escape(message)):
        DiffusionModel.load(bad)
    assert_error(timed_cli("generate", "a red circle", "-m", bad, "--steps", "2", "-o", tmp_path / "out.png"),
                 f"'{bad}'", message)  # an all-black picture before, exit code 0
    assert not (tmp_path / "out.png").exists()
    assert DiffusionModel.load(good).latent.shift == pytest.approx(0.1)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.hostile
def test_a_latent_model_whose_pictures_would_pass_the_size_bound_is_refused(tmp_path):
    good = latent_model_file(tmp_path / "good.safetensors")
    bad = with_config(good, tmp_path / "bad.safetensors",
                      lambda c: c["unet"].update(image_size=520, attention_resolutions=[], mid_attention=False))
    with pytest.raises(ModelFileError, match="its picture size 1040 is not a size minidiff handles"):
        DiffusionModel.load(bad)


@pytest.mark.hostile
def test_measuring_a_latent_space_no_model_file_may_hold_is_refused():
    ae = tiny_vae()
    with torch.no_grad():  # latents of mean 1e6 and spread 1: the shift would swallow the spread
        ae.encoder.conv_out.weight.zero_()
        ae.encoder.conv_out.bias.copy_(torch.tensor([1e6] * 4 + [0.0] * 4))
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    with pytest.raises(MinidiffError, match="not usable for diffusion: vae.shift 1e.06 lies more than 10000 spreads"):
        measure(ae, lambda a, b: images[a:b], len(images))


@pytest.mark.hostile
def test_two_vae_runs_given_one_out_the_later_is_refused_before_it_trains(tmp_path):
    """Both start before either has written the file (each passes the check of a new run); the first to
    save claims the name, and the other is refused at its first save instead of replacing the file."""
    from minidiff_cli.training.vae import VAETrainConfig, VAETrainer, check_new_run

    out = tmp_path / "vae.safetensors"
    flags = dict(data="shapes", image_size=16, base_channels=8, channel_mult=[1, 2], batch_size=4, warmup=2,
                 device="cpu", quiet=True, max_steps=2, save_every=2, sample_every=1000, out=str(out))
    first = VAETrainConfig(**flags, run_dir=str(tmp_path / "a"))
    second = VAETrainConfig(**flags, run_dir=str(tmp_path / "b"), seed=1)
    for cfg in (first, second):
        check_new_run(cfg, resume=False)
    a, b = VAETrainer(first, log=lambda m: None), VAETrainer(second, log=lambda m: None)
    a.run()
    with pytest.raises(MinidiffError, match=re_escape("appeared after this run started (another run writing it?); "
                                                      "choose another --out")):
        b.run()
    assert b.step == 0 and not (tmp_path / "b").exists()
    held = load_vae(out).autoencoder.state_dict()
    assert all(torch.equal(held[k], v) for k, v in a.ema.state_dict().items())
    assert load_vae(out).meta["training"]["flags"]["run_dir"] == str(tmp_path / "a")


@pytest.mark.hostile
def test_two_concurrent_vae_train_commands_with_one_out_one_wins_and_the_file_is_its(tmp_path):
    import subprocess

    from conftest import cli_command

    from minidiff_cli.training.checkpoint import load_checkpoint

    out = tmp_path / "vae.safetensors"
    runs = [subprocess.Popen([*cli_command(), "vae", "train", "--data", "shapes", *TINY_VAE, "--max-steps", "3",
                              "--seed", str(k), "--out", str(out), "--run-dir", str(tmp_path / f"run{k}")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    winner = next(k for k, (code, _, _) in enumerate(results) if code == 0)
    loser = results[1 - winner][2].strip().splitlines()
    assert len(loser) == 1 and str(out) in loser[0] and "choose another --out" in loser[0], loser
    _, tensors = load_checkpoint(tmp_path / f"run{winner}" / "checkpoint.safetensors")
    held = load_vae(out).autoencoder.state_dict()
    assert all(torch.equal(held[k], tensors[f"ema.{k}"]) for k in held)

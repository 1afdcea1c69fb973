"""The model file: what is saved comes back exactly, and every broken file is refused in one line."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_error, assert_one_line_error, run_cli, timed_cli
from conftest import run_in_process as cli
from hostile_models import HOSTILE_MODELS, header_only_model
from safetensors.torch import save_file
from tinymodels import TINY_TRAIN, tiny_config, tiny_model

from minidiff_cli.diffusion.conditioning import Conditioning
from minidiff_cli.diffusion.model import DiffusionModel
from minidiff_cli.errors import MinidiffError, ModelFileError
from minidiff_cli.files.model_file import FORMAT_VERSION, file_hash, read_config, save_model_file
from minidiff_cli.inference.pipeline import Pipeline
from minidiff_cli.training.trainer import CHECKPOINT


def predictions(model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), 3, model.image_size, model.image_size, generator=g)
    t = torch.tensor([3, 27, 49][:len(prompts)])
    with torch.no_grad():
        return model.predict_eps(x, t, model.conditioner.encode(prompts))


# -- round trip --------------------------------------------------------------------------
@pytest.mark.parametrize("conditioner, prompts", [("class", ["red circle", "blue square", ""]),
                                                  ("clip", ["a red circle", "two blue squares", ""]),
                                                  ("none", ["", "", ""])])
def test_save_then_load_gives_identical_tensors_config_and_predictions(tmp_path, conditioner, prompts):
    model = tiny_model(conditioner, seed=3)
    path = model.save(tmp_path / "m.safetensors")
    loaded = DiffusionModel.load(path)

    saved, back = model.tensors(), loaded.tensors()
    assert saved.keys() == back.keys()
    for key in saved:
        assert saved[key].dtype == back[key].dtype and torch.equal(saved[key], back[key]), key
    assert loaded.config == {**tiny_config(conditioner), "unet": model.unet.config.to_dict()}
    assert loaded.hash == file_hash(path) and len(loaded.hash) == 10
    again = DiffusionModel.load(path)
    assert torch.equal(predictions(loaded, prompts), predictions(again, prompts))
    if conditioner != "clip":  # the clip encoder is stored in float16, so only the reload is exact
        assert torch.equal(predictions(model, prompts), predictions(loaded, prompts))


def test_clip_model_stores_its_encoder_in_half_precision_and_predicts_almost_the_same(tmp_path):
    model = tiny_model("clip", seed=1)
    path = model.save(tmp_path / "m.safetensors")
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    dtypes = {k.split(".")[0]: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"unet": "F32", "conditioner": "F16"}
    prompts = ["a red circle", "a blue square", ""]
    assert torch.allclose(predictions(model, prompts), predictions(DiffusionModel.load(path), prompts), atol=5e-3)


def test_saving_never_overwrites_unless_asked(tmp_path):
    path = tiny_model("none").save(tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(MinidiffError, match="already exists"):
        tiny_model("none", seed=5).save(path)
    assert path.read_bytes() == before
    tiny_model("none", seed=5).save(path, overwrite=True)
    assert path.read_bytes() != before


def test_info_json_shows_the_config_and_the_training_section(trained_run):
    path = trained_run / "model.safetensors"
    result = run_cli("info", str(path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["file"] == str(path) and info["hash"] == file_hash(path) and info["bytes"] == path.stat().st_size
    config = info["config"]
    assert config == read_config(path)
    assert config["unet"]["image_size"] == 16 and config["schedule"]["num_timesteps"] == 100
    assert config["conditioner"]["name"] == "class" and len(config["class_names"]) == 24
    training = config["training"]
    assert training["step"] == 6 and training["world_size"] == 1 and training["global_batch"] == 4
    assert training["data"] == "shapes" and training["flags"]["max_steps"] == 6
    assert 0 < training["final_loss"] < 2
    unet_params = DiffusionModel.load(path).unet.num_parameters()
    assert info["parameters"]["unet"] == unet_params

    table = run_cli("info", str(path))
    assert table.returncode == 0 and "training" in table.stdout and "red circle" in table.stdout


# -- refusals ------------------------------------------------------------------------------
def good_file(folder: Path) -> Path:
    return tiny_model("class", seed=2).save(folder / "good.safetensors")


def rewrite(folder: Path, change) -> Path:
    """A minidiff file whose tensors (or config) were changed after the fact."""
    model = tiny_model("class", seed=2)
    tensors, config = model.tensors(), {**tiny_config("class"), "unet": model.unet.config.to_dict()}
    change(tensors, config)
    return save_model_file(folder / "bad.safetensors", tensors, config)


def raw_file(folder: Path, data: bytes) -> Path:
    path = folder / "bad.safetensors"
    path.write_bytes(data)
    return path


def random_bytes(folder):
    return raw_file(folder, bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                                  .to(torch.uint8).tolist()))


def truncated(folder):
    return raw_file(folder, good_file(folder).read_bytes()[:-1000])


def header_larger_than_file(folder):
    return raw_file(folder, struct.pack("<Q", 10_000) + b'{"__metadata__": {}}')


def header_not_json(folder):
    return raw_file(folder, struct.pack("<Q", 16) + b"\xff\xfe not json!!!!" + b"\0" * 64)


def tiny_file(folder):
    return raw_file(folder, b"\x01\x02\x03")


def other_program(folder):
    path = folder / "bad.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(path), metadata={"format": "pt"})
    return path


def future_version(folder):
    path = folder / "bad.safetensors"
    meta = {"format": "minidiff", "format_version": str(FORMAT_VERSION + 1), "config": json.dumps(tiny_config())}
    save_file({k: v.contiguous() for k, v in tiny_model().tensors().items()}, str(path), metadata=meta)
    return path


def config_not_json(folder):
    path = folder / "bad.safetensors"
    save_file({"unet.x": torch.zeros(1)}, str(path), metadata={"format": "minidiff", "format_version": "1",
                                                                "config": "{not json"})
    return path


def wrong_shape(folder):
    return rewrite(folder, lambda t, c: t.__setitem__("unet.conv_in.weight", torch.zeros(8, 3, 5, 5)))


def missing_tensor(folder):
    return rewrite(folder, lambda t, c: t.pop("unet.conv_in.bias"))


def extra_tensor(folder):
    return rewrite(folder, lambda t, c: t.__setitem__("unet.extra.weight", torch.zeros(2)))


def foreign_prefix(folder):
    return rewrite(folder, lambda t, c: t.__setitem__("vae.decoder.weight", torch.zeros(2)))


def half_precision_unet(folder):
    return rewrite(folder, lambda t, c: t.__setitem__("unet.conv_in.weight", t["unet.conv_in.weight"].half()))


def integer_weights(folder):
    return rewrite(folder, lambda t, c: t.__setitem__("conditioner.embedding.weight",
                                                      t["conditioner.embedding.weight"].long()))


def nan_weights(folder):
    return rewrite(folder, lambda t, c: t["unet.conv_in.weight"].view(-1).__setitem__(0, float("nan")))


def other_classes(folder):
    return rewrite(folder, lambda t, c: c["conditioner"]["config"].__setitem__("class_names", ["a", "b"]))


def unknown_conditioner(folder):
    return rewrite(folder, lambda t, c: c["conditioner"].__setitem__("name", "no-such-conditioner"))


def missing_unet_config(folder):
    return rewrite(folder, lambda t, c: c.pop("unet"))


CASES = [
    (random_bytes, "truncated or not a safetensors file"),
    (truncated, "truncated"),
    (header_larger_than_file, "header says 10000 bytes, file has 28"),
    (header_not_json, "header is not JSON"),
    (tiny_file, "not a safetensors file (only 3 bytes)"),
    (other_program, "not a minidiff model"),
    (future_version, f"format version {FORMAT_VERSION + 1}, newer than this minidiff"),
    (config_not_json, "config is missing or not JSON"),
    (wrong_shape, "unet.conv_in.weight has shape (8, 3, 5, 5), expected (8, 3, 3, 3)"),
    (missing_tensor, "missing unet.conv_in.bias"),
    (extra_tensor, "unexpected unet.extra.weight"),
    (foreign_prefix, "unexpected vae.decoder.weight"),
    (half_precision_unet, "unet.conv_in.weight is stored as F16, expected F32"),
    (integer_weights, "conditioner.embedding.weight is stored as I64, expected F32"),
    (nan_weights, "unet.conv_in.weight holds NaN"),
    (other_classes, "conditioner.embedding.weight has shape (4, 8), expected (3, 8)"),
    (unknown_conditioner, "unknown conditioner 'no-such-conditioner'; available: "),
    (missing_unet_config, "invalid config: missing key 'unet'"),
]


@pytest.mark.parametrize("make, message", CASES, ids=[make.__name__ for make, _ in CASES])
def test_broken_file_is_refused_with_one_line_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ModelFileError) as caught:
        DiffusionModel.load(path)
    text = str(caught.value)
    assert f"'{path}'" in text and message in text and "\n" not in text, text


@pytest.mark.parametrize("make, message", [CASES[0], CASES[6], CASES[8]],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_cli_refuses_a_broken_file_with_exit_code_2_and_no_traceback(tmp_path, make, message):
    path = make(tmp_path)
    assert_one_line_error(run_cli("info", str(path)), str(path), message)
    out = tmp_path / "out"
    result = run_cli("generate", "a red circle", "--model", str(path), "-o", str(out), "-q")
    assert_one_line_error(result, str(path), message)
    assert not out.exists() or not any(out.iterdir())


def test_missing_model_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "nothing-here.safetensors"
    with pytest.raises(ModelFileError, match="does not exist"):
        DiffusionModel.load(path)
    assert_one_line_error(run_cli("info", str(path)), str(path), "does not exist")
    assert_one_line_error(run_cli("generate", "a red circle", "--model", str(path), "-o", str(tmp_path / "o")),
                          str(path), "does not exist")
    with pytest.raises(ModelFileError, match="is not a file"):
        DiffusionModel.load(tmp_path)


def huge_clip_vocabulary(config):
    config["conditioner"]["config"]["text_cfg"]["vocab_size"] = 10**10


ABSURD = [
    ("class", lambda c: c["unet"].__setitem__("base_channels", 8_000_000), "more than the 500M allowed"),
    ("class", lambda c: c["conditioner"]["config"].__setitem__("dim", 10**10),
     "the U-Net's pooled_dim (8) does not match the 'class' conditioner's (10000000000)"),
    ("clip", huge_clip_vocabulary, "vocab_size must be a whole number from 49408 to 1,000,000, got 10000000000"),
    ("class", lambda c: c["schedule"].__setitem__("num_timesteps", 10**12), "1000000000000 timesteps is more than"),
    ("class", lambda c: c["unet"].__setitem__("image_size", 2**40), "image_size 1099511627776 is too large"),
]


@pytest.mark.parametrize("conditioner, change, message", ABSURD, ids=["channels", "class-dim", "clip-vocabulary",
                                                                     "timesteps", "image-size"])
def test_absurd_config_is_refused_at_once_without_allocating(tmp_path, conditioner, change, message):
    """Each of these would need 40 GB or more if it were built before being checked."""
    model = tiny_model(conditioner)
    config = json.loads(json.dumps({**tiny_config(conditioner), "unet": model.unet.config.to_dict()}))
    change(config)
    path = save_model_file(tmp_path / "absurd.safetensors", model.tensors(), config)
    start = time.perf_counter()
    with pytest.raises(ModelFileError) as caught:
        DiffusionModel.load(path)
    assert time.perf_counter() - start < 3
    assert message in str(caught.value) and f"'{path}'" in str(caught.value)
    with pytest.raises(ModelFileError, match="absurd.safetensors"):
        DiffusionModel.check_file(path)


def test_check_file_reads_only_the_header(tmp_path):
    path = good_file(tmp_path)
    assert DiffusionModel.check_file(path) == read_config(path)
    # Weights that are garbage are not looked at by the header check, but loading refuses them.
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8 + header_len:] = b"\xff" * (len(data) - 8 - header_len)  # every float becomes NaN
    path.write_bytes(bytes(data))
    assert DiffusionModel.check_file(path)["conditioner"]["name"] == "class"
    with pytest.raises(ModelFileError, match="NaN"):
        DiffusionModel.load(path)


def test_loaded_model_matches_the_predictions_of_a_saved_state(tmp_path):
    """Loading puts every weight in its place: a shuffled state would still have the right shapes."""
    model = tiny_model("class", seed=4)
    path = model.save(tmp_path / "m.safetensors")
    other = tiny_model("class", seed=5)
    prompts = ["red circle", "green triangle"]
    assert not torch.allclose(predictions(model, prompts), predictions(other, prompts))
    loaded = DiffusionModel.load(path)
    cond = Conditioning.cat(model.conditioner.encode(prompts))
    assert torch.equal(loaded.conditioner.encode(prompts).pooled, cond.pooled)
    assert os.path.getsize(path) > 4 * loaded.unet.num_parameters()


def test_a_float16_unet_file_is_half_the_bytes_and_loads_as_float32(tmp_path):
    from tinymodels import tiny_model

    from minidiff_cli.diffusion.model import DiffusionModel

    model = tiny_model("class")
    full = model.save(tmp_path / "full.safetensors")
    half = model.save(tmp_path / "half.safetensors", unet_dtype="float16")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = DiffusionModel.load(half)
    assert loaded.config["unet_storage"] == "float16" and loaded.unet.conv_in.weight.dtype == torch.float32
    for key, value in model.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value.half().float()), key
    bad = dict(loaded.config, unet_storage="int8")
    with pytest.raises(MinidiffError, match="unknown unet_storage"):
        DiffusionModel(loaded.unet, loaded.conditioner, loaded.schedule, bad).save(tmp_path / "bad.safetensors")


# -- hostile model files through `train --init-from` ---------------------------------------------------
@pytest.mark.hostile
@pytest.mark.parametrize("make, message", [c[1:] for c in HOSTILE_MODELS], ids=[c[0] for c in HOSTILE_MODELS])
def test_hostile_init_from_file_is_a_one_line_error_and_nothing_is_written(tmp_path, toml, make, message):
    path = make(tmp_path)
    out = tmp_path / "run"
    result = cli("train", *TINY_TRAIN, "--config", toml, "--out", out, "--init-from", path, "--max-steps", "1")
    assert_error(result, f"'{path}'", message)
    assert not out.exists()
    with pytest.raises(ModelFileError, match="bad.safetensors"):  # the Python API: the same check, its own type
        Pipeline.load(path, device="cpu")


@pytest.mark.hostile
def test_init_from_a_missing_file_a_folder_or_a_checkpoint(tmp_path, toml, trained_checkpoint_run):
    out = tmp_path / "run"
    for target, message in ((tmp_path / "nothing.safetensors", "does not exist"), (tmp_path, "is not a file"),
                            (trained_checkpoint_run / CHECKPOINT, "not a minidiff model")):
        result = cli("train", *TINY_TRAIN, "--config", toml, "--out", out, "--init-from", target, "--max-steps", "1")
        assert_error(result, f"'{target}'", message)
    assert not out.exists()


# -- small files that would cost gigabytes or minutes -------------------------------------------
def _unet(**changes):
    def change(config):
        config["unet"].update(changes)
    return change


def _text(**changes):
    def change(config):
        config["conditioner"]["config"]["text_cfg"].update(changes)
    return change


def _clip(**changes):
    def change(config):
        config["conditioner"]["config"].update(changes)
    return change


COSTLY = {
    # 6,000,000 residual blocks at 1 channel: few parameters, but 6 GB and minutes of modules
    "res blocks": ("class", _unet(num_res_blocks=6_000_000, base_channels=1, norm_groups=1, head_dim=1,
                                  channel_mult=[1], attention_resolutions=[], cross_attention_resolutions=[]),
                   "num_res_blocks 6000000 is more than the 32"),
    # self-attention over every pixel of 1024 x 1024: a 4 TB attention matrix for one image
    "attention activations": ("class", _unet(image_size=1024, base_channels=8, channel_mult=[1],
                                             attention_resolutions=[1024], head_dim=1, mid_attention=False),
                              "GiB of activations for one image"),
    "clip layers": ("clip", _text(layers=10**7), "layers must be a whole number from 1 to 64"),
    "clip context": ("clip", _text(context_length=40_000), "context_length must be a whole number from 4 to 1,024"),
    "clip width": ("clip", _text(width=10**6, heads=1), "width must be a whole number from 1 to 8,192"),
    "clip embed_dim": ("clip", _clip(embed_dim=10**9), "embed_dim must be a whole number"),
}


@pytest.mark.hostile
@pytest.mark.parametrize("case", list(COSTLY))
def test_a_small_file_that_would_cost_gigabytes_is_refused_at_once_by_info_and_generate(tmp_path, case):
    conditioner, change, message = COSTLY[case]
    config = json.loads(json.dumps(tiny_config(conditioner)))
    change(config)
    path = header_only_model(tmp_path / "costly.safetensors", config)
    assert path.stat().st_size < 2000
    assert_error(timed_cli("info", path), message, str(path))
    assert_error(timed_cli("generate", "x", "--model", path, "-o", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()

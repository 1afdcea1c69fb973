"""A folder of captioned pictures to a text-to-image model in one command, and its metrics (issue 14)."""

from __future__ import annotations

import json

import pytest
import torch
from captioned import TINY_CLIP_TABLE, captioned_folder
from conftest import assert_one_line_error, run_cli
from safetensors import safe_open
from tinymodels import TINY_TOML, TINY_TRAIN

from minidiff_cli.data.holdout import CaptionHoldout, split_captions
from minidiff_cli.data.sources import open_dataset
from minidiff_cli.data.vocabulary import vocabulary
from minidiff_cli.files.model_file import read_config
from minidiff_cli.training.clip import ClipRecipe, train_clip
from minidiff_cli.training.clip_stage import checkpoint_path

HOLDOUT = "25%"  # of the 12 captions: 'green square', 'red circle', 'yellow square' (by their hashes)
TINY_CLIP = dict(width=16, heads=2, layers=1, embed_dim=16, context_length=12, vision_width=8, batch_size=8,
                 device="cpu", threads=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return captioned_folder(tmp_path_factory.mktemp("captioned") / "data")


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    """`minidiff train --data DIR --conditioner clip` with no text encoder: both stages, tiny."""
    root = tmp_path_factory.mktemp("run")
    config = root / "tiny.toml"
    config.write_text("[train]\n" + TINY_TOML + TINY_CLIP_TABLE)
    out = root / "run"
    result = run_cli("train", *TINY_TRAIN, "--config", str(config), "--data", str(folder), "--conditioner", "clip",
                     "--clip-steps", "6", "--holdout", HOLDOUT, "--max-steps", "3", "--sample-every", "3",
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out, result


def test_the_holdout_of_captions_depends_on_the_captions_alone(folder):
    seen, held = split_captions(["red circle", "blue bar", "red circle"], 0.5)
    assert sorted(seen + held) == ["blue bar", "red circle"]
    dataset = open_dataset(str(folder), image_size=16, holdout=HOLDOUT)
    assert isinstance(dataset, CaptionHoldout)
    assert dataset.heldout_captions == ["green square", "red circle", "yellow square"]
    assert len(dataset) == 9 and {dataset[i]["caption"] for i in range(9)} == set(dataset.all_captions())
    assert not set(dataset.all_captions()) & set(dataset.heldout_captions)


def test_one_command_trains_the_text_encoder_then_the_diffusion_model(run):
    out, result = run
    assert result.stderr.index("stage 1/2 (text encoder): training a CLIP") < result.stderr.index("training on cpu")
    with safe_open(str(out / "clip.safetensors"), "pt") as f:
        meta = f.metadata()
        assert any(k.startswith("visual.") for k in f.keys())  # the image tower stays, for the metrics
    assert meta["format"] == "minidiff-clip"
    retrieval = json.loads(meta["eval"])
    assert retrieval["captions"] == 12 and retrieval["heldout_images"] == 3 and retrieval["seen_images"] == 9
    assert not checkpoint_path(out / "clip.safetensors").exists()  # removed once the file is complete
    config = read_config(out / "model.safetensors")
    assert config["conditioner"]["name"] == "clip" and config["unet"]["context_dim"] == 16
    assert config["training"]["flags"]["clip_weights"] == str(out / "clip.safetensors")
    seen, _ = split_captions([f"{c} {s}" for c in ("red", "blue", "green", "yellow")
                              for s in ("circle", "square", "bar")], 0.25)
    assert config["vocabulary"] == vocabulary(seen)
    assert set(config["card"]["examples"]) <= set(seen)


def test_the_sample_step_reports_the_folder_metrics(run):
    out, _ = run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [r["samples"] for r in records if "samples" in r][-1]
    assert 0 <= samples["r_precision"] <= 1 and samples["clip_score"] >= 0 and samples["fd_clip"] >= 0
    assert {"r_precision_seen", "r_precision_heldout", "precision", "recall"} <= set(samples)


def test_resuming_stage_two_goes_on_with_the_runs_own_text_encoder(run, folder, tmp_path):
    out, _ = run
    result = run_cli("train", "--out", str(out), "--resume", "--max-steps", "4", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "stage 1/2" not in result.stderr and "from step 3 to 4" in result.stderr
    assert read_config(out / "model.safetensors")["training"]["step"] == 4


def test_a_clip_stopped_and_resumed_ends_exactly_as_one_never_stopped(folder, tmp_path):
    recipe = ClipRecipe(data=str(folder), image_size=16, holdout=HOLDOUT, steps=6, **TINY_CLIP)
    whole, _ = train_clip(recipe)

    def stop_at_4(info):
        if info["step"] == 4:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "clip.checkpoint.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_clip(recipe, callback=stop_at_4, checkpoint=checkpoint)
    assert checkpoint.is_file()
    started = []
    resumed, summary = train_clip(recipe, checkpoint=checkpoint, on_start=started.append)
    assert started == [4] and summary["resumed_at"] == 4
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_text_stage_refuses_an_unfinished_checkpoint_without_resume(folder, tmp_path):
    recipe = ClipRecipe(data=str(folder), image_size=16, holdout=HOLDOUT, steps=4, **TINY_CLIP)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_clip(recipe, callback=lambda info: (_ for _ in ()).throw(KeyboardInterrupt),
                   checkpoint=checkpoint_path(out / "clip.safetensors"))
    config = tmp_path / "tiny.toml"
    config.write_text("[train]\n" + TINY_TOML + TINY_CLIP_TABLE)
    args = ["train", *TINY_TRAIN, "--config", str(config), "--data", str(folder), "--conditioner", "clip",
            "--clip-steps", "4", "--holdout", HOLDOUT, "--max-steps", "1", "--out", str(out), "--quiet"]
    assert_one_line_error(run_cli(*args), "holds an unfinished text-encoder stage; pass --resume")
    result = run_cli(*args, "--resume")
    assert result.returncode == 0, result.stderr
    assert "from step 1 to step 4" in result.stderr and (out / "model.safetensors").is_file()


def test_clip_train_on_a_folder_reports_caption_retrieval(folder, tmp_path):
    out = tmp_path / "clip.safetensors"
    result = run_cli("clip", "train", "--data", str(folder), "--image-size", "16", "--holdout", HOLDOUT,
                     "--steps", "4", "--width", "16", "--heads", "2", "--layers", "1", "--embed-dim", "16",
                     "--context-length", "12", "--vision-width", "8", "--batch-size", "8", "--device", "cpu",
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "caption retrieval among 12 captions (chance 8.3%)" in result.stdout
    assert "(9 images); held-out top-1" in result.stdout and "(3 images)" in result.stdout


def test_eval_on_a_folder_reports_every_metric_beside_the_real_images(run, folder):
    out, _ = run
    result = run_cli("eval", "--model", str(out / "model.safetensors"), "--data", str(folder), "--captions", "8",
                     "--runs", "ddim:2", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["captions"] == 8 and report["images"] == 8 and report["reference_images"] == 12
    assert report["clip_file"] == str(out / "clip.safetensors")  # found next to the model file
    for side in ("generated", "real"):
        figures = report[side]
        assert 0 <= figures["r_precision"] <= 1 and 0 <= figures["precision"] <= 1 and figures["fd_clip"] >= 0
    assert report["real"]["precision"] == 1.0  # the real images lie in their own manifold
    grid = out.parent / "grid.png"
    text = run_cli("eval", "--model", str(out / "model.safetensors"), "--data", str(folder), "--captions", "8",
                   "--runs", "ddim:2", "--quiet", "--grid", str(grid))
    assert "8 images for 8 captions" in text.stdout and "R-precision" in text.stdout
    from PIL import Image

    from minidiff_cli.evaluation.captioned_grid import CELL

    with Image.open(grid) as sheet:  # one row of 8 cells, each an enlarged image above its caption
        assert sheet.width > 8 * CELL and CELL < sheet.height < 2 * CELL


def test_eval_on_a_folder_without_its_clip_says_how_to_get_one(folder, tmp_path):
    from tinymodels import tiny_model_file

    model = tiny_model_file(tmp_path / "m.safetensors", conditioner="clip")
    assert_one_line_error(run_cli("eval", "--model", str(model), "--data", str(folder)),
                          "--data needs the CLIP trained on that folder: pass --clip FILE")


def test_a_run_stopped_in_stage_one_resumes_from_its_folder_alone(folder, tmp_path):
    from minidiff_cli.training.clip_stage import run_clip_stage
    from minidiff_cli.training.config import TrainConfig

    out = tmp_path / "run"
    cfg = TrainConfig(data=str(folder), image_size=16, holdout=HOLDOUT, conditioner="clip", clip_steps=6,
                      clip={k: v for k, v in TINY_CLIP.items() if k not in ("device", "threads")},
                      base_channels=8, channel_mult=[1, 2], head_dim=8, class_dim=16, batch_size=4, max_steps=2,
                      out=str(out), threads=1).validate()

    def stop_at_3(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_clip_stage(cfg, resume=False, callback=stop_at_3, log=lambda msg: None)
    assert (out / "train_config.json").is_file() and checkpoint_path(out / "clip.safetensors").is_file()
    result = run_cli("train", "--out", str(out), "--resume", "--clip-steps", "5", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "from step 3 to step 5" in result.stderr and (out / "model.safetensors").is_file()
    assert json.loads(safe_open(str(out / "clip.safetensors"), "pt").metadata()["training"])["steps"] == 5


def test_the_fixed_evaluation_captions_hold_seen_and_held_out_ones_in_proportion():
    from minidiff_cli.data.holdout import is_heldout
    from minidiff_cli.evaluation.caption_eval import fixed_captions

    captions = [f"caption number {k}" for k in range(4000)]
    chosen = fixed_captions(captions, 200)
    assert len(chosen) == 200 and fixed_captions(list(reversed(captions)), 200) == chosen
    held = sum(is_heldout(c, 0.05) for c in chosen)
    assert 2 <= held <= 22  # about 5% of 200, not all of them first


def test_one_subfolder_beside_metadata_is_a_layout_not_a_class(folder):
    dataset = open_dataset(str(folder), image_size=16)  # images/*.png with metadata.jsonl
    assert dataset.class_names == [] and {dataset[i]["label"] for i in range(len(dataset))} == {-1}
    from minidiff_cli.evaluation.shapes_judge import default_prompts

    prompts = default_prompts(open_dataset(str(folder), image_size=16, holdout=HOLDOUT), HOLDOUT)
    assert prompts[-2:] == ["green square", "red circle"] and len(prompts) == 8  # captions, held-out last

"""Hostile input, round 2 (issue 18): every refusal is one line, within seconds and bounded memory.

Every hostile file is made here and goes through the real CLI (``main([...])`` in this process, or a
real process where exit codes, signals or stdout matter). Round 1 is test_hardening.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from conftest import run_in_process
from test_hardening import assert_error, plugin_dir  # noqa: F401 (assert_error: exit 2, one line; a fixture)
from tinymodels import CLASS_NAMES, TINY_CLIP, TINY_TRAIN, tiny_config, tiny_model


def timed_cli(*args, limit: float = 5.0) -> tuple[int, str, str]:
    start = time.perf_counter()
    result = run_in_process(*args)
    assert time.perf_counter() - start < limit, ("too slow to refuse", args)
    return result


def header_only_model(path: Path, config: dict) -> Path:
    """A model file of a few hundred bytes: a config and no tensors (it claims whatever it likes)."""
    save_file({}, str(path), metadata={"format": "minidiff", "format_version": "1", "config": json.dumps(config)})
    return path


# -- 1. small files that would cost gigabytes or minutes -------------------------------------------
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


def test_activations_are_bounded_at_the_batch_chosen(tmp_path):
    """A model fine for one image (0.5 GiB of attention) is refused for a batch that needs over 64 GiB."""
    from minidiff_cli.diffusion.model import DiffusionModel

    config = json.loads(json.dumps(tiny_config("class")))
    config["unet"].update(image_size=64, base_channels=8, channel_mult=[1], attention_resolutions=[64], head_dim=1,
                          mid_attention=False)
    path = tmp_path / "wide-attention.safetensors"
    DiffusionModel.build(config).save(path)
    assert_error(timed_cli("generate", CLASS_NAMES[0], "--model", path, "-n", "200", "--batch-size", "200", "--quiet",
                           "-o", tmp_path / "out"), "GiB of activations for 200 images")
    assert not (tmp_path / "out").exists()


# -- 2. CLIP files and configs are checked by an allow-list -----------------------------------------
HOSTILE_TEXT_CFG = {
    "heads do not divide width": ({"width": 16, "heads": 3}, "width 16 must be a multiple of heads 3"),
    "device in act_kwargs": ({"act_kwargs": {"device": "meta"}}, "act_kwargs may not set 'device'"),
    "bogus norm kwarg": ({"norm_kwargs": {"elementwise_affine": "yes"}}, "norm_kwargs may not set"),
    "norm eps a string": ({"norm_kwargs": {"eps": "1e-5"}}, "eps must be a number"),
    "bogus gelu": ({"act_kwargs": {"approximate": "cubic"}}, "approximate must be one of none, tanh"),
    "bpe_path": ({"tokenizer_kwargs": {"bpe_path": "/etc/passwd"}}, "tokenizer_kwargs may not set 'bpe_path'"),
    "special tokens": ({"tokenizer_kwargs": {"additional_special_tokens": ["(("]}}, "may not set"),
    "clean mode": ({"tokenizer_kwargs": {"clean": "(["}}, "clean must be one of lower, whitespace, canonicalize"),
    "unknown tokenizer key": ({"tokenizer_kwargs": {"context_length": 10**9}}, "tokenizer_kwargs may not set"),
    "pool type": ({"pool_type": "median"}, "pool_type must be one of"),
    "proj type": ({"proj_type": "mlp"}, "proj_type must be one of linear, none"),
    "huge eos id": ({"eos_id": 2**70}, "eos_id must be a whole number from 0 to 49,407"),
    "negative pad id": ({"pad_id": -1}, "pad_id must be a whole number"),
    "fractional heads": ({"heads": 2.5}, "heads must be a whole number"),
    "boolean layers": ({"layers": True}, "layers must be a whole number"),
    "nan mlp ratio": ({"mlp_ratio": float("nan")}, "mlp_ratio must be a number"),
    "unknown key": ({"output_dim": 3}, "unknown key 'output_dim'"),
    "flag not a bool": ({"no_causal_mask": "no"}, "no_causal_mask must be true or false"),
}


def _tiny_clip_config(change: dict) -> dict:
    return {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], **change}}


def clip_text_file(path: Path, config: dict) -> Path:
    """A minidiff-clip text-encoder file with ``config`` and the tensors of the tiny one."""
    from minidiff_cli import plugins

    encoder = plugins.get_conditioner("clip").from_config(TINY_CLIP)
    tensors = {k: v.contiguous() for k, v in encoder.state_dict().items()}
    metadata = {"format": "minidiff-clip", "format_version": "1", "config": json.dumps(config)}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case", list(HOSTILE_TEXT_CFG))
def test_a_hostile_clip_config_is_one_line_in_a_model_file_and_a_clip_file(tmp_path, case):
    change, message = HOSTILE_TEXT_CFG[case]
    config = json.loads(json.dumps(tiny_config("clip"), allow_nan=True))
    config["conditioner"]["config"] = _tiny_clip_config(change)
    model = header_only_model(tmp_path / "model.safetensors", config)
    assert_error(timed_cli("info", model), message, str(model))
    clip_file = clip_text_file(tmp_path / "clip.safetensors", _tiny_clip_config(change))
    out = tmp_path / "run"
    assert_error(timed_cli("train", "--data", "shapes", "--conditioner", "clip", "--clip-weights", clip_file,
                           *TINY_TRAIN, "--max-steps", "1", "--out", out), message, str(clip_file))
    assert not out.exists()


def test_a_clip_file_cannot_make_minidiff_open_a_path(tmp_path):
    """A FIFO would hang any reader; the allow-list refuses bpe_path before anything is opened."""
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    config = _tiny_clip_config({"tokenizer_kwargs": {"bpe_path": str(fifo)}})
    clip_file = clip_text_file(tmp_path / "clip.safetensors", config)
    model = tiny_model("clip")
    model.conditioner._config = config  # a model file whose clip conditioner names the FIFO
    model_file = tmp_path / "model.safetensors"
    model.save(model_file)
    assert_error(timed_cli("generate", "a red circle", "--model", model_file, "-o", tmp_path / "o"), "bpe_path")
    assert_error(timed_cli("train", "--data", "shapes", "--conditioner", "clip", "--clip-weights", clip_file,
                           *TINY_TRAIN, "--max-steps", "1", "--out", tmp_path / "run"), "bpe_path")


def full_clip_file(path: Path, vision_cfg: dict, text_change: dict | None = None) -> Path:
    """A `clip train` file with an image tower, made by clip_train's own code at the tiniest size."""
    import torch

    from minidiff_cli.training.clip import ClipRecipe
    from minidiff_cli.clip.clip_file import build_clip, save_clip

    recipe = ClipRecipe(width=16, heads=2, layers=1, context_length=12, embed_dim=16, vision_width=8)
    config = recipe.model_config()
    torch.manual_seed(0)
    model = build_clip(config)
    save_clip(path, model, config, {}, {})
    # Then its config is replaced by the hostile one (the tensors stay those of the honest config).
    from safetensors.torch import load_file

    from minidiff_cli.clip.weights import read_safetensors

    metadata, _ = read_safetensors(path)
    config = {**config, "vision_cfg": {**config["vision_cfg"], **vision_cfg},
              "text_cfg": {**config["text_cfg"], **(text_change or {})}}
    save_file(load_file(str(path)), str(path), metadata={**metadata, "config": json.dumps(config)})
    return path


HOSTILE_VISION_CFG = {
    "huge image": ({"image_size": 10**6}, "image_size must be a whole number from 1 to 512"),
    "deep resnet": ({"layers": [10**7, 1, 1, 1]}, "layers must be a whole number from 1 to 64"),
    "three stages": ({"layers": [1, 1, 1]}, "must list 4 stages"),
    "unknown key": ({"timm_model_name": "x"}, "unknown key 'timm_model_name'"),
    "heads do not split": ({"head_width": 3}, "does not split"),
    "image not a multiple of the stride": ({"image_size": 40}, "must be a multiple of 32"),
}


@pytest.mark.parametrize("case", list(HOSTILE_VISION_CFG))
def test_clip_eval_checks_a_files_whole_config_before_building_it(tmp_path, case):
    change, message = HOSTILE_VISION_CFG[case]
    path = full_clip_file(tmp_path / "clip.safetensors", change)
    assert_error(timed_cli("clip", "eval", path), message, str(path))


def test_clip_eval_refuses_a_hostile_text_config_and_a_config_that_does_not_fit(tmp_path):
    path = full_clip_file(tmp_path / "a.safetensors", {}, {"layers": 10**7})
    assert_error(timed_cli("clip", "eval", path), "layers must be", str(path))
    path = full_clip_file(tmp_path / "b.safetensors", {}, {"layers": 3})
    assert_error(timed_cli("clip", "eval", path), "does not match its config", str(path))


def test_the_projects_own_clip_configs_still_load():
    from minidiff_cli.clip.config import check_clip_config, check_clip_model_config
    from minidiff_cli.clip.weights import read_clip_config, read_safetensors
    from minidiff_cli.training.clip import ClipRecipe

    shipped = Path(__file__).resolve().parents[1] / "minidiff_cli" / "models" / "shapes-clip.safetensors"
    metadata, _ = read_safetensors(shipped)
    check_clip_config(read_clip_config(metadata, shipped))
    check_clip_config(TINY_CLIP)
    emoji = ClipRecipe(context_length=24, width=64, layers=4, heads=4)  # the emoji recipe's text tower
    check_clip_model_config(emoji.model_config())
    check_clip_model_config(ClipRecipe(vision="vit").model_config())


# -- 3. run folders --------------------------------------------------------------------------------
def train_args(toml: Path, out: Path, *more: str) -> list:
    return ["train", "--data", "shapes", "--conditioner", "class", *TINY_TRAIN, "--config", toml,
            "--sample-every", "1000", "--out", out, *more]


@pytest.mark.parametrize("foreign", ["loss.png", "samples/step-0000002.png", "metrics.jsonl", "notes.txt"])
def test_a_new_run_refuses_a_folder_holding_files_it_did_not_write(tmp_path, toml, foreign):
    out = tmp_path / "run"
    (out / foreign).parent.mkdir(parents=True)
    (out / foreign).write_text("someone else's\n")
    before = snapshot(out)
    first = foreign.split("/")[0]
    assert_error(timed_cli(*train_args(toml, out, "--max-steps", "2")), f"'{out}' is not empty ('{first}')",
                 "choose a new or empty --out")
    assert snapshot(out) == before


def test_a_folder_holding_only_this_runs_first_stage_is_this_runs(tmp_path, toml):
    from minidiff_cli.training.run_folder import check_contents

    out = tmp_path / "run"
    out.mkdir()
    (out / "clip.safetensors").write_bytes(b"")
    (out / "clip.checkpoint.safetensors").write_bytes(b"")
    check_contents(out, resume=False)  # no error


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _locked_by_someone(path: Path) -> bool:
    import fcntl
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_second_train_into_a_live_run_is_refused_and_a_crashed_runs_lock_is_stale(tmp_path, toml):
    """A real run holds the folder; a second is refused in one line; after SIGKILL the lock is gone."""
    import signal
    import subprocess

    from conftest import cli_command

    out = tmp_path / "run"
    args = [str(a) for a in train_args(toml, out, "--max-steps", "100000", "--save-every", "2", "--log-every", "1")]
    first = subprocess.Popen([*cli_command(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "checkpoint.safetensors").exists() and _locked_by_someone(out)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not get going"
            time.sleep(0.2)
        metrics = (out / "metrics.jsonl").read_bytes()
        line = assert_error(timed_cli(*train_args(toml, out, "--max-steps", "100000", "--resume")),
                            f"another minidiff train is writing into '{out}' (process {first.pid})")
        assert "wait for it to end" in line
        assert (out / "metrics.jsonl").read_bytes().startswith(metrics)  # only the first run's steps
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    from minidiff_cli.training.checkpoint import read_checkpoint_meta

    step = read_checkpoint_meta(out / "checkpoint.safetensors")["step"]
    rc, _, err = run_in_process("train", "--out", out, "--resume", "--max-steps", step + 1, "--quiet")
    assert rc == 0, err


def test_resume_removes_only_this_runs_stale_temporaries(tmp_path, toml, trained_run):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    stale = [out / ".checkpoint.safetensors.k2j4h5g6.tmp", out / ".metrics.jsonl.abcd_123.tmp",
             out / "samples" / ".step-0000004.png.zzzzzzzz.tmp"]
    kept = [out / ".notes.txt.abcdefgh.tmp", out / "samples" / ".holiday.png.abcdefgh.tmp"]
    for path in stale + kept:
        path.write_bytes(b"half a file")
    rc, _, err = run_in_process("train", "--out", out, "--resume", "--max-steps", "7", "--quiet")
    assert rc == 0, err
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


SQUATTER = '''
import os
from pathlib import Path

import minidiff_cli
from minidiff_cli import plugins


class Squatter:
    """DDIM, but while it samples another process takes the name this run picked."""
    name = "squatter"
    default_steps = 2

    def sample(self, denoiser, x, schedule, steps, **kwargs):
        target = Path(os.environ["SQUAT"])
        if not target.exists():
            target.write_bytes(b"another run's image")
        return plugins.get_sampler("ddim").sample(denoiser, x, schedule, steps, **kwargs)


@minidiff_cli.hookimpl
def register_samplers(register):
    register(Squatter())
'''


def test_generate_claims_its_names_when_saving(tmp_path, monkeypatch, plugin_dir):
    (plugin_dir / "squat.py").write_text(SQUATTER)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("SQUAT", str(out / "minidiff-00000.png"))
    model = tmp_path / "tiny.safetensors"
    tiny_model("class").save(model)
    rc, stdout, err = run_in_process("generate", CLASS_NAMES[0], "--model", model, "--sampler", "squatter", "-n", "2",
                                     "-o", out, "--quiet")
    assert rc == 0, err
    assert (out / "minidiff-00000.png").read_bytes() == b"another run's image"  # not replaced
    assert sorted(p.name for p in out.iterdir()) == ["minidiff-00000.png", "minidiff-00001.png", "minidiff-00002.png"]


# -- 4. disk full ----------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs), so that writes fail with a real ENOSPC; skipped where mount is not allowed."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); a real full disk is what is tested")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill the filesystem of ``folder`` until ``leave`` bytes or fewer are free."""
    import os

    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))


def test_train_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_disk, toml):
    out = small_disk / "run"
    rc, _, err = run_in_process(*train_args(toml, out, "--max-steps", "2", "--quiet"))
    assert rc == 0, err
    fill(small_disk, leave=100_000)  # the checkpoint is about 850 kB
    before = snapshot(out)
    rc, _, err = timed_cli("train", "--out", out, "--resume", "--max-steps", "4", "--quiet", limit=60)
    lines = err.strip().splitlines()  # train's start line ("training on cpu ..."), then the error
    assert rc == 2 and "Traceback" not in err and len(lines) == 2, err
    assert lines[1].startswith("Error: could not write") and "No space left on device" in lines[1]
    after = snapshot(out)
    assert after["checkpoint.safetensors"] == before["checkpoint.safetensors"]
    assert not [name for name in after if name.endswith(".tmp")]
    assert all(line.endswith("}") for line in (out / "metrics.jsonl").read_text().splitlines())


def test_clip_train_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    fill(small_disk, leave=50_000)  # the tiny CLIP file is about 1.7 MB
    target = small_disk / "clip.safetensors"
    assert_error(timed_cli("clip", "train", "--out", target, "--steps", "2", "--width", "16", "--heads", "2",
                           "--layers", "1", "--embed-dim", "16", "--context-length", "12", "--vision-width", "8",
                           "--batch-size", "16", "--threads", "1", "--device", "cpu", "--quiet", limit=60),
                 "No space left on device")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# -- 5. plugins are contained ----------------------------------------------------------------------
PLUGINS = {
    "exits": "import sys\nsys.exit(0)\n",
    "interrupts": ("import minidiff_cli\n\n@minidiff_cli.hookimpl\ndef register_schedules(register):\n"
                   "    raise KeyboardInterrupt\n"),
    "chatty": "print('hello from a plugin')\n",
    "base": "class Odd(BaseException):\n    pass\n\nraise Odd('odd')\n",
}


def test_base_exceptions_and_prints_from_plugins_leave_every_command_working(plugin_dir):
    for name, code in PLUGINS.items():
        (plugin_dir / f"{name}.py").write_text(code)
    rc, out, err = run_in_process("schedules", "list", "--json")
    assert rc == 0, err
    assert "linear" in [s["name"] for s in json.loads(out)]  # stdout is the JSON alone
    assert "hello from a plugin" in err
    assert "plugin 'exits' failed to load: raised SystemExit 0" in err
    assert "plugin 'interrupts' failed in register_schedules: raised KeyboardInterrupt" in err
    assert "plugin 'base' failed to load: raised Odd odd" in err


def test_a_real_ctrl_c_while_a_plugin_loads_still_stops_minidiff(tmp_path):
    import signal
    import subprocess

    from conftest import cli_command

    (tmp_path / "slow.py").write_text("import time\ntime.sleep(30)\n")
    proc = subprocess.Popen([*cli_command(), "--plugins-dir", str(tmp_path), "schedules", "list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # into the plugin's sleep (the CLI starts in about a second)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_a_slow_plugin_is_named_while_it_loads(plugin_dir, monkeypatch):
    from minidiff_cli.plugins import guard as plugin_guard

    monkeypatch.setattr(plugin_guard, "SLOW_SECONDS", 0.3)
    (plugin_dir / "sleepy.py").write_text("import time\ntime.sleep(1.0)\n")
    rc, _, err = run_in_process("schedules", "list")
    assert rc == 0, err
    assert "loading plugin 'sleepy' is taking more than" in err


COMMANDS = '''
import minidiff_cli
import typer


@minidiff_cli.hookimpl
def register_commands(cli):
    @cli.command("generate")
    def fake_generate():
        print("hijacked")

    @cli.command("info")
    def fake_info():
        print("hijacked")

    @cli.command("hello-there")
    def hello():
        print("hello")
'''


def test_a_plugin_cannot_replace_a_built_in_command(plugin_dir):
    (plugin_dir / "hijack.py").write_text(COMMANDS)
    rc, out, err = run_in_process("info")
    assert rc == 0 and "hijacked" not in out, (out, err)
    assert "command name 'generate' clashes: registered by both minidiff itself and plugin 'hijack'" in err
    assert "command name 'info' clashes" in err
    from minidiff_cli import plugins

    plugins.reset()
    rc, out, _ = run_in_process("hello-there")
    assert rc == 0 and out.strip() == "hello"  # its other command still works


USE_TIME = '''
import minidiff_cli
from minidiff_cli import plugins


class Half:
    name = "half"
    default_steps = 2

    def sample(self, denoiser, x, schedule, steps, **kwargs):
        return plugins.get_sampler("ddim").sample(denoiser, x, schedule, steps, **kwargs).half()


def broken_dataset(source, **kwargs):
    raise ValueError("cannot open the data")


class BrokenConditioner:
    name = "brokenc"
    context_dim = pooled_dim = None

    @classmethod
    def from_options(cls, **options):
        return {}["missing"]


class Quitter:
    name = "quitter"
    default_steps = 2

    def sample(self, denoiser, x, schedule, steps, **kwargs):
        raise SystemExit(0)


@minidiff_cli.hookimpl
def register_samplers(register):
    register(Half())
    register(Quitter())


@minidiff_cli.hookimpl
def register_datasets(register):
    register("broken", broken_dataset)


@minidiff_cli.hookimpl
def register_conditioners(register):
    register("brokenc", BrokenConditioner)
'''


def test_plugins_failing_at_use_are_one_line_errors_naming_them(plugin_dir, tmp_path, toml):
    (plugin_dir / "usetime.py").write_text(USE_TIME)
    model = tmp_path / "tiny.safetensors"
    tiny_model("class").save(model)
    generate = ["generate", CLASS_NAMES[0], "--model", model, "--quiet", "-o", tmp_path / "out", "--sampler"]
    assert_error(timed_cli(*generate, "half"), "sampler 'half' (plugin 'usetime') returned a torch.float16 tensor",
                 "expected torch.float32")
    assert_error(timed_cli(*generate, "quitter"), "plugin 'usetime' failed: SystemExit")
    run = ["train", *TINY_TRAIN, "--config", toml, "--max-steps", "1", "--out", tmp_path / "run"]
    assert_error(timed_cli(*run, "--data", "broken", "--conditioner", "class"),
                 "plugin 'usetime' failed: ValueError: cannot open the data")
    assert_error(timed_cli(*run, "--data", "shapes", "--conditioner", "brokenc"), "plugin 'usetime' failed: KeyError")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


# -- 6. tracebacks left ----------------------------------------------------------------------------
def rewrite_checkpoint_config(path: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as fh:
        metadata = dict(fh.metadata())
    config = json.loads(metadata["config"])
    change(config)
    save_file(load_file(str(path)), str(path), metadata={**metadata, "config": json.dumps(config)})


def copied_run(trained_run: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    return out


def test_a_checkpoint_step_beyond_any_run_is_one_line(tmp_path, trained_run):
    out = copied_run(trained_run, tmp_path)
    rewrite_checkpoint_config(out / "checkpoint.safetensors", lambda c: c.__setitem__("step", 2**62))
    assert_error(timed_cli("train", "--out", out, "--resume", "--max-steps", "10"), "its step is 4611686018427387904")
    assert_error(timed_cli("train", "--out", out, "--resume", "--max-steps", 2**62 + 2),
                 "--max-steps 4611686018427387906 is more than minidiff allows (1,000,000,000)")


@pytest.mark.parametrize("target", ["hostile", "fifo", "folder"])
def test_init_from_in_a_checkpoint_pointing_at_a_hostile_file_is_one_line(tmp_path, trained_run, target):
    import os

    out = copied_run(trained_run, tmp_path)
    path = tmp_path / target
    if target == "hostile":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    elif target == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    rewrite_checkpoint_config(out / "checkpoint.safetensors", lambda c: c["train"].__setitem__("init_from", str(path)))
    assert_error(timed_cli("train", "--out", out, "--resume", "--max-steps", "10"), str(path))


def captioned_folder(tmp_path: Path, metadata: bytes) -> Path:
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (16, 16), "red").save(folder / "a.png")
    (folder / "metadata.jsonl").write_bytes(metadata)
    return folder


@pytest.mark.parametrize("metadata, message", [
    (b'{"file_name": "a.png", "text": "caf\xe9"}\n', "is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1 is nested too deeply"),
])
def test_a_hostile_metadata_jsonl_is_one_line(tmp_path, toml, metadata, message):
    data = captioned_folder(tmp_path, metadata)
    assert_error(timed_cli("train", "--data", data, "--conditioner", "class", *TINY_TRAIN, "--config", toml,
                           "--max-steps", "1", "--out", tmp_path / "run"), "metadata.jsonl", message)


def test_a_deeply_nested_toml_is_one_line(tmp_path):
    config = tmp_path / "deep.toml"
    config.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert_error(timed_cli("train", "--config", config, "--out", tmp_path / "run"), "nested too deeply", str(config))


@pytest.fixture(scope="module")
def shipped_png(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("png")
    rc, stdout, err = run_in_process("generate", "a red circle", "--steps", "2", "-o", out / "a.png", "--quiet")
    assert rc == 0, err
    return out / "a.png"


def png_with(source: Path, path: Path, **changes) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from minidiff_cli.files.png_parameters import JSON_KEY, TEXT_KEY, read_parameters

    params = {**read_parameters(source), **changes}
    info = PngInfo()  # ASCII JSON: a lone surrogate travels as the escape \ud800, as a stranger's file may hold it
    info.add_text(TEXT_KEY, "a stranger's text")
    info.add_text(JSON_KEY, json.dumps(params))
    with Image.open(source) as image:
        image.save(path, format="PNG", pnginfo=info)
    return path


def test_info_shows_a_pngs_escapes_nul_and_lone_surrogates_escaped(tmp_path, shipped_png):
    png = png_with(shipped_png, tmp_path / "evil.png", prompt="a red circle\x1b[2J\x00\u202e\ud800")
    for args in ([], ["--json"]):
        rc, out, err = run_in_process("info", png, *args)
        assert rc == 0, err
        assert "\x1b" not in out and "\x00" not in out and "\u202e" not in out and "\ud800" not in out
    assert json.loads(out)["prompt"] == "a red circle\x1b[2J\x00\u202e\ud800"  # the JSON still says exactly it
    _, text, _ = run_in_process("info", png)
    assert "\\x1b[2J\\x00\\u202e\\ud800" in text


def test_errors_show_a_files_escapes_escaped_and_drop_torchs_cpp_stack(tmp_path, plugin_dir):
    (plugin_dir / "deep.py").write_text(
        "import minidiff_cli\nfrom minidiff_cli.errors import MinidiffError\n\n"
        "def data(source, **kwargs):\n"
        "    raise MinidiffError('bad \\x1b[31mred\\x00 data\\nException raised from foo at bar.cpp:12 '\n"
        "                        '(most recent call first):\\nframe #0: ' + 'c10::Error ' * 200)\n\n"
        "@minidiff_cli.hookimpl\ndef register_datasets(register):\n    register('deep', data)\n")
    line = assert_error(timed_cli("train", "--data", "deep", "--out", tmp_path / "run"), "bad \\x1b[31mred\\x00 data")
    assert "frame #0" not in line and "Exception raised from" not in line and len(line) < 200


def test_a_model_name_from_a_png_never_resolves_to_a_file_in_the_working_directory(tmp_path, shipped_png,
                                                                                   monkeypatch):
    from minidiff_cli.files.png_parameters import read_parameters

    name = read_parameters(shipped_png)["model"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(b"not the model you asked for")
    rc, out, err = run_in_process("generate", "--from", shipped_png, "--steps", "2", "-o", tmp_path / "out", "--quiet")
    assert rc == 0, err

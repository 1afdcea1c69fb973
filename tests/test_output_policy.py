"""One policy for output files: never replaced without --overwrite, the umask's permissions,
and no empty folder left behind by a generate run that wrote nothing."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest
from conftest import assert_error, assert_one_line_error, cli_command, files_in, run_cli
from conftest import run_in_process as cli
from tinymodels import tiny_model_file

from minidiff_cli.files.png_parameters import read_parameters


def usual_mode() -> int:
    """What the umask gives a new file (0644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


CLIP_FLAGS = ["--steps", "2", "--batch-size", "4", "--width", "16", "--heads", "2", "--layers", "1",
              "--embed-dim", "16", "--context-length", "8", "--device", "cpu", "-q"]


def test_generate_replaces_a_file_only_with_overwrite(tmp_path):
    model = tiny_model_file(tmp_path / "m.safetensors", "class")
    target = tmp_path / "pic.png"
    base = ["generate", "red circle", "--model", str(model), "--steps", "2", "-q", "-o", str(target)]
    assert run_cli(*base, "--seed", "1").returncode == 0
    assert_one_line_error(run_cli(*base, "--seed", "2"), "already exists", "--overwrite")
    assert read_parameters(target)["seed"] == 1  # untouched by the refused run
    result = run_cli(*base, "--seed", "2", "--overwrite", "--save-trajectory")
    assert result.returncode == 0, result.stderr
    assert read_parameters(target)["seed"] == 2
    again = run_cli(*base, "--seed", "3", "--overwrite", "--save-trajectory")  # trajectory files replaced too
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "pic-trajectory.gif").is_file()


def test_clip_train_replaces_its_file_only_with_overwrite(tmp_path):
    out = tmp_path / "clip.safetensors"
    out.write_bytes(b"not a model")
    assert_one_line_error(run_cli("clip", "train", "--out", str(out), *CLIP_FLAGS), "already exists", "--overwrite")
    assert out.read_bytes() == b"not a model"
    result = run_cli("clip", "train", "--out", str(out), *CLIP_FLAGS, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] != b"not a mo" and out.stat().st_size > 100_000
    assert stat.S_IMODE(out.stat().st_mode) == usual_mode()  # the umask rule, like every other output


def test_model_checkpoint_and_images_share_the_umask_permissions(trained_run, tmp_path):
    for name in ("model.safetensors", "checkpoint.safetensors", "loss.png", "metrics.jsonl", "train_config.json"):
        assert stat.S_IMODE((trained_run / name).stat().st_mode) == usual_mode(), name
    result = run_cli("generate", "red circle", "--model", str(trained_run / "model.safetensors"), "--steps", "1",
                     "-q", "-o", str(tmp_path / "out"))
    assert result.returncode == 0
    assert stat.S_IMODE((tmp_path / "out" / "minidiff-00000.png").stat().st_mode) == usual_mode()
    from minidiff_cli.files.atomic import atomic_write

    old = os.umask(0o077)
    try:
        path = atomic_write(tmp_path / "private.txt", lambda p: p.write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # a stricter umask is honoured, not widened


def test_a_failed_generate_leaves_no_folder_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new" / "deeper"
    result = run_cli("generate", "a red circle", "--sampler", "no-such-sampler", "--steps", "2", "-q",
                     "-o", str(target))
    assert_one_line_error(result, "no-such-sampler")
    assert not (tmp_path / "kept" / "new").exists() and (tmp_path / "kept").is_dir()  # only what it made


def test_ctrl_c_during_generate_leaves_no_empty_folder(tmp_path):
    model = tiny_model_file(tmp_path / "m.safetensors", "class")
    plugs, marker, target = tmp_path / "plugs", tmp_path / "sampling", tmp_path / "out"
    plugs.mkdir()
    (plugs / "slow.py").write_text(SLOW_SAMPLER)  # writes the marker once it samples: a signal, not a clock
    env = {**os.environ, "MINIDIFF_PLUGINS_DIR": str(plugs), "MINIDIFF_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([*cli_command(), "generate", "red circle", "--model", str(model), "--sampler", "slow",
                             "-q", "-o", str(target)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300  # a bound for a hung process only; the wait ends on the marker
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=30)
        assert target.is_dir()  # made before sampling, and now empty
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 130, err
    assert "Interrupted" in err and "Traceback" not in err
    assert not target.exists()


def test_steps_beyond_the_models_schedule_are_refused_before_any_folder_is_made(tmp_path):
    model = tiny_model_file(tmp_path / "m.safetensors", "class")  # T = 50
    assert_error(cli("generate", "red circle", "--model", model, "--steps", "20000", "-q", "-o", tmp_path / "a" / "b"),
                 "steps must be between 1 and 50 for this model (got 20000)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_clip_train_progress_ends_on_the_summary_loss(tmp_path):
    import re
    # stderr is no terminal here, so the progress comes as lines ("clip: step 3 loss 1.2345"), not a bar

    result = run_cli("clip", "train", "--out", str(tmp_path / "c.safetensors"),
                     *[f for f in CLIP_FLAGS if f != "-q"], "--steps", "3")
    assert result.returncode == 0, result.stderr
    bar = re.findall(r"step 3 loss (\d+\.\d{4})", result.stderr)
    summary = re.search(r"loss (\d+\.\d{4}) at step 1 -> (\d+\.\d{4}) \(mean of the last 50 steps", result.stdout)
    assert bar and summary, (result.stdout, result.stderr)
    assert bar[-1] == summary.group(2)  # the same quantity, to the digit
    assert float(summary.group(1)) > 0


def test_eval_replaces_its_report_and_grid_only_with_overwrite(tmp_path):
    report, grid = tmp_path / "report.json", tmp_path / "grid.png"
    args = ["eval", "-n", "1", "--runs", "ddim:1", "-q", "-o", str(report), "--grid", str(grid)]
    assert run_cli(*args).returncode == 0
    report.write_text("mine"), grid.write_bytes(b"mine")
    assert_one_line_error(run_cli(*args), "already exists; choose another file name or pass --overwrite")
    assert report.read_text() == "mine" and grid.read_bytes() == b"mine"
    assert run_cli(*args, "--overwrite").returncode == 0
    assert report.read_text().startswith("{") and grid.read_bytes()[:4] == b"\x89PNG"


# -- Ctrl-C and names the filesystem refuses ----------------------------------------------------------
SLOW_SAMPLER = '''
import os
import time

from minidiff_cli import hookimpl


class Slow:
    name = "slow"
    default_steps = 1

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, **opts):
        from minidiff_cli.diffusion.sampling import batch_t

        open(os.environ["MINIDIFF_TEST_MARKER"], "w").close()
        deadline = time.time() + 120
        while time.time() < deadline:
            denoiser(x, batch_t(0, x))
            time.sleep(0.02)
        return x


@hookimpl
def register_samplers(register):
    register(Slow())
'''


@pytest.mark.hostile
def test_ctrl_c_during_generate_exits_130_with_one_line_and_no_files(tmp_path, tiny):
    plugs = tmp_path / "plugs"
    plugs.mkdir()
    (plugs / "slow.py").write_text(SLOW_SAMPLER)
    marker, out = tmp_path / "sampling", tmp_path / "out"
    env = {**os.environ, "MINIDIFF_PLUGINS_DIR": str(plugs), "MINIDIFF_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([*cli_command(), "generate", "red circle", "--model", str(tiny), "--sampler", "slow",
                             "-n", "3", "-o", str(out), "-q"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=30)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "Interrupted; nothing half-written was left behind."]
    assert stdout == "" and files_in(out) == []


@pytest.mark.hostile
def test_output_names_the_filesystem_refuses_are_one_line_errors_before_sampling(tmp_path, tiny):
    long_name = "x" * 300
    for target in (tmp_path / long_name, tmp_path / f"{long_name}.png", tmp_path / long_name / "a.png"):
        line = assert_error(cli("generate", "red circle", "--model", tiny, "-o", target, "-q"))
        assert "too long" in line.lower(), line
    assert list(tmp_path.iterdir()) == []

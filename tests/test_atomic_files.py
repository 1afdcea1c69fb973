"""Atomic writes (minidiff_cli.files.atomic): a failing writer, a full disk, a race for the name, Ctrl-C or
SIGKILL while writing never leave a partial file under the final name, nor a stray temporary file."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_error, files_in, run_in_process, snapshot, train_args
from conftest import run_in_process as cli
from PIL import Image
from tinymodels import CLASS_NAMES, tiny_model

from minidiff_cli.errors import MinidiffError
from minidiff_cli.files import atomic as fileio
from minidiff_cli.files.atomic import atomic_write
from minidiff_cli.files.png_parameters import read_parameters

# -- files: crashes, races, interrupts -------------------------------------------------------------------
def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.hostile
@pytest.mark.parametrize("error", [ValueError("broken writer"), KeyboardInterrupt()], ids=["ValueError", "Ctrl-C"])
def test_a_writer_that_fails_leaves_no_file_and_no_temporary(tmp_path, error):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise error

    with pytest.raises(type(error)):
        atomic_write(tmp_path / "out.png", write, overwrite=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.hostile
def test_disk_errors_are_one_line_errors_naming_the_file(tmp_path):
    import errno

    def full(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MinidiffError, match=r"could not write '.*out.png': No space left on device"):
        atomic_write(tmp_path / "out.png", full)
    assert list(tmp_path.iterdir()) == []


NO_LINK_MODES = ["link", "rename-noreplace", "claim-then-replace"]


@pytest.fixture(params=NO_LINK_MODES)
def publish_mode(request, monkeypatch):
    """How atomic_write gives a new file its name: hard link, or the fallbacks for filesystems without."""
    if request.param != "link":
        import errno

        def no_links(src, dst, *args, **kwargs):
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(fileio.os, "link", no_links)
    if request.param == "rename-noreplace":
        if fileio._noreplace_call() is None:
            pytest.skip("no renameat2 / renamex_np here")

        def not_the_last_resort(tmp, path):
            raise AssertionError("the atomic no-replace rename was not used")

        monkeypatch.setattr(fileio, "_claim_then_replace", not_the_last_resort)
    if request.param == "claim-then-replace":
        monkeypatch.setattr(fileio, "_noreplace_call", lambda: None)
    return request.param


@pytest.mark.hostile
def test_new_file_gets_its_content_and_usual_permissions_in_every_mode(tmp_path, publish_mode):
    path = atomic_write(tmp_path / "new.bin", lambda tmp: tmp.write_bytes(b"content"), overwrite=False)
    assert path.read_bytes() == b"content" and leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


@pytest.mark.hostile
def test_a_file_that_appears_while_writing_is_never_replaced(tmp_path, publish_mode):
    """Between the existence check and the final rename another process creates the file."""
    target = tmp_path / "picture.png"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"minidiff's image")
        target.write_bytes(b"someone else's file")

    with pytest.raises(MinidiffError, match="already exists"):
        atomic_write(target, write, overwrite=False)
    assert target.read_bytes() == b"someone else's file"
    assert leftovers(tmp_path) == []


@pytest.mark.hostile
def test_overwrite_replaces_in_one_step(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and leftovers(tmp_path) == []


SLOW_PNG_WRITER = '''
import sys, time
from PIL import Image, PngImagePlugin  # importing the plugin registers its saver
from minidiff_cli.files import png_parameters as imagemeta

original = Image.SAVE["PNG"]

def slow(im, fp, filename, *args, **kwargs):
    original(im, fp, filename, *args, **kwargs)  # the whole image is in the temporary file...
    fp.flush()
    print("written", flush=True)
    time.sleep(120)  # ...and the process is killed before it is renamed

Image.SAVE["PNG"] = slow
imagemeta.save_png(Image.new("RGB", (256, 256), "red"), sys.argv[1], {"prompt": "x"}, overwrite=sys.argv[2] == "1")
'''


@pytest.mark.hostile
@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "replacing"])
def test_sigkill_while_writing_a_png_leaves_no_partial_file_under_its_name(tmp_path, existing):
    target = tmp_path / "image.png"
    if existing:
        target.write_bytes(b"the previous version")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PNG_WRITER, str(target), "1" if existing else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline().strip() == "written", proc.stderr.read()
        temporary = [p for p in tmp_path.iterdir() if p.name.startswith(".image.png.") and p.name.endswith(".tmp")]
        assert len(temporary) == 1 and temporary[0].stat().st_size > 0
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    if existing:
        assert target.read_bytes() == b"the previous version"
    else:
        assert not target.exists()
    # what is left is a hidden temporary file, never mistaken for an image, and the next free name is unchanged
    assert fileio.next_free_path(tmp_path, "image", ".png").name == "image-00000.png"


@pytest.mark.hostile
def test_ctrl_c_while_saving_keeps_the_finished_images_and_no_partial_one(tmp_path, tiny, monkeypatch):
    Image.init()  # registers Pillow's PNG writer in Image.SAVE, whatever ran before this test
    original, calls = Image.SAVE["PNG"], []

    def interrupted_second_save(im, fp, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            fp.write(b"\x89PNG half an image")
            raise KeyboardInterrupt
        return original(im, fp, filename, *args, **kwargs)

    monkeypatch.setitem(Image.SAVE, "PNG", interrupted_second_save)
    out = tmp_path / "out"
    result = cli("generate", "red circle", "--model", tiny, "--steps", "2", "-n", "3", "-o", out, "-q")
    assert_error(result, "Interrupted", code=130)
    assert files_in(out) == ["minidiff-00000.png"]
    assert read_parameters(out / "minidiff-00000.png")["seed"] == 0


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


@pytest.mark.hostile
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


# -- disk full ----------------------------------------------------------------------------------
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


@pytest.mark.hostile
def test_train_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_disk, toml):
    out = small_disk / "run"
    rc, _, err = run_in_process(*train_args(toml, out, "--max-steps", "2", "--quiet"))
    assert rc == 0, err
    fill(small_disk, leave=100_000)  # the checkpoint is about 850 kB
    before = snapshot(out)
    rc, _, err = run_in_process("train", "--out", out, "--resume", "--max-steps", "4", "--quiet")
    # train's start line ("training on cpu ..."), maybe a progress line (stderr is no terminal), then the error
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err and lines[0].startswith("training on"), err
    assert [line for line in lines if line.startswith("Error")] == lines[-1:], err
    assert lines[-1].startswith("Error: could not write") and "No space left on device" in lines[-1]
    after = snapshot(out)
    assert after["checkpoint.safetensors"] == before["checkpoint.safetensors"]
    assert not [name for name in after if name.endswith(".tmp")]
    assert all(line.endswith("}") for line in (out / "metrics.jsonl").read_text().splitlines())


@pytest.mark.hostile
def test_clip_train_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    fill(small_disk, leave=50_000)  # the tiny CLIP file is about 1.7 MB
    target = small_disk / "clip.safetensors"
    assert_error(run_in_process("clip", "train", "--out", target, "--steps", "2", "--width", "16", "--heads", "2",
                                "--layers", "1", "--embed-dim", "16", "--context-length", "12", "--vision-width", "8",
                                "--batch-size", "16", "--threads", "1", "--device", "cpu", "--quiet"),
                 "No space left on device")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]

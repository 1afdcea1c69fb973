"""Every command and Python example of README.md runs, so the README cannot drift from the code.

The commands are read from README.md's ```bash blocks when the tests run, so a line added
to the README is covered without touching this file. Each runs through the installed
`minidiff` console script, in README order, in a fresh folder, with small settings put in
by the tables below (2 training steps, tiny widths, 2 sampling steps): the test checks that
the command line is valid and does what it says, not how well a long run trains.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

README = ROOT / "README.md"

# Settings replaced where the README gives them: option -> function of the README's value.
REPLACED = {
    "generate": {"--steps": lambda v: "2", "-n": lambda v: "2", "--num-images": lambda v: "2"},
    # Scaled, not fixed, so that a resumed run (--max-steps 4000 after 2000) still goes further.
    "train": {"--max-steps": lambda v: str(max(2, int(v) // 1000))},
    "eval": {"-n": lambda v: "1", "--per-prompt": lambda v: "1", "--runs": lambda v: "ddim:2"},
    "clip train": {"--steps": lambda v: "2"},
    "vae train": {"--max-steps": lambda v: "2", "--image-size": lambda v: "16"},
    "distill": {"--max-steps": lambda v: "2"},
}
# Settings added where the README does not give them: (the option and its aliases, value).
ADDED = {
    "generate": [(("--steps",), "2")],
    "train": [(("--image-size",), "16"), (("--channel-mult",), "1,2"), (("--base-channels",), "16"),
              (("--batch-size",), "2"), (("--timesteps",), "100"), (("--warmup",), "1"),
              (("--max-steps",), "2"), (("--device",), "cpu"), (("--clip-steps",), "2"), (("--quiet", "-q"), None)],
    "eval": [(("-n", "--per-prompt"), "1"), (("--runs",), "ddim:2"), (("--device",), "cpu")],
    "clip train": [(("--steps",), "2"), (("--batch-size",), "4"), (("--width",), "16"), (("--heads",), "2"),
                   (("--layers",), "1"), (("--embed-dim",), "16"), (("--context-length",), "8"),
                   (("--device",), "cpu"), (("--quiet", "-q"), None)],
    "vae train": [(("--max-steps",), "2"), (("--batch-size",), "2"), (("--base-channels",), "8"),
                  (("--channel-mult",), "1,2"), (("--device",), "cpu"), (("--quiet", "-q"), None)],
    "vae eval": [(("--holdout",), ""), (("--device",), "cpu")],  # the test's folder has 3 pictures
    "vae reconstruct": [(("--device",), "cpu")],
    "distill": [(("--batch-size",), "2"), (("--device",), "cpu"), (("--quiet", "-q"), None)],
}
# Commands that train or evaluate: they run in a test of their own (about 50 s), after their training runs.
SLOW = ("train", "eval", "clip train", "vae train", "vae eval", "vae reconstruct", "distill")
# Commands a test machine cannot run, by their first word, with the reason.
# Commands that run until stopped: started on a free port, asked for an answer, then stopped with Ctrl-C.
SERVED = ("serve",)
SKIPPED = {"torchrun": "several processes (and for --nnodes 2, two machines); tests/test_training.py's "
                       "slow DDP test runs `torchrun --nproc-per-node 2 -m minidiff_cli train` on CPU, and "
                       "tests/test_prompts_file.py runs `generate --prompts` under torchrun"}
OUTPUT_OPTIONS = ("-o", "--output", "--out", "--grid", "--latents")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def readme_commands() -> list[list[str]]:
    """Every shell command of README.md's ```bash blocks, as argument lists, once each, in order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    commands: list[list[str]] = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for command in _split_on_operators(shlex.split(line, comments=True)):
                if command and command not in commands:
                    commands.append(command)
    return commands


def _split_on_operators(tokens: list[str]) -> list[list[str]]:
    """`a && b; c` -> [a, b, c]."""
    commands, current = [], []
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [*commands, current]


def subcommand(argv: list[str]) -> str:
    """'train', 'clip train', 'schedules', ...: the command's name, as the tables above use it."""
    words = list(itertools.takewhile(lambda token: not token.startswith("-"), argv[1:3]))
    pair = " ".join(words)
    return pair if pair in ADDED else (words[0] if words else "")


def small(argv: list[str]) -> list[str]:
    """``argv`` with the small settings of REPLACED and ADDED."""
    name = subcommand(argv)
    replaced = REPLACED.get(name, {})
    out = list(argv)
    for i in range(1, len(out) - 1):
        if out[i] in replaced:
            out[i + 1] = replaced[out[i]](out[i + 1])
    for aliases, value in ADDED.get(name, []):
        if not any(token in aliases or token.startswith(tuple(a + "=" for a in aliases)) for token in out):
            out += [aliases[0]] if value is None else [aliases[0], value]
    return out


def provide_inputs(argv: list[str], folder: Path) -> None:
    """Create the input files a README command assumes the reader has (photo.jpg, ./my_images, ...).

    A relative path that exists in the repository (recipes/shapes.toml) is copied from it,
    since the README's commands run from the repository's root.
    """
    for i, token in enumerate(argv[1:], start=1):
        if token.startswith("-") or argv[i - 1] in OUTPUT_OPTIONS or (folder / token).exists():
            continue
        source = ROOT / token
        if not Path(token).is_absolute() and source.is_file() and ROOT in source.resolve().parents:
            (folder / token).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, folder / token)
        elif Path(token).suffix.lower() in IMAGE_SUFFIXES:
            _picture(folder / token)
        elif Path(token).suffix == ".txt":
            (folder / token).write_text("a red circle\na blue square\n")
        elif argv[i - 1] == "--data" and token.startswith(("./", "../")):
            for k in range(3):  # captioned, for the text-to-image commands
                _picture(folder / token / f"image-{k}.png", k)
                (folder / token / f"image-{k}.txt").write_text(f"picture number {k}")


def _picture(path: Path, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (80, 60), (30 + 40 * seed, 90, 160))
    ImageDraw.Draw(image).ellipse((20, 10, 60, 50), fill=(220, 60, 40))
    image.save(path)


def _runnable(slow: bool) -> list[list[str]]:
    return [c for c in readme_commands() if c[0] == "minidiff" and (subcommand(c) in SLOW) == slow
            and subcommand(c) not in SERVED]


def _run_in_order(commands: list[list[str]], folder: Path) -> None:
    for argv in commands:
        argv = small(argv)
        provide_inputs(argv, folder)
        result = run_cli(*argv[1:], cwd=folder, timeout=600)
        assert result.returncode == 0, (shlex.join(argv), result.stdout[-2000:], result.stderr[-2000:])
        assert "Error" not in result.stderr, (shlex.join(argv), result.stderr)


def test_the_readme_has_the_commands_this_test_knows_how_to_run():
    commands = readme_commands()
    names = {subcommand(c) for c in commands if c[0] == "minidiff"}
    assert {"generate", "train", "eval", "clip train", "schedules", "noise", "info", "models"} <= names
    # Every command is run, or skipped for a stated reason; nothing falls through unnoticed.
    assert all(c[0] == "minidiff" or c[0] in SKIPPED or c[0] in ("pip", "python") for c in commands), commands


def test_small_settings_replace_and_add_without_touching_the_rest():
    argv = ["minidiff", "train", "--data", "./my_images", "--image-size", "64", "--max-steps", "4000"]
    out = small(argv)
    assert out[:6] == argv[:6] and out[6:8] == ["--max-steps", "4"]
    assert "--channel-mult" in out and out.count("--image-size") == 1
    assert small(["minidiff", "generate", "x", "--steps=50"]).count("--steps=50") == 1


def test_readme_commands_without_training_run(tmp_path):
    commands = _runnable(slow=False)
    assert len(commands) >= 10
    _run_in_order(commands, tmp_path)
    assert (tmp_path / "outputs" / "minidiff-00000.png").is_file()
    assert len(list((tmp_path / "out").glob("minidiff-*.png"))) == 2 and (tmp_path / "noise.png").is_file()


def test_readme_commands_that_train_run(tmp_path):
    from minidiff_cli.files.model_file import read_config

    commands = _runnable(slow=True)
    assert len(commands) >= 4
    _run_in_order(commands, tmp_path)  # about 130 s on 2 busy cores, beside the rest under -n auto
    for run in tmp_path.glob("runs/*/model.safetensors"):
        unet = read_config(run)["unet"]
        lowest = unet["image_size"] >> (len(unet["channel_mult"]) - 1)
        assert unet["attention_resolutions"] == [lowest], (run, unet)  # the default follows --image-size
    assert read_config(tmp_path / "runs/shapes-class/model.safetensors")["conditioner"]["name"] == "class"


@pytest.mark.parametrize("command", [c for c in readme_commands() if c[0] == "minidiff" and subcommand(c) in SERVED],
                         ids=shlex.join)
def test_readme_serve_commands_start_answer_and_stop(command, tmp_path):
    """`minidiff serve ...` as the README gives it, on a free port; it answers, then Ctrl-C stops it."""
    import requests
    from serving import Served

    argv = list(command[2:])
    if "--port" in argv:  # the README's port may be taken here
        del argv[argv.index("--port"):argv.index("--port") + 2]
    served = Served(tmp_path, *argv)
    try:
        assert requests.get(f"{served.url}/", timeout=30).status_code == 200
        assert requests.get(f"{served.url}/sdapi/v1/sd-models", timeout=30).status_code == 200
    finally:
        code = served.stop()
    assert code in (0, 130) and "Traceback" not in served.output(), served.output()


@pytest.mark.parametrize("command", [c for c in readme_commands() if c[0] in SKIPPED], ids=shlex.join)
def test_readme_commands_this_machine_cannot_run(command):
    pytest.skip(SKIPPED[command[0]])


def readme_python_examples() -> list[str]:
    """The ```python blocks of README.md that use minidiff's API (not the plugin-writing sketch)."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    return [block for block in blocks if "Pipeline" in block or "sample(" in block]


def test_readme_python_api_example_prints_what_its_comment_says(tmp_path):
    import subprocess
    import sys

    (example,) = readme_python_examples()
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    promised = re.search(r"print\(.*\)\s*#\s*(.+)", example).group(1).strip()
    assert result.stdout.strip() == promised  # mean 0.502, std 0.485: the Gaussian's 0.5 and 0.5, recovered
    from minidiff_cli.files.png_parameters import read_parameters

    params = read_parameters(tmp_path / "circle.png")  # Pipeline.save kept the parameters
    assert (params["prompt"], params["steps"], params["cfg"], params["seed"]) == ("a red circle", 50, 3.0, 0)

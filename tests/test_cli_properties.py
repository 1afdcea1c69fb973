"""Property: whatever values `generate` and `train` are given, a run ends in success or in one line.

Hypothesis draws option values (out of range, huge, negative, NaN and infinite floats, empty,
huge, unicode and control-character prompts, output paths that are files, folders, missing or
under a file) and runs the CLI in-process. Every run must exit 0, or exit 2 with exactly one
line on stderr; an exception escaping ``main`` (a traceback for the user) fails the test.
`train` is only given values its validation refuses, so no example trains. The last test checks that an error's
terminal escapes are shown escaped and torch's C++ stack is dropped from its one line.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from conftest import assert_error, run_in_process, timed_cli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tinymodels import CLASS_NAMES, TIMESTEPS, TINY_TOML, tiny_model_file

from minidiff_cli.files.png_parameters import read_parameters

SETTINGS = settings(max_examples=35, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def run(args: list) -> tuple[int, str, str]:
    return run_in_process(*args)


def one_line_error(result: tuple[int, str, str]) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result
    assert "Traceback" not in err
    return lines[0]


# -- a small world of files -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    models = {"class": tiny_model_file(root / "class.safetensors", "class", seed=1),
              "none": tiny_model_file(root / "none.safetensors", "none", seed=2)}
    code, _, err = run(["generate", "red circle", "--model", models["class"], "--steps", "1",
                        "-o", root / "made.png", "-q"])
    assert code == 0, err
    (root / "a-file").write_text("not a folder")
    (root / "noise.safetensors").write_bytes(os.urandom(512))
    (root / "noise.png").write_bytes(os.urandom(512))
    (root / "a-folder.png").mkdir()
    (root / "tiny.toml").write_text(TINY_TOML)
    return {**models, "root": root, "made": root / "made.png"}


COUNTER = itertools.count()


def output_path(world: dict[str, Path], kind: str) -> Path:
    """A fresh place of the kind drawn, under the world's root."""
    base = world["root"] / f"out-{next(COUNTER)}"
    base.mkdir()
    return {
        "new-folder": base / "images",
        "existing-folder": base,
        "new-file": base / "picture.png",
        "existing-file": world["made"],
        "file-as-folder": world["root"] / "a-file",
        "under-a-file": world["root"] / "a-file" / "sub" / "x.png",
        "folder-named-png": world["root"] / "a-folder.png",
        "other-suffix": base / "picture.jpg",
        "long-name": base / ("n" * 300 + ".png"),
    }[kind]


def model_arg(world: dict[str, Path], kind: str) -> str:
    return {"class": str(world["class"]), "none": str(world["none"]),
            "missing": str(world["root"] / "nope.safetensors"),
            "folder": str(world["root"]), "noise": str(world["root"] / "noise.safetensors"),
            "png": str(world["made"]), "unknown-name": "no-such-model"}[kind]


def from_arg(world: dict[str, Path], kind: str) -> str:
    return {"made": str(world["made"]), "noise": str(world["root"] / "noise.png"),
            "folder": str(world["root"] / "a-folder.png"), "missing": str(world["root"] / "missing.png"),
            "model-file": str(world["class"])}[kind]


# -- value strategies ----------------------------------------------------------------------------------
def number_text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 10),
                   st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e308, -1e-300]))
prompts = st.one_of(
    st.sampled_from(CLASS_NAMES),
    st.text(max_size=30),
    st.text(st.characters(codec="utf-8"), max_size=30),
    st.text(st.characters(max_codepoint=0x1f), max_size=10),  # control characters only
    st.sampled_from(["", " ", "\n", "\x00", "\ud800", "red circle\x1b[31m", "\u202ered circle", "-x", "--", "-n 3"]),
    st.integers(9_990, 10_010).map(lambda n: "red circle " + "z" * n),
)
generate_options = st.fixed_dictionaries({}, optional={
    "--steps": st.one_of(st.integers(1, 3), st.integers(-10**30, 0), st.integers(TIMESTEPS + 1, 10**30)),
    "--cfg": floats,
    "--eta": floats,
    "--seed": st.one_of(st.integers(0, 2**64), st.integers(-2**70, -1), st.integers(2**64 - 3, 2**70)),
    "-n": st.one_of(st.integers(1, 2), st.integers(-10**20, 0), st.integers(10_001, 10**20)),
    "--batch-size": st.one_of(st.integers(1, 3), st.integers(-10**20, 0), st.integers(10**6, 10**20)),
    "--sampler": st.one_of(st.sampled_from(["ddim", "ddpm", "DDIM", ""]), st.text(max_size=8)),
    "--negative": prompts,
    "--device": st.sampled_from(["cpu", "auto", "cuda:x", "cuda:99", "gpu", ""]),
    "--dtype": st.sampled_from(["auto", "float32", "bfloat16", "float16", "int8", ""]),
    "-O": st.one_of(st.sampled_from(["eta=0.5", "spacing=leading", "eta=NaN", "eta=1e999", "generator=1",
                                     "callback=x", "spacing=[1]", "nonsense", "=1", "clip_x0=-1"]),
                    st.text(max_size=12)),
})


@SETTINGS
@given(prompt=prompts, options=generate_options,
       output=st.sampled_from(["new-folder", "existing-folder", "new-file", "existing-file", "file-as-folder",
                               "under-a-file", "folder-named-png", "other-suffix", "long-name"]),
       model=st.sampled_from(["class"] * 4 + ["none"] * 2 + ["missing", "folder", "noise", "png", "unknown-name"]),
       source=st.one_of(st.none(), st.none(), st.sampled_from(["made", "noise", "folder", "missing", "model-file"])))
def test_generate_ends_in_success_or_one_line_exit_2(world, prompt, options, output, model, source):
    target = output_path(world, output)
    args = ["generate", prompt, "--model", model_arg(world, model), "-o", target, "-q"]
    for flag, value in options.items():
        args += [flag, number_text(value)]
    if source is not None:
        args += ["--from", from_arg(world, source)]
    before = _listing(world["root"])
    result = run(args)
    code, out, err = result
    event("success" if code == 0 else "refused")
    if code == 0:
        written = [Path(line) for line in out.split("\n") if line]
        # A "prompt" like "-m0" is an option (-m 0, overridden by the --model after it): the picture then
        # carries the prompt of --from's PNG, and only the option-free case can be checked here.
        assert written and all(read_parameters(p)["prompt"] == prompt or p.suffix != ".png" or prompt.startswith("-")
                               for p in written)
        assert all(line.startswith("minidiff: warning: ") for line in err.splitlines() if line.strip()), err
    else:
        one_line_error(result)
    # existing files are never changed, and no temporary file is left anywhere
    after = _listing(world["root"])
    assert {p: s for p, s in after.items() if p in before} == before
    assert not [p for p in after if p.endswith(".tmp")]


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


# -- train: values its validation refuses ----------------------------------------------------------------
# For each flag, values that must be refused before anything is built.
INVALID = {
    "--lr": st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -1e-3, -0.0]),
                      st.floats(max_value=0)),
    "--ema-decay": st.one_of(st.sampled_from([float("nan"), float("inf"), 1.0, -0.5]), st.floats(min_value=1)),
    "--cfg-dropout": st.sampled_from([float("nan"), float("inf"), 1.0, 1.5, -0.1]),
    "--min-snr-gamma": st.sampled_from([float("nan"), float("inf"), -1.0]),
    "--max-steps": st.integers(-10**30, 0),
    "--batch-size": st.one_of(st.integers(-10**30, 0), st.integers(65_537, 10**30)),
    "--warmup": st.integers(-10**30, -1),
    "--lr-decay-steps": st.integers(-10**30, -1),
    "--seed": st.one_of(st.integers(-10**30, -1), st.integers(2**32, 10**30)),
    "--threads": st.one_of(st.integers(-10**30, -1), st.integers(1025, 10**30)),
    "--image-size": st.one_of(st.integers(-10**30, 0), st.integers(513, 10**30)),
    "--save-every": st.integers(-10**30, 0),
    "--log-every": st.integers(-10**30, 0),
    "--base-channels": st.integers(-10**30, 0),
    "--num-res-blocks": st.integers(-10**30, 0),
    "--mixed-precision": st.text(max_size=6).filter(lambda v: v not in ("no", "bf16", "fp16")),
    "--prediction": st.text(max_size=6).filter(lambda v: v not in ("eps", "v")),
    "--channel-mult": st.sampled_from(["1,x", "0,1", "-1", "1,,-2", "1.5", "9" * 30 + ",x"]),
}
# Any value at all for the other flags (valid or not, parseable or not).
ANY = {
    **{flag: st.one_of(floats, st.integers(-10**6, 10**6)) for flag in
       ("--lr", "--ema-decay", "--cfg-dropout", "--min-snr-gamma")},
    **{flag: st.one_of(st.integers(-10**30, 10**30), st.text(max_size=4)) for flag in
       ("--max-steps", "--batch-size", "--warmup", "--lr-decay-steps", "--seed", "--threads", "--image-size",
        "--save-every", "--log-every", "--base-channels", "--num-res-blocks", "--timesteps", "--sample-every")},
    "--mixed-precision": st.text(max_size=5),
    "--prediction": st.text(max_size=5),
    "--channel-mult": st.text(max_size=8),
    "--holdout": st.text(max_size=12),
    "--name": st.text(max_size=12),
}


@st.composite
def train_arguments(draw) -> list[str]:
    invalid_flag = draw(st.sampled_from(sorted(INVALID)))
    others = draw(st.lists(st.sampled_from(sorted(set(ANY) - {invalid_flag})), max_size=5, unique=True))
    args: list[str] = []
    for flag in others:
        args += [flag, number_text(draw(ANY[flag]))]
    return args + [invalid_flag, number_text(draw(INVALID[invalid_flag]))]  # last, so no other value replaces it


@pytest.fixture
def no_training(monkeypatch):
    """A value that validation lets through fails the test at once instead of training."""
    def refuse(cfg, resume):
        raise AssertionError(f"validation let this through: {cfg}")

    monkeypatch.setattr("minidiff_cli.cli.train._train", refuse)


@SETTINGS
@given(args=train_arguments(), with_toml=st.booleans())
def test_train_refuses_invalid_values_in_one_line_before_building_anything(world, no_training, args, with_toml):
    out = world["root"] / f"run-{next(COUNTER)}"
    extra = ["--config", world["root"] / "tiny.toml"] if with_toml else []
    one_line_error(run(["train", "--out", out, "--quiet", "--device", "cpu", *extra, *args]))
    assert not out.exists()


# -- NaN and infinity, one by one --------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--cfg", "nan", "--cfg must be 0 or more (got nan)"),
    ("--cfg", "inf", "--cfg must be at most 1000 (got inf)"),
    ("--cfg", "-inf", "--cfg must be 0 or more (got -inf)"),
    ("--eta", "nan", "--eta must be between 0 and 1 (got nan)"),
    ("--eta", "inf", "--eta must be between 0 and 1 (got inf)"),
    ("--eta", "-inf", "--eta must be between 0 and 1 (got -inf)"),
])
def test_generate_refuses_nan_and_infinity(world, flag, value, message):
    out = world["root"] / f"nan-{next(COUNTER)}"
    line = one_line_error(run(["generate", "red circle", "--model", world["class"], flag, value, "-o", out, "-q"]))
    assert message in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("flag, value", [(f, v) for f in ("--lr", "--ema-decay", "--cfg-dropout", "--min-snr-gamma")
                                         for v in ("nan", "inf", "-inf")])
def test_train_refuses_nan_and_infinity(world, no_training, flag, value):
    out = world["root"] / f"nan-{next(COUNTER)}"
    line = one_line_error(run(["train", "--out", out, flag, value, "--quiet"]))
    assert f"{flag} must be a finite number (got {value})" in line
    assert not out.exists()


@pytest.mark.parametrize("toml", ["lr = nan", "lr = inf", "ema_decay = -inf", "lr = 'fast'", "max_steps = 2.5",
                                  "seed = -1", "name = 5", "channel_mult = [1, 'x']", "train = 5",
                                  "quiet = 'yes'", "sample_prompts = [1]"])
def test_train_refuses_bad_toml_values_in_one_line(world, no_training, toml):
    path = world["root"] / f"bad-{next(COUNTER)}.toml"
    path.write_text(toml + "\n")
    out = world["root"] / f"toml-{next(COUNTER)}"
    one_line_error(run(["train", "--config", path, "--out", out]))
    assert not out.exists()


# -- error lines: a message's terminal escapes and torch's C++ stack -------------------------------------
@pytest.mark.hostile
def test_errors_show_a_files_escapes_escaped_and_drop_torchs_cpp_stack(tmp_path, plugin_dir):
    (plugin_dir / "deep.py").write_text(
        "import minidiff_cli\nfrom minidiff_cli.errors import MinidiffError\n\n"
        "def data(source, **kwargs):\n"
        "    raise MinidiffError('bad \\x1b[31mred\\x00 data\\nException raised from foo at bar.cpp:12 '\n"
        "                        '(most recent call first):\\nframe #0: ' + 'c10::Error ' * 200)\n\n"
        "@minidiff_cli.hookimpl\ndef register_datasets(register):\n    register('deep', data)\n")
    line = assert_error(timed_cli("train", "--data", "deep", "--out", tmp_path / "run"), "bad \\x1b[31mred\\x00 data")
    assert "frame #0" not in line and "Exception raised from" not in line and len(line) < 200

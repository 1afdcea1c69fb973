"""Plugin discovery: installed entry points, plugin folders, clashes, broken plugins, and plugins that return
garbage or misbehave (exit, Ctrl-C, print, load slowly, take a command's name): each is named in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import assert_error, assert_one_line_error, files_in, run_cli, run_in_process, timed_cli
from conftest import run_in_process as cli
from tinymodels import CLASS_NAMES, TINY_TRAIN, tiny_model

from minidiff_cli import plugins
from minidiff_cli.cli.app import main
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.errors import PluginError, UnknownNameError
from minidiff_cli.inference.pipeline import Pipeline

GOOD_PLUGIN = '''
from minidiff_cli import hookimpl

def halfway(num_timesteps, beta=0.02):
    import torch
    return torch.full((num_timesteps,), beta, dtype=torch.float64)

@hookimpl
def register_schedules(register):
    register("folder-constant", halfway)
'''


def write(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def plugin_list(*args: str, env: dict | None = None) -> dict[str, dict]:
    result = run_cli(*args, "plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)}


def fake_installed_distribution(site: Path, dist: str, module: str, source: str) -> dict:
    """A distribution as pip lays it out (dist-info with entry_points.txt); PYTHONPATH finds it."""
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[minidiff]\n{module} = {module}\n")
    write(site, f"{module}.py", source)
    return {"PYTHONPATH": str(site)}


def test_builtins_register_through_entry_points():
    listed = plugin_list()
    builtins = {name: p for name, p in listed.items() if p["distribution"] == "minidiff"}
    registered = {kind: names for p in builtins.values() for kind, names in p["registered"].items()}
    assert {"ddpm", "ddim"} <= set(registered["samplers"])
    assert {"linear", "cosine", "scaled-linear", "sigmoid"} <= set(registered["schedules"])
    assert all(p["source"] == "entry point" and p["status"] == "ok" for p in builtins.values())


def test_installed_third_party_plugin_is_discovered():
    listed = plugin_list()
    assert "testplugin" in listed, "install it with: pip install ./tests/plugin_dist"
    plugin = listed["testplugin"]
    assert plugin["distribution"] == "minidiff-testplugin" and plugin["version"] == "0.3.0"
    assert plugin["registered"]["schedules"] == ["testplugin-constant"]
    assert plugin["registered"]["samplers"] == ["testplugin-onestep"]
    assert plugin["registered"]["commands"] == ["testplugin-hello"]
    assert set(plugin["hooks"]) == {"register_schedules", "register_samplers", "register_commands"}
    hello = run_cli("testplugin-hello", "--name", "tests")
    assert hello.returncode == 0 and "hello tests from minidiff-testplugin" in hello.stdout


def test_load_plugins_env_restricts_third_party_plugins():
    assert "testplugin" not in plugin_list(env={"MINIDIFF_LOAD_PLUGINS": ""})
    assert "testplugin" in plugin_list(env={"MINIDIFF_LOAD_PLUGINS": "testplugin"})
    assert "testplugin" in plugin_list(env={"MINIDIFF_LOAD_PLUGINS": "minidiff-testplugin"})
    # the built-ins always load
    assert "minidiff.samplers" in plugin_list(env={"MINIDIFF_LOAD_PLUGINS": ""})


def test_plugins_dir_flag_and_env(tmp_path):
    folder = tmp_path / "plugs"
    write(folder, "constant.py", GOOD_PLUGIN)
    for args, env in (((f"--plugins-dir={folder}",), None), ((), {"MINIDIFF_PLUGINS_DIR": str(folder)})):
        listed = plugin_list(*args, env=env)
        assert listed["constant"]["registered"] == {"schedules": ["folder-constant"]}
        assert listed["constant"]["source"] == str(folder / "constant.py")
        shown = run_cli(*args, "schedules", "show", "folder-constant", "--timesteps", "4", "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["betas"] == [0.02] * 4


def test_missing_plugins_dir_is_a_one_line_error(tmp_path):
    assert_one_line_error(run_cli("--plugins-dir", str(tmp_path / "nope"), "plugins"), "does not exist")


@pytest.mark.parametrize("source, reason", [
    ("import not_a_module_anywhere\n", "ModuleNotFoundError"),
    ("raise RuntimeError('boom at import')\n", "boom at import"),
    ("from minidiff_cli import hookimpl\n@hookimpl\ndef register_samplers(register):\n    raise ValueError('bad hook')\n",
     "bad hook"),
    ("from minidiff_cli import hookimpl\n@hookimpl\ndef register_samplers(register):\n    register(42)\n",
     "needs one object"),
])
def test_broken_plugin_is_reported_and_the_rest_works(tmp_path, source, reason):
    folder = tmp_path / "plugs"
    write(folder, "broken.py", source)
    write(folder, "constant.py", GOOD_PLUGIN)
    listed = plugin_list("--plugins-dir", str(folder))
    assert listed["broken"]["status"] == "broken"
    assert any(reason in e for e in listed["broken"]["errors"])
    assert listed["constant"]["status"] == "ok"
    # other commands still work, with a one-line warning naming the plugin
    shown = run_cli("--plugins-dir", str(folder), "schedules", "show", "folder-constant", "--json")
    assert shown.returncode == 0
    warnings = [line for line in shown.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "plugin 'broken'" in warnings[0] and reason in warnings[0]


def test_strict_mode_turns_reports_into_errors(tmp_path):
    folder = tmp_path / "plugs"
    write(folder, "broken.py", "import not_a_module_anywhere\n")
    result = run_cli("--plugins-dir", str(folder), "schedules", "list", env={"MINIDIFF_STRICT_PLUGINS": "1"})
    assert_one_line_error(result, "plugin 'broken'", "MINIDIFF_STRICT_PLUGINS")


def test_name_clash_names_both_plugins(tmp_path):
    folder = tmp_path / "plugs"
    write(folder, "clasher.py", '''
        from minidiff_cli import hookimpl

        class Fake:
            name = "ddim"
            default_steps = 1
            def sample(self, *a, **k):
                raise AssertionError("the clashing sampler must never run")

        class Other(Fake):
            name = "clasher-sampler"

        @hookimpl
        def register_samplers(register):
            register(Fake())
            register(Other())
    ''')
    listed = plugin_list("--plugins-dir", str(folder))
    errors = " ".join(listed["clasher"]["errors"])
    assert "'ddim'" in errors and "'minidiff.samplers'" in errors and "'clasher'" in errors
    # the first registration keeps the name; the plugin's other names still register
    assert listed["clasher"]["registered"] == {"samplers": ["clasher-sampler"]}
    assert listed["minidiff.samplers"]["registered"]["samplers"] == ["ddpm", "ddim", "lcm"]


def test_entry_point_plugin_that_fails_to_import(tmp_path):
    env = fake_installed_distribution(tmp_path / "site", "broken-dist", "broken_ep", "raise ImportError('missing dep')\n")
    listed = plugin_list(env=env)
    assert listed["broken_ep"]["distribution"] == "broken-dist"
    assert listed["broken_ep"]["status"] == "broken"
    assert "missing dep" in listed["broken_ep"]["errors"][0]
    assert run_cli("schedules", "list", env=env).returncode == 0


def test_accessors_list_available_names_on_a_miss():
    with pytest.raises(UnknownNameError, match=r"unknown sampler 'nope'; available: .*ddim.*ddpm"):
        plugins.get_sampler("nope")
    with pytest.raises(UnknownNameError, match="unknown schedule 'nope'; available: cosine"):
        get_schedule("nope", 10)
    with pytest.raises(UnknownNameError, match="unknown conditioner 'nope'; available: class, clip, none"):
        plugins.get_conditioner("nope")
    assert plugins.get_sampler("ddim").name == "ddim"


def test_registry_collects_from_a_plugins_dir_in_process(tmp_path):
    write(tmp_path, "constant.py", GOOD_PLUGIN)
    reg = plugins.Registry(plugins_dir=tmp_path, load=[]).discover()
    assert reg.owner("schedules", "folder-constant") == "constant"
    assert "testplugin-constant" not in reg.names("schedules")  # load=[]: no third-party entry points
    with pytest.raises(PluginError, match="does not exist"):
        plugins.Registry(plugins_dir=tmp_path / "missing").discover()


def test_help_does_not_import_torch():
    code = ("import sys\nfrom minidiff_cli.cli.app import main\n"
            "for args in (['--help'], ['generate', '--help'], ['train', '--help'], ['schedules', '--help']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_plugins_dir_flag_plugins_can_add_commands(tmp_path):
    folder = tmp_path / "plugs"
    write(folder, "cmd.py", '''
        from minidiff_cli import hookimpl

        @hookimpl
        def register_commands(cli):
            @cli.command("folder-hello")
            def hello():
                print("hello from the plugins folder")
    ''')
    for args in (("--plugins-dir", f"{folder}/"), (f"--plugins-dir={folder}",)):
        result = run_cli(*args, "folder-hello")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "hello from the plugins folder"
        assert result.stderr == ""


# -- plugins that return garbage -----------------------------------------------------------------------
GARBAGE_REGISTRATIONS = '''
from minidiff_cli import hookimpl


def fine(num_timesteps):
    import torch
    return torch.full((num_timesteps,), 0.01, dtype=torch.float64)


class NoSteps:
    name = "g-no-steps"
    def sample(self, *args, **kwargs):
        raise AssertionError


class ZeroSteps(NoSteps):
    name = "g-zero-steps"
    default_steps = 0


class Good(NoSteps):
    name = "g-good"
    default_steps = 3


@hookimpl
def register_schedules(register):
    register("g-not-callable", 42)
    register("", fine)
    register(None, fine)
    register("two\\nlines", fine)
    register("g-one-argument")
    register("g-fine", fine)


@hookimpl
def register_samplers(register):
    register(NoSteps())
    register(ZeroSteps())
    register("g-named", Good())
    register(object())
    register(Good())


@hookimpl
def register_datasets(register):
    register("g-data", "not a factory")


@hookimpl
def register_conditioners(register):
    register("g-conditioner", 3.5)
'''


@pytest.mark.hostile
def test_garbage_registrations_are_recorded_one_line_each_and_the_rest_registers(tmp_path):
    (tmp_path / "garbage.py").write_text(GARBAGE_REGISTRATIONS)
    warnings: list[str] = []
    reg = plugins.Registry(plugins_dir=tmp_path, load=[], warn=warnings.append).discover()
    info = reg.plugins["garbage"]
    assert info.registered == {"schedules": ["g-fine"], "samplers": ["g-good"]}
    errors = "\n".join(info.errors)
    for fragment in ("schedule 'g-not-callable' was registered with int, which cannot be called",
                     "needs a name (a short printable string) and a value (got 2 argument(s))",
                     "(got 1 argument(s))", "sampler 'g-no-steps' needs a 'default_steps' of at least 1 (got None)",
                     "sampler 'g-zero-steps' needs a 'default_steps' of at least 1 (got 0)",
                     "register(sampler) needs one object", "dataset 'g-data' was registered with str",
                     "conditioner 'g-conditioner' was registered with float"):
        assert fragment in errors, fragment
    assert len(info.errors) == 11 and len(warnings) == 11
    assert all("\n" not in w and w.startswith("plugin 'garbage' ") for w in warnings)
    assert reg.get("schedules", "g-fine")(4).tolist() == [0.01] * 4
    assert "ddim" in reg.names("samplers")  # the built-ins are untouched


@pytest.mark.hostile
def test_strict_mode_refuses_garbage_registrations_naming_the_plugin(tmp_path, plugin_dir, monkeypatch):
    (tmp_path / "garbage.py").write_text(GARBAGE_REGISTRATIONS)
    with pytest.raises(PluginError) as caught:
        plugins.Registry(plugins_dir=tmp_path, load=[], strict=True).discover()
    assert "plugin 'garbage'" in str(caught.value) and "MINIDIFF_STRICT_PLUGINS" in str(caught.value)

    (plugin_dir / "garbage.py").write_text(GARBAGE_REGISTRATIONS)
    monkeypatch.setenv("MINIDIFF_STRICT_PLUGINS", "1")
    plugins.reset()
    assert_error(cli("schedules", "list"), "plugin 'garbage'", "MINIDIFF_STRICT_PLUGINS is set")
    monkeypatch.delenv("MINIDIFF_STRICT_PLUGINS")
    plugins.reset()
    code, out, err = cli("schedules", "show", "g-fine", "-T", "4", "--json")
    assert code == 0 and json.loads(out)["betas"] == [0.01] * 4
    assert err.count("plugin 'garbage'") == 11  # one warning line per garbage registration


@pytest.mark.hostile
def test_register_with_keywords_is_reported_as_a_hook_failure(tmp_path):
    (tmp_path / "keywords.py").write_text(textwrap.dedent('''
        from minidiff_cli import hookimpl

        @hookimpl
        def register_schedules(register):
            register(name="k", fn=len)
    '''))
    reg = plugins.Registry(plugins_dir=tmp_path, load=[], warn=lambda m: None).discover()
    [error] = reg.plugins["keywords"].errors
    assert error.startswith("failed in register_schedules: TypeError: ")
    assert error.endswith("register() got an unexpected keyword argument 'name'")


GARBAGE_SCHEDULES = '''
import torch
from minidiff_cli import hookimpl


def short(num_timesteps):
    return torch.full((num_timesteps - 1,), 0.01, dtype=torch.float64)


def nan(num_timesteps):
    betas = torch.full((num_timesteps,), 0.01, dtype=torch.float64)
    betas[3] = float("nan")
    return betas


def too_big(num_timesteps):
    return torch.full((num_timesteps,), 1.5)


def text(num_timesteps):
    return "not betas"


def none(num_timesteps):
    return None


def matrix(num_timesteps):
    return torch.full((num_timesteps, 2), 0.01)


def boom(num_timesteps):
    raise RuntimeError("schedule exploded\\nsecond line")


@hookimpl
def register_schedules(register):
    for fn in (short, nan, too_big, text, none, matrix, boom):
        register(f"bad-{fn.__name__.replace('_', '-')}", fn)
'''

SCHEDULE_GARBAGE = [
    ("bad-short", "returned 999 betas for 1000 timesteps"),
    ("bad-nan", "returned unusable betas: betas must be finite"),
    ("bad-too-big", "returned unusable betas: every beta must lie in (0, 0.999]"),
    ("bad-text", "returned unusable betas: betas must be"),
    ("bad-none", "returned unusable betas: betas must be"),
    ("bad-matrix", "returned unusable betas: betas must be 1-D"),
    ("bad-boom", "failed: RuntimeError: schedule exploded"),
]


@pytest.mark.hostile
@pytest.mark.parametrize("name, message", SCHEDULE_GARBAGE, ids=[n for n, _ in SCHEDULE_GARBAGE])
def test_schedule_returning_garbage_is_an_error_naming_the_plugin_when_used(plugin_dir, tmp_path, toml, name,
                                                                             message):
    (plugin_dir / "garbage_schedules.py").write_text(GARBAGE_SCHEDULES)
    who = f"schedule '{name}' (plugin 'garbage_schedules')"
    with pytest.raises(PluginError) as caught:
        get_schedule(name, 1000)
    assert who in str(caught.value) and message in str(caught.value)
    assert_error(cli("schedules", "show", name), who, message)
    out = tmp_path / "run"
    assert_error(cli("train", *TINY_TRAIN, "--config", toml, "--out", out, "--schedule", name, "--timesteps", "1000",
                     "--max-steps", "1"), who)
    assert not out.exists()
    code, listing, err = cli("schedules", "list")  # every other schedule still shows
    assert code == 0 and "cosine" in listing and err == ""


GARBAGE_SAMPLERS = '''
import torch
from minidiff_cli import hookimpl


class Garbage:
    default_steps = 2

    def __init__(self, kind):
        self.kind = kind
        self.name = f"bad-{kind}"

    def sample(self, denoiser, x, schedule, steps, *, generator=None, callback=None, **opts):
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        if self.kind == "model":
            return denoiser(x[:, :1], t)  # one channel where the model takes three
        denoiser(x, t)
        if self.kind == "shape":
            return x[:, :1]
        if self.kind == "nan":
            return torch.full_like(x, float("nan"))
        if self.kind == "inf":
            return torch.full_like(x, float("inf"))
        if self.kind == "none":
            return None
        if self.kind == "list":
            return x.tolist()
        if self.kind == "int":
            return x.long()
        if self.kind == "raise":
            raise ValueError("garbage in the sampler\\nsecond line")


@hookimpl
def register_samplers(register):
    for kind in ("model", "shape", "nan", "inf", "none", "list", "int", "raise"):
        register(Garbage(kind))
'''

SAMPLER_GARBAGE = [
    ("bad-shape", "returned a tensor of shape (1, 1, 8, 8), expected (1, 3, 8, 8)"),
    ("bad-nan", "returned NaN or infinite values"),
    ("bad-inf", "returned NaN or infinite values"),
    ("bad-none", "returned NoneType, not a tensor of shape (1, 3, 8, 8)"),
    ("bad-list", "returned list, not a tensor"),
    ("bad-int", "returned a torch.int64 tensor, not floats"),
    ("bad-raise", "failed: ValueError: garbage in the sampler"),
    ("bad-model", "failed in the model it called: ValueError: x must be [B, 3, H, W]"),
]


@pytest.mark.hostile
@pytest.mark.parametrize("name, message", SAMPLER_GARBAGE, ids=[n for n, _ in SAMPLER_GARBAGE])
def test_sampler_returning_garbage_is_an_error_naming_its_plugin_and_the_rest_works(plugin_dir, tmp_path, tiny,
                                                                                     name, message):
    (plugin_dir / "garbage_samplers.py").write_text(GARBAGE_SAMPLERS)
    who = f"sampler '{name}' (plugin 'garbage_samplers')"
    out = tmp_path / "out"
    assert_error(cli("generate", "red circle", "--model", tiny, "--sampler", name, "-o", out, "-q"), who, message)
    assert files_in(out) == []
    pipe = Pipeline.load(tiny, device="cpu")
    with pytest.raises(PluginError) as caught:
        pipe.generate("red circle", steps=2, sampler=name)
    assert who in str(caught.value) and message in str(caught.value) and "\n" not in str(caught.value)
    code, printed, err = cli("generate", "red circle", "--model", tiny, "--steps", "2", "-o", out, "-q")
    assert code == 0 and printed.split() == [str(out / "minidiff-00000.png")], err


@pytest.mark.hostile
def test_debug_shows_the_samplers_own_traceback(plugin_dir, tmp_path, tiny):
    (plugin_dir / "garbage_samplers.py").write_text(GARBAGE_SAMPLERS)
    with pytest.raises(PluginError) as caught:
        main(["--debug", "generate", "red circle", "--model", str(tiny), "--sampler", "bad-raise",
              "-o", str(tmp_path / "o"), "-q"])
    assert isinstance(caught.value.__cause__, ValueError)


# -- plugins are contained ----------------------------------------------------------------------
PLUGINS = {
    "exits": "import sys\nsys.exit(0)\n",
    "interrupts": ("import minidiff_cli\n\n@minidiff_cli.hookimpl\ndef register_schedules(register):\n"
                   "    raise KeyboardInterrupt\n"),
    "chatty": "print('hello from a plugin')\n",
    "base": "class Odd(BaseException):\n    pass\n\nraise Odd('odd')\n",
}


@pytest.mark.hostile
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


@pytest.mark.hostile
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


@pytest.mark.hostile
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


@pytest.mark.hostile
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


@pytest.mark.hostile
def test_plugins_failing_at_use_are_one_line_errors_naming_them(plugin_dir, tmp_path, toml):
    (plugin_dir / "usetime.py").write_text(USE_TIME)
    model = tmp_path / "tiny.safetensors"
    tiny_model("class").save(model)
    generate = ["generate", CLASS_NAMES[0], "--model", model, "--quiet", "-o", tmp_path / "out", "--sampler"]
    # the sampler runs (50 U-Net calls) before its answer can be checked: not a refusal, so not counted
    assert_error(run_in_process(*generate, "half"), "sampler 'half' (plugin 'usetime') returned a torch.float16 tensor",
                 "expected torch.float32")
    assert_error(timed_cli(*generate, "quitter"), "plugin 'usetime' failed: SystemExit")
    run = ["train", *TINY_TRAIN, "--config", toml, "--max-steps", "1", "--out", tmp_path / "run"]
    assert_error(timed_cli(*run, "--data", "broken", "--conditioner", "class"),
                 "plugin 'usetime' failed: ValueError: cannot open the data")
    assert_error(timed_cli(*run, "--data", "shapes", "--conditioner", "brokenc"), "plugin 'usetime' failed: KeyError")
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()

"""Plugin discovery: installed entry points, plugin folders, clashes, broken plugins."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from minidiff_cli import plugins
from minidiff_cli.diffusion.schedule import get_schedule
from minidiff_cli.errors import PluginError, UnknownNameError

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
    assert listed["minidiff.samplers"]["registered"]["samplers"] == ["ddpm", "ddim"]


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

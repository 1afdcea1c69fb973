"""examples/hello_plugin, pip-installed as a user would, is found through its entry point.

It is installed into a temporary folder (pip --target) that only the minidiff subprocess
sees on PYTHONPATH, so the test leaves this environment as it found it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT, run_cli


def test_the_hello_plugin_installs_and_registers_its_schedule(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT / "examples" / "hello_plugin", source)  # the build writes beside its sources
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "-q", "--target", str(site), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}

    listed = {p["name"]: p for p in json.loads(run_cli("plugins", "--json", env=env).stdout)}
    hello = listed["hello"]
    assert hello["distribution"] == "minidiff-hello" and hello["version"] == "0.1.0"
    assert hello["status"] == "ok" and hello["registered"] == {"schedules": ["sqrt"]}

    shown = run_cli("schedules", "show", "sqrt", "--timesteps", "10", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    betas = json.loads(shown.stdout)["betas"]
    # alpha_bar(t) = 1 - sqrt(t/T + s): beta_0 = 1 - (1 - sqrt(0.1001)) / (1 - sqrt(0.0001))
    assert len(betas) == 10 and abs(betas[0] - (1 - (1 - 0.1001 ** 0.5) / 0.99)) < 1e-9
    assert betas[-1] == 0.999
    assert "hello" not in {p["name"] for p in json.loads(run_cli("plugins", "--json").stdout)}

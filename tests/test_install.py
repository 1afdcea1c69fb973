"""The README's install: the command CI runs verbatim, preceded by how to get torch's CPU build, which the pins allow."""

from __future__ import annotations

import re

from conftest import ROOT


def test_the_readme_says_how_to_install_the_cpu_build_of_torch_first():
    text = (ROOT / "README.md").read_text()
    install = text.index('pip install -e . ./plugins/* && minidiff generate "a red circle" --steps 50 --cfg 3')
    cpu = text.find("pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu")
    assert 0 <= cpu < install
    assert text.count("download.pytorch.org") == 1  # named once, nowhere else


def test_the_pins_accept_a_cpu_build_of_torch():
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), flags=re.S | re.M)
    deps = re.findall(r'^\s*"([^"]+)"', block.group(1), flags=re.M)
    for name in ("torch", "torchvision"):
        (pin,) = [d for d in deps if re.match(rf"{name}\s*[<>=!~ ]", d)]
        assert "+cu" not in pin and "nvidia" not in pin and "<" not in pin, pin  # 2.x+cpu satisfies >=
    assert not any(d.lower().startswith("nvidia-") for d in deps)

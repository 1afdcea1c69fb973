"""The package's shape: its layers (import-linter's contract in pyproject.toml), no cycle between its
top-level units, at most 16 of them, no module over 500 lines, and the old import paths plugins use."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minidiff_cli"
MAX_UNITS = 16
MAX_LINES = 500


def top_level_units() -> list[str]:
    """Modules and subpackages directly in minidiff_cli (the package's own __init__ is not one)."""
    units = []
    for entry in PACKAGE.iterdir():
        if entry.suffix == ".py" and entry.name != "__init__.py":
            units.append(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            units.append(entry.name)
    return sorted(units)


def unit_graph() -> dict[str, set[str]]:
    """unit -> the units it imports, from every import statement (function-level ones too)."""
    graph = grimp.build_graph("minidiff_cli", cache_dir=None)
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        parts = module.split(".")
        if len(parts) < 2:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            target = imported.split(".")
            if len(target) >= 2 and target[1] != parts[1]:
                edges.setdefault(parts[1], set()).add(target[1])
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path a -> ... -> a, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_at_most_16_top_level_units():
    units = top_level_units()
    assert len(units) <= MAX_UNITS, f"{len(units)} top-level units: {units}"


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long


def test_no_import_cycle_between_top_level_units():
    assert find_cycle(unit_graph()) is None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_nothing_below_the_cli_imports_it():
    edges = unit_graph()
    assert [unit for unit, targets in edges.items() if "cli" in targets and unit != "__main__"] == []


def lint_imports() -> list[str]:
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: pip install -e '.[test]' installs import-linter")
    return [exe]


def test_the_layers_contract_is_kept():
    result = subprocess.run(lint_imports() + ["--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_the_layers_contract_catches_an_upward_import(tmp_path):
    """The contract is not vacuous: a copy of the package where the data layer imports the CLI fails."""
    shutil.copytree(PACKAGE, tmp_path / "minidiff_cli", ignore=shutil.ignore_patterns("models", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "minidiff_cli" / "data" / "images.py", "a", encoding="utf-8") as fh:
        fh.write("\n\ndef _upward():\n    from minidiff_cli.cli.app import app\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(lint_imports() + ["--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "minidiff_cli.data.images -> minidiff_cli.cli.app" in result.stdout


@pytest.mark.parametrize("old, new", [
    ("minidiff_cli.sampling", "minidiff_cli.diffusion.sampling"),
    ("minidiff_cli.conditioning", "minidiff_cli.diffusion.conditioning"),
    ("minidiff_cli.hookspecs", "minidiff_cli.plugins.hookspecs"),
    ("minidiff_cli.schedule", "minidiff_cli.diffusion.schedule"),
])
def test_old_plugin_import_paths_still_work(old, new):
    """Plugins written before the regrouping import these paths; each is the moved module itself."""
    code = (f"import importlib; old = importlib.import_module({old!r}); new = importlib.import_module({new!r}); "
            "assert old is new and new.__spec__.name == new.__name__ == "
            f"{new!r}; from minidiff_cli.plugins import get_schedule, get_sampler; "
            "from minidiff_cli.data import check_dataset; print(get_schedule('cosine', 10).num_timesteps)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "10"

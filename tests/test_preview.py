"""The terminal preview of `minidiff generate` (and `noise`): tiled to fit, and off without colour."""

from __future__ import annotations

import os
import pty
import subprocess

import pytest
from conftest import cli_command

from minidiff_cli.cli.display import preview_layout

BLOCK = "\u2580"


def run_in_terminal(*args: str, cwd, columns: int = 80, lines: int = 40, **env: str) -> tuple[int, str]:
    """Run the console script with stdout on a pseudo-terminal of the given size; (exit code, stdout)."""
    leader, follower = pty.openpty()
    full_env = {**{k: v for k, v in os.environ.items() if k != "NO_COLOR"},
                "COLUMNS": str(columns), "LINES": str(lines), "TERM": "xterm-256color", **env}
    proc = subprocess.Popen([*cli_command(), *args], stdout=follower, stderr=subprocess.DEVNULL, cwd=cwd,
                            env=full_env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode("utf-8", "replace")


def picture_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if BLOCK in line]


def test_layout_tiles_what_fits_and_counts_the_rest():
    # 32 px tiles are 32 columns and 16 lines (+1 gap): 2 per row in 80 columns, 2 rows in 40 lines.
    assert preview_layout(16, 32, width=80, height=40) == (32, 2, 4)
    assert preview_layout(16, 32, width=200, height=60) == (32, 5, 15)
    assert preview_layout(3, 32, width=200, height=60) == (32, 3, 3)
    assert preview_layout(1, 64, width=40, height=10) == (40, 1, 1)  # wider than the terminal: scaled down


def test_sixteen_images_are_tiled_to_the_terminal_and_the_rest_counted(tmp_path):
    code, out = run_in_terminal("generate", "a red circle", "-n", "16", "--steps", "1", "-o", "out",
                                cwd=tmp_path, columns=80, lines=40)
    assert code == 0, out
    pictures = picture_lines(out)
    assert len(pictures) == 2 * 16  # two rows of 32 px tiles, 16 lines each (was 16 x 16 = 256 lines)
    assert all(line.count(BLOCK) == 32 + 2 + 32 for line in pictures)  # two tiles and the gap: 66 <= 80
    assert "12 more image(s) not shown; the terminal fits 4" in out
    assert len(list((tmp_path / "out").glob("minidiff-*.png"))) == 16


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {"TERM": "dumb"}], ids=["NO_COLOR", "TERM=dumb"])
def test_no_colour_means_no_picture(tmp_path, env):
    code, out = run_in_terminal("generate", "a red circle", "--steps", "1", "-o", "out", cwd=tmp_path, **env)
    assert code == 0 and BLOCK not in out
    assert "out/minidiff-00000.png" in out  # the path is still printed
    code, out = run_in_terminal("noise", str(next((tmp_path / "out").glob("*.png"))), "-o", "noise.png",
                                cwd=tmp_path, **env)
    assert code == 0 and BLOCK not in out and (tmp_path / "noise.png").is_file()

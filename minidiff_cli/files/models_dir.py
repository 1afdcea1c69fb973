"""Where model files live, and how a ``--model`` value becomes a file.

``--model`` takes a path to a ``.safetensors`` file, or the name of a model in
the shipped folder (inside the package) or in the user's model folder
(``$MINIDIFF_MODELS_DIR``, else ``$XDG_DATA_HOME/minidiff/models``, else
``~/.local/share/minidiff/models``), or a run folder of ``minidiff train``
(``runs/NAME``, which holds ``model.safetensors``).
"""

from __future__ import annotations

import os
from pathlib import Path

from minidiff_cli.errors import MinidiffError, UnknownNameError

SHIPPED_DIR = Path(__file__).parent.parent / "models"  # minidiff_cli/models
DEFAULT_MODEL = "shapes-clip"
RUNS_DIR = Path("runs")  # where the README's `minidiff train --out runs/NAME` puts runs, from the current folder
RUN_MODEL = "model.safetensors"  # the file a run folder exports (training.MODEL)


def user_dir() -> Path:
    if os.environ.get("MINIDIFF_MODELS_DIR"):
        return Path(os.environ["MINIDIFF_MODELS_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "minidiff" / "models"


def list_models() -> list[tuple[str, Path, str]]:
    """(name, path, where) for every model file found: shipped, user, then run folders.

    A run's name is its folder (``runs/shapes``), which ``--model`` takes as a path.
    """
    found = []
    for folder, where in ((SHIPPED_DIR, "shipped"), (user_dir(), "user")):
        if folder.is_dir():
            found += [(p.stem, p, where) for p in sorted(folder.glob("*.safetensors"))]
    if RUNS_DIR.is_dir():
        found += [(str(p.parent), p, "run") for p in sorted(RUNS_DIR.glob(f"*/{RUN_MODEL}")) if p.is_file()]
    return found


def resolve_model(model: str | os.PathLike | None, *, installed_only: bool = False) -> Path:
    """The file for a model name or path; ``None`` is the shipped default.

    ``installed_only``: a name from a file (a PNG's model), looked up among the shipped and user
    models alone, never as a path, so a file named like it in the working directory is not used.
    """
    name = DEFAULT_MODEL if model is None else str(model)
    path = Path(name).expanduser()
    if not installed_only:
        if path.is_dir():
            if (path / RUN_MODEL).is_file():
                return path / RUN_MODEL  # a run folder
            raise MinidiffError(f"'{name}' is a folder without {RUN_MODEL}: give a model's .safetensors file, "
                                "a run folder of `minidiff train`, or a model name (`minidiff models` lists them)")
        if path.suffix == ".safetensors" or os.sep in name or path.exists():
            return path  # a path: files/model_file.py reports a missing or broken file
    for stem, found, where in list_models():
        if stem == name and (where != "run" or not installed_only):
            return found
    names = ", ".join(stem for stem, _, _ in list_models()) or "none installed"
    if model is None:
        raise UnknownNameError(f"the default model '{DEFAULT_MODEL}' is not installed; "
                               f"pass --model FILE.safetensors (models found: {names})")
    raise UnknownNameError(f"unknown model '{name}'; pass a .safetensors path or one of: {names}")

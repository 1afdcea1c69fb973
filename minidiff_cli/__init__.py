"""minidiff: train and sample small diffusion models.

Importing this package is cheap: torch is only imported when a name that needs
it is first used, so ``minidiff --help`` stays instant.

The package is grouped by role (docs/design.md has the map). Modules that plugins and
scripts imported before that regrouping keep their old paths (``minidiff_cli.sampling``
is ``minidiff_cli.diffusion.sampling``, the same module object), through ``_MovedModules``.
"""

import importlib
import importlib.machinery
import sys

from minidiff_cli.plugins.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "sample", "Pipeline", "NoiseSchedule", "__version__"]

_LAZY = {
    "sample": ("minidiff_cli.diffusion.sampling", "sample"),
    "Pipeline": ("minidiff_cli.inference.pipeline", "Pipeline"),
    "NoiseSchedule": ("minidiff_cli.diffusion.schedule", "NoiseSchedule"),
}

# Old module paths a plugin or a script may import -> where the module lives now.
MOVED = {
    "minidiff_cli.sampling": "minidiff_cli.diffusion.sampling",
    "minidiff_cli.schedule": "minidiff_cli.diffusion.schedule",
    "minidiff_cli.conditioning": "minidiff_cli.diffusion.conditioning",
    "minidiff_cli.guidance": "minidiff_cli.diffusion.guidance",
    "minidiff_cli.model": "minidiff_cli.diffusion.model",
    "minidiff_cli.unet": "minidiff_cli.nets.unet",
    "minidiff_cli.pipeline": "minidiff_cli.inference.pipeline",
    "minidiff_cli.hookspecs": "minidiff_cli.plugins.hookspecs",
}


class _MovedModules:
    """Answers an import of an old path with the module at its new path (imported on first use).

    A meta path finder and loader by protocol (importlib.abc would cost ``--help`` 17 ms to import)."""

    def __init__(self):
        self.specs = {}

    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self.specs[spec.name] = module.__spec__  # importlib gives the module the alias's spec next
        return module

    def exec_module(self, module):
        module.__spec__ = self.specs[module.__spec__.name]  # so it keeps its own name, file and spec


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'minidiff_cli' has no attribute {name!r}")

"""minidiff: train and sample small diffusion models.

Importing this package is cheap: torch is only imported when a name that needs
it is first used, so ``minidiff --help`` stays instant.
"""

from minidiff_cli.plugins.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "sample", "Pipeline", "NoiseSchedule", "__version__"]

_LAZY = {
    "sample": ("minidiff_cli.diffusion.sampling", "sample"),
    "Pipeline": ("minidiff_cli.inference.pipeline", "Pipeline"),
    "NoiseSchedule": ("minidiff_cli.diffusion.schedule", "NoiseSchedule"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'minidiff_cli' has no attribute {name!r}")

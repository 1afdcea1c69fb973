"""The plugin contract and the registry that collects what plugins register.

    hookspecs.py  the five hooks a plugin implements (``hookimpl`` marks them)
    registry.py   discovery through entry points and a plugins folder; lookups by name
    guard.py      runs plugin code so that its exit, prints and hangs stay contained

Imports only ``minidiff_cli.errors``: every other layer may use plugins, plugins use no
layer. The lookups most code needs are re-exported here (``plugins.get_sampler(name)``).
``get_schedule`` lives with the schedules (``minidiff_cli.diffusion.schedule``); the old
path ``minidiff_cli.plugins.get_schedule`` still works for plugins written before the move.
"""

from minidiff_cli.plugins.hookspecs import hookimpl
from minidiff_cli.plugins.registry import (
    PluginInfo,
    Registry,
    get_conditioner,
    get_dataset,
    get_sampler,
    registry,
    reset,
)

__all__ = ["hookimpl", "PluginInfo", "Registry", "get_conditioner", "get_dataset", "get_sampler",
           "registry", "reset"]


def __getattr__(name):
    if name == "get_schedule":  # moved to diffusion.schedule; kept for plugins that import it from here
        import importlib

        return importlib.import_module("minidiff_cli.diffusion.schedule").get_schedule
    raise AttributeError(f"module 'minidiff_cli.plugins' has no attribute {name!r}")

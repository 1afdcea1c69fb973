"""The whole plugin contract: five hooks, each handed a ``register`` callable.

A plugin is a module with functions named like these hooks, decorated with
``minidiff_cli.hookimpl``. It may implement any subset of them.
"""

import pluggy

hookspec = pluggy.HookspecMarker("minidiff")
hookimpl = pluggy.HookimplMarker("minidiff")


@hookspec
def register_schedules(register):
    """Register noise schedules: ``register(name, fn)``, ``fn(num_timesteps, **opts) -> betas`` (float64, length T)."""


@hookspec
def register_samplers(register):
    """Register samplers: ``register(sampler)``; see ``minidiff_cli.diffusion.sampling.Sampler``.

    A sampler that image-to-image and inpainting can use also follows
    ``minidiff_cli.diffusion.sampling.PartialSampler``: ``noise_levels(schedule, steps, **opts)`` gives
    alpha_bar along its grid, and ``sample(..., start=i, stop=j)`` takes steps i..j-1 of it from
    x noised to level i. Without them, --init-image and --mask refuse it by name.
    """


@hookspec
def register_conditioners(register):
    """Register conditioners: ``register(name, cls)``; see ``minidiff_cli.diffusion.conditioning.Conditioner``."""


@hookspec
def register_datasets(register):
    """Register training data sets: ``register(name, factory)``; see ``minidiff_cli.data.dataset``."""


@hookspec
def register_commands(cli):
    """Add commands to the Typer app ``cli``."""

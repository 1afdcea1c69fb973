"""minidiff-solvers: DPM-Solver++(2M), Euler, Heun and Euler ancestral samplers for minidiff.

This module is the entry point (group ``minidiff``); it imports no torch, so loading the
plugin leaves ``minidiff --help`` fast. See README.md for the samplers and their options.
"""

from minidiff_cli import hookimpl

__version__ = "0.1.0"


@hookimpl
def register_samplers(register):
    from minidiff_solvers.samplers import SAMPLERS

    for sampler in SAMPLERS:
        register(sampler())

"""The Typer app: global options, command registration, and one-line errors.

Command modules are imported here, but each imports torch only inside its
functions, so ``minidiff --help`` never pays for torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

try:  # newer Typer releases carry their own copy of Click
    from typer._click import exceptions as click_errors
except ImportError:  # older ones use the click package
    from click import exceptions as click_errors

from minidiff_cli import __version__
from minidiff_cli.errors import MinidiffError, first_line

app = typer.Typer(
    name="minidiff",
    help="Train and sample small diffusion models.\n\n"
         "Examples:\n\n"
         "  minidiff generate \"a red circle\" --steps 50 --cfg 3\n\n"
         "  minidiff schedules plot -o schedules.png\n\n"
         "  minidiff plugins",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"minidiff {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    plugins_dir: Optional[Path] = typer.Option(
        None, "--plugins-dir", envvar="MINIDIFF_PLUGINS_DIR",
        help="Also load every .py file in this folder as a plugin."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    from minidiff_cli import plugins
    from minidiff_cli.runtime.allocator import keep_freed_memory

    keep_freed_memory()  # a command is about to run: reuse freed tensor memory (see allocator.py)
    if plugins_dir is not None:
        if not plugins_dir.is_dir():
            raise MinidiffError(f"plugins folder '{plugins_dir}' does not exist; "
                                "pass an existing folder to --plugins-dir")
        if os.environ.get("MINIDIFF_PLUGINS_DIR") != str(plugins_dir):  # from the flag, not the variable
            os.environ["MINIDIFF_PLUGINS_DIR"] = str(plugins_dir)
            plugins.reset()  # else the registry would load (and warn about) the same plugins twice


# Each module adds its commands to ``app`` when imported.
COMMAND_MODULES = ("generate", "train", "distill", "eval", "info", "models", "schedules", "clip", "vae", "plugins_cmd",
                   "noise", "explain", "serve")


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"minidiff_cli.cli.{name}")


def _add_plugin_commands() -> None:
    """Plugins may add commands; a broken one is reported, never fatal."""
    from minidiff_cli import plugins

    plugins.registry().add_commands(app)  # a MinidiffError (strict mode) is one line in main()


def _early_plugins_dir(args: list[str]) -> None:
    """Honour --plugins-dir before the commands are built, so its plugins can add commands.

    The global options come before the command name; the option callback still checks
    the folder and reports a missing one.
    """
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            return  # the command name: global options end here
        value = arg.split("=", 1)[1] if arg.startswith("--plugins-dir=") else (
            args[i + 1] if arg == "--plugins-dir" and i + 1 < len(args) else None)
        if value is not None:
            if Path(value).is_dir():
                os.environ["MINIDIFF_PLUGINS_DIR"] = str(Path(value))
            return


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: success, or one line on stderr and exit code 2 (130 for Ctrl-C).

    ``--debug`` lets errors through with their tracebacks. Anything else that escapes
    is a bug in minidiff or a plugin, and shows its traceback.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    try:
        _register_commands()
        # Plugin commands need the registry; skip it for bare help and --version so they stay instant.
        if args and args[0] not in ("--help", "-h", "--version"):
            _early_plugins_dir(args)
            _add_plugin_commands()
        result = app(args=args, prog_name="minidiff", standalone_mode=False)
        # Typer (not in standalone mode) returns the code of a typer.Exit, and turns Ctrl-C into Exit(130).
        code = result if isinstance(result, int) and not isinstance(result, bool) else 0
        if code == 130:
            _error("Interrupted; nothing half-written was left behind.", code=130, prefix="")
        if code:
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # Click turns Ctrl-C into Abort
        if debug:
            raise
        _error("Interrupted; nothing half-written was left behind.", code=130, prefix="")
    except click_errors.UsageError as exc:
        # One line, like every other error; --help shows the usage.
        where = f"minidiff {exc.ctx.command_path.split(' ', 1)[1]}" if exc.ctx and " " in exc.ctx.command_path else "minidiff"
        _error(f"{exc.format_message()} (see: {where} --help)", code=exc.exit_code)
    except click_errors.ClickException as exc:
        _error(exc.format_message(), code=exc.exit_code)
    except MinidiffError as exc:
        if debug:
            raise
        _error(str(exc))
    except BrokenPipeError:  # stdout closed early, as by `| head`: not an error worth a message
        _quiet_stdout()
        sys.exit(1)
    except OSError as exc:  # disk full, permission denied, ...: the user's to fix, not a bug
        if debug:
            raise
        where = f" ('{exc.filename}')" if exc.filename else ""
        _error(f"{exc.strerror or exc}{where}")
    except MemoryError:
        if debug:
            raise
        _error("out of memory; use fewer or smaller images (e.g. --num-images, --batch-size)")
    except (Exception, SystemExit) as exc:  # a plugin's code failing at use is the plugin's fault, in one line
        plugin = None if debug else _plugin_of(exc)
        if plugin is None:
            raise  # minidiff's own bug (or a plain exit): the traceback is what helps
        _error(f"plugin '{plugin}' failed: {type(exc).__name__}: {first_line(exc)}")


def _plugin_of(exc: BaseException) -> str | None:
    from minidiff_cli.plugins.registry import loaded_plugin_of

    return loaded_plugin_of(exc)


def _error(message: str, code: int = 2, prefix: str = "Error: ") -> None:
    """Print ``Error: message`` as exactly one line on stderr and exit."""
    from minidiff_cli.inference.infotext import printable

    text = str(message)
    cut = text.find("Exception raised from ")  # torch's C++ context: kilobytes of stack after the message
    text = text[:cut] if cut > 0 else text
    line = printable(" ".join(text.split())) or "unknown error"  # a file's escapes never reach the terminal raw
    print(f"{prefix}{line}", file=sys.stderr)
    sys.exit(code)


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass

"""The plugin manager: finds plugins, collects what they register, isolates the broken.

Plugins come from two places, in this order:

1. installed distributions with an entry point in group ``minidiff`` (the built-ins
   register there too, from this distribution);
2. ``.py`` files in a plugins folder (``--plugins-dir`` or ``MINIDIFF_PLUGINS_DIR``).

``MINIDIFF_LOAD_PLUGINS=a,b`` restricts which third-party entry points load (the
built-ins always do). A plugin that fails to import or to register is recorded with
the reason, reported once as a one-line warning, and everything else keeps working;
``MINIDIFF_STRICT_PLUGINS=1`` turns such reports into errors, for plugin authors.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pluggy

from minidiff_cli.errors import PluginError, UnknownNameError, first_line
from minidiff_cli.plugins import hookspecs
from minidiff_cli.plugins.guard import PluginCodeExit, plugin_code

ENTRY_POINT_GROUP = "minidiff"
CORE_DISTRIBUTION = "minidiff"
KINDS = ("schedules", "samplers", "conditioners", "datasets")
# The singular words used in messages, e.g. "unknown sampler 'x'".
SINGULAR = {"schedules": "schedule", "samplers": "sampler", "conditioners": "conditioner", "datasets": "dataset"}


@dataclass
class PluginInfo:
    """What ``minidiff plugins`` shows about one plugin."""

    name: str
    source: str  # "entry point" or the .py file's path
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "distribution": self.distribution,
            "version": self.version,
            "hooks": self.hooks,
            "registered": self.registered,
            "status": "ok" if self.ok else "broken",
            "errors": self.errors,
        }


@dataclass
class _Entry:
    value: Any
    plugin: str


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def failure_line(exc: BaseException) -> str:
    """One line naming what a plugin's code raised: the type, then its first line."""
    if isinstance(exc, PluginCodeExit):  # its text names the real exception already
        return first_line(exc)
    return f"{type(exc).__name__}: {first_line(exc)}".rstrip(": ")


def _is_name(value: Any) -> bool:
    """What users can type after --sampler or --schedule: a non-empty printable string, no outer spaces."""
    return isinstance(value, str) and 0 < len(value) <= 100 and value.isprintable() and value == value.strip()


def _registration_problem(kind: str, args: tuple) -> str | None:
    """Why a register(...) call breaks the contract of ``kind``, or None if it keeps it."""
    if kind == "samplers":
        sampler = args[0] if len(args) == 1 else None
        if sampler is None or not _is_name(getattr(sampler, "name", None)) \
                or not callable(getattr(sampler, "sample", None)):
            return "register(sampler) needs one object with a 'name' and a 'sample' method"
        steps = getattr(sampler, "default_steps", None)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            return f"sampler '{sampler.name}' needs a 'default_steps' of at least 1 (got {steps!r:.40})"
        return None
    if len(args) != 2 or not _is_name(args[0]):
        return (f"register(name, value) for {kind} needs a name (a short printable string) and a value "
                f"(got {len(args)} argument(s))")
    if not callable(args[1]):
        return f"{SINGULAR[kind]} '{args[0]}' was registered with {type(args[1]).__name__}, which cannot be called"
    return None


class Registry:
    """Everything the plugins registered, by kind and name, plus a record of each plugin."""

    def __init__(self, plugins_dir: str | os.PathLike | None = None, load: list[str] | None = None,
                 strict: bool = False, warn: Callable[[str], None] | None = None):
        self.plugins_dir = Path(plugins_dir) if plugins_dir else None
        self.load_only = load
        self.strict = strict
        self._warn = warn or (lambda message: print(f"minidiff: warning: {message}", file=sys.stderr))
        self.pm = pluggy.PluginManager("minidiff")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.entries: dict[str, dict[str, _Entry]] = {kind: {} for kind in KINDS}
        self._commands_added = False
        self.code_roots: dict[str, str] = {}  # plugin name -> the folder or file its code lives in

    # -- discovery ---------------------------------------------------------------
    def discover(self) -> "Registry":
        self._load_entry_points()
        if self.plugins_dir is not None:
            self._load_plugins_dir(self.plugins_dir)
        for kind in KINDS:
            self._collect(kind)
        return self

    def _load_entry_points(self) -> None:
        from importlib import metadata  # here, not at import: `minidiff --help` never discovers plugins

        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else None
            is_core = dist == CORE_DISTRIBUTION
            if self.load_only is not None and not is_core and not ({ep.name, dist} & set(self.load_only)):
                continue
            name = ep.name if not is_core else f"minidiff.{ep.name}"
            info = PluginInfo(name=name, source="entry point", distribution=dist,
                              version=ep.dist.version if ep.dist else None)
            self._register(info, ep.load)

    def _load_plugins_dir(self, folder: Path) -> None:
        if not folder.is_dir():
            raise PluginError(f"plugins folder '{folder}' does not exist; pass an existing folder to --plugins-dir")
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            info = PluginInfo(name=path.stem, source=str(path))
            self._register(info, lambda path=path: _import_file(path))

    def _register(self, info: PluginInfo, load_module: Callable[[], Any]) -> None:
        if info.name in self.plugins:
            info.name = f"{info.name}@{info.source}"
        self.plugins[info.name] = info
        try:
            with plugin_code(info.name):  # sys.exit, prints and hangs at import are contained (plugin_guard.py)
                module = load_module()
            self.pm.register(module, name=info.name)
        except Exception as exc:  # a broken plugin must not take the program down
            self._fail(info, f"failed to load: {failure_line(exc)}")
            return
        root = _code_root(module)
        if root and info.distribution != CORE_DISTRIBUTION:  # the built-ins are minidiff's own code
            self.code_roots[info.name] = root
        info.hooks = sorted(impl_name for impl_name in dir(module)
                            if impl_name.startswith("register_") and self._is_hookimpl(module, impl_name))

    def _is_hookimpl(self, module: Any, attr: str) -> bool:
        return hasattr(self.pm.hook, attr) and self.pm.parse_hookimpl_opts(module, attr) is not None

    def _fail(self, info: PluginInfo, message: str) -> None:
        message = " ".join(message.split())  # one line, whatever the plugin's message held
        info.errors.append(message)
        text = f"plugin '{info.name}' {message}"
        if self.strict:
            error = PluginError(text + " (MINIDIFF_STRICT_PLUGINS is set)")
            error.reported = True
            raise error
        self._warn(text)

    # -- collection --------------------------------------------------------------
    def _collect(self, kind: str) -> None:
        hook = getattr(self.pm.hook, f"register_{kind}")
        # get_hookimpls() lists plugins in registration order, so the first one discovered wins a clash.
        for impl in hook.get_hookimpls():
            info = self.plugins[impl.plugin_name]
            try:
                with plugin_code(info.name, f"register_{kind} of"):
                    impl.function(register=self._registrar(kind, info))
            except PluginError as exc:
                if getattr(exc, "reported", False):  # strict mode: _fail raised it, naming the plugin
                    raise
                self._fail(info, f"failed in register_{kind}: {first_line(exc)}")
            except Exception as exc:
                self._fail(info, f"failed in register_{kind}: {failure_line(exc)}")

    def _registrar(self, kind: str, info: PluginInfo) -> Callable[..., None]:
        def register(*args: Any) -> None:
            problem = _registration_problem(kind, args)
            if problem is not None:  # recorded; the rest of this plugin still loads
                self._fail(info, f"{problem} (in register_{kind})")
                return
            name, value = (args[0].name, args[0]) if kind == "samplers" else (args[0], args[1])
            taken = self.entries[kind].get(name)
            if taken is not None:  # the first one keeps the name; the rest of this plugin still loads
                self._fail(info, f"{SINGULAR[kind]} name '{name}' clashes: registered by both plugin "
                                 f"'{taken.plugin}' and plugin '{info.name}'; rename one of them")
                return
            self.entries[kind][name] = _Entry(value, info.name)
            info.registered.setdefault(kind, []).append(name)

        return register

    def add_commands(self, cli: Any) -> None:
        """Let plugins add Typer commands (once per registry)."""
        if self._commands_added:
            return
        self._commands_added = True
        for impl in self.pm.hook.register_commands.get_hookimpls():
            info = self.plugins[impl.plugin_name]
            before = (len(cli.registered_commands), len(cli.registered_groups))
            taken = {_command_name(c): c for c in cli.registered_commands + cli.registered_groups}
            try:
                with plugin_code(info.name, "register_commands of"):
                    impl.function(cli=cli)
            except Exception as exc:
                self._fail(info, f"failed in register_commands: {failure_line(exc)}")
                continue
            for lists, start in ((cli.registered_commands, before[0]), (cli.registered_groups, before[1])):
                for command in lists[start:]:
                    name = _command_name(command)
                    earlier = taken.get(name)
                    if earlier is not None and getattr(earlier, "minidiff_plugin", None) == info.name:
                        _remove(cli, earlier)  # the same plugin again (a new registry in this process)
                    elif earlier is not None:  # like any other clash: the first keeps the name, built-ins first
                        lists.remove(command)
                        self._fail(info, f"command name '{name}' clashes: registered by both "
                                         f"{self._command_owner(earlier)} and plugin '{info.name}'; rename one of them")
                        continue
                    taken[name] = command
                    command.minidiff_plugin = info.name
                    info.registered.setdefault("commands", []).append(name)

    @staticmethod
    def _command_owner(command: Any) -> str:
        plugin = getattr(command, "minidiff_plugin", None)
        return f"plugin '{plugin}'" if plugin else "minidiff itself"

    def plugin_of(self, exc: BaseException) -> str | None:
        """The plugin whose code raised ``exc`` (the innermost of its frames that is a plugin's), if any."""
        tb, found = exc.__traceback__, None
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            for name, root in self.code_roots.items():
                if filename == root or filename.startswith(root + os.sep):
                    found = name
            tb = tb.tb_next
        return found

    # -- look-ups ----------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def owner(self, kind: str, name: str) -> str:
        return self.entries[kind][name].plugin

    def get(self, kind: str, name: str) -> Any:
        entry = self.entries[kind].get(name)
        if entry is None:
            available = ", ".join(self.names(kind)) or "none"
            raise UnknownNameError(f"unknown {SINGULAR[kind]} '{name}'; available: {available}")
        return entry.value


def _code_root(obj: Any) -> str | None:
    """Where the code of a loaded plugin lives: its top-level package's folder, or its file."""
    import inspect

    module = inspect.getmodule(obj) if not inspect.ismodule(obj) else obj
    if module is None:
        return None
    top = sys.modules.get(module.__name__.split(".")[0], module)
    if top.__name__ == "minidiff_plugins_dir":  # files of --plugins-dir live under this private name
        top = module
    path = getattr(top, "__file__", None)
    if not path:
        return None
    path = os.path.abspath(path)
    return os.path.dirname(path) if os.path.basename(path) == "__init__.py" else path


def loaded_plugin_of(exc: BaseException) -> str | None:
    """``plugin_of`` of the registry, if one was built (never builds one)."""
    return _registry.plugin_of(exc) if _registry is not None else None


def _remove(cli: Any, command: Any) -> None:
    for lists in (cli.registered_commands, cli.registered_groups):
        if command in lists:
            lists.remove(command)


def _command_name(command: Any) -> str:
    """The name Typer gives a registered command or group: its name, else its function's, dashed."""
    name = getattr(command, "name", None) or getattr(getattr(command, "callback", None), "__name__", None)
    if name is None and getattr(command, "typer_instance", None) is not None:
        name = command.typer_instance.info.name
    return str(name or "?").lower().replace("_", "-")


def _import_file(path: Path) -> Any:
    """Import a plugin file under a private module name, without touching sys.path."""
    module_name = f"minidiff_plugins_dir.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


# -- the process-wide registry ------------------------------------------------------
_registry: Registry | None = None


def registry() -> Registry:
    """The registry for this process, built on first use from the environment."""
    global _registry
    if _registry is None:
        load = os.environ.get("MINIDIFF_LOAD_PLUGINS")
        _registry = Registry(
            plugins_dir=os.environ.get("MINIDIFF_PLUGINS_DIR") or None,
            load=[n.strip() for n in load.split(",") if n.strip()] if load is not None else None,
            strict=_env_flag("MINIDIFF_STRICT_PLUGINS"),
        ).discover()
    return _registry


def reset() -> None:
    """Forget the registry, so the next use re-reads the environment (tests, --plugins-dir)."""
    global _registry
    _registry = None


def get_sampler(name: str):
    return registry().get("samplers", name)


def get_conditioner(name: str):
    return registry().get("conditioners", name)


def get_dataset(name: str):
    return registry().get("datasets", name)

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
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pluggy

from minidiff_cli import hookspecs
from minidiff_cli.errors import PluginError, UnknownNameError

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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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

    # -- discovery ---------------------------------------------------------------
    def discover(self) -> "Registry":
        self._load_entry_points()
        if self.plugins_dir is not None:
            self._load_plugins_dir(self.plugins_dir)
        for kind in KINDS:
            self._collect(kind)
        return self

    def _load_entry_points(self) -> None:
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
            module = load_module()
            self.pm.register(module, name=info.name)
        except Exception as exc:  # a broken plugin must not take the program down
            self._fail(info, f"failed to load: {_one_line(exc)}")
            return
        info.hooks = sorted(impl_name for impl_name in dir(module)
                            if impl_name.startswith("register_") and self._is_hookimpl(module, impl_name))

    def _is_hookimpl(self, module: Any, attr: str) -> bool:
        return hasattr(self.pm.hook, attr) and self.pm.parse_hookimpl_opts(module, attr) is not None

    def _fail(self, info: PluginInfo, message: str) -> None:
        info.errors.append(message)
        text = f"plugin '{info.name}' {message}"
        if self.strict:
            raise PluginError(text + " (MINIDIFF_STRICT_PLUGINS is set)")
        self._warn(text)

    # -- collection --------------------------------------------------------------
    def _collect(self, kind: str) -> None:
        hook = getattr(self.pm.hook, f"register_{kind}")
        # get_hookimpls() lists plugins in registration order, so the first one discovered wins a clash.
        for impl in hook.get_hookimpls():
            info = self.plugins[impl.plugin_name]
            try:
                impl.function(register=self._registrar(kind, info))
            except PluginError as exc:
                if self.strict:
                    raise
                self._fail(info, str(exc))
            except Exception as exc:
                self._fail(info, f"failed in register_{kind}: {_one_line(exc)}")

    def _registrar(self, kind: str, info: PluginInfo) -> Callable[..., None]:
        def register(*args: Any) -> None:
            name, value = self._name_and_value(kind, args)
            taken = self.entries[kind].get(name)
            if taken is not None:  # the first one keeps the name; the rest of this plugin still loads
                self._fail(info, f"{SINGULAR[kind]} name '{name}' clashes: registered by both plugin "
                                 f"'{taken.plugin}' and plugin '{info.name}'; rename one of them")
                return
            self.entries[kind][name] = _Entry(value, info.name)
            info.registered.setdefault(kind, []).append(name)

        return register

    @staticmethod
    def _name_and_value(kind: str, args: tuple) -> tuple[str, Any]:
        if kind == "samplers":
            if len(args) != 1 or not isinstance(getattr(args[0], "name", None), str) \
                    or not callable(getattr(args[0], "sample", None)):
                raise PluginError("register(sampler) needs one object with a 'name' and a 'sample' method")
            return args[0].name, args[0]
        if len(args) != 2 or not isinstance(args[0], str) or not args[0] or args[1] is None:
            raise PluginError(f"register(name, value) for {kind} needs a non-empty name and a value")
        return args[0], args[1]

    def add_commands(self, cli: Any) -> None:
        """Let plugins add Typer commands (once per registry)."""
        if self._commands_added:
            return
        self._commands_added = True
        for impl in self.pm.hook.register_commands.get_hookimpls():
            info = self.plugins[impl.plugin_name]
            before = (len(cli.registered_commands), len(cli.registered_groups))
            try:
                impl.function(cli=cli)
                added = cli.registered_commands[before[0]:] + cli.registered_groups[before[1]:]
                names = [getattr(c, "name", None) or getattr(getattr(c, "callback", None), "__name__", "?")
                         for c in added]
                info.registered.setdefault("commands", []).extend(names)
            except Exception as exc:
                self._fail(info, f"failed in register_commands: {_one_line(exc)}")

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


def get_schedule(name: str, num_timesteps: int = 1000, **opts: Any):
    """The NoiseSchedule built by schedule ``name`` over ``num_timesteps`` steps."""
    fn = registry().get("schedules", name)  # an unknown name fails before torch is imported
    from minidiff_cli.schedule import NoiseSchedule

    return NoiseSchedule.from_betas(fn(num_timesteps, **opts), name=name)


def get_sampler(name: str):
    return registry().get("samplers", name)


def get_conditioner(name: str):
    return registry().get("conditioners", name)


def get_dataset(name: str):
    return registry().get("datasets", name)

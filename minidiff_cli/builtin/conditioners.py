"""Built-in conditioners: ``none``, ``class`` and ``clip``, registered like any plugin's.

Registering must stay cheap: this module is imported whenever the plugin registry
is built (``minidiff plugins``, every command that takes a name), and the CLIP
text encoder needs torch and open_clip, seconds of imports. So what is registered
is a ``LazyClass``: a stand-in that knows the conditioner's name and where its
class lives, and imports it on first real use. ``get_conditioner("clip")`` hands
back the stand-in; ``.from_options(...)``, ``.from_config(...)``, calling it, or
any other attribute import the real class and forward to it, and
``isinstance(obj, stand_in)`` works. Plugin authors with heavy imports can copy
the pattern (or register their class directly if importing it is cheap).
"""

from __future__ import annotations

import importlib
from typing import Any

from minidiff_cli.plugins import hookimpl


class LazyClass:
    """A class that is imported from ``"module:attr"`` when first used."""

    def __init__(self, name: str, target: str, summary: str = ""):
        self.name = name  # known without importing: the registry and `minidiff plugins` use it
        self.target = target
        self.summary = summary
        self._cls: type | None = None

    def resolve(self) -> type:
        """The real class (imported on the first call)."""
        if self._cls is None:
            module, _, attr = self.target.partition(":")
            self._cls = getattr(importlib.import_module(module), attr)
        return self._cls

    def __getattr__(self, attr: str) -> Any:
        # Only called for attributes this object lacks: everything else is the class's.
        if attr.startswith("__") or attr == "_cls":
            raise AttributeError(attr)
        return getattr(self.resolve(), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self.resolve())

    def __subclasscheck__(self, cls: type) -> bool:
        return issubclass(cls, self.resolve())

    def __repr__(self) -> str:
        state = "imported" if self._cls is not None else "not imported yet"
        return f"<conditioner {self.name!r} from {self.target} ({state})>"


CONDITIONERS = (
    LazyClass("none", "minidiff_cli.builtin.class_conditioners:NoneConditioner",
              "Unconditional: prompts are ignored."),
    LazyClass("class", "minidiff_cli.builtin.class_conditioners:ClassConditioner",
              "A learned embedding per class name (pooled), plus a null class."),
    LazyClass("clip", "minidiff_cli.clip.conditioner:ClipTextConditioner",
              "A frozen open_clip text encoder: token states (context) and projected EOT (pooled)."),
)


@hookimpl
def register_conditioners(register):
    for lazy in CONDITIONERS:
        register(lazy.name, lazy)

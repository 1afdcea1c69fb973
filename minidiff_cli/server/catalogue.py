"""The models a client may name: the installed ones (shipped, user, runs/*), by name or hash only.

A client's value is matched against this list and never opened as a path, so no request can make
the server read a file the operator did not install. AUTOMATIC1111 lists a checkpoint as
``title`` ("name [hash]"), ``model_name``, ``hash`` (10 hex digits), ``sha256`` and ``filename``;
``filename`` is the model's name here, not a path on the server.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from minidiff_cli.errors import MinidiffError, UnknownNameError, shown
from minidiff_cli.files.models_dir import list_models


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    where: str
    sha256: str

    @property
    def hash(self) -> str:
        return self.sha256[:10]  # what the PNGs record as "Model hash" (files.model_file.file_hash)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"

    def a1111(self) -> dict:
        return {"title": self.title, "model_name": self.name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.name, "config": None}


class Catalogue:
    """The installed models, listed afresh on each look-up (a model copied in appears); hashes cached."""

    def __init__(self, extra: Entry | None = None):
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self.extra = extra  # a --model FILE given on the command line: served, though not installed

    def entries(self) -> list[Entry]:
        found = [Entry(name, path, where, self._sha256(path)) for name, path, where in list_models()]
        if self.extra is not None and all(e.path.resolve() != self.extra.path.resolve() for e in found):
            found.append(self.extra)
        return found

    def find(self, wanted) -> Entry:
        """The entry a client names (title, name, name.safetensors, hash or sha256); a one-line error otherwise."""
        if not isinstance(wanted, str) or not 0 < len(wanted) <= 300:
            raise MinidiffError(f"a model is named by a string of at most 300 characters (got {shown(wanted)})")
        text = wanted.strip()
        entries = self.entries()
        for entry in entries:
            if text in (entry.title, entry.name, f"{entry.name}.safetensors", entry.hash, entry.sha256):
                return entry
        names = ", ".join(e.name for e in entries) or "none installed"
        raise UnknownNameError(f"unknown model {shown(text)}; the installed ones are: {names}")

    def _sha256(self, path: Path) -> str:
        stat = os.stat(path)
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key not in self._hashes:
                digest = hashlib.sha256()
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
                self._hashes[key] = digest.hexdigest()
            return self._hashes[key]


def entry_for_path(path: Path, catalogue: Catalogue) -> Entry:
    """The entry of the model the operator named on the command line (a name or a file)."""
    path = Path(path)
    for entry in catalogue.entries():
        if entry.path.resolve() == path.resolve():
            return entry
    return Entry(path.stem if path.name != "model.safetensors" else path.parent.name, path, "command line",
                 catalogue._sha256(path))

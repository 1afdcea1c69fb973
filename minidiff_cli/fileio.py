"""Writing files so that nothing is ever lost: atomic replace, never overwrite.

A crash (even SIGKILL) while writing leaves either the old file or the new one,
never a half-written file under the final name: data goes to a temporary file in
the same folder, is fsynced, then renamed over the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from minidiff_cli.errors import MinidiffError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically.

    With ``overwrite=False`` an existing ``path`` is an error, and the final
    step uses a hard link, which fails instead of replacing a file that
    appeared meanwhile.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not overwrite and path.exists():
        raise MinidiffError(f"'{path}' already exists; choose another name or remove it first")
    ensure_writable_dir(folder)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise MinidiffError(f"'{path}' already exists; choose another name or remove it first") from None
            tmp.unlink()
        _fsync_dir(folder)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed; a one-line error if that is impossible."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MinidiffError(f"'{folder}' is a file, not a folder; pass a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MinidiffError(f"cannot create folder '{folder}': {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MinidiffError(f"folder '{folder}' is not writable; choose another output path")
    return folder


def next_free_path(folder: str | os.PathLike, stem: str, suffix: str, start: int = 0) -> Path:
    """The first ``folder/stem-NNNNN.suffix`` that does not exist yet."""
    folder = Path(folder)
    index = start
    while True:
        candidate = folder / f"{stem}-{index:05d}{suffix}"
        if not candidate.exists():
            return candidate
        index += 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

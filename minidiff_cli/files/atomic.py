"""Writing files so that nothing is ever lost: atomic replace, never overwrite.

A crash (even SIGKILL) while writing leaves either the old file or the new one,
never a half-written file under the final name: data goes to a temporary file in
the same folder (``.NAME.XXXX.tmp``), is fsynced, then given its final name in one
step. A crash can leave such a hidden temporary file behind, never a partial file
under the final name.

Never overwriting needs a final step that fails when the name is taken, even by a
file that appeared after the check (another process, a second minidiff). In order
of preference:

1. ``os.link(tmp, path)``: atomic, and fails if ``path`` exists. POSIX and NTFS.
2. where the filesystem has no hard links (FAT, exFAT, some network and FUSE
   mounts): a rename that refuses to replace: ``renameat2(RENAME_NOREPLACE)`` on
   Linux, ``renamex_np(RENAME_EXCL)`` on macOS, ``os.rename`` on Windows (which
   never replaces). Still atomic.
3. only where neither exists: claim the name with an exclusive create
   (``O_CREAT | O_EXCL``), then rename the temporary file over that empty
   placeholder. The claim cannot replace anyone's file, but a crash between the two
   calls (microseconds) leaves an empty file under the final name. An empty file is
   never mistaken for a finished one, and nothing existing is ever replaced, so this
   is the least bad portable choice; check-then-rename would be worse (it can replace
   a file that appears in between), and writing the data into the claimed file
   directly would leave half a file after a crash.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable

from minidiff_cli.errors import MinidiffError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically.

    With ``overwrite=False`` an existing ``path`` is an error, also when it appears
    while ``write`` runs: the final step fails instead of replacing it (see above).
    An OSError (disk full, permissions) is a one-line MinidiffError naming ``path``.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        if not overwrite and path.exists():
            raise _exists(path)
    except (OSError, ValueError) as exc:
        raise MinidiffError(f"cannot write '{path}': {_reason(exc)}") from None
    ensure_writable_dir(folder)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise MinidiffError(f"cannot write '{path}': {_reason(exc)}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _call_writer(write, tmp)
        # mkstemp makes 0600, and some writers (safetensors) replace the file with their own:
        # set the mode after writing, so every output gets the same umask-based permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
        _fsync_dir(folder)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        raise MinidiffError(f"could not write '{path}': {_reason(exc)}") from exc
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()
    return path


# Writers in Rust (safetensors) report a failed write as their own exception, whose text ends in the
# OS error: "Error while serializing: I/O error: No space left on device (os error 28)".
WRAPPED_OS_ERROR = re.compile(r"\(os error (\d{1,4})\)")


def _call_writer(write: Callable[[Path], None], tmp: Path) -> None:
    """``write(tmp)``, with an OS error wrapped in a library's own exception turned back into OSError."""
    try:
        write(tmp)
    except OSError:
        raise
    except Exception as exc:
        match = WRAPPED_OS_ERROR.search(str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(tmp)) from exc


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line whole or not at all: a failed write (disk full) is cut off again."""
    with open(path, "a", encoding="utf-8") as fh:
        start = fh.tell()
        try:
            fh.write(line.rstrip("\n") + "\n")
            fh.flush()
        except OSError:
            fh.truncate(start)
            raise


def write_numbered(folder: str | os.PathLike, stem: str, suffix: str, write: Callable[[Path], None],
                   start: int = 0) -> Path:
    """Write to the first free ``folder/stem-NNNNN.suffix`` from ``start``, claiming the name as it is
    published: if another process takes that name meanwhile, the next free one is used instead."""
    index = start
    while True:
        path = next_free_path(folder, stem, suffix, index)
        try:
            return atomic_write(path, write, overwrite=False)
        except NameTaken:
            index = int(path.stem.rsplit("-", 1)[1]) + 1


def refuse_existing(paths, overwrite: bool) -> None:
    """Before any work: an output file that exists is an error unless ``overwrite`` (--overwrite)."""
    for path in paths:
        if path is not None and Path(path).exists() and not overwrite:
            raise MinidiffError(f"'{path}' already exists; choose another file name or pass --overwrite")


class NameTaken(MinidiffError):
    """atomic_write(overwrite=False): the name exists, or appeared while writing."""


def _exists(path: Path) -> MinidiffError:
    return NameTaken(f"'{path}' already exists; choose another name or remove it first")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _publish_new(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` atomically; FileExistsError if the name is taken."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem
        if not _rename_noreplace(tmp, path):
            _claim_then_replace(tmp, path)
    else:
        tmp.unlink()


def _rename_noreplace(tmp: Path, path: Path) -> bool:
    """An atomic rename that refuses to replace ``path``; False where the system has none."""
    if os.name == "nt":
        os.rename(tmp, path)  # Windows' rename raises FileExistsError instead of replacing
        return True
    call = _noreplace_call()
    if call is None:
        return False
    import ctypes

    if call(os.fsencode(tmp), os.fsencode(path)) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(path))
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this filesystem does not support the flag
    raise OSError(err, os.strerror(err), str(path))


def _claim_then_replace(tmp: Path, path: Path) -> None:
    """The last resort (see the module docstring): claim the name exclusively, then replace the claim."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    os.close(fd)
    os.replace(tmp, path)


_NOREPLACE: list = []  # [callable or None], looked up once


def _noreplace_call():
    """``f(src: bytes, dst: bytes) -> int`` renaming without replacing (errno in ctypes), or None."""
    if _NOREPLACE:
        return _NOREPLACE[0]
    call = None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            fn = libc.renameat2  # glibc >= 2.28
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            at_fdcwd, rename_noreplace = -100, 1

            def call(src: bytes, dst: bytes) -> int:
                return fn(at_fdcwd, src, at_fdcwd, dst, rename_noreplace)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            fn = libc.renamex_np
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            rename_excl = 0x4

            def call(src: bytes, dst: bytes) -> int:
                return fn(src, dst, rename_excl)
    except (OSError, AttributeError, TypeError):
        call = None
    _NOREPLACE.append(call)
    return call


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed; a one-line error if that is impossible."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise MinidiffError(f"'{folder}' is a file, not a folder; pass a folder path")
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file (or a broken link)
        raise MinidiffError(f"cannot create folder '{folder}': a part of the path is a file") from None
    except (OSError, ValueError) as exc:
        raise MinidiffError(f"cannot create folder '{folder}': {_reason(exc)}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MinidiffError(f"folder '{folder}' is not writable; choose another output path")
    return folder


def next_free_path(folder: str | os.PathLike, stem: str, suffix: str, start: int = 0) -> Path:
    """The first ``folder/stem-NNNNN.suffix`` that does not exist yet."""
    folder = Path(folder)
    index = start
    while True:
        candidate = folder / f"{stem}-{index:05d}{suffix}"
        if not os.path.lexists(candidate):  # a dangling link counts as taken
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


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in [folder, *folder.parents]:
        if os.path.lexists(path) or not str(path) or path == path.parent:
            break
        missing.append(path)
    return missing

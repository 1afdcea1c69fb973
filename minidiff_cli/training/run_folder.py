"""The run folder of ``minidiff train``: whose it is, who is writing it, and what it left behind.

- A new run (no ``--resume``) goes only into a folder that is missing, empty, or holds nothing but
  this run's own first stage (``clip.safetensors``, ``clip.checkpoint.safetensors``, and the ``logs``
  folder that stage's ``--log-with`` wrote): a folder with someone's ``loss.png`` or ``metrics.jsonl``
  in it is refused rather than replaced or appended to.
- One run at a time: the folder itself is locked with ``flock`` for as long as the run lives (no
  lock file: a refused run leaves the folder byte for byte as it was). The kernel drops the lock
  when the process ends, however it ends, so a crashed run leaves no stale lock behind; a second
  live run is refused at once.
- Hidden temporaries of this run's files (``.NAME.XXXXXXXX.tmp``, left when a write was killed) are
  removed when the lock is taken: no other writer can own them then.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from minidiff_cli.errors import MinidiffError
from minidiff_cli.files.atomic import missing_folders

CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
STAGE_ONE = ("clip.safetensors", "clip.checkpoint.safetensors", "train_config.json")  # a run's own first stage (clip_stage.py writes its recipe too)
STAGE_ONE_LOGS = ("logs",)  # tracking.LOGS, when the first stage logged there (only beside that stage's files)
RUN_FILES = (CHECKPOINT, MODEL, "train_config.json", "metrics.jsonl", "loss.png", *STAGE_ONE)
SAMPLES = "samples"
SAMPLE_NAME = re.compile(r"step-\d+\.png")
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp")  # files.atomic.atomic_write's mkstemp names


def check_contents(out: Path, resume: bool) -> None:
    """Refuse a new run into a folder that holds a run already, or files that are not this run's."""
    has_run = (out / CHECKPOINT).exists() or (out / MODEL).exists()
    if resume and not (out / CHECKPOINT).exists():
        raise MinidiffError(f"nothing to resume: '{out / CHECKPOINT}' does not exist")
    if resume:
        return
    if has_run:
        raise MinidiffError(f"'{out}' already holds a training run; pass --resume to continue it "
                            "or choose another --out")
    own = STAGE_ONE + (STAGE_ONE_LOGS if any((out / name).exists() for name in STAGE_ONE) else ())
    foreign = sorted(name for name in _entries(out) if name not in own and not _own_temporary(name, RUN_FILES))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise MinidiffError(f"'{out}' is not empty ('{foreign[0]}'{more}) and holds no run to resume; "
                            "choose a new or empty --out (a new run never replaces or appends to others' files)")


@contextmanager
def locked(out: Path, main: bool = True) -> Iterator[None]:
    """Hold the run folder for this process (only the main one under torchrun); stale temporaries go."""
    if not main:
        yield
        return
    check_creatable(out)
    created = missing_folders(out)  # out and the parents it makes (runs/ of runs/x), deepest first
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        _lock(fd, out)
        remove_stale_temporaries(out)
        yield
    finally:
        os.close(fd)  # releases the lock
        for folder in created:  # a run that failed before writing anything leaves no folder behind
            if not _rmdir_if_empty(folder):
                break


def check_creatable(folder: Path) -> None:
    """Fail before training, not at the first save, if the run folder cannot be made."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MinidiffError(f"'{existing}' is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MinidiffError(f"'{existing}' is not writable; choose another --out")


def _lock(fd: int, out: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs are not locked there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        who = f" (process {holder})" if holder else ""
        raise MinidiffError(f"another minidiff train is writing into '{out}'{who}; wait for it to end "
                            "or choose another --out") from None


def _holder(fd: int) -> str:
    """The process holding the flock on ``fd``'s file, from Linux's /proc/locks; "" where unknown."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()  # "1: FLOCK ADVISORY WRITE 1234 08:01:5678 0 EOF"
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
                    return fields[4]
    except OSError:
        pass
    return ""


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the hidden temporaries of this run's own files (never anything else); returns them."""
    gone = []
    for folder, names in ((out, RUN_FILES), (out / SAMPLES, None)):
        for name in _entries(folder):
            path = folder / name
            if _own_temporary(name, names) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                gone.append(path)
    return gone


def _own_temporary(name: str, names: tuple[str, ...] | None) -> bool:
    match = TEMPORARY.fullmatch(name)
    if not match:
        return False
    target = match.group("name")
    return target in names if names is not None else bool(SAMPLE_NAME.fullmatch(target))


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _rmdir_if_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
    except OSError:
        return False
    return True

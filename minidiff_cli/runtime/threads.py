"""How many CPU threads torch should use: as many as there are cores that nothing else is using.

torch starts one thread per core, and its threads spin while they wait for each other.
On a machine busy with other work that is the worst choice: on 2 cores with one other
CPU-bound process, a forward pass took 3x as long with 2 threads as with 1, because each
step waits for the thread whose core is taken. So minidiff counts the cores that other
processes keep busy, over a short look at the kernel's CPU counters, and uses the rest
(at least one). On a quiet machine that is every core: torch's own default.

Who decides, first match wins:
1. ``--threads N`` of the command (N >= 1);
2. ``MINIDIFF_THREADS=N`` in the environment;
3. ``OMP_NUM_THREADS``, which torch reads itself (minidiff then changes nothing);
4. otherwise the count above ("auto"), re-taken during long training runs.

Commands choose at their start; the Python API (``Pipeline.load``) chooses the same way, once per
process, unless a count was chosen already (``apply_threads(N)``, or ``Pipeline.load(threads=N)``).

Linux gives the counters in /proc/stat; elsewhere the 1-minute load average stands in
for them (less current, but the same idea).
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

from minidiff_cli.errors import MinidiffError

ENV = "MINIDIFF_THREADS"
MAX_THREADS = 1024
LOOK_S = 0.1  # long enough to see a busy process, short enough not to notice at start-up


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> Optional[tuple[float, float]]:
    """(busy, total) jiffies over all CPUs from /proc/stat, or None where there is no such file."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [float(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _own_time() -> float:
    """This process's CPU seconds (all its threads)."""
    return time.process_time()


class LoadMeter:
    """Cores kept busy by *other* processes, between successive calls of ``others()``."""

    def __init__(self):
        self._last = self._read()

    @staticmethod
    def _read():
        return _cpu_times(), _own_time(), time.monotonic()

    def others(self) -> float:
        (cpu0, own0, t0), (cpu1, own1, t1) = self._last, self._read()
        self._last = (cpu1, own1, t1)
        if cpu0 is None or cpu1 is None:
            try:
                return max(0.0, os.getloadavg()[0])
            except (AttributeError, OSError):
                return 0.0
        total = cpu1[1] - cpu0[1]
        if total <= 0 or t1 <= t0:
            return 0.0
        cores = os.cpu_count() or 1
        busy_cores = cores * (cpu1[0] - cpu0[0]) / total
        return max(0.0, busy_cores - (own1 - own0) / (t1 - t0))


def auto_threads(meter: Optional[LoadMeter] = None, look_s: float = LOOK_S) -> int:
    """Usable cores minus those other processes keep busy (rounded), at least 1."""
    if meter is None:
        meter = LoadMeter()
        time.sleep(look_s)
    free = usable_cores() - meter.others()
    return max(1, min(usable_cores(), math.floor(free + 0.5)))


def requested_threads(flag: Optional[int]) -> Optional[int]:
    """The thread count asked for by --threads or MINIDIFF_THREADS; None for auto. 0 means auto too."""
    if flag is not None:
        return _checked(flag, "--threads")
    text = os.environ.get(ENV, "").strip()
    if not text or text.lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise MinidiffError(f"{ENV}={text!r:.40} must be a whole number of threads, or auto") from None
    return _checked(value, ENV)


def _checked(value: int, where: str) -> Optional[int]:
    if not 0 <= value <= MAX_THREADS:
        raise MinidiffError(f"{where} must be from 1 to {MAX_THREADS} threads, or 0 for auto (got {value})")
    return value or None


_chosen = False  # whether apply_threads ran in this process (a command, or the library once)


def apply_threads(flag: Optional[int] = None) -> Optional[int]:
    """Set torch's thread count by the rules of the module doc; returns it (None: left to OMP_NUM_THREADS)."""
    import torch

    global _chosen
    _chosen = True
    wanted = requested_threads(flag)
    if wanted is None and os.environ.get("OMP_NUM_THREADS"):
        return None
    count = wanted or auto_threads()
    torch.set_num_threads(count)
    return count


def ensure_threads() -> None:
    """Choose the thread count as a command does, once per process: what the library (Pipeline.load)
    calls, so that Python users get the CLI's choice. A count chosen before (apply_threads, by a
    command or by the user: ``apply_threads(N)``) is left alone, and so is torch.set_num_threads
    called after it."""
    if not _chosen:
        apply_threads(None)


class AutoThreads:
    """Re-takes the auto count every ``every_s`` seconds of a long job (a training run), so that
    work started or ended elsewhere is followed. Does nothing when the count was given."""

    def __init__(self, flag: Optional[int] = None, every_s: float = 30.0):
        self.active = requested_threads(flag) is None and not os.environ.get("OMP_NUM_THREADS")
        self.every_s = every_s
        self._meter = LoadMeter() if self.active else None
        self._next = time.monotonic() + every_s

    def tick(self) -> None:
        if not self.active or time.monotonic() < self._next:
            return
        import torch

        self._next = time.monotonic() + self.every_s
        count = auto_threads(self._meter)
        if count != torch.get_num_threads():
            torch.set_num_threads(count)

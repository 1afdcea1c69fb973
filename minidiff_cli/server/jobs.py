"""One job at a time per model, a bounded queue in front of it, progress, interrupt, shutdown.

Each model has one worker thread, which loads the model on its first job and keeps it: a model
never runs two jobs at once (on a CPU they would only split the cores; on a GPU, its memory). A
full queue is refused at once (the caller answers 503 with Retry-After), never waited on. A job
whose client went away is skipped if still queued, and stopped at its next step if running;
other clients' jobs are untouched. ``interrupt`` stops the running jobs at their next step (they
answer with what they have); ``shutdown`` does that, refuses the queued jobs and ends the threads.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from minidiff_cli.errors import MinidiffError


class Busy(Exception):
    """The model's queue is full (or the server is stopping): answer 503."""


class Cancelled(MinidiffError):
    """Raised inside a job's step callback to stop it (its client left, or the server stops)."""


@dataclass
class Job:
    """A unit of work for one model's worker: ``work(pipe, job)`` runs in the worker thread."""

    work: Callable[[Any, "Job"], Any]
    label: str = "txt2img"
    future: Future = field(default_factory=Future)
    interrupted: threading.Event = field(default_factory=threading.Event)  # answer with what it has
    cancelled: threading.Event = field(default_factory=threading.Event)   # nobody is waiting: stop
    steps_done: int = 0
    steps_total: int = 0
    started: float | None = None
    preview: Any = None  # (the batch's x0 guess, decode or None): the current pictures, made on request
    queued_at: float = field(default_factory=time.monotonic)

    def step(self, info: dict) -> None:
        """The sampler's callback: count the step, keep the cheap preview, stop if asked."""
        self.steps_done += 1
        x0 = info.get("x0")
        if x0 is not None:
            self.preview = (x0.detach().clone(), info.get("decode"))
        if self.cancelled.is_set() or self.interrupted.is_set():
            raise Cancelled("interrupted")

    def progress(self) -> float:
        return min(1.0, self.steps_done / self.steps_total) if self.steps_total else 0.0

    def eta(self) -> float:
        if self.started is None or not self.steps_done or not self.steps_total:
            return 0.0
        per_step = (time.monotonic() - self.started) / self.steps_done
        return max(0.0, per_step * (self.steps_total - self.steps_done))


class Worker:
    """One model: a thread, its pipeline (loaded on first use) and a queue of at most ``size`` waiting jobs."""

    def __init__(self, name: str, load: Callable[[], Any], size: int, board: "Board"):
        self.name = name
        self.load = load
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.board = board
        self.pipe = None
        self.running: Job | None = None
        self.thread = threading.Thread(target=self._loop, name=f"minidiff-{name}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.board.stopping:
            raise Busy("the server is stopping")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"model {self.name} has {self.queue.maxsize} jobs waiting") from None

    def waiting(self) -> int:
        return self.queue.qsize()

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            if job.cancelled.is_set() or self.board.stopping:
                job.future.set_exception(Busy("the job was dropped: its client left or the server is stopping"))
                continue
            self.running = job
            job.started = time.monotonic()
            try:
                if self.pipe is None:
                    self.pipe = self.load()
                job.future.set_result(job.work(self.pipe, job))
            except BaseException as exc:  # the job's own error goes to its client; the worker lives on
                job.future.set_exception(exc)
            finally:
                self.running = None
                self.board.finished += 1

    def refuse_waiting(self) -> None:
        """Answer every queued job with Busy: the server is stopping."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.future.set_exception(Busy("the server is stopping"))

    def stop(self) -> None:
        self.refuse_waiting()  # then end the thread
        if self.running is not None:
            self.running.cancelled.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass


class Board:
    """Every model's worker, and what /progress and /interrupt see across them."""

    def __init__(self, load: Callable[[Any], Any], queue_size: int = 8):
        self.load = load  # entry -> Pipeline
        self.queue_size = queue_size
        self.workers: dict[str, Worker] = {}
        self.lock = threading.Lock()
        self.stopping = False
        self.finished = 0

    def worker(self, entry) -> Worker:
        with self.lock:
            key = str(entry.path)
            if key not in self.workers:
                self.workers[key] = Worker(entry.name, lambda: self.load(entry), self.queue_size, self)
            return self.workers[key]

    def submit(self, entry, job: Job) -> Job:
        self.worker(entry).submit(job)
        return job

    def running(self) -> list[Job]:
        return [w.running for w in list(self.workers.values()) if w.running is not None]

    def job_count(self) -> int:
        return len(self.running()) + sum(w.waiting() for w in list(self.workers.values()))

    def interrupt(self) -> int:
        jobs = self.running()
        for job in jobs:
            job.interrupted.set()
        return len(jobs)

    def shutdown(self, wait_s: float = 10.0) -> None:
        self.stopping = True
        workers = list(self.workers.values())
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + wait_s
        for worker in workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))


def stop_soon(board: Board) -> None:
    """Ctrl-C: refuse new and queued jobs at once, and let running ones answer with what they have."""
    board.stopping = True
    board.interrupt()
    for worker in list(board.workers.values()):
        worker.refuse_waiting()

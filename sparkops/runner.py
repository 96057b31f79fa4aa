"""The jobs runner: periodic jobs on a ``schedule`` loop, one runner per host.

The runner only schedules; each job is a plain function ``job(store, now=...)``
that can also be called on its own (a "run now" button, a test). Today there is
one job:

* ``promote``: move ``todo`` tasks whose parents are all finished to ``ready``
  (:func:`sparkops.board.promote_ready`), the safety net for boards that another
  tool (Hermes) also writes.

Three things the ``schedule`` library does not do, done here:

* **a failing job stays scheduled**: :meth:`Runner.run_job` logs the exception
  and returns normally, so ``schedule`` books the next run as usual (a job that
  raises inside ``schedule`` is never rescheduled and takes the loop down);
* **one runner per host**: :class:`RunnerLock` holds an exclusive ``fcntl``
  lock on a file next to the ops database; a second runner is refused with
  :class:`AlreadyRunning`, naming the lock and the pid that holds it;
* **clean shutdown**: SIGTERM/SIGINT only set a flag; the job in progress
  finishes, no new job starts, and :meth:`Runner.run_forever` returns.

Logging handlers are set by the entry point (``jobs_runner.py``), not here.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import schedule

from sparkops import board
from sparkops.config import Settings
from sparkops.errors import Refused
from sparkops.store import Store

log = logging.getLogger(__name__)

#: The longest the loop sleeps between looks at the schedule (seconds).
POLL_SECONDS = 1.0

LOCK_SUFFIX = ".runner.lock"


# -- jobs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """A periodic job: ``func(store, now=epoch_seconds)`` every ``every_seconds``."""

    name: str
    every_seconds: float
    func: Callable[..., Any]


@dataclass(frozen=True)
class JobResult:
    """What one run of a job did."""

    name: str
    started_at: float  # the ``now`` the job was given
    duration_seconds: float
    ok: bool
    result: Any = None
    error: str | None = None  # "ExceptionType: message" when not ok


def promote(store: Store, *, now: float | None = None) -> list[str]:
    """The ``promote`` job: promote todo tasks whose parents are all finished."""
    promoted = board.promote_ready(store.board, now=now)
    if promoted:
        log.info("promoted %d task(s) to ready: %s", len(promoted), ", ".join(promoted))
    return promoted


def default_jobs(settings: Settings) -> list[Job]:
    """The jobs a runner schedules, with their intervals from the settings."""
    return [Job("promote", settings["runner.promote_interval_seconds"], promote)]


# -- the runner ---------------------------------------------------------------------


class Runner:
    """Runs ``jobs`` against ``store`` on a ``schedule.Scheduler``.

    ``clock`` gives the ``now`` handed to jobs (epoch seconds); ``stop`` is the
    event that ends :meth:`run_forever` (set by :meth:`request_stop` or by the
    signal handlers of :meth:`install_signal_handlers`).
    """

    def __init__(self, store: Store, jobs: Iterable[Job], *,
                 clock: Callable[[], float] = time.time,
                 stop: threading.Event | None = None):
        self.store = store
        self.clock = clock
        self.stop = stop or threading.Event()
        self.stop_reason: str | None = None
        self.scheduler = schedule.Scheduler()
        self.jobs: dict[str, Job] = {}
        self.last_results: dict[str, JobResult] = {}
        self._ran: list[JobResult] = []
        for job in jobs:
            self.add_job(job)

    def add_job(self, job: Job) -> None:
        if job.name in self.jobs:
            raise ValueError(f"a job named {job.name!r} is already scheduled")
        if job.every_seconds <= 0:
            raise ValueError(f"job {job.name!r}: every_seconds must be > 0, got {job.every_seconds}")
        self.jobs[job.name] = job
        self.scheduler.every(job.every_seconds).seconds.do(self._scheduled, job.name).tag(job.name)

    def run_job(self, name: str, *, now: float | None = None) -> JobResult:
        """Run one job now. Never raises for a failing job: the error is logged
        and returned, so the job stays scheduled."""
        job = self.jobs[name]
        now = self.clock() if now is None else now
        started = time.monotonic()
        try:
            value = job.func(self.store, now=now)
        except Exception as exc:  # noqa: BLE001 - a failing job must not stop the runner
            result = JobResult(name, now, time.monotonic() - started, ok=False,
                               error=f"{type(exc).__name__}: {exc}")
            log.error("job %s failed after %.2fs (it stays scheduled): %s\n%s", name,
                      result.duration_seconds, result.error, traceback.format_exc().rstrip())
        else:
            result = JobResult(name, now, time.monotonic() - started, ok=True, result=value)
            log.debug("job %s finished in %.3fs", name, result.duration_seconds)
        self.last_results[name] = result
        self._ran.append(result)
        return result

    def _scheduled(self, name: str) -> None:
        # Called by schedule. Returns None, so schedule always books the next run.
        if not self.stop.is_set():
            self.run_job(name)

    def run_pending_once(self) -> list[JobResult]:
        """One step of the loop: run the jobs that are due; return what ran."""
        self._ran = []
        self.scheduler.run_pending()
        ran, self._ran = self._ran, []
        return ran

    def next_run(self, name: str):
        """When ``schedule`` will next run job ``name`` (a naive local datetime)."""
        return next(j.next_run for j in self.scheduler.jobs if name in j.tags)

    def run_forever(self, *, poll_seconds: float = POLL_SECONDS) -> None:
        """Run due jobs until :attr:`stop` is set; the job in progress finishes."""
        while not self.stop.is_set():
            self.run_pending_once()
            idle = self.scheduler.idle_seconds
            wait = poll_seconds if idle is None else min(max(idle, 0.01), poll_seconds)
            self.stop.wait(wait)

    def request_stop(self, reason: str = "requested") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop after the current job (main thread only)."""
        install_stop_handlers(self.stop, on_signal=self.request_stop)


def install_stop_handlers(stop: threading.Event,
                          on_signal: Callable[[str], None] | None = None) -> None:
    """Make SIGTERM and SIGINT set ``stop`` (and nothing else: no I/O in a handler)."""

    def handler(signum: int, _frame: Any) -> None:
        if on_signal is not None:
            on_signal(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


# -- one runner per host -----------------------------------------------------------------


class AlreadyRunning(Refused):
    """Another jobs runner holds the lock."""

    def __init__(self, path: Path, holder: str | None):
        self.path = path
        self.holder = holder
        who = f"pid {holder} holds the lock {path}" if holder else f"the lock {path} is held"
        super().__init__(
            f"another jobs runner is already running ({who}); stop it first "
            "(kill -TERM that pid), or point this one at other databases"
        )


def lock_path(settings: Settings) -> Path:
    """The runner's lock file: next to a SQLite ops database, else in ``data/``."""
    url = settings["storage.ops_url"]
    if url.startswith("sqlite:///"):
        ops_file = Path(url[len("sqlite:///"):].split("?", 1)[0])
        return ops_file.with_name(ops_file.name + LOCK_SUFFIX)
    return settings.base_dir / "data" / ("jobs_runner" + LOCK_SUFFIX)


class RunnerLock:
    """An exclusive, non-blocking ``flock`` on ``path``, holding our pid.

    The kernel drops the lock when the process ends, however it ends, so a
    crashed runner never leaves a stale lock behind. The file itself stays.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> "RunnerLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or None
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise AlreadyRunning(self.path, holder) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunnerLock":
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

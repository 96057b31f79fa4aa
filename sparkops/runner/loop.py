"""The jobs runner: every job of :func:`sparkops.runner.registry.all_jobs` on a ``schedule``
loop, one runner per host.

The runner only schedules. Each job runs through :func:`sparkops.runner.registry.run_job`
(its lock, its record, exceptions caught), so a failing job stays scheduled: a
job that raises inside ``schedule`` would never be rescheduled and would take
the loop down.

* **Dispatch latency**: ``dispatch`` runs every ``dispatch.interval_seconds``
  (1 s) and also right after a worker shim the runner started exits (SIGCHLD
  wakes the loop), so a freed slot is refilled at once.
* **One runner per host**: :class:`RunnerLock` holds an exclusive ``flock`` on
  ``<state dir>/locks/runner.lock``; a second runner is refused with
  :class:`AlreadyRunning`, naming the pid that holds it.
* **Clean shutdown**: SIGTERM/SIGINT only set a flag; the job in progress
  finishes and the loop returns. Workers run in their own sessions and are not
  touched: they keep running and report when done.
* **Never stalled**: the jobs that talk to the outside world or walk the disk
  (``JobSpec.background``: watchdog, disk, gpu-sample, review, export, push,
  tunnel, remote-gpu) run on a thread each; dispatch, reclaim and promote stay on
  the main loop and are never held up by a slow service (each service check has a
  total deadline too). A background job still running when it is due again is not
  started twice.
* **Liveness**: the runner heartbeats its row in ``ops_hosts`` every
  :data:`sparkops.jobs.hosts.HEARTBEAT_SECONDS`, which the app shows.

Logging handlers are set by the entry point (``jobs_runner.py``), not here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import schedule

from sparkops import __version__
from sparkops.config import Settings, load_secrets
from sparkops.core import procs
from sparkops.core.clock import follow_database
from sparkops.core.clock import now as clock_now
from sparkops.core.errors import Refused
from sparkops.engine.dispatch import ShimTracker
from sparkops.jobs import hosts
from sparkops.jobs.framework import JobBusy, JobContext, JobLock, JobRun, JobSpec, lock_dir
from sparkops.meters import gpu
from sparkops.runner import registry
from sparkops.runner.registry import run_job
from sparkops.storage.db import is_disk_full
from sparkops.watch import alerts
from sparkops.watch.alerts import Alert

log = logging.getLogger(__name__)

#: The longest the loop sleeps between looks at the schedule (seconds).
POLL_SECONDS = 1.0
#: The longest wait between tries while the database is unreachable.
DATABASE_BACKOFF_MAX = 30.0


class Runner:
    """Runs ``specs`` for ``ctx`` on a ``schedule.Scheduler``.

    ``clock`` gives the ``now`` handed to jobs (epoch seconds); ``stop`` ends
    :meth:`run_forever` (set by :meth:`request_stop` or the signal handlers)."""

    def __init__(self, ctx: JobContext, specs: dict[str, JobSpec] | None = None, *,
                 clock: Callable[[], float] = clock_now, stop: threading.Event | None = None):
        self.ctx = ctx
        self.specs = specs if specs is not None else registry.all_jobs()
        self.clock = clock
        self.stop = stop or threading.Event()
        self.wake = threading.Event()
        self.stop_reason: str | None = None
        self.scheduler = schedule.Scheduler()
        self.last_results: dict[str, JobRun] = {}
        self._ran: list[JobRun] = []
        self._last_host_beat = 0.0
        #: while the database is unreachable, scheduled jobs wait until then (monotonic)
        self._database_back_at = 0.0
        self._database_backoff = 0.0
        #: the last job that failed did so for a full disk, and no job has written since
        self.disk_full = False
        #: background jobs (JobSpec.background): one thread each, the run in flight
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._background: dict[str, Future] = {}
        for spec in self.specs.values():
            every = spec.interval(ctx.settings)
            self.scheduler.every(every).seconds.do(self._scheduled, spec.name).tag(spec.name)

    def intervals(self) -> dict[str, float]:
        return {name: spec.interval(self.ctx.settings) for name, spec in self.specs.items()}

    def run_job(self, name: str, *, now: float | None = None, trigger: str = "schedule") -> JobRun:
        """Run one job now (never raises for a failing job)."""
        result = run_job(self.ctx, name, now=self.clock() if now is None else now, trigger=trigger,
                         specs=self.specs)
        self.last_results[name] = result
        self._ran.append(result)
        self._note_database(result)
        self._note_disk(result)
        return result

    def _note_disk(self, result: JobRun) -> None:
        """A full disk is said once, with one alert, and its end once: jobs go on
        running (nothing stays locked), so the runner recovers by itself when space
        returns, and the disk job can free it meanwhile."""
        if result.disk_full and not self.disk_full:
            self.disk_full = True
            log.error("the disk is full: jobs cannot write (%s); free space, e.g. `python -m sparkops "
                      "disk --force`; the runner goes on and recovers when there is space", result.error)
            self._alert(Alert("storage:disk_full", "error", f"disk full on {self.ctx.host}",
                              f"job {result.job}: {result.error}"))
        elif self.disk_full and result.ok and result.acted:  # it wrote: the disk has space again
            self._disk_recovered(f"job {result.job} wrote again")

    def _alert(self, alert: Alert) -> None:
        try:
            alerts.notify(self.ctx, alert)
        except Exception as exc:  # noqa: BLE001 - the ops database may be on the full disk
            if not is_disk_full(exc):
                log.warning("could not send the alert %s: %s", alert.key, exc)
                return
            try:
                alerts.send_unrecorded(self.ctx, alert)
            except Exception as again:  # noqa: BLE001
                log.warning("could not send the alert %s: %s", alert.key, again)

    def _note_database(self, result: JobRun) -> None:
        """Back off while the database is unreachable (1 s doubling to 30 s); the
        workers go on, and the log says so once each way."""
        if result.database_unreachable:
            self._database_backoff = min(max(self._database_backoff * 2, 1.0), DATABASE_BACKOFF_MAX)
            self._database_back_at = time.monotonic() + self._database_backoff
            log.warning("the database is unreachable; scheduled jobs wait %.0f s before trying again "
                        "(running workers go on)", self._database_backoff)
        elif self._database_backoff and result.outcome != "error":
            log.warning("the database is reachable again; jobs run on their schedule")
            self._database_backoff = 0.0
            self._database_back_at = 0.0

    def waiting_for_database(self) -> bool:
        return time.monotonic() < self._database_back_at

    def _scheduled(self, name: str) -> None:
        # Called by schedule; returns None, so schedule always books the next run.
        if self.stop.is_set() or self.waiting_for_database():
            return
        if not self.specs[name].background:
            self.run_job(name)
            return
        running = self._background.get(name)
        if running is not None and not running.done():
            return  # still at it: the next look is at the next interval
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"job-{name}")
        self._background[name] = pool.submit(self.run_job, name)

    def wait_background(self, timeout: float | None = None) -> None:
        """Wait for the jobs running on their own threads (the runner is stopping)."""
        wait([f for f in self._background.values() if not f.done()], timeout=timeout)
        for pool in self._pools.values():
            pool.shutdown(wait=False)

    def run_pending_once(self) -> list[JobRun]:
        """One step of the loop: the jobs that are due (and dispatch, when a worker
        ended since the last step); returns what ran."""
        self._ran = []
        if self.wake.is_set():
            self.wake.clear()
            if "dispatch" in self.specs and not self.stop.is_set() and not self.waiting_for_database():
                self.run_job("dispatch", trigger="schedule")
        self.scheduler.run_pending()
        self.heartbeat_host()
        ran, self._ran = self._ran, []
        return ran

    def next_run(self, name: str):
        """When ``schedule`` will next run job ``name`` (a naive local datetime)."""
        return next(j.next_run for j in self.scheduler.jobs if name in j.tags)

    def start_checks(self) -> None:
        """Start the jobs that run at start (``JobSpec.at_start``: the watchdog, the
        disk, the GPU sample, the review), each on its thread, so the app says "not
        checked" for seconds after a start, not for a whole interval."""
        for spec in self.specs.values():
            if spec.at_start:
                self._scheduled(spec.name)

    def run_forever(self, *, poll_seconds: float = POLL_SECONDS) -> None:
        """Run due jobs until :attr:`stop` is set; the job in progress finishes."""
        self.start_checks()
        while not self.stop.is_set():
            self.run_pending_once()
            idle = self.scheduler.idle_seconds
            wait = poll_seconds if idle is None else min(max(idle, 0.01), poll_seconds)
            if self.wake.wait(wait):
                continue
        self.wait_background()  # the jobs in progress finish
        if self.ctx.shims is not None:
            self.ctx.shims.stop_standby()
        self.ctx.close()
        self.heartbeat_host(stopping=True)

    def request_stop(self, reason: str = "requested") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop.set()
        self.wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the loop after the current job; SIGCHLD (a worker
        shim ended) wakes it to dispatch at once. Main thread only."""
        install_stop_handlers(self.stop, on_signal=self.request_stop)
        if self.ctx.settings["dispatch.wake_on_worker_exit"]:
            signal.signal(signal.SIGCHLD, lambda _sig, _frame: self.wake.set())

    def _gpu_summary(self) -> dict[str, Any]:
        try:
            return gpu.summary(gpu.snapshot())
        except Exception as exc:  # noqa: BLE001 - the fleet view can live without it
            return {"available": False, "reason": f"cannot read the GPUs: {exc}", "devices": []}

    def heartbeat_host(self, *, stopping: bool = False) -> None:
        """Register this runner in ``ops_hosts`` and say it is alive."""
        now = time.monotonic()
        if not stopping and now - self._last_host_beat < hosts.HEARTBEAT_SECONDS:
            return
        self._last_host_beat = now
        try:
            follow_database(self.ctx.store.board)  # a fleet keeps the database's time
        except Exception as exc:  # noqa: BLE001 - the database may be away; keep the last offset
            log.warning("could not read the database's clock: %s", exc)
        info = {"jobs": self.intervals(), "mode": self.ctx.settings["dispatch.mode"],
                "labels": list(self.ctx.settings["host.labels"]), "gpu": self._gpu_summary()}
        try:
            hosts.heartbeat(self.ctx.store.ops, self.ctx.host, pid=os.getpid(), boot_id=procs.boot_id(),
                            version=__version__, capacity=self.ctx.settings["dispatch.max_in_progress"],
                            info=info, now=self.clock(), stopping=stopping)
        except Exception as exc:  # noqa: BLE001 - liveness bookkeeping must not stop the runner
            if is_disk_full(exc):
                self._note_disk(JobRun("heartbeat", "schedule", time.time(), 0.0, "error",
                                       error=f"disk full: {exc}", disk_full=True))
            else:
                log.warning("could not record the runner's heartbeat: %s", exc)
            return
        if self.disk_full:  # it wrote: the disk has space again
            self._disk_recovered("the runner's heartbeat was written")

    def _disk_recovered(self, how: str) -> None:
        self.disk_full = False
        log.warning("the disk has space again (%s); jobs write as before", how)
        self._alert(Alert("storage:disk_full", "recovery", f"disk has space again on {self.ctx.host}", how))


def install_stop_handlers(stop: threading.Event,
                          on_signal: Callable[[str], None] | None = None) -> None:
    """Make SIGTERM and SIGINT set ``stop`` (and nothing else: no I/O in a handler)."""

    def handler(signum: int, _frame: Any) -> None:
        if on_signal is not None:
            on_signal(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def new_context(settings: Settings, store) -> JobContext:
    """The runner's job context: it tracks the shims it starts; secrets for alerts."""
    ctx = JobContext.create(settings, store, shims=ShimTracker(), secrets=load_secrets())
    ctx.resident = True  # jobs may keep things open between runs (the tunnel)
    return ctx


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
    """The runner's lock file, with the job locks."""
    return lock_dir(settings) / "runner.lock"


class RunnerLock(JobLock):
    def acquire(self) -> RunnerLock:
        try:
            super().acquire()
        except JobBusy as busy:
            raise AlreadyRunning(busy.path, busy.holder) from None
        return self

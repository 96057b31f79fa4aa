"""Jobs: named, plain functions with a one-step entry point, run under a lock
and recorded.

A job is ``run(ctx, now=...) -> JobReport``. :func:`run_job` is the only way the
runner, the CLI (``python -m sparkops job run NAME``) and the app's buttons run
one, so all three share:

* **a per-job lock across processes** (an ``flock`` on ``<state dir>/locks/NAME.lock``):
  the same job never runs twice at once; a second caller is told who holds it;
* **isolation**: an exception is caught, logged and recorded; it never escapes
  to the scheduler, so a failing job stays scheduled;
* **a record** in ``ops_job_runs`` (:mod:`sparkops.jobs.history`: start, end, duration, outcome, summary,
  error). Idle scheduled runs (a dispatch tick that found nothing to do) are not
  recorded, so the table holds what happened, not 86,400 rows a day of "nothing";
  the runner's liveness is in ``ops_hosts`` instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparkops.config import Secrets, Settings, state_dir
from sparkops.core.errors import NotFound, Refused
from sparkops.core.procs import host_name
from sparkops.jobs import history
from sparkops.storage.db import is_disconnect, is_disk_full
from sparkops.storage.store import Store

if TYPE_CHECKING:
    from sparkops.engine.dispatch import ShimTracker

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What every job gets: settings, secrets, the store, this host's name, and (in
    the runner only) the tracker of worker shims it started."""

    settings: Settings
    store: Store
    host: str
    shims: ShimTracker | None = None
    #: secrets, loaded by the entry point (jobs never read the environment)
    secrets: Secrets = field(default_factory=Secrets)
    #: what each job saw last time, under its own name (a change token, the time of
    #: its last run), so it can skip work when nothing changed
    last_seen: dict[str, Any] = field(default_factory=dict)
    #: what a job keeps open between runs in the runner (the tunnel), under its own
    #: name; closed by :meth:`close`
    kept_open: dict[str, Any] = field(default_factory=dict)
    #: restart commands started for a service (by the watchdog or an operator's
    #: button), reaped by the watchdog once they exit
    restarts: list[subprocess.Popen] = field(default_factory=list)
    #: True in the long-lived jobs runner: a job may keep things open between runs
    resident: bool = False

    def close(self) -> None:
        """Close what jobs kept open (the runner is stopping)."""
        for name, value in list(self.kept_open.items()):
            closer = getattr(value, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001 - closing one must not stop the others
                    log.warning("closing what job %s kept open failed: %s", name, exc)

    @classmethod
    def create(cls, settings: Settings, store: Store, shims: ShimTracker | None = None,
               secrets: Secrets | None = None) -> JobContext:
        return cls(settings=settings, store=store, host=host_name(settings["host.name"]), shims=shims,
                   secrets=secrets or Secrets())


@dataclass(frozen=True)
class JobReport:
    """What a job did: one line for people, ``acted`` false when it did nothing."""

    summary: str
    acted: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    #: What the job found wrong (a service down, a zombie, a stale run): it ran
    #: fine, but the outcome is not "all is well". Such a run is always recorded.
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobSpec:
    name: str
    run: Callable[..., JobReport]
    interval_setting: str
    help: str
    #: One at a time across the fleet (a PostgreSQL advisory lock), not per host.
    fleet: bool = False
    #: In the runner, runs on a thread of its own, so that a slow service, disk or
    #: remote host never holds up dispatch and reclaim (which stay on the main loop).
    background: bool = False
    #: In the runner, runs once as soon as it starts, not only after its first
    #: interval: what it checks (services, the GPU, the disks, the sprint) is "not
    #: checked" for seconds, not minutes.
    at_start: bool = False
    #: The setting that turns the job on (it does nothing while it is empty), if any.
    needs: str | None = None

    def configured(self, settings: Settings) -> bool:
        return self.needs is None or bool(settings[self.needs])

    def interval(self, settings: Settings) -> float:
        return float(settings[self.interval_setting])


@dataclass(frozen=True)
class JobRun:
    """One recorded run of a job."""

    job: str
    trigger: str
    started_at: float
    duration_seconds: float
    outcome: str  # "ok" | "error" | "skipped"
    summary: str = ""
    error: str | None = None
    acted: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    #: it failed because the database could not be reached (the runner backs off)
    database_unreachable: bool = False
    #: it failed because the disk is full (the runner says so once, and alerts)
    disk_full: bool = False
    #: how many problems it found (``JobReport.problems``)
    problems: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


# -- running one job ---------------------------------------------------------------


def run_job(ctx: JobContext, name: str, specs: dict[str, JobSpec], *, now: float | None = None,
            trigger: str = "cli", **options: Any) -> JobRun:
    """Run job ``name`` of ``specs`` once, under its lock, and record it. Never
    raises for a failing job (the error is in the returned :class:`JobRun`); raises
    :class:`NotFound` for an unknown name. (Every job, by name, is
    :func:`sparkops.runner.registry.all_jobs`; this module imports no job.)"""
    if name not in specs:
        raise NotFound("job", f"{name!r} (jobs: {', '.join(sorted(specs))})")
    started = time.time() if now is None else float(now)
    clock = time.monotonic()
    lock = JobLock(lock_dir(ctx.settings) / f"{name}.lock")
    try:
        lock.acquire()
    except OSError as exc:
        result = JobRun(name, trigger, started, 0.0, "error", summary="failed",
                        error=f"cannot take the lock {lock.path}: {exc.strerror or exc}")
        log.error("job %s: %s", name, result.error)
        _record(ctx, result)
        return result
    except JobBusy as busy:
        # recorded like any run that did not end "ok" (a scheduled one too: it only
        # happens while a person's run of the same job holds the lock)
        result = JobRun(name, trigger, started, 0.0, "skipped", summary=str(busy), acted=False)
        _record(ctx, result)
        return result
    try:
        with ctx.store.ops.fleet_lock(f"job:{name}") if specs[name].fleet else nullcontext(True) as held:
            if held:
                report = specs[name].run(ctx, now=now, **options)
            else:
                report = JobReport("another host is running it (one at a time across the fleet)", acted=False)
        result = JobRun(name, trigger, started, time.monotonic() - clock, "ok",
                        summary=report.summary, acted=report.acted, details=report.details,
                        problems=len(report.problems))
    except Exception as exc:  # noqa: BLE001 - a failing job must never stop its caller
        error = f"{type(exc).__name__}: {exc}"
        unreachable = database_unreachable(exc)
        full = is_disk_full(exc)
        if full:  # one line, no traceback: the runner says so once and alerts
            error = f"disk full: {error}"
            log.warning("job %s: %s", name, error.splitlines()[0])
        elif unreachable:  # one line, no traceback: the runner backs off and says so
            log.warning("job %s: the database is unreachable: %s", name, error.splitlines()[0])
        else:
            log.error("job %s failed (it stays scheduled): %s\n%s", name, error,
                      traceback.format_exc().rstrip())
        result = JobRun(name, trigger, started, time.monotonic() - clock, "error",
                        summary="failed", error=error[:2000], database_unreachable=unreachable, disk_full=full)
    finally:
        lock.release()
    if result.acted or result.problems or result.outcome != "ok" or trigger != "schedule":
        _record(ctx, result)
    if result.acted and result.ok:
        log.info("job %s: %s (%.2fs)", name, result.summary, result.duration_seconds)
    return result


def database_unreachable(exc: BaseException) -> bool:
    """True for a lost or refused database connection (directly or as the cause of a
    StorageError), as opposed to a job's own failure."""
    return is_disconnect(exc) or (exc.__cause__ is not None and is_disconnect(exc.__cause__))


def _record(ctx: JobContext, run: JobRun) -> None:
    try:
        history.record(ctx.store.ops, job=run.job, host=ctx.host, trigger=run.trigger, started_at=run.started_at,
                       duration_seconds=run.duration_seconds, outcome=run.outcome, summary=run.summary,
                       error=run.error, problems=run.problems)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not turn a good run into a failure
        log.warning("could not record the run of job %s: %s", run.job, exc)


# -- locks --------------------------------------------------------------------------


def lock_dir(settings: Settings) -> Path:
    return state_dir(settings) / "locks"


class JobBusy(Refused):
    """The lock is held by another process."""

    def __init__(self, path: Path, holder: str | None):
        self.path = path
        self.holder = holder
        who = f"pid {holder}" if holder else "another process"
        super().__init__(f"{path.stem} is already running ({who} holds {path})")


class JobLock:
    """An exclusive, non-blocking ``flock`` on ``path`` that holds our pid.

    The kernel drops it when the process ends, however it ends, so a crashed
    holder never leaves a stale lock. The file itself stays."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> JobLock:
        """Take the lock; :class:`JobBusy` if another process holds it. The holder's
        pid is written into the file for people to read; when that write fails (a
        full disk) the lock is still held, and released as usual: a lock is never
        left taken by an error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or None
            finally:
                os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise JobBusy(self.path, holder) from None
            raise
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError as exc:
            log.warning("holding %s without writing our pid into it: %s", self.path, exc.strerror or exc)
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # the pid stays in the file; the lock goes with the descriptor
        finally:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

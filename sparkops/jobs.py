"""Jobs: named, plain functions with a one-step entry point, run under a lock
and recorded.

A job is ``run(ctx, now=...) -> JobReport``. :func:`run_job` is the only way the
runner, the CLI (``python -m sparkops job run NAME``) and the app's buttons run
one, so all three share:

* **a per-job lock across processes** (an ``flock`` on ``<state dir>/locks/NAME.lock``):
  the same job never runs twice at once; a second caller is told who holds it;
* **isolation**: an exception is caught, logged and recorded; it never escapes
  to the scheduler, so a failing job stays scheduled;
* **a record** in ``ops_job_runs`` (start, end, duration, outcome, summary,
  error). Idle scheduled runs (a dispatch tick that found nothing to do) are not
  recorded, so the table holds what happened, not 86,400 rows a day of "nothing";
  the runner's liveness is in ``ops_hosts`` instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import insert

from sparkops.clock import epoch
from sparkops.config import Secrets, Settings
from sparkops.db import is_disconnect
from sparkops.errors import NotFound, Refused
from sparkops.procs import host_name
from sparkops.schema import ops_job_runs
from sparkops.store import Store

if TYPE_CHECKING:
    from sparkops.dispatch import ShimTracker

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What every job gets: settings, secrets, the store, this host's name, and (in
    the runner only) the tracker of worker shims it started."""

    settings: Settings
    store: Store
    host: str
    shims: "ShimTracker | None" = None
    #: secrets, loaded by the entry point (jobs never read the environment)
    secrets: Secrets = field(default_factory=Secrets)
    #: what a job saw last time, for jobs that can skip work when nothing changed; and
    #: what a job keeps open between runs in the runner (the tunnel), closed by close()
    memo: dict[str, Any] = field(default_factory=dict)
    #: True in the long-lived jobs runner: a job may keep things open between runs
    resident: bool = False

    def close(self) -> None:
        """Close what jobs kept open in :attr:`memo` (the runner is stopping)."""
        for name, value in list(self.memo.items()):
            closer = getattr(value, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception as exc:  # noqa: BLE001 - closing one must not stop the others
                    log.warning("closing what job %s kept open failed: %s", name, exc)

    @classmethod
    def create(cls, settings: Settings, store: Store, shims: "ShimTracker | None" = None,
               secrets: Secrets | None = None) -> "JobContext":
        return cls(settings=settings, store=store, host=host_name(settings["host.name"]), shims=shims,
                   secrets=secrets or Secrets())


@dataclass(frozen=True)
class JobReport:
    """What a job did: one line for people, ``acted`` false when it did nothing."""

    summary: str
    acted: bool = True
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobSpec:
    name: str
    run: Callable[..., JobReport]
    interval_setting: str
    help: str
    #: One at a time across the fleet (a PostgreSQL advisory lock), not per host.
    fleet: bool = False

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

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def registry() -> dict[str, JobSpec]:
    """Every job, by name."""
    # Imported here: the job modules import JobContext and JobReport from this one.
    from sparkops import disk, dispatch, export, gpu, push, reclaim, remote_gpu, review, tunnel, watchdog

    specs = [
        JobSpec("dispatch", dispatch.run, "dispatch.interval_seconds",
                "Reap dead local runs, then claim ready tasks into free slots and start workers."),
        JobSpec("reclaim", reclaim.run, "reclaim.interval_seconds",
                "Close runs whose worker is gone, silent or over its max runtime; requeue the task."),
        JobSpec("promote", promote, "runner.promote_interval_seconds",
                "Promote todo tasks whose parents are all finished.", fleet=True),
        JobSpec("watchdog", watchdog.run, "watchdog.interval_seconds",
                "Check the services and vLLM, restart what is down, kill GPU zombies, report stale runs."),
        JobSpec("disk", disk.run, "watchdog.interval_seconds",
                "Above disk.threshold_percent, delete old logs and finished workspaces."),
        JobSpec("gpu-sample", gpu.sample, "gpu.sample_interval_seconds",
                "Store one GPU sample per device for the GPU page; prune old samples."),
        JobSpec("review", review.run, "review.interval_seconds",
                "Record phase boundaries; write the sprint review report (metrics, phases, risks, narrative).",
                fleet=True),
        JobSpec("export", export.run, "export.interval_seconds",
                "Write the board as CSV and JSON into export.dir (the files replaced atomically)."),
        JobSpec("push", push.run, "remote.push_interval_seconds",
                "Copy the latest export to remote.push_host over SFTP (only changed files, each "
                "renamed into place whole)."),
        JobSpec("tunnel", tunnel.run, "remote.tunnel_interval_seconds",
                "Keep the reverse tunnel to the app open on remote.tunnel_host: probe it end to end, "
                "reconnect with backoff."),
        JobSpec("remote-gpu", remote_gpu.run, "remote.gpu_interval_seconds",
                "Read the GPUs of remote.gpu_hosts over SSH with nvidia-smi, for the GPU page."),
    ]
    return {spec.name: spec for spec in specs}


def promote(ctx: JobContext, *, now: float | None = None) -> JobReport:
    """The ``promote`` job: the safety net for parents finished by another tool."""
    from sparkops import board

    token = ctx.store.board.change_token()
    if token is not None and ctx.memo.get("promote") == token:
        return JobReport("nothing changed since the last look", acted=False)
    promoted = board.promote_ready(ctx.store.board, now=now)
    ctx.memo["promote"] = ctx.store.board.change_token()
    if not promoted:
        return JobReport("nothing to promote", acted=False)
    return JobReport(f"promoted {len(promoted)} task(s): {', '.join(promoted)}",
                     details={"promoted": promoted})


# -- running one job ---------------------------------------------------------------


def run_job(ctx: JobContext, name: str, *, now: float | None = None, trigger: str = "cli",
            specs: dict[str, JobSpec] | None = None, **options: Any) -> JobRun:
    """Run job ``name`` once, under its lock, and record it. Never raises for a
    failing job (the error is in the returned :class:`JobRun`); raises
    :class:`NotFound` for an unknown name."""
    specs = specs or registry()
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
                        summary=report.summary, acted=report.acted, details=report.details)
    except Exception as exc:  # noqa: BLE001 - a failing job must never stop its caller
        error = f"{type(exc).__name__}: {exc}"
        unreachable = database_unreachable(exc)
        if unreachable:  # one line, no traceback: the runner backs off and says so
            log.warning("job %s: the database is unreachable: %s", name, error.splitlines()[0])
        else:
            log.error("job %s failed (it stays scheduled): %s\n%s", name, error,
                      traceback.format_exc().rstrip())
        result = JobRun(name, trigger, started, time.monotonic() - clock, "error",
                        summary="failed", error=error[:2000], database_unreachable=unreachable)
    finally:
        lock.release()
    if result.acted or result.outcome != "ok" or trigger != "schedule":
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
        with ctx.store.ops.write() as conn:
            conn.execute(insert(ops_job_runs).values(
                job=run.job, host=ctx.host, pid=os.getpid(), trigger=run.trigger,
                started_at=epoch(run.started_at), ended_at=epoch(run.started_at + run.duration_seconds),
                duration_ms=int(run.duration_seconds * 1000), outcome=run.outcome,
                summary=run.summary[:2000], error=run.error,
            ))
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not turn a good run into a failure
        log.warning("could not record the run of job %s: %s", run.job, exc)


# -- locks --------------------------------------------------------------------------


def state_dir(settings: Settings) -> Path:
    """Where SparkOps keeps this host's state files (locks): next to a SQLite ops
    database, else ``data/`` under the settings' base directory."""
    url = settings["storage.ops_url"]
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):].split("?", 1)[0]).parent
    return settings.base_dir / "data"


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

    def acquire(self) -> "JobLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or None
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise JobBusy(self.path, holder) from None
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

    def __enter__(self) -> "JobLock":
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

"""Disk: watch the file systems SparkOps writes to and, above the threshold,
delete old logs and the workspaces of tasks finished long ago.

Three steps, each usable on its own:

* :func:`usage` measures the watched paths (``disk.paths``), one entry per file
  system;
* :func:`~sparkops.watch.cleanup_plan.plan_cleanup` lists what *may* go, and why everything else stays;
* :func:`clean` deletes the plan's candidates, oldest first, only while a watched
  file system is above ``disk.threshold_percent`` (or when forced), and stops as
  soon as none is.

What may go:

* **logs**: regular files under ``disk.log_roots`` whose mtime is older than
  ``disk.log_retention_days``, except the runner's live log, the log of any run
  still open, the SQLite databases, the config file, and anything under the
  workspace root or the lock directory (should a log root contain them);
* **workspaces**: directories directly under ``dispatch.workspace_root`` named by
  the id of a task that is ``done`` or ``archived``, has no open run, and
  finished longer ago than ``disk.workspace_retention_days`` (``completed_at``,
  else the task's latest event). A directory of an unknown task is kept.

Safety: roots are resolved first; a root that is ``/``, the user's home (or a
directory above it), or not a directory is refused as a whole. The walk never
follows a symlink; a symlink whose target lies outside its root is refused (it
and its target stay); one whose target lies inside is deleted as a link. Every
candidate is resolved again right before it is deleted, and a workspace's task
is looked up again (another tool may have reopened it). Failures to delete are
collected in the report, never raised.

The plan is :mod:`sparkops.watch.cleanup_plan`.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select

from sparkops.board.model import FINISHED
from sparkops.jobs.framework import JobContext, JobReport
from sparkops.storage.db import Database, is_disk_full
from sparkops.storage.schema import task_runs, tasks
from sparkops.watch import alerts, cleanup_plan

log = logging.getLogger(__name__)

#: Deletions between two looks at the disk (a workspace is always followed by one).
RECHECK_EVERY = 10


# -- usage -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskUsage:
    """One file system, as seen from ``path`` (the first watched path on it).

    ``percent`` is ``used / (used + free)``, as ``df`` computes it (space reserved
    for root counts as neither). ``also`` holds the other watched paths on the
    same file system. A path that cannot be measured has ``error`` set and zeros."""

    path: Path
    mount: Path | None
    total_bytes: int
    used_bytes: int
    free_bytes: int
    percent: float
    device: int | None = None
    also: tuple[Path, ...] = ()
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "mount": str(self.mount) if self.mount else None,
                "total_bytes": self.total_bytes, "used_bytes": self.used_bytes,
                "free_bytes": self.free_bytes, "percent": round(self.percent, 2),
                "also": [str(p) for p in self.also], "error": self.error}


def usage(paths: Iterable[str | os.PathLike]) -> list[DiskUsage]:
    """Measure each path's file system; paths on one file system (same ``st_dev``)
    give one entry. A missing or unreadable path gives an entry with ``error``."""
    out: list[DiskUsage] = []
    by_device: dict[int, int] = {}  # st_dev -> index in out
    for raw in paths:
        path = Path(raw)
        try:
            device = os.stat(path).st_dev
            if device in by_device:
                first = out[by_device[device]]
                out[by_device[device]] = replace(first, also=first.also + (path,))
                continue
            total, used, free = shutil.disk_usage(path)
        except OSError as exc:
            why = "does not exist" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
            out.append(DiskUsage(path, None, 0, 0, 0, 0.0, error=f"{path}: {why}"))
            continue
        percent = 100.0 * used / (used + free) if used + free else 0.0
        by_device[device] = len(out)
        out.append(DiskUsage(path, _mount_point(path), total, used, free, percent, device=device))
    return out


def _mount_point(path: Path) -> Path | None:
    current = Path(os.path.realpath(path))
    while not os.path.ismount(current):
        if current.parent == current:
            return None
        current = current.parent
    return current


def _over(usages: Sequence[DiskUsage], threshold: float) -> list[DiskUsage]:
    return [u for u in usages if u.error is None and u.percent > threshold]


# -- cleaning ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanupReport:
    """What :func:`clean` did (or, with ``dry_run``, would do).

    ``deleted`` are the candidates that went (oldest first); ``freed_bytes`` is
    their sum plus whatever part of a workspace went before an error stopped it.
    ``triggered`` is false when no watched path was above the threshold and the
    run was not forced; then nothing was planned. ``remaining`` counts the
    candidates left when cleaning stopped early."""

    usage_before: list[DiskUsage]
    usage_after: list[DiskUsage]
    deleted: list[cleanup_plan.Candidate]
    freed_bytes: int
    refused: list[tuple[Path, str]]
    errors: list[tuple[Path, str]]
    dry_run: bool
    triggered: bool
    threshold_percent: float
    forced: bool = False
    remaining: int = 0
    kept: dict[str, int] = field(default_factory=dict)

    @property
    def still_over(self) -> list[DiskUsage]:
        """Watched file systems still above the threshold after cleaning (the
        watchdog's cue to alert: cleanup could not fix it)."""
        return _over(self.usage_after, self.threshold_percent)

    def as_dict(self) -> dict[str, Any]:
        return {
            "still_over": [str(u.path) for u in self.still_over],
            "usage_before": [u.as_dict() for u in self.usage_before],
            "usage_after": [u.as_dict() for u in self.usage_after],
            "deleted": [c.as_dict() for c in self.deleted],
            "freed_bytes": self.freed_bytes,
            "refused": [[str(p), why] for p, why in self.refused],
            "errors": [[str(p), why] for p, why in self.errors],
            "dry_run": self.dry_run, "triggered": self.triggered, "forced": self.forced,
            "threshold_percent": self.threshold_percent, "remaining": self.remaining,
            "kept": dict(self.kept),
        }


Measure = Callable[[Sequence[Path]], list[DiskUsage]]


def clean(ctx: JobContext, *, now: float | None = None, dry_run: bool = False, force: bool = False,
          measure: Measure | None = None, recheck_every: int = RECHECK_EVERY) -> CleanupReport:
    """Delete old logs and finished workspaces while the disk is too full.

    Acts only when a watched path (``disk.paths``) is above
    ``disk.threshold_percent``; then deletes, oldest first, the candidates that
    lie on a file system above it, looks at the disk again every
    ``recheck_every`` deletions (and after each workspace) and stops once no
    watched file system is above the threshold. ``force`` (the operator's
    button) deletes every candidate whatever the usage. ``dry_run`` deletes
    nothing and lists every candidate that could go. ``measure`` replaces
    :func:`usage` (tests). Never raises for a file that cannot be deleted."""
    measure = measure or usage
    watched = [Path(p) for p in ctx.settings["disk.paths"]]
    threshold = float(ctx.settings["disk.threshold_percent"])
    before = measure(watched)
    over = _over(before, threshold)
    triggered = force or bool(over)
    if not triggered:
        return CleanupReport(before, before, [], 0, [], [], dry_run, False, threshold, force)

    plan = cleanup_plan.plan_cleanup(ctx, now=now)
    errors = list(plan.errors)
    kept = dict(plan.kept)
    eligible = plan.candidates
    if not force:
        devices = {u.device for u in over}
        eligible = [c for c in plan.candidates if c.device in devices]
        if len(eligible) < len(plan.candidates):
            kept["on a file system below the threshold"] = len(plan.candidates) - len(eligible)
    if dry_run:
        return CleanupReport(before, before, list(eligible), sum(c.bytes for c in eligible),
                             plan.refused, errors, True, True, threshold, force, kept=kept)

    deleted: list[cleanup_plan.Candidate] = []
    freed = since_check = attempted = 0
    devices = {u.device for u in over}
    for candidate in eligible:
        if not force and candidate.device not in devices:
            continue  # its file system went below the threshold meanwhile
        attempted += 1
        if candidate.kind == "workspace" and not _still_finished(ctx.store.board, candidate.task_id):
            kept["task changed since the plan"] = kept.get("task changed since the plan", 0) + 1
            continue
        gone, error = _delete(candidate)
        freed += gone
        if error is None:
            deleted.append(candidate)
            log.debug("deleted %s %s (%d bytes): %s", candidate.kind, candidate.path,
                      candidate.bytes, candidate.reason)
        elif error:
            errors.append((candidate.path, error))
            log.warning("could not delete %s: %s", candidate.path, error)
        since_check += 1
        if force:
            continue
        if since_check >= max(1, recheck_every) or candidate.kind == "workspace":
            since_check = 0
            devices = {u.device for u in _over(measure(watched), threshold)}
            if not devices:
                break
    after = measure(watched)
    remaining = len(eligible) - attempted
    report = CleanupReport(before, after, deleted, freed, plan.refused, errors, False, True,
                           threshold, force, remaining=remaining, kept=kept)
    if deleted or errors:
        log.info("%s", summary(report))
    for path, why in plan.refused:
        log.warning("disk cleanup refused %s: %s", path, why)
    return report


def _still_finished(db: Database, task_id: str | None) -> bool:
    """The workspace's task is still finished with no open run (looked up again
    right before its workspace goes: another tool may have reopened it)."""
    with db.read() as conn:
        status = conn.execute(select(tasks.c.status).where(tasks.c.id == task_id)).scalar()
        open_run = conn.execute(select(task_runs.c.id).where(
            task_runs.c.task_id == task_id, task_runs.c.ended_at.is_(None)).limit(1)).first()
    return status in FINISHED and open_run is None


def _delete(candidate: cleanup_plan.Candidate) -> tuple[int, str | None]:
    """Delete one candidate: ``(bytes freed, error)``. The error is None when it
    went, ``""`` when it was already gone (not an error), else the reason."""
    path = str(candidate.path)
    root = str(candidate.root)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0, ""
    except OSError as exc:
        return 0, f"cannot inspect: {exc.strerror or exc}"
    # resolved again right before deleting: nothing outside the root, ever
    where = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    if not cleanup_plan.inside(where, root):
        return 0, f"refused: now resolves to {where}, outside {root}"
    is_link = stat.S_ISLNK(st.st_mode)
    if is_link and not cleanup_plan.inside(os.path.realpath(path), root):
        return 0, f"refused: now a symlink to {os.path.realpath(path)}, outside {root}"
    try:
        if is_link or candidate.kind == "log":
            if stat.S_ISDIR(st.st_mode):
                return 0, "refused: a log candidate became a directory"
            os.unlink(path)
            return (0 if is_link else candidate.bytes), None
        if not stat.S_ISDIR(st.st_mode):
            return 0, "refused: a workspace candidate is no longer a directory"
        failures: list[str] = []

        def note(_func: Any, failed: str, exc: Any) -> None:
            exc = exc[1] if isinstance(exc, tuple) else exc  # onerror gets exc_info, onexc the exception
            failures.append(f"{failed}: {getattr(exc, 'strerror', None) or exc}")

        # removes symlinks inside as links, and refuses to start at a symlink
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=note)
        else:
            shutil.rmtree(path, onerror=note)
    except FileNotFoundError:
        return 0, ""
    except OSError as exc:
        return 0, exc.strerror or str(exc)
    if not failures:
        return candidate.bytes, None
    left = cleanup_plan.tree_bytes(path) if os.path.lexists(path) else 0
    shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
    freed = max(0, candidate.bytes - left)
    return freed, f"partly deleted ({_human(freed)} freed): {shown}"


# -- reporting ---------------------------------------------------------------------------


def summary(report: CleanupReport) -> str:
    """One line for people, e.g. ``disk /data 91% -> 78%: freed 3.2 GB (12 logs, 4 workspaces)``."""
    after = {u.device: u for u in report.usage_after}
    disks = []
    for u in report.usage_before:
        if u.error is not None:
            disks.append(u.error)
            continue
        new = after.get(u.device)
        if report.triggered and not report.dry_run and new is not None and new.error is None:
            disks.append(f"{u.path} {u.percent:.0f}% -> {new.percent:.0f}%")
        else:
            disks.append(f"{u.path} {u.percent:.0f}%")
    head = "disk " + (", ".join(disks) if disks else "(no watched paths)")
    if not report.triggered:
        return f"{head}: below {report.threshold_percent:g}%, nothing to clean"
    logs = sum(1 for c in report.deleted if c.kind == "log")
    workspaces = len(report.deleted) - logs
    what = f"{logs} log{'s' if logs != 1 else ''}, {workspaces} workspace{'s' if workspaces != 1 else ''}"
    if report.dry_run:
        line = f"{head}: dry run, would free {_human(report.freed_bytes)} ({what})"
    elif report.deleted or report.freed_bytes:
        line = f"{head}: freed {_human(report.freed_bytes)} ({what})"
    else:
        line = f"{head}: nothing old enough to delete"
    extras = []
    if report.forced:
        extras.append("forced")
    if report.refused:
        extras.append(f"{len(report.refused)} refused")
    if report.errors:
        extras.append(f"{len(report.errors)} error{'s' if len(report.errors) != 1 else ''}")
    return line + (f"; {', '.join(extras)}" if extras else "")


def _human(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def run(ctx: JobContext, *, now: float | None = None, dry_run: bool = False,
        force: bool = False) -> JobReport:
    """The disk step as a job (for the watchdog, the CLI and the app's button)."""
    report = clean(ctx, now=now, dry_run=dry_run, force=force)
    acted = bool(report.deleted or report.errors) and not report.dry_run
    if not report.dry_run:
        _alert(ctx, report, now=now)
    return JobReport(summary(report), acted=acted, details=report.as_dict())


def _alert(ctx: JobContext, report: CleanupReport, *, now: float | None) -> None:
    """A file system still above the threshold after cleaning is an error; one
    back under it after an alert is a recovery."""

    still = {u.path for u in report.still_over}
    for used in report.usage_after or report.usage_before:
        if used.error:
            continue
        key = f"disk:{used.mount or used.path}"
        if used.path in still:
            alert = alerts.Alert(
                key, "error", f"disk {used.mount or used.path} is {used.percent:.0f}% full",
                f"{summary(report)}; still above disk.threshold_percent "
                f"({report.threshold_percent:g}%) after cleaning what may be cleaned")
        else:
            alert = alerts.Alert(key, "recovery", f"disk {used.mount or used.path} is fine again",
                                 f"{used.percent:.0f}% used")
        try:
            alerts.notify(ctx, alert, now=now)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            # the ops database is on the full disk: say it without recording it
            if alert.level != "recovery":
                alerts.send_unrecorded(ctx, alert, now=now)

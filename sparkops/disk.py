"""Disk: watch the file systems SparkOps writes to and, above the threshold,
delete old logs and the workspaces of tasks finished long ago.

Three steps, each usable on its own:

* :func:`usage` measures the watched paths (``disk.paths``), one entry per file
  system;
* :func:`plan_cleanup` lists what *may* go, and why everything else stays;
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

A plan reads the board with three queries whatever the number of files, and walks
the trees with ``os.scandir`` (10,000 log files: well under a second).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from sparkops.board import FINISHED
from sparkops.db import Database
from sparkops.jobs import JobContext, JobReport, lock_dir
from sparkops.schema import task_events, task_runs, tasks

log = logging.getLogger(__name__)

DAY = 86400.0
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


# -- planning ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """Something that may be deleted. ``bytes`` is the space it takes on disk
    (allocated blocks, hard links inside a workspace counted once); a symlink is
    deleted as a link and counts 0."""

    path: Path
    kind: str  # "log" | "workspace"
    bytes: int
    age_days: float
    reason: str
    root: Path
    device: int
    is_link: bool = False
    task_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "bytes": self.bytes,
                "age_days": round(self.age_days, 2), "reason": self.reason,
                "is_link": self.is_link, "task_id": self.task_id}


@dataclass
class CleanupPlan:
    """What may go (oldest first), what was refused, and why the rest stays.

    ``kept`` counts items kept per reason; ``kept_workspaces`` names the
    workspace directories kept (they are few, and an operator may want them)."""

    candidates: list[Candidate] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=dict)
    kept_workspaces: list[tuple[Path, str]] = field(default_factory=list)
    errors: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.candidates)

    def keep(self, why: str, count: int = 1) -> None:
        self.kept[why] = self.kept.get(why, 0) + count

    def keep_workspace(self, path: Path, why: str) -> None:
        self.keep(why)
        self.kept_workspaces.append((path, why))


@dataclass(frozen=True)
class _Board:
    """What the plan needs from the board, read once."""

    tasks: dict[str, Any]            # id -> row (status, completed_at, workspace_path)
    open_runs: dict[str, list[int]]  # task id -> ids of its open runs
    last_event: dict[str, int]       # finished task without completed_at -> latest event time


def plan_cleanup(ctx: JobContext, *, now: float | None = None) -> CleanupPlan:
    """List the logs and workspaces that may be deleted now (see the module
    docstring for the rules). Reads the board and the file system; changes nothing."""
    ts = time.time() if now is None else float(now)
    settings = ctx.settings
    plan = CleanupPlan()
    state = _read_board(ctx.store.board)
    workspace_root = Path(settings["dispatch.workspace_root"])
    protected_files, protected_dirs = _protected(ctx, state, workspace_root)
    for root, real_root in _log_roots(plan, settings["disk.log_roots"], protected_dirs):
        _plan_logs(plan, root, real_root, ts=ts, retention_days=settings["disk.log_retention_days"],
                   protected_files=protected_files, protected_dirs=protected_dirs)
    _plan_workspaces(plan, workspace_root, state, ts=ts,
                     retention_days=settings["disk.workspace_retention_days"],
                     protected=_protected_inside_workspaces(state, protected_files, protected_dirs,
                                                            workspace_root))
    plan.candidates.sort(key=lambda c: (-c.age_days, str(c.path)))
    return plan


def _read_board(db: Database) -> _Board:
    finished = [str(s) for s in FINISHED]
    with db.read() as conn:
        rows = {r.id: r for r in conn.execute(
            select(tasks.c.id, tasks.c.status, tasks.c.completed_at, tasks.c.workspace_path))}
        open_runs: dict[str, list[int]] = {}
        for run_id, task_id in conn.execute(
                select(task_runs.c.id, task_runs.c.task_id).where(task_runs.c.ended_at.is_(None))):
            open_runs.setdefault(task_id, []).append(int(run_id))
        no_finish_time = select(tasks.c.id).where(tasks.c.status.in_(finished),
                                                  tasks.c.completed_at.is_(None))
        last_event = {task_id: int(at) for task_id, at in conn.execute(
            select(task_events.c.task_id, func.max(task_events.c.created_at))
            .where(task_events.c.task_id.in_(no_finish_time))
            .group_by(task_events.c.task_id)) if at is not None}
    return _Board(rows, open_runs, last_event)


def _protected(ctx: JobContext, state: _Board,
               workspace_root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Real paths never deleted (files) and never entered from a log root (dirs)."""
    from sparkops.dispatch import run_log_path  # the one definition of a run's log path

    settings = ctx.settings
    files: dict[str, str] = {os.path.realpath(settings["runner.log_file"]): "the runner's live log"}
    for task_id, run_ids in state.open_runs.items():
        for run_id in run_ids:
            files[os.path.realpath(run_log_path(settings, task_id, run_id))] = "log of an open run"
    for db in (ctx.store.board, ctx.store.ops):
        if db.path is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                files[os.path.realpath(f"{db.path}{suffix}")] = "a database file"
    if settings.source is not None:
        files[os.path.realpath(settings.source)] = "the config file"
    dirs = {os.path.realpath(workspace_root): "inside the workspace root",
            os.path.realpath(lock_dir(settings)): "inside the lock directory"}
    return files, dirs


def _protected_inside_workspaces(state: _Board, files: dict[str, str], dirs: dict[str, str],
                                 workspace_root: Path) -> list[tuple[str, str]]:
    """Real paths that no deleted workspace may contain: the protected files, and
    the workspaces of tasks that are not finished or have an open run (a task's
    ``workspace_path`` may point anywhere, even into another task's directory)."""
    out = [(p, why) for p, why in files.items()]
    out += [(p, why) for p, why in dirs.items() if why != "inside the workspace root"]
    for task_id, row in state.tasks.items():
        if row.status in FINISHED and task_id not in state.open_runs:
            continue
        why = f"holds the workspace of {row.status} task {task_id}"
        out.append((os.path.realpath(workspace_root / task_id), why))
        if row.workspace_path:
            out.append((os.path.realpath(row.workspace_path), why))
    return out


#: :func:`check_root`'s answer for a root that does not exist (yet): nothing to
#: clean there, which is not a refusal.
MISSING = "does not exist"


def check_root(root: Path) -> tuple[str | None, str | None]:
    """``(real path, None)`` for a root that may be cleaned, ``(None, why)`` otherwise
    (``why`` is :data:`MISSING` for a root that does not exist)."""
    real = os.path.realpath(root)
    shown = f"{root}" + (f" (resolves to {real})" if real != str(root) else "")
    if real == os.path.realpath(os.sep) or os.path.dirname(real) == real:
        return None, f"{shown} is the file system root; refusing to clean it"
    for home in _homes():
        if real == home:
            return None, f"{shown} is the home directory; refusing to clean it"
        if _inside(home, real):
            return None, f"{shown} contains the home directory {home}; refusing to clean it"
    if not os.path.lexists(real):
        return None, MISSING
    if not os.path.isdir(real):
        return None, f"{shown} is not a directory; refusing to clean it"
    return real, None


def _homes() -> set[str]:
    homes = set()
    try:
        homes.add(os.path.realpath(Path.home()))
    except (RuntimeError, KeyError):
        pass
    try:
        homes.add(os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir))
    except KeyError:
        pass
    return homes


def _inside(path: str, root: str) -> bool:
    """``path`` lies strictly inside ``root`` (both real, absolute paths)."""
    return path.startswith(root.rstrip(os.sep) + os.sep)


def _log_roots(plan: CleanupPlan, roots: Iterable[Path],
               protected_dirs: dict[str, str]) -> list[tuple[Path, str]]:
    """The log roots that may be cleaned, as ``(root, real root)``; a root inside
    another is walked with it, once. Refused roots go to ``plan.refused``: those
    :func:`check_root` refuses, and a root inside the workspace root or the lock
    directory (workspaces go by their task's state, never by file age)."""
    usable: list[tuple[Path, str]] = []
    for root in map(Path, roots):
        real_root, why = check_root(root)
        if real_root is not None:
            inside = next((d for d in protected_dirs if real_root == d or _inside(real_root, d)), None)
            if inside is not None:
                real_root, why = None, f"{root} is {protected_dirs[inside]} {inside}; refusing to clean it"
        if why == MISSING:
            plan.keep("root does not exist")
        elif real_root is None:
            plan.refused.append((root, f"log root {why}"))
        else:
            usable.append((root, real_root))
    walked: list[tuple[Path, str]] = []
    for root, real in sorted(usable, key=lambda pair: len(pair[1])):
        if not any(real == other or _inside(real, other) for _, other in walked):
            walked.append((root, real))
    return walked


def _plan_logs(plan: CleanupPlan, root: Path, real_root: str, *, ts: float, retention_days: float,
               protected_files: dict[str, str], protected_dirs: dict[str, str]) -> None:
    older = f"log older than {retention_days:g} days"
    stack = [real_root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            plan.errors.append((Path(directory), f"cannot list: {exc.strerror or exc}"))
            continue
        for entry in entries:
            path = entry.path
            try:
                if entry.is_symlink():
                    target = os.path.realpath(path)
                    if not _inside(target, real_root):
                        plan.refused.append((Path(path), f"symlink to {target}, outside the log root {root}"))
                        continue
                    st = entry.stat(follow_symlinks=False)
                    is_link, size = True, 0
                elif entry.is_dir(follow_symlinks=False):
                    if path in protected_dirs:
                        plan.keep(protected_dirs[path])
                    else:
                        stack.append(path)
                    continue
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    is_link, size = False, st.st_blocks * 512
                else:
                    plan.keep("not a regular file")
                    continue
            except OSError as exc:
                plan.errors.append((Path(path), f"cannot inspect: {exc.strerror or exc}"))
                continue
            if path in protected_files:
                plan.keep(protected_files[path])
                continue
            age = (ts - st.st_mtime) / DAY
            if age <= retention_days:
                plan.keep(f"log newer than {retention_days:g} days")
                continue
            # resolved once more: a directory swapped for a symlink during the walk
            real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
            if not _inside(real, real_root):
                plan.refused.append((Path(path), f"resolves to {real}, outside the log root {root}"))
                continue
            plan.candidates.append(Candidate(Path(real), "log", size, age, older, Path(real_root),
                                             st.st_dev, is_link=is_link))


def _plan_workspaces(plan: CleanupPlan, root: Path, state: _Board, *, ts: float,
                     retention_days: float, protected: list[tuple[str, str]]) -> None:
    real_root, why = check_root(root)
    if why == MISSING:
        plan.keep("root does not exist")
        return
    if real_root is None:
        plan.refused.append((root, f"workspace root {why}"))
        return
    try:
        entries = list(os.scandir(real_root))
    except OSError as exc:
        plan.errors.append((Path(real_root), f"cannot list: {exc.strerror or exc}"))
        return
    for entry in sorted(entries, key=lambda e: e.name):
        path = Path(entry.path)
        try:
            is_link = entry.is_symlink()
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            plan.errors.append((path, f"cannot inspect: {exc.strerror or exc}"))
            continue
        real = os.path.realpath(path)
        if is_link and not _inside(real, real_root):
            plan.refused.append((path, f"symlink to {real}, outside the workspace root {root}"))
            continue
        if not is_link and not stat.S_ISDIR(st.st_mode):
            plan.keep("not a workspace directory")
            continue
        keep = partial(plan.keep_workspace, path)
        row = state.tasks.get(entry.name)
        if row is None:
            keep("unknown task")
            continue
        if row.status not in FINISHED:
            keep(f"task is {row.status}")
            continue
        if entry.name in state.open_runs:
            keep("task has an open run")
            continue
        finished_at = row.completed_at if row.completed_at is not None else state.last_event.get(entry.name)
        if finished_at is None:
            keep("no finish time")
            continue
        age = (ts - finished_at) / DAY
        if age <= retention_days:
            keep(f"finished less than {retention_days:g} days ago")
            continue
        target = real if is_link else str(path)
        blocker = next((why for p, why in protected if p == target or _inside(p, target)), None)
        if blocker is not None:
            keep(blocker)
            continue
        size = 0 if is_link else _tree_bytes(str(path), plan)
        plan.candidates.append(Candidate(
            path, "workspace", size, age,
            f"workspace of {row.status} task {entry.name}, finished {age:.1f} days ago",
            Path(real_root), st.st_dev, is_link=is_link, task_id=entry.name))


def _tree_bytes(top: str, plan: CleanupPlan | None = None) -> int:
    """Allocated bytes under ``top``, links not followed, hard links counted once."""
    total, inodes, stack = 0, set(), [top]
    try:
        total += os.lstat(top).st_blocks * 512
    except OSError:
        return 0
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            if plan is not None:
                plan.errors.append((Path(directory), f"cannot list: {exc.strerror or exc}"))
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in inodes:
                    continue
                inodes.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
    return total


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
    deleted: list[Candidate]
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

    plan = plan_cleanup(ctx, now=now)
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

    deleted: list[Candidate] = []
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


def _delete(candidate: Candidate) -> tuple[int, str | None]:
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
    if not _inside(where, root):
        return 0, f"refused: now resolves to {where}, outside {root}"
    is_link = stat.S_ISLNK(st.st_mode)
    if is_link and not _inside(os.path.realpath(path), root):
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
    left = _tree_bytes(path) if os.path.lexists(path) else 0
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


def _alert(ctx: JobContext, report: "CleanupReport", *, now: float | None) -> None:
    """A file system still above the threshold after cleaning is an error; one
    back under it after an alert is a recovery."""
    from sparkops import alerts

    still = {u.path for u in report.still_over}
    for used in report.usage_after or report.usage_before:
        if used.error:
            continue
        key = f"disk:{used.mount or used.path}"
        if used.path in still:
            alerts.notify(ctx, alerts.Alert(
                key, "error", f"disk {used.mount or used.path} is {used.percent:.0f}% full",
                f"{summary(report)}; still above disk.threshold_percent "
                f"({report.threshold_percent:g}%) after cleaning what may be cleaned"), now=now)
        else:
            alerts.notify(ctx, alerts.Alert(key, "recovery", f"disk {used.mount or used.path} is fine again",
                                            f"{used.percent:.0f}% used"), now=now)

"""What a disk cleanup may delete, and why everything else stays: the plan that
:func:`sparkops.watch.disk.clean` carries out (see :mod:`sparkops.watch.disk` for
the rules: old logs under ``disk.log_roots``, workspaces of tasks finished long
ago, roots that are refused whole).

A plan reads the board with three queries whatever the number of files, and walks
the trees with ``os.scandir`` (10,000 log files: well under a second).
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from sparkops.board import model
from sparkops.board.model import FINISHED
from sparkops.core.errors import StorageError
from sparkops.engine.runlog import run_log_path
from sparkops.jobs.framework import JobContext, lock_dir
from sparkops.storage.db import Database, error_line
from sparkops.storage.schema import task_events, task_runs, tasks

log = logging.getLogger(__name__)

DAY = 86400.0


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
    try:
        state = _read_board(ctx.store.board)
        board_read = True
    except (DBAPIError, StorageError) as exc:
        # A full disk may not even let SQLite open the board: logs past their retention
        # can still go (an open run's log is younger); workspaces cannot be judged.
        reason = error_line(exc)
        plan.errors.append((Path(str(ctx.store.board.path or ctx.store.board.display_url)),
                            f"the board cannot be read ({reason}): workspaces are left alone this time"))
        state, board_read = _Board({}, {}, {}), False
    workspace_root = Path(settings["dispatch.workspace_root"])
    protected_files, protected_dirs = _protected(ctx, state, workspace_root)
    for root, real_root in _log_roots(plan, settings["disk.log_roots"], protected_dirs):
        _plan_logs(plan, root, real_root, ts=ts, retention_days=settings["disk.log_retention_days"],
                   protected_files=protected_files, protected_dirs=protected_dirs)
    if board_read:
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

    settings = ctx.settings
    files: dict[str, str] = {os.path.realpath(settings["runner.log_file"]): "the runner's live log"}
    for task_id, run_ids in state.open_runs.items():
        if not model.is_safe_id(task_id):
            continue  # never started here, so it has no log
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
        if inside(home, real):
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


def inside(path: str, root: str) -> bool:
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
            holder = next((d for d in protected_dirs if real_root == d or inside(real_root, d)), None)
            if holder is not None:
                real_root, why = None, f"{root} is {protected_dirs[holder]} {holder}; refusing to clean it"
        if why == MISSING:
            plan.keep("root does not exist")
        elif real_root is None:
            plan.refused.append((root, f"log root {why}"))
        else:
            usable.append((root, real_root))
    walked: list[tuple[Path, str]] = []
    for root, real in sorted(usable, key=lambda pair: len(pair[1])):
        if not any(real == other or inside(real, other) for _, other in walked):
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
                    if not inside(target, real_root):
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
            if not inside(real, real_root):
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
        if is_link and not inside(real, real_root):
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
        blocker = next((why for p, why in protected if p == target or inside(p, target)), None)
        if blocker is not None:
            keep(blocker)
            continue
        size = 0 if is_link else tree_bytes(str(path), plan)
        plan.candidates.append(Candidate(
            path, "workspace", size, age,
            f"workspace of {row.status} task {entry.name}, finished {age:.1f} days ago",
            Path(real_root), st.st_dev, is_link=is_link, task_id=entry.name))


def tree_bytes(top: str, plan: CleanupPlan | None = None) -> int:
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



"""Reading the board: tasks, a task's detail, runs, events and counts.

Read-only and dialect-neutral. Rows come back as plain dicts with Hermes' column
names (JSON columns decoded), ready for the CLI's ``--json``, pandas and the pages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from sqlalchemy import func, or_, select

from sparkops.board import FINISHED, Status
from sparkops.clock import epoch
from sparkops.db import Database
from sparkops.errors import InvalidInput, NotFound
from sparkops.schema import task_comments, task_events, task_links, task_runs, tasks

#: How the board's filters and pages name "no assignee".
UNASSIGNED = "(unassigned)"

TASK_LIST_COLUMNS = (
    "id", "title", "assignee", "status", "priority", "created_by", "created_at",
    "started_at", "completed_at", "current_run_id", "consecutive_failures", "last_failure_error",
)


def _decode(row: dict[str, Any], *json_cols: str) -> dict[str, Any]:
    for col in json_cols:
        value = row.get(col)
        if isinstance(value, str) and value:
            try:
                row[col] = json.loads(value)
            except ValueError:
                pass  # leave text that is not JSON as it is
    return row


def _check_status(status: str | None) -> None:
    if status is not None and status not in set(Status):
        raise InvalidInput(
            f"unknown status {status!r}; statuses are {', '.join(s.value for s in Status)}"
        )


def list_tasks(db: Database, *, status: str | None = None, assignee: str | None = None,
               include_archived: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
    """Tasks ordered like ``hermes kanban list``: priority first, then age."""
    _check_status(status)
    query = select(*[tasks.c[name] for name in TASK_LIST_COLUMNS])
    if status:
        query = query.where(tasks.c.status == status)
    elif not include_archived:
        query = query.where(tasks.c.status != Status.ARCHIVED)
    if assignee:
        query = query.where(tasks.c.assignee == assignee.lower())
    query = query.order_by(tasks.c.priority.desc(), tasks.c.created_at, tasks.c.id)
    if limit:
        query = query.limit(limit)
    with db.read() as conn:
        return _dicts(conn.execute(query))


def _dicts(result) -> list[dict[str, Any]]:
    """Rows as dicts; zip with the keys once is ~3x faster than ``row._mapping`` per row,
    which matters on a 100,000-task board."""
    keys = list(result.keys())
    return [dict(zip(keys, row)) for row in result]


@dataclass(frozen=True)
class BoardSlice:
    """What the board page shows: per status, how many tasks match and the first
    ``per_status`` of them (board order), without loading the whole board."""

    counts: dict[str, int]
    cards: dict[str, list[dict[str, Any]]]
    matched: int
    total: int


def board_slice(db: Database, *, text: str = "", assignee: str | None = None, priority: int | None = None,
                include_archived: bool = False, keep: Callable[[str], bool] | None = None,
                per_status: int = 50) -> BoardSlice:
    """Tasks matching the filters, counted per status, with the first ``per_status``
    of each status in full.

    ``text`` matches the title or the id (any case), ``assignee`` ``"(unassigned)"``
    means none, ``keep`` is a filter on task ids done here (the phase, which is not a
    column). Only ids and statuses of the matching tasks are read; full rows only for
    the cards, so a 100,000-task board costs one narrow scan.
    """
    where = [] if include_archived else [tasks.c.status != Status.ARCHIVED]
    needle = (text or "").strip()
    if needle:
        pattern = "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append(or_(tasks.c.title.ilike(pattern, escape="\\"), tasks.c.id.ilike(pattern, escape="\\")))
    if assignee is not None:
        where.append(or_(tasks.c.assignee.is_(None), tasks.c.assignee == "") if assignee == UNASSIGNED
                     else tasks.c.assignee == assignee)
    if priority is not None:
        where.append(func.coalesce(tasks.c.priority, 0) == priority)
    order = (tasks.c.priority.desc(), tasks.c.created_at, tasks.c.id)
    with db.read() as conn:
        total_query = select(func.count()).select_from(tasks)
        if not include_archived:
            total_query = total_query.where(tasks.c.status != Status.ARCHIVED)
        total = conn.execute(total_query).scalar_one()
        counts: dict[str, int] = {}
        first: dict[str, list[str]] = {}
        for task_id, status in conn.execute(select(tasks.c.id, tasks.c.status).where(*where).order_by(*order)):
            if keep is not None and not keep(task_id):
                continue
            counts[status] = counts.get(status, 0) + 1
            if counts[status] <= per_status:
                first.setdefault(status, []).append(task_id)
        wanted = [i for ids in first.values() for i in ids]
        rows: dict[str, dict[str, Any]] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            query = select(*[tasks.c[name] for name in TASK_LIST_COLUMNS]).where(tasks.c.id.in_(chunk))
            rows.update((r["id"], r) for r in _dicts(conn.execute(query)))
    cards = {status: [rows[i] for i in ids if i in rows] for status, ids in first.items()}
    return BoardSlice(counts, cards, sum(counts.values()), total)


def board_options(db: Database, *, include_archived: bool = False) -> dict[str, list[Any]]:
    """The assignees and priorities present, for the board's filters."""
    where = [] if include_archived else [tasks.c.status != Status.ARCHIVED]
    with db.read() as conn:
        assignees = [a for (a,) in conn.execute(select(tasks.c.assignee).where(*where).distinct())]
        priorities = [p for (p,) in conn.execute(
            select(func.coalesce(tasks.c.priority, 0)).where(*where).distinct())]
    names = sorted(a for a in assignees if a)
    return {"assignees": names + ([UNASSIGNED] if None in assignees or "" in assignees else []),
            "priorities": sorted(set(priorities), reverse=True)}


def open_tasks(db: Database, *, limit: int = 500) -> list[dict[str, Any]]:
    """The newest tasks that are neither done nor archived: id and title."""
    query = (select(tasks.c.id, tasks.c.title).where(tasks.c.status.notin_(list(FINISHED)))
             .order_by(tasks.c.created_at.desc(), tasks.c.id).limit(limit))
    with db.read() as conn:
        return _dicts(conn.execute(query))


def titles(db: Database, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{id: {"id", "title", "status"}}`` for these tasks (the ones that exist)."""
    ids = list(dict.fromkeys(ids))
    found: dict[str, dict[str, Any]] = {}
    with db.read() as conn:
        for start in range(0, len(ids), 500):
            query = (select(tasks.c.id, tasks.c.title, tasks.c.status)
                     .where(tasks.c.id.in_(ids[start:start + 500])))
            found.update((r["id"], r) for r in _dicts(conn.execute(query)))
    return found


def get_task(db: Database, task_id: str) -> dict[str, Any]:
    with db.read() as conn:
        row = conn.execute(select(tasks).where(tasks.c.id == task_id)).first()
    if row is None:
        raise NotFound("task", task_id)
    return _decode(dict(row._mapping), "skills")


def task_detail(db: Database, task_id: str) -> dict[str, Any]:
    """The task with its parents, children, comments, events and runs."""
    with db.read() as conn:
        row = conn.execute(select(tasks).where(tasks.c.id == task_id)).first()
        if row is None:
            raise NotFound("task", task_id)
        parents = list(conn.execute(select(task_links.c.parent_id)
                                    .where(task_links.c.child_id == task_id)
                                    .order_by(task_links.c.parent_id)).scalars())
        children = list(conn.execute(select(task_links.c.child_id)
                                     .where(task_links.c.parent_id == task_id)
                                     .order_by(task_links.c.child_id)).scalars())
        comments = [dict(r._mapping) for r in conn.execute(
            select(task_comments).where(task_comments.c.task_id == task_id)
            .order_by(task_comments.c.created_at, task_comments.c.id))]
        events = [_decode(dict(r._mapping), "payload") for r in conn.execute(
            select(task_events).where(task_events.c.task_id == task_id)
            .order_by(task_events.c.created_at, task_events.c.id))]
        runs = [_decode(dict(r._mapping), "metadata") for r in conn.execute(
            select(task_runs).where(task_runs.c.task_id == task_id).order_by(task_runs.c.id))]
    return {
        "task": _decode(dict(row._mapping), "skills"),
        "parents": parents,
        "children": children,
        "comments": comments,
        "events": events,
        "runs": runs,
    }


def list_runs(db: Database, *, task_id: str | None = None, active_only: bool = False,
              limit: int = 50) -> list[dict[str, Any]]:
    """Runs, newest first; for one task when ``task_id`` is given."""
    query = select(task_runs)
    if task_id:
        _require_task(db, task_id)
        query = query.where(task_runs.c.task_id == task_id)
    if active_only:
        query = query.where(task_runs.c.ended_at.is_(None))
    query = query.order_by(task_runs.c.id.desc()).limit(limit)
    with db.read() as conn:
        return [_decode(dict(r._mapping), "metadata") for r in conn.execute(query)]


def list_events(db: Database, *, task_id: str | None = None, since: int | None = None,
                kinds: Iterable[str] | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Events, newest first."""
    query = select(task_events)
    if task_id:
        _require_task(db, task_id)
        query = query.where(task_events.c.task_id == task_id)
    if since is not None:
        query = query.where(task_events.c.created_at >= since)
    if kinds:
        query = query.where(task_events.c.kind.in_(list(kinds)))
    query = query.order_by(task_events.c.id.desc()).limit(limit)
    with db.read() as conn:
        return [_decode(dict(r._mapping), "payload") for r in conn.execute(query)]


def board_stats(db: Database, *, now: float | None = None) -> dict[str, Any]:
    """Counts per status and per assignee and the oldest ready task's age, in the
    shape of ``hermes kanban stats --json`` (which leaves archived tasks out of
    both counts); ``archived`` is counted on its own."""
    ts = epoch(now)
    live = tasks.c.status != Status.ARCHIVED
    with db.read() as conn:
        by_status = {s: n for s, n in conn.execute(
            select(tasks.c.status, func.count()).where(live)
            .group_by(tasks.c.status).order_by(tasks.c.status))}
        by_assignee: dict[str, dict[str, int]] = {}
        for assignee, status, count in conn.execute(
                select(tasks.c.assignee, tasks.c.status, func.count())
                .where(live, tasks.c.assignee.is_not(None))
                .group_by(tasks.c.assignee, tasks.c.status)
                .order_by(tasks.c.assignee, tasks.c.status)):
            by_assignee.setdefault(assignee, {})[status] = count
        archived = conn.execute(select(func.count()).select_from(tasks).where(~live)).scalar()
        oldest_ready = conn.execute(
            select(func.min(tasks.c.created_at)).where(tasks.c.status == Status.READY)).scalar()
        running = conn.execute(select(func.count()).select_from(task_runs)
                               .where(task_runs.c.ended_at.is_(None))).scalar()
    return {
        "by_status": by_status,
        "by_assignee": by_assignee,
        "oldest_ready_age_seconds": (ts - int(oldest_ready)) if oldest_ready is not None else None,
        "active_runs": int(running or 0),
        "archived": int(archived or 0),
        "open": sum(n for s, n in by_status.items() if s not in FINISHED),
        "now": ts,
    }


def _require_task(db: Database, task_id: str) -> None:
    with db.read() as conn:
        if conn.execute(select(tasks.c.id).where(tasks.c.id == task_id)).first() is None:
            raise NotFound("task", task_id)

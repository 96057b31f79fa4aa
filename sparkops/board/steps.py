"""The steps every transition takes (:mod:`sparkops.board.transitions` decides which):
read and lock the task row, check a worker's run id, open and close runs, append
events, and the reads a claim needs (ready candidates, slots a host holds). A
task's status is written only by the transitions themselves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from typing import Any

from sqlalchemy import Integer, bindparam, cast, func, insert, select, update
from sqlalchemy.engine import Connection

from sparkops.board.model import FINISHED, Outcome, Status, host_lock_pattern, is_protocol_violation
from sparkops.core import json_text
from sparkops.core.errors import NotFound, StaleRun
from sparkops.storage.schema import task_events, task_links, task_runs, tasks

log = logging.getLogger(__name__)


# Built once and run with parameters: a transition runs a dozen statements, and building
# them each time cost more than SQLite's work (bench/bench_vs_hermes.py).
#: The task with its current run's metadata (``run_metadata``, which closing the
#: run keeps) and start (``run_started_at``), and whether any task depends on it
#: (``has_children``: finishing it looks for children to promote only then): one
#: read instead of three.
_TASK_ROW = (select(tasks, task_runs.c.metadata.label("run_metadata"),
                    task_runs.c.started_at.label("run_started_at"),
                    select(task_links.c.child_id).where(task_links.c.parent_id == tasks.c.id)
                    .exists().label("has_children"))
             .select_from(tasks.outerjoin(task_runs, task_runs.c.id == tasks.c.current_run_id))
             .where(tasks.c.id == bindparam("b_task")))
CLOSE_RUN = update(task_runs).where(task_runs.c.id == bindparam("b_run"), task_runs.c.ended_at.is_(None))
INSERT_EVENT = insert(task_events)


def task_row(conn: Connection, task_id: str):
    row = conn.execute(_TASK_ROW, {"b_task": task_id}).first()
    if row is None:
        raise NotFound("task", task_id)
    return row


def check_run(row, run_id: int | None) -> None:
    """The fencing check: a report for ``run_id`` only counts while it is current."""
    if run_id is not None and row.current_run_id != int(run_id):
        raise StaleRun(row.id, int(run_id), row.current_run_id)


def close_run(conn: Connection, row, *, status: str, outcome: Outcome, now: int,
              summary: str | None = None, error: str | None = None,
              metadata: dict | None = None) -> int | None:
    if row.current_run_id is None:
        return None
    conn.execute(CLOSE_RUN, {"b_run": row.current_run_id, **closed_run_values(
        row, status=status, outcome=outcome, now=now, summary=summary, error=error, metadata=metadata)})
    return int(row.current_run_id)


def closed_run_values(row, *, status: str, outcome: Outcome, now: int, summary: str | None = None,
                      error: str | None = None, metadata: dict | None = None) -> dict[str, Any]:
    """What closing ``row``'s current run writes in it (see :func:`close_run`)."""
    return {"status": status, "outcome": str(outcome), "summary": summary, "error": error,
            "metadata": json_text.text_of(merged_metadata(row.run_metadata, metadata)),
            "ended_at": now, "claim_lock": None, "claim_expires": None, "worker_pid": None}


def merged_metadata(current: str | None, extra: dict | None) -> dict | None:
    """A run's metadata (``current``, its JSON text as read: a task row's
    ``run_metadata``) with ``extra`` on top (the process identity is kept)."""
    merged: dict = {}
    if current:
        try:
            loaded = json.loads(current)
            merged = loaded if isinstance(loaded, dict) else {"previous": loaded}
        except ValueError:
            merged = {"previous": current}
    merged.update(extra or {})
    return merged or None


def claim_lock_of_host():
    """``task_runs.claim_lock LIKE :host_pattern`` (see :func:`host_lock_pattern`)."""
    return task_runs.c.claim_lock.like(bindparam("host_pattern"), escape="\\")


# Built once: the dispatcher asks these every second.
_OPEN_RUNS_ON_HOST = (select(func.count()).select_from(task_runs)
                      .where(task_runs.c.ended_at.is_(None), claim_lock_of_host()))


_parent = tasks.alias("parent")


#: Correlated to ``tasks``: the task has a parent that is neither done nor archived.
HAS_UNFINISHED_PARENT = (
    select(task_links.c.child_id)
    .join(_parent, _parent.c.id == task_links.c.parent_id)
    .where(task_links.c.child_id == tasks.c.id, _parent.c.status.not_in(list(FINISHED)))
    .exists()
)


#: What a claim reads of each candidate (what opening its run needs and the order):
#: not whole rows, whose every column the driver would decode.
CLAIM_COLUMNS = (tasks.c.id, tasks.c.status, tasks.c.priority, tasks.c.created_at, tasks.c.started_at,
                 tasks.c.assignee, tasks.c.current_step_key, tasks.c.current_run_id,
                 tasks.c.max_runtime_seconds, tasks.c.consecutive_failures)

#: The best ready tasks with no unfinished parent (``scan`` of them) but those
#: ``excluded``, locked as read: on PostgreSQL ``FOR UPDATE SKIP LOCKED`` (a row
#: another transaction is claiming is passed over, not waited for); SQLite has one
#: writer at a time, so there the plain read is already exclusive. CAST: a text
#: priority another writer put in SQLite's column counts as 0 (text would sort
#: above every number and jump the queue).
_BEST_READY = (
    select(*CLAIM_COLUMNS)
    .where(tasks.c.status == Status.READY, ~HAS_UNFINISHED_PARENT,
           tasks.c.id.notin_(bindparam("excluded", expanding=True)))
    .order_by(cast(tasks.c.priority, Integer).desc(), tasks.c.created_at, tasks.c.id)
    .limit(bindparam("scan"))
    .with_for_update(skip_locked=True)
    .subquery("best")
)

#: The host's open runs other than the ``busy`` ones (counted by the caller).
_OPEN_RUNS_BUT_BUSY = _OPEN_RUNS_ON_HOST.where(task_runs.c.id.notin_(bindparam("busy", expanding=True)))


def _last_run(column):
    """``column`` of the last run of the candidate (correlated to ``_BEST_READY``)."""
    return (select(column).where(task_runs.c.task_id == _BEST_READY.c.id)
            .order_by(task_runs.c.id.desc()).limit(1).scalar_subquery())


#: The candidates in their order, each with its last run's end and outcome (looked
#: up for those few rows only, not for every ready task) and the slots the host
#: holds, read in the same statement (so in the same snapshot) as the candidates.
_CLAIM_CANDIDATES = (
    select(_BEST_READY, _last_run(task_runs.c.ended_at).label("last_end"),
           _last_run(task_runs.c.outcome).label("last_outcome"),
           _OPEN_RUNS_BUT_BUSY.scalar_subquery().label("taken"))
    .order_by(cast(_BEST_READY.c.priority, Integer).desc(), _BEST_READY.c.created_at, _BEST_READY.c.id)
)


def open_runs_on(conn: Connection, host: str) -> int:
    return int(conn.execute(_OPEN_RUNS_ON_HOST, {"host_pattern": host_lock_pattern(host)}).scalar() or 0)


def claim_candidates(conn: Connection, limit: int, *, host: str, busy_runs: Collection[int] = (),
                     excluded: Collection[str] = ()) -> tuple[int, list]:
    """The slots ``host`` holds (its open runs and the runs with a live agent there,
    ``busy_runs``, each counted once) and up to ``limit`` ready tasks with no
    unfinished parent, best first (:data:`CLAIM_COLUMNS`, with their last run's end
    and outcome), each locked for this transaction and still ready. One statement;
    the slots are only known when there is a candidate (0 otherwise)."""
    rows = conn.execute(_CLAIM_CANDIDATES, {
        "scan": limit, "excluded": sorted(excluded), "busy": sorted(busy_runs),
        "host_pattern": host_lock_pattern(host)}).all()
    taken = int(rows[0].taken or 0) + len(set(busy_runs)) if rows else 0
    return taken, rows


def protocol_violation_streak(conn: Connection, task_id: str) -> int:
    """How many of the task's latest closed runs in a row were protocol violations,
    by either tool, counted as Hermes counts them: rate-limited runs are skipped,
    any other run ends the streak."""
    streak = 0
    for outcome, error, metadata in conn.execute(
            select(task_runs.c.outcome, task_runs.c.error, task_runs.c.metadata)
            .where(task_runs.c.task_id == task_id, task_runs.c.ended_at.is_not(None))
            .order_by(task_runs.c.id.desc()).limit(50)):
        if outcome == Outcome.RATE_LIMITED:
            continue
        if not is_protocol_violation(outcome, error, metadata):
            break
        streak += 1
    return streak


def synthesize_run(conn: Connection, row, outcome: Outcome, *, now: int,
                   summary: str | None = None, metadata: dict | None = None) -> int:
    """A zero-length, closed run for a terminal change on a never-claimed task,
    so the summary is kept in the attempt history (as Hermes does)."""
    return int(conn.execute(insert(task_runs).values(
        task_id=row.id, profile=row.assignee, step_key=row.current_step_key,
        status=str(outcome), outcome=str(outcome), summary=summary,
        metadata=json_text.text_of(metadata), started_at=now, ended_at=now,
    )).inserted_primary_key[0])


def event(conn: Connection, task_id: str, kind: str, payload: dict | None, *, now: int,
          run_id: int | None = None) -> None:
    conn.execute(INSERT_EVENT, event_values(task_id, kind, payload, now=now, run_id=run_id))


def event_values(task_id: str, kind: str, payload: dict | None, *, now: int,
                 run_id: int | None = None) -> dict[str, Any]:
    """The ``task_events`` row of an event (see :func:`event`)."""
    return {"task_id": task_id, "run_id": run_id, "kind": kind, "payload": json_text.text_of(payload),
            "created_at": now}




def statuses(conn: Connection, ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    return dict(conn.execute(select(tasks.c.id, tasks.c.status).where(tasks.c.id.in_(ids))).all())


_UNFINISHED_PARENTS = (select(tasks.c.id)
                       .join(task_links, task_links.c.parent_id == tasks.c.id)
                       .where(task_links.c.child_id == bindparam("b_task"), tasks.c.status.not_in(list(FINISHED)))
                       .order_by(tasks.c.id))


def unfinished_parents(conn: Connection, task_id: str) -> list[str]:
    return list(conn.execute(_UNFINISHED_PARENTS, {"b_task": task_id}).scalars())


def path_between(conn: Connection, start: str, goal: str) -> list[str]:
    """Ids on a parent->child path from ``start`` down to ``goal``, or []."""
    came_from: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        children = conn.execute(
            select(task_links.c.parent_id, task_links.c.child_id)
            .where(task_links.c.parent_id.in_(frontier))
        ).all()
        frontier = []
        for parent, child in children:
            if child in came_from:
                continue
            came_from[child] = parent
            if child == goal:
                path = [child]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return list(reversed(path))
            frontier.append(child)
    return []

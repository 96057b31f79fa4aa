"""The steps every transition takes (:mod:`sparkops.board.transitions` decides which):
read and lock the task row, check a worker's run id, open and close runs, append
events, and the reads a claim needs (ready candidates, slots a host holds).

A task's status is decided only by the transitions: the writes here that change
it (:func:`guarded_update`, :func:`open_run`, :func:`end_run`) take the target
from their caller and refuse if the row changed since it was read. They also
decide how the writes reach the database: one statement at a time on SQLite, which
runs in this process, and folded into one statement on PostgreSQL, where each
statement is a round trip (a claim's four writes, a run's end's three).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Collection
from typing import Any

from sqlalchemy import Integer, Text, bindparam, cast, func, insert, literal, select, update
from sqlalchemy.engine import Connection

from sparkops.board.model import FINISHED, Outcome, Status, host_lock_pattern, is_protocol_violation
from sparkops.core import json_text
from sparkops.core.errors import NotFound, StaleRun, TransitionRefused
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


# -- the writes of a transition (its target status is the caller's) ---------------------


_GUARDED = update(tasks).where(tasks.c.id == bindparam("b_id"), tasks.c.status == bindparam("b_status"))
_GUARDED_NO_RUN = _GUARDED.where(tasks.c.current_run_id.is_(None))
_GUARDED_RUN = _GUARDED.where(tasks.c.current_run_id == bindparam("b_run"))


def guarded_update(conn: Connection, row, action: str, target: Status, values: dict[str, Any]) -> None:
    """Move ``row`` to ``target`` only if nobody changed it since we read it."""
    params = {"b_id": row.id, "b_status": row.status, "status": str(target), **values}
    if row.current_run_id is None:
        statement = _GUARDED_NO_RUN
    else:
        statement, params["b_run"] = _GUARDED_RUN, row.current_run_id
    won = conn.execute(statement, params).rowcount
    if won != 1:
        raise TransitionRefused(row.id, action, row.status, "the task changed at the same time")


def end_run(conn: Connection, row, action: str, target: Status, values: dict[str, Any],
            logged: tuple[str, dict | None], *, now: int, **closing: Any) -> int:
    """How a run ends in complete, block, fail and reclaim: the task moves to
    ``target`` with ``values`` only if nobody changed it since it was read (as
    :func:`guarded_update`), its current run is closed (``closing``: see
    :func:`closed_run_values`) and the event ``logged`` (kind, payload) is appended
    for that run. Returns the run's id.

    On PostgreSQL the three writes are one statement (three round trips are one): the
    task's update is a data-modifying CTE whose row count says whether it won, and a
    refused move raises, which rolls the whole transaction back."""
    run_id = int(row.current_run_id)
    kind, payload = logged
    if conn.dialect.name != "postgresql":
        guarded_update(conn, row, action, target, values)
        close_run(conn, row, now=now, **closing)
        event(conn, row.id, kind, payload, run_id=run_id, now=now)
        return run_id
    moved = {"status": str(target), **values}
    run = closed_run_values(row, now=now, **closing)
    logged_row = event_values(row.id, kind, payload, now=now, run_id=run_id)
    statement = _end_run_statement(tuple(moved), tuple(run), tuple(logged_row))
    won = conn.execute(statement, {
        "b_id": row.id, "b_status": row.status, "b_run": run_id,
        **{f"t_{k}": v for k, v in moved.items()}, **{f"r_{k}": v for k, v in run.items()},
        **{f"e_{k}": v for k, v in logged_row.items()}}).scalar()
    if won != 1:
        raise TransitionRefused(row.id, action, row.status, "the task changed at the same time")
    return run_id


@functools.cache
def _end_run_statement(task_keys: tuple[str, ...], run_keys: tuple[str, ...], event_keys: tuple[str, ...]):
    """:func:`end_run`'s statement for PostgreSQL, built once per set of columns."""
    def bound(table, keys, prefix):
        return {k: bindparam(f"{prefix}{k}", type_=table.c[k].type) for k in keys}
    moved = _GUARDED_RUN.values(bound(tasks, task_keys, "t_")).returning(tasks.c.id).cte("moved")
    closed = CLOSE_RUN.values(bound(task_runs, run_keys, "r_")).cte("closed")
    logged = INSERT_EVENT.values(bound(task_events, event_keys, "e_")).cte("logged")
    return select(select(func.count()).select_from(moved).scalar_subquery()).add_cte(closed, logged)


_INSERT_RUN = insert(task_runs)


def open_run(conn: Connection, row, *, lock: str, ttl_seconds: int, now: int,
             workspace: str | None = None, metadata: dict | None = None) -> int:
    """Move ``row`` to running and open its run; returns the run id."""
    if conn.dialect.name == "postgresql":
        return _open_run_in_one(conn, row, lock=lock, ttl_seconds=ttl_seconds, now=now,
                                workspace=workspace, metadata=metadata)
    # The run first, so that the task moves and points at it in one statement (a
    # refused move raises, and the transaction, run included, is rolled back).
    run_id = conn.execute(_INSERT_RUN, {
        "task_id": row.id, "profile": row.assignee, "step_key": row.current_step_key,
        "status": "running", "claim_lock": lock, "claim_expires": now + ttl_seconds,
        "max_runtime_seconds": row.max_runtime_seconds, "started_at": now, "last_heartbeat_at": now,
        "metadata": json_text.text_of(metadata),
    }).inserted_primary_key[0]
    values: dict[str, Any] = {
        "claim_lock": lock, "claim_expires": now + ttl_seconds, "worker_pid": None,
        "started_at": row.started_at if row.started_at is not None else now, "last_heartbeat_at": now,
        "current_run_id": run_id,
    }
    if workspace:
        values["workspace_path"] = workspace
    guarded_update(conn, row, "claim", Status.RUNNING, values)
    event(conn, row.id, "claimed", _claimed_payload(row, lock, now + ttl_seconds, run_id),
          run_id=run_id, now=now)
    return int(run_id)


def _claimed_payload(row, lock: str, expires: int, run_id: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"lock": lock, "expires": expires, "run_id": run_id}
    if row.status == Status.REVIEW:
        payload["source_status"] = "review"
    return payload


def _open_run_statement(guard_run: bool):
    """PostgreSQL: :func:`open_run`'s four writes as one statement (a round trip,
    not four). The run is inserted first; the task moves only if it is still as
    read (``moved`` counts it, and the caller rolls back when it is 0); the
    ``claimed`` event's payload is the same JSON text with the new run's id."""
    run = insert(task_runs).values(
        task_id=bindparam("b_id"), profile=bindparam("b_profile"), step_key=bindparam("b_step"),
        status="running", claim_lock=bindparam("b_lock"), claim_expires=bindparam("b_expires"),
        max_runtime_seconds=bindparam("b_max_runtime"), started_at=bindparam("b_now"),
        last_heartbeat_at=bindparam("b_now"), metadata=bindparam("b_metadata"),
    ).returning(task_runs.c.id).cte("new_run")
    guard = tasks.c.current_run_id == bindparam("b_run") if guard_run else tasks.c.current_run_id.is_(None)
    moved = update(tasks).where(tasks.c.id == bindparam("b_id"), tasks.c.status == bindparam("b_status"),
                                guard).values(
        status=str(Status.RUNNING), claim_lock=bindparam("b_lock"), claim_expires=bindparam("b_expires"),
        worker_pid=None, started_at=func.coalesce(tasks.c.started_at, bindparam("b_now")),
        last_heartbeat_at=bindparam("b_now"),
        workspace_path=func.coalesce(bindparam("b_workspace", type_=Text), tasks.c.workspace_path),
        current_run_id=select(run.c.id).scalar_subquery(),
    ).returning(tasks.c.id).cte("moved")
    payload = bindparam("b_head", type_=Text) + cast(run.c.id, Text) + bindparam("b_tail", type_=Text)
    event = insert(task_events).from_select(
        ["task_id", "run_id", "kind", "payload", "created_at"],
        select(bindparam("b_id", type_=Text), run.c.id, literal("claimed", Text), payload,
               bindparam("b_now", type_=task_events.c.created_at.type)),
    ).cte("claimed_event")
    return select(run.c.id, select(func.count()).select_from(moved).scalar_subquery()).add_cte(moved, event)


_OPEN_RUN_NO_RUN = _open_run_statement(guard_run=False)
_OPEN_RUN_AFTER_RUN = _open_run_statement(guard_run=True)


def _open_run_in_one(conn: Connection, row, *, lock: str, ttl_seconds: int, now: int,
                     workspace: str | None, metadata: dict | None) -> int:
    expires = now + ttl_seconds
    # the payload's text cut around the run id (a key in JSON text is never
    # mistaken for a string value, whose quotes are escaped)
    key = '"run_id": '
    head, tail = json_text.text_of(_claimed_payload(row, lock, expires, -1)).split(key + "-1", 1)
    params = {"b_id": row.id, "b_status": row.status, "b_profile": row.assignee,
              "b_step": row.current_step_key, "b_lock": lock, "b_expires": expires,
              "b_max_runtime": row.max_runtime_seconds, "b_now": now, "b_workspace": workspace or None,
              "b_metadata": json_text.text_of(metadata), "b_head": head + key, "b_tail": tail}
    if row.current_run_id is None:
        statement = _OPEN_RUN_NO_RUN
    else:
        statement, params["b_run"] = _OPEN_RUN_AFTER_RUN, row.current_run_id
    run_id, moved = conn.execute(statement, params).one()
    if moved != 1:
        raise TransitionRefused(row.id, "claim", row.status, "the task changed at the same time")
    return int(run_id)

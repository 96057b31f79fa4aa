"""A run's bookkeeping, which changes no task's status: the worker's process record,
heartbeats (which keep the claim ahead of Hermes' TTL), open runs per host, runs
left open by a crash, and the run rows Hermes would backfill for a running task
without one. Status changes are :mod:`sparkops.board.transitions`.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import insert, select, update

from sparkops.board import steps
from sparkops.board.model import DEFAULT_CLAIM_TTL, ERROR_EXCERPT, Outcome, Status
from sparkops.core import json_text
from sparkops.core.clock import epoch
from sparkops.core.errors import StaleRun
from sparkops.storage.db import Database
from sparkops.storage.schema import task_runs, tasks

log = logging.getLogger(__name__)


def count_open_runs(db: Database, host: str) -> int:
    """Runs not yet closed whose claim belongs to ``host``."""
    with db.read() as conn:
        return steps.open_runs_on(conn, host)


def record_process(db: Database, task_id: str, *, run_id: int, claim_lock: str,
                   worker_pid: int | None, identity: dict[str, Any],
                   now: float | None = None) -> Any:
    """Store the run's process identity (host, boot id, pids and start times) in the
    run row's metadata, and the worker pid and claim lock in Hermes' columns.
    Refused with :class:`StaleRun` once the run is no longer current. Returns the
    task's row as read (see :func:`sparkops.board.steps.task_row`)."""
    ts = epoch(now)
    with db.write() as conn:
        row = steps.task_row(conn, task_id)
        steps.check_run(row, run_id)
        if row.status != Status.RUNNING:
            raise StaleRun(task_id, run_id, None)
        metadata = steps.merged_metadata(row.run_metadata, identity)
        conn.execute(update(task_runs).where(task_runs.c.id == run_id, task_runs.c.ended_at.is_(None))
                     .values(metadata=json_text.text_of(metadata), claim_lock=claim_lock,
                             worker_pid=worker_pid, last_heartbeat_at=ts))
        conn.execute(update(tasks).where(tasks.c.id == task_id, tasks.c.current_run_id == run_id)
                     .values(claim_lock=claim_lock, worker_pid=worker_pid, last_heartbeat_at=ts))
    return row


def close_orphan_run(db: Database, run_id: int, *, reason: str, now: float | None = None) -> bool:
    """Close a run row left open although its task no longer points at it (a leak
    from another tool). The task is not touched. False if the run was closed, or
    became current again, in the meantime."""
    ts = epoch(now)
    with db.write() as conn:
        current = select(tasks.c.id).where(tasks.c.current_run_id == run_id).exists()
        row = conn.execute(select(task_runs.c.task_id)
                           .where(task_runs.c.id == run_id, task_runs.c.ended_at.is_(None), ~current)).first()
        if row is None:
            return False
        conn.execute(update(task_runs).where(task_runs.c.id == run_id, task_runs.c.ended_at.is_(None))
                     .values(status="reclaimed", outcome=str(Outcome.RECLAIMED), error=reason[:ERROR_EXCERPT],
                             ended_at=ts, claim_lock=None, claim_expires=None, worker_pid=None))
        steps.event(conn, row.task_id, "reclaimed", {"reason": reason, "orphan_run": run_id},
                    run_id=run_id, now=ts)
    return True


def backfill_runs(db: Database, *, now: float | None = None) -> list[tuple[str, int]]:
    """Give a run row to every ``running`` task that has none, as Hermes does when it
    opens a board: a claim only on the tasks row (``claim_lock``, ``worker_pid``; the
    shape of boards from older Hermes versions and of hand-edited fixes) becomes an
    open run with the same claim, which the reclaimer can then judge. Returns
    (task id, run id) for each. Writes nothing when there is nothing to do."""
    ts = epoch(now)
    bare = (select(tasks.c.id, tasks.c.assignee, tasks.c.claim_lock, tasks.c.claim_expires,
                   tasks.c.worker_pid, tasks.c.max_runtime_seconds, tasks.c.last_heartbeat_at,
                   tasks.c.started_at, tasks.c.current_step_key)
            .where(tasks.c.status == Status.RUNNING, tasks.c.current_run_id.is_(None)))
    with db.read() as conn:
        if conn.execute(bare.limit(1)).first() is None:
            return []
    made = []
    with db.write() as conn:
        for row in conn.execute(bare).all():
            run_id = int(conn.execute(insert(task_runs).values(
                task_id=row.id, profile=row.assignee, step_key=row.current_step_key, status="running",
                claim_lock=row.claim_lock, claim_expires=row.claim_expires, worker_pid=row.worker_pid,
                max_runtime_seconds=row.max_runtime_seconds, last_heartbeat_at=row.last_heartbeat_at,
                started_at=row.started_at if row.started_at is not None else ts,
            )).inserted_primary_key[0])
            won = conn.execute(update(tasks).where(
                tasks.c.id == row.id, tasks.c.status == Status.RUNNING, tasks.c.current_run_id.is_(None))
                .values(current_run_id=run_id)).rowcount
            if won != 1:  # cannot happen inside one writer's transaction; kept as Hermes keeps it
                conn.execute(update(task_runs).where(task_runs.c.id == run_id).values(
                    status="reclaimed", outcome=str(Outcome.RECLAIMED), ended_at=ts))
                continue
            made.append((row.id, run_id))
    return made


def heartbeat(db: Database, task_id: str, *, run_id: int, ttl_seconds: int = DEFAULT_CLAIM_TTL,
              now: float | None = None) -> None:
    """Record that ``run_id``'s worker is alive and keep its claim ahead of now
    (``claim_expires = now + ttl_seconds``, on the task and the run, as Hermes' own
    workers do: Hermes' dispatcher releases an expired claim of another host). A
    stale run changes nothing (:class:`StaleRun`)."""
    ts = epoch(now)
    with db.write() as conn:
        row = steps.task_row(conn, task_id)
        steps.check_run(row, run_id)
        alive = {"last_heartbeat_at": ts, "claim_expires": ts + int(ttl_seconds)}
        won = conn.execute(update(tasks).where(
            tasks.c.id == task_id, tasks.c.current_run_id == run_id,
            tasks.c.status == Status.RUNNING).values(**alive)).rowcount
        if won != 1:
            raise StaleRun(task_id, run_id, row.current_run_id)
        conn.execute(update(task_runs).where(task_runs.c.id == run_id, task_runs.c.ended_at.is_(None))
                     .values(**alive))

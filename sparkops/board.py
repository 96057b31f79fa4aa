"""The state machine: the one module that changes a task's status.

Every change follows one pattern, in one writing transaction:

1. read the task row (``NotFound`` if there is none);
2. check the action is allowed from its status (:data:`TRANSITIONS`) and, for a
   worker's report, that ``run_id`` is still the task's current run (the fencing
   token; ``StaleRun`` otherwise);
3. a conditional ``UPDATE ... WHERE id = ? AND status = ? AND current_run_id IS ?``
   whose rowcount says whether we won (``TransitionRefused`` if not);
4. open or close the ``task_runs`` row and append a ``task_events`` row.

Semantics follow Hermes Kanban (hermes-agent 0.19) so a board can be worked by
both: the same event kinds and payloads, run ``status``/``outcome`` pairs,
dependency gating (a child waits in ``todo`` until every parent is ``done`` or
``archived``), typed blocks, and the consecutive-failure circuit breaker.
Functions return a :class:`Change` that says what happened.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Collection, Iterable

from sqlalchemy import and_, bindparam, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from sparkops.clock import epoch
from sparkops.db import Database
from sparkops.errors import InvalidInput, NotFound, Refused, StaleRun, TransitionRefused
from sparkops.schema import task_comments, task_events, task_links, task_runs, tasks

log = logging.getLogger(__name__)


class Status(StrEnum):
    TRIAGE = "triage"
    TODO = "todo"
    SCHEDULED = "scheduled"
    READY = "ready"
    RUNNING = "running"
    BLOCKED = "blocked"
    REVIEW = "review"
    DONE = "done"
    ARCHIVED = "archived"


class Outcome(StrEnum):
    """How a run ended (``task_runs.outcome``)."""

    COMPLETED = "completed"
    BLOCKED = "blocked"
    CRASHED = "crashed"
    TIMED_OUT = "timed_out"
    SPAWN_FAILED = "spawn_failed"
    GAVE_UP = "gave_up"
    RECLAIMED = "reclaimed"
    PROTOCOL_VIOLATION = "protocol_violation"
    RATE_LIMITED = "rate_limited"
    WORKSPACE_MISSING = "workspace_missing"


#: A parent in one of these no longer holds back its children.
FINISHED = frozenset({Status.DONE, Status.ARCHIVED})

#: Failure outcomes that count toward ``consecutive_failures`` and the failure limit.
COUNTED_FAILURES = frozenset(
    {Outcome.CRASHED, Outcome.TIMED_OUT, Outcome.SPAWN_FAILED, Outcome.WORKSPACE_MISSING}
)
#: Outcomes of :func:`fail`: the counted ones, a protocol violation (its own limit,
#: on the streak of such runs) and a rate limit (never counted).
FAILURE_OUTCOMES = COUNTED_FAILURES | {Outcome.PROTOCOL_VIOLATION, Outcome.RATE_LIMITED}

#: action -> the statuses it may start from. The target is decided by the action.
TRANSITIONS: dict[str, frozenset[Status]] = {
    "claim": frozenset({Status.READY, Status.REVIEW}),             # -> running
    "complete": frozenset({Status.RUNNING, Status.READY, Status.BLOCKED}),  # -> done
    "block": frozenset({Status.RUNNING, Status.READY}),            # -> blocked | todo | triage
    "unblock": frozenset({Status.BLOCKED, Status.SCHEDULED}),      # -> ready | todo
    "promote": frozenset({Status.TODO, Status.BLOCKED, Status.TRIAGE}),  # -> ready
    "archive": frozenset(set(Status) - {Status.ARCHIVED, Status.RUNNING}),  # -> archived
    "reclaim": frozenset({Status.RUNNING}),                        # -> ready
    "fail": frozenset({Status.RUNNING}),                           # -> ready | blocked
}

#: Hermes' BLOCK_RECURRENCE_LIMIT: the same block kind this many times in a row
#: (with unblocks between) routes the task to triage instead of blocked.
BLOCK_RECURRENCE_LIMIT = 2
BLOCK_KINDS = frozenset({"dependency", "needs_input", "capability", "transient"})
DEFAULT_CLAIM_TTL = 15 * 60
ERROR_EXCERPT = 500

#: Columns cleared whenever a task stops being claimed by a run.
RELEASE_CLAIM = {"claim_lock": None, "claim_expires": None, "worker_pid": None,
                 "current_run_id": None}


@dataclass(frozen=True)
class Change:
    """What a transition did."""

    task_id: str
    action: str
    from_status: str
    to_status: str
    run_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id, "action": self.action, "from": self.from_status,
            "to": self.to_status, "run_id": self.run_id,
        }


@dataclass(frozen=True)
class RetryPolicy:
    """When a task that failed or was rate limited may be claimed again."""

    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 1800.0
    rate_limit_cooldown_seconds: float = 300.0

    def backoff(self, failures: int) -> float:
        """Wait after ``failures`` consecutive failures: none after the first (a lone
        crash is usually the environment, and the slot should not idle), then base,
        2x base, 4x base ... up to the maximum."""
        if failures <= 1:
            return 0.0
        return min(self.backoff_seconds * 2 ** (failures - 2), self.backoff_max_seconds)

    def not_before(self, failures: int, last_outcome: str | None, last_end: int | None) -> float:
        """The earliest time a task may be claimed again."""
        if last_end is None:
            return 0.0
        if last_outcome == Outcome.RATE_LIMITED:
            return last_end + self.rate_limit_cooldown_seconds
        return last_end + self.backoff(failures)


def new_task_id() -> str:
    """``t_`` and 8 hex digits, as Hermes makes them."""
    return "t_" + secrets.token_hex(4)


# -- creating and linking ----------------------------------------------------------


def create_task(
    db: Database,
    title: str,
    *,
    body: str | None = None,
    assignee: str | None = None,
    priority: int = 0,
    parents: Iterable[str] = (),
    triage: bool = False,
    created_by: str | None = None,
    max_runtime_seconds: int | None = None,
    max_retries: int | None = None,
    idempotency_key: str | None = None,
    now: float | None = None,
) -> str:
    """Create a task; it starts ``ready``, or ``todo`` while a parent is unfinished,
    or ``triage`` when asked. Returns the new id (or the existing one for a
    repeated ``idempotency_key``)."""
    if title is None or not str(title).strip():
        raise InvalidInput("a task needs a title; the title given was empty")
    if max_runtime_seconds is not None and max_runtime_seconds <= 0:
        raise InvalidInput(f"max runtime must be a positive number of seconds, got {max_runtime_seconds}")
    if max_retries is not None and max_retries < 1:
        raise InvalidInput(f"max retries must be at least 1, got {max_retries}")
    parents = list(dict.fromkeys(p for p in parents if p))
    assignee = assignee.strip().lower() if assignee and assignee.strip() else None
    ts = epoch(now)
    for attempt in range(3):
        task_id = new_task_id()
        try:
            with db.write() as conn:
                if idempotency_key:
                    existing = conn.execute(
                        select(tasks.c.id)
                        .where(tasks.c.idempotency_key == idempotency_key,
                               tasks.c.status != Status.ARCHIVED)
                        .order_by(tasks.c.created_at.desc()).limit(1)
                    ).scalar()
                    if existing:
                        return existing
                parent_status = _statuses(conn, parents)
                missing = [p for p in parents if p not in parent_status]
                if missing:
                    raise NotFound("task", ", ".join(missing))
                if triage:
                    status = Status.TRIAGE
                elif any(s not in FINISHED for s in parent_status.values()):
                    status = Status.TODO
                else:
                    status = Status.READY
                conn.execute(insert(tasks).values(
                    id=task_id, title=title.strip(), body=body, assignee=assignee,
                    status=status, priority=int(priority), created_by=created_by,
                    created_at=ts, workspace_kind="scratch", idempotency_key=idempotency_key,
                    max_runtime_seconds=max_runtime_seconds, max_retries=max_retries,
                ))
                for parent in parents:
                    conn.execute(insert(task_links).values(parent_id=parent, child_id=task_id))
                _event(conn, task_id, "created", {
                    "assignee": assignee, "status": str(status), "parents": parents,
                    "tenant": None, "branch_name": None, "skills": None, "goal_mode": None,
                }, now=ts)
            return task_id
        except IntegrityError:
            if attempt == 2:
                raise
            log.warning("task id %s collided; retrying with a new id", task_id)
    raise AssertionError("unreachable")


def link(db: Database, parent_id: str, child_id: str, *, now: float | None = None) -> None:
    """Make ``child_id`` depend on ``parent_id``. Refuses cycles; a ``ready``
    child goes back to ``todo`` while the parent is unfinished."""
    ts = epoch(now)
    with db.write() as conn:
        found = _statuses(conn, [parent_id, child_id])
        for ident in (parent_id, child_id):
            if ident not in found:
                raise NotFound("task", ident)
        if parent_id == child_id:
            raise Refused(f"cannot link {parent_id} to itself: a task cannot depend on itself")
        path = _path_between(conn, child_id, parent_id)
        if path:
            chain = " -> ".join([parent_id, *path])
            raise Refused(
                f"cannot link {parent_id} -> {child_id}: it would make a cycle ({chain}); "
                "nothing was changed"
            )
        exists = conn.execute(select(task_links.c.parent_id).where(
            task_links.c.parent_id == parent_id, task_links.c.child_id == child_id)).first()
        if exists:
            return
        conn.execute(insert(task_links).values(parent_id=parent_id, child_id=child_id))
        if found[parent_id] not in FINISHED:
            conn.execute(update(tasks).where(tasks.c.id == child_id, tasks.c.status == Status.READY)
                         .values(status=Status.TODO))
        _event(conn, child_id, "linked", {"parent": parent_id, "child": child_id}, now=ts)


def comment(db: Database, task_id: str, body: str, *, author: str = "user",
            now: float | None = None) -> int:
    if body is None or not body.strip():
        raise InvalidInput("a comment needs text; the text given was empty")
    author = (author or "").strip() or "user"
    ts = epoch(now)
    with db.write() as conn:
        _task_row(conn, task_id)
        comment_id = conn.execute(insert(task_comments).values(
            task_id=task_id, author=author, body=body.strip(), created_at=ts,
        )).inserted_primary_key[0]
        _event(conn, task_id, "commented", {"author": author, "len": len(body)}, now=ts)
    return int(comment_id)


# -- transitions -------------------------------------------------------------------


def claim(db: Database, task_id: str, *, lock: str, ttl_seconds: int = DEFAULT_CLAIM_TTL,
          now: float | None = None) -> Change:
    """``ready`` (or ``review``) -> ``running``: opens a run; ``lock`` is ``host:pid``."""
    ts = epoch(now)
    with db.write() as conn:
        row = _begin(conn, task_id, "claim")
        if row.status == Status.READY:
            unfinished = _unfinished_parents(conn, task_id)
            if unfinished:
                raise TransitionRefused(task_id, "claim", row.status,
                                        "parents not finished: " + ", ".join(unfinished))
        run_id = _open_run(conn, row, lock=lock, ttl_seconds=ttl_seconds, now=ts)
    return Change(task_id, "claim", row.status, Status.RUNNING, run_id)


def claim_next(db: Database, *, host: str, lock: str, capacity: int,
               policy: RetryPolicy = RetryPolicy(), workspace_root: str | None = None,
               ttl_seconds: int = DEFAULT_CLAIM_TTL, now: float | None = None,
               scan: int = 200, deferred: list[float] | None = None,
               excluded: Collection[str] = ()) -> Change | None:
    """The dispatcher's claim: the best eligible ``ready`` task, if ``host`` has
    fewer than ``capacity`` open runs. One transaction; None when there is nothing
    to claim (no slot, no eligible task).

    Order: priority, then age. Eligible: every parent finished, and the retry
    backoff (or the rate-limit cooldown) since its last run has passed. The count
    of open runs and the claim happen in the same transaction, so concurrent
    dispatchers of one host never exceed its capacity. Tasks passed over because
    their backoff has not run out add the time it does to ``deferred``; tasks in
    ``excluded`` (their requirements are not this host's labels) are left alone.

    On PostgreSQL the chosen task is locked ``FOR UPDATE SKIP LOCKED``: dispatchers
    of other hosts pass over a task one of them is claiming instead of waiting for
    it, and the claim is decided by that row lock."""
    ts = epoch(now)
    with db.write() as conn:
        db.serialize_claims(conn, host)
        if _open_runs_on(conn, host) >= capacity:
            return None
        for row in _claim_candidates(conn, scan, excluded):
            not_before = policy.not_before(row.consecutive_failures or 0, row.last_outcome,
                                           row.last_end)
            if not_before > ts:
                if deferred is not None:
                    deferred.append(not_before)
                continue
            task = _lock_ready(conn, row.id)
            if task is None:  # another host is claiming it, or it moved on
                continue
            workspace = f"{workspace_root.rstrip('/')}/{task.id}" if workspace_root else None
            run_id = _open_run(conn, task, lock=lock, ttl_seconds=ttl_seconds, now=ts,
                               workspace=workspace,
                               metadata={"claimed_by": "sparkops", "host": host})
            return Change(task.id, "claim", task.status, Status.RUNNING, run_id)
    return None


def count_open_runs(db: Database, host: str) -> int:
    """Runs not yet closed whose claim belongs to ``host``."""
    with db.read() as conn:
        return _open_runs_on(conn, host)


def record_process(db: Database, task_id: str, *, run_id: int, claim_lock: str,
                   worker_pid: int | None, identity: dict[str, Any],
                   now: float | None = None) -> None:
    """Store the run's process identity (host, boot id, pids and start times) in the
    run row's metadata, and the worker pid and claim lock in Hermes' columns.
    Refused with :class:`StaleRun` once the run is no longer current."""
    ts = epoch(now)
    with db.write() as conn:
        row = _task_row(conn, task_id)
        _check_run(row, run_id)
        if row.status != Status.RUNNING:
            raise StaleRun(task_id, run_id, None)
        metadata = _merged_metadata(conn, run_id, identity)
        conn.execute(update(task_runs).where(task_runs.c.id == run_id, task_runs.c.ended_at.is_(None))
                     .values(metadata=_json(metadata), claim_lock=claim_lock,
                             worker_pid=worker_pid, last_heartbeat_at=ts))
        conn.execute(update(tasks).where(tasks.c.id == task_id, tasks.c.current_run_id == run_id)
                     .values(claim_lock=claim_lock, worker_pid=worker_pid, last_heartbeat_at=ts))


def complete(db: Database, task_id: str, *, run_id: int | None = None,
             result: str | None = None, summary: str | None = None,
             metadata: dict | None = None, now: float | None = None) -> Change:
    """-> ``done``. With ``run_id`` (a worker's report) only that live run may
    complete the task. Children whose parents are now all finished become ready."""
    ts = epoch(now)
    with db.write() as conn:
        row = _begin(conn, task_id, "complete", run_id)
        _conditional_update(conn, row, "complete", Status.DONE, {
            **RELEASE_CLAIM, "result": result, "completed_at": ts, "block_kind": None,
            "block_recurrences": 0, "consecutive_failures": 0, "last_failure_error": None,
        })
        closing = summary if summary is not None else result
        closed = _close_run(conn, row, status="done", outcome=Outcome.COMPLETED,
                            summary=closing, metadata=metadata, now=ts)
        if closed is None and (closing or metadata):
            closed = _synthesize_run(conn, row, Outcome.COMPLETED, summary=closing,
                                     metadata=metadata, now=ts)
        first_line = (closing or "").strip().splitlines()[0][:400] if (closing or "").strip() else None
        _event(conn, task_id, "completed",
               {"result_len": len(result) if result else 0, "summary": first_line},
               run_id=closed, now=ts)
        _promote_children(conn, task_id, now=ts)
    return Change(task_id, "complete", row.status, Status.DONE, closed)


def block(db: Database, task_id: str, *, reason: str | None = None, kind: str | None = None,
          run_id: int | None = None, now: float | None = None) -> Change:
    """-> ``blocked`` for a human. ``kind='dependency'`` waits in ``todo`` instead;
    the same kind blocked again after an unblock goes to ``triage`` (loop breaker)."""
    if kind is not None and kind not in BLOCK_KINDS:
        raise InvalidInput(f"block kind must be one of {', '.join(sorted(BLOCK_KINDS))}, got {kind!r}")
    ts = epoch(now)
    with db.write() as conn:
        row = _begin(conn, task_id, "block", run_id)
        clear = {**RELEASE_CLAIM, "block_kind": kind}
        if kind == "dependency":
            target, event_kind = Status.TODO, "dependency_wait"
            payload: dict[str, Any] = {"reason": reason, "kind": kind}
        else:
            recurrences = (row.block_recurrences or 0) + 1 if row.block_kind == kind else 1
            clear["block_recurrences"] = recurrences
            if recurrences >= BLOCK_RECURRENCE_LIMIT:
                target, event_kind = Status.TRIAGE, "block_loop_detected"
                payload = {"reason": reason, "kind": kind, "recurrences": recurrences,
                           "limit": BLOCK_RECURRENCE_LIMIT}
            else:
                target, event_kind = Status.BLOCKED, "blocked"
                payload = {"reason": reason, "kind": kind, "recurrences": recurrences}
        _conditional_update(conn, row, "block", target, clear)
        closed = _close_run(conn, row, status="blocked", outcome=Outcome.BLOCKED,
                            summary=reason, now=ts)
        if closed is None and reason:
            closed = _synthesize_run(conn, row, Outcome.BLOCKED, summary=reason, now=ts)
        _event(conn, task_id, event_kind, payload, run_id=closed, now=ts)
    return Change(task_id, "block", row.status, target, closed)


def unblock(db: Database, task_id: str, *, now: float | None = None) -> Change:
    """``blocked``/``scheduled`` -> ``ready`` (``todo`` while parents are unfinished).
    A deliberate unblock gives the task a fresh failure budget."""
    ts = epoch(now)
    with db.write() as conn:
        row = _begin(conn, task_id, "unblock")
        target = Status.TODO if _unfinished_parents(conn, task_id) else Status.READY
        _conditional_update(conn, row, "unblock", target, {
            "current_run_id": None, "consecutive_failures": 0, "last_failure_error": None,
        })
        _close_run(conn, row, status="reclaimed", outcome=Outcome.RECLAIMED,
                   summary="invariant recovery on unblock", now=ts)
        _event(conn, task_id, "unblocked",
               {"status": str(target)} if target != Status.READY else None, now=ts)
    return Change(task_id, "unblock", row.status, target)


def promote(db: Database, task_id: str, *, actor: str = "user", reason: str | None = None,
            force: bool = False, now: float | None = None) -> Change:
    """Manually move a ``todo``/``blocked``/``triage`` task to ``ready``. Refused
    while a parent is unfinished unless ``force``."""
    ts = epoch(now)
    with db.write() as conn:
        row = _begin(conn, task_id, "promote")
        unfinished = _unfinished_parents(conn, task_id)
        if unfinished and not force:
            raise TransitionRefused(task_id, "promote", row.status,
                                    "parents not finished: " + ", ".join(unfinished)
                                    + " (use --force to override)")
        _conditional_update(conn, row, "promote", Status.READY, {})
        _event(conn, task_id, "promoted_manual",
               {"actor": actor, "reason": reason, "forced": force}, now=ts)
    return Change(task_id, "promote", row.status, Status.READY)


def archive(db: Database, task_id: str, *, now: float | None = None) -> Change:
    """-> ``archived``. A running task must be reclaimed first: archiving it would
    release a claim whose worker may still be alive."""
    ts = epoch(now)
    with db.write() as conn:
        row = _task_row(conn, task_id)
        if row.status == Status.RUNNING:
            raise TransitionRefused(task_id, "archive", row.status,
                                    "its worker may still be running; reclaim it first")
        _check_allowed(row, "archive")
        _conditional_update(conn, row, "archive", Status.ARCHIVED, RELEASE_CLAIM)
        closed = _close_run(conn, row, status="reclaimed", outcome=Outcome.RECLAIMED,
                            summary="task archived with run still active", now=ts)
        _event(conn, task_id, "archived", None, run_id=closed, now=ts)
        _promote_children(conn, task_id, now=ts)
    return Change(task_id, "archive", row.status, Status.ARCHIVED, closed)


def reclaim(db: Database, task_id: str, *, run_id: int, reason: str,
            now: float | None = None) -> Change:
    """``running`` -> ``ready`` for a run whose worker is known to be gone.

    The caller (the reclaimer, an operator) decides the worker is dead; this only
    releases the claim if ``run_id`` is still current, so a reclaim decided on
    stale information changes nothing."""
    ts = epoch(now)
    with db.write() as conn:
        row = _begin(conn, task_id, "reclaim", run_id)
        _conditional_update(conn, row, "reclaim", Status.READY, RELEASE_CLAIM)
        _close_run(conn, row, status="reclaimed", outcome=Outcome.RECLAIMED,
                   error=reason[:ERROR_EXCERPT], now=ts)
        _event(conn, task_id, "reclaimed", {"reason": reason, "prev_lock": row.claim_lock},
               run_id=run_id, now=ts)
    return Change(task_id, "reclaim", row.status, Status.READY, run_id)


def fail(db: Database, task_id: str, *, run_id: int, outcome: Outcome, error: str,
         failure_limit: int, protocol_violation_limit: int = 3,
         now: float | None = None) -> Change:
    """The one failure path: close ``run_id`` with ``outcome`` and requeue the task.

    Counted failures (crash, timeout, spawn failure, lost workspace) add one to
    ``consecutive_failures``; at the limit (the task's ``max_retries`` wins over
    ``failure_limit``) the circuit breaker moves the task to ``blocked`` with the
    reason and a ``gave_up`` event. A protocol violation (exit 0 without a report)
    trips the breaker on its own streak, at ``protocol_violation_limit``. A rate
    limit requeues without counting."""
    outcome = Outcome(outcome)
    if outcome not in FAILURE_OUTCOMES:
        raise InvalidInput(f"{outcome} is not a failure outcome")
    ts = epoch(now)
    excerpt = (error or "")[:ERROR_EXCERPT]
    with db.write() as conn:
        row = _begin(conn, task_id, "fail", run_id)
        counted = outcome in COUNTED_FAILURES
        failures = (row.consecutive_failures or 0) + (1 if counted else 0)
        if outcome == Outcome.PROTOCOL_VIOLATION:
            streak = _protocol_violation_streak(conn, task_id) + 1
            tripped, limit, source = streak >= protocol_violation_limit, protocol_violation_limit, \
                "protocol_violation_limit"
        else:
            limit = row.max_retries if row.max_retries is not None else failure_limit
            tripped, source = counted and failures >= limit, \
                "task" if row.max_retries is not None else "dispatcher"
        target = Status.BLOCKED if tripped else Status.READY
        values: dict[str, Any] = {**RELEASE_CLAIM, "consecutive_failures": failures}
        if outcome != Outcome.RATE_LIMITED:
            values["last_failure_error"] = excerpt
        _conditional_update(conn, row, "fail", target, values)
        _close_run(conn, row, status=str(outcome), outcome=outcome, error=excerpt,
                   metadata={"failures": failures}, now=ts)
        _event(conn, task_id, str(outcome), {"error": excerpt, "failures": failures},
               run_id=run_id, now=ts)
        if tripped:
            _event(conn, task_id, "gave_up", {
                "failures": failures, "effective_limit": limit, "limit_source": source,
                "error": excerpt, "trigger_outcome": str(outcome),
            }, run_id=run_id, now=ts)
    return Change(task_id, "fail", row.status, target, run_id)


def set_priority(db: Database, task_id: str, priority: int, *, now: float | None = None) -> int:
    """Change a task's priority (not its status); returns the old one."""
    ts = epoch(now)
    with db.write() as conn:
        row = _task_row(conn, task_id)
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(priority=int(priority)))
        _event(conn, task_id, "reprioritized", {"priority": int(priority), "was": row.priority}, now=ts)
    return row.priority or 0


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
        _event(conn, row.task_id, "reclaimed", {"reason": reason, "orphan_run": run_id},
               run_id=run_id, now=ts)
    return True


def heartbeat(db: Database, task_id: str, *, run_id: int, now: float | None = None) -> None:
    """Record that ``run_id``'s worker is alive. A stale run changes nothing."""
    ts = epoch(now)
    with db.write() as conn:
        row = _task_row(conn, task_id)
        _check_run(row, run_id)
        won = conn.execute(update(tasks).where(
            tasks.c.id == task_id, tasks.c.current_run_id == run_id,
            tasks.c.status == Status.RUNNING).values(last_heartbeat_at=ts)).rowcount
        if won != 1:
            raise StaleRun(task_id, run_id, row.current_run_id)
        conn.execute(update(task_runs).where(task_runs.c.id == run_id, task_runs.c.ended_at.is_(None))
                     .values(last_heartbeat_at=ts))


def promote_ready(db: Database, *, now: float | None = None) -> list[str]:
    """Promote every ``todo`` task whose parents are all finished. Returns the ids.

    Completing or archiving a task promotes its children at once; this sweep is
    the safety net for boards that another tool (Hermes) also writes."""
    ts = epoch(now)
    with db.write() as conn:
        return _promote_where(conn, tasks.c.status == Status.TODO, now=ts)


# -- the pieces every transition uses ----------------------------------------------


def _begin(conn: Connection, task_id: str, action: str, run_id: int | None = None):
    """The start of every transition: the row, the fencing check, the table check."""
    row = _task_row(conn, task_id)
    _check_run(row, run_id)
    _check_allowed(row, action)
    return row


def _task_row(conn: Connection, task_id: str):
    row = conn.execute(select(tasks).where(tasks.c.id == task_id)).first()
    if row is None:
        raise NotFound("task", task_id)
    return row


def _check_allowed(row, action: str) -> None:
    allowed = TRANSITIONS[action]
    if row.status not in allowed:
        raise TransitionRefused(
            row.id, action, row.status,
            f"{action} applies to {', '.join(sorted(allowed))} tasks",
        )


def _check_run(row, run_id: int | None) -> None:
    """The fencing check: a report for ``run_id`` only counts while it is current."""
    if run_id is not None and row.current_run_id != int(run_id):
        raise StaleRun(row.id, int(run_id), row.current_run_id)


def _conditional_update(conn: Connection, row, action: str, target: Status,
                        values: dict[str, Any]) -> None:
    """Move ``row`` to ``target`` only if nobody changed it since we read it."""
    run_guard = (tasks.c.current_run_id.is_(None) if row.current_run_id is None
                 else tasks.c.current_run_id == row.current_run_id)
    won = conn.execute(
        update(tasks)
        .where(tasks.c.id == row.id, tasks.c.status == row.status, run_guard)
        .values(status=target, **values)
    ).rowcount
    if won != 1:
        raise TransitionRefused(row.id, action, row.status, "the task changed at the same time")


def _close_run(conn: Connection, row, *, status: str, outcome: Outcome, now: int,
               summary: str | None = None, error: str | None = None,
               metadata: dict | None = None) -> int | None:
    if row.current_run_id is None:
        return None
    conn.execute(
        update(task_runs)
        .where(task_runs.c.id == row.current_run_id, task_runs.c.ended_at.is_(None))
        .values(status=status, outcome=str(outcome), summary=summary, error=error,
                metadata=_json(_merged_metadata(conn, row.current_run_id, metadata)),
                ended_at=now, claim_lock=None, claim_expires=None, worker_pid=None)
    )
    return int(row.current_run_id)


def _merged_metadata(conn: Connection, run_id: int, extra: dict | None) -> dict | None:
    """The run's metadata with ``extra`` on top (the process identity is kept)."""
    current = conn.execute(select(task_runs.c.metadata).where(task_runs.c.id == run_id)).scalar()
    merged: dict = {}
    if current:
        try:
            loaded = json.loads(current)
            merged = loaded if isinstance(loaded, dict) else {"previous": loaded}
        except ValueError:
            merged = {"previous": current}
    merged.update(extra or {})
    return merged or None


def _open_run(conn: Connection, row, *, lock: str, ttl_seconds: int, now: int,
              workspace: str | None = None, metadata: dict | None = None) -> int:
    """Move ``row`` to running and open its run; returns the run id."""
    values: dict[str, Any] = {
        "claim_lock": lock, "claim_expires": now + ttl_seconds, "worker_pid": None,
        "started_at": func.coalesce(tasks.c.started_at, now), "last_heartbeat_at": now,
    }
    if workspace:
        values["workspace_path"] = workspace
    _conditional_update(conn, row, "claim", Status.RUNNING, values)
    run_id = conn.execute(insert(task_runs).values(
        task_id=row.id, profile=row.assignee, step_key=row.current_step_key,
        status="running", claim_lock=lock, claim_expires=now + ttl_seconds,
        max_runtime_seconds=row.max_runtime_seconds, started_at=now, last_heartbeat_at=now,
        metadata=_json(metadata),
    )).inserted_primary_key[0]
    conn.execute(update(tasks).where(tasks.c.id == row.id).values(current_run_id=run_id))
    payload = {"lock": lock, "expires": now + ttl_seconds, "run_id": run_id}
    if row.status == Status.REVIEW:
        payload["source_status"] = "review"
    _event(conn, row.id, "claimed", payload, run_id=run_id, now=now)
    return int(run_id)


def host_of_lock(lock: str | None) -> str:
    """The host of a claim lock ``host:pid`` ("" for none)."""
    return (lock or "").rpartition(":")[0]


def host_lock_pattern(host: str) -> str:
    """A LIKE pattern for the claim locks of ``host`` (``host:pid``), escaped."""
    escaped = host.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + ":%"


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
_last = task_runs.alias("last")
_LAST_RUN_ID = (select(task_runs.c.id).where(task_runs.c.task_id == tasks.c.id)
                .order_by(task_runs.c.id.desc()).limit(1).scalar_subquery())
_CLAIM_CANDIDATES = (
    select(tasks.c.id, tasks.c.consecutive_failures,
           _last.c.ended_at.label("last_end"), _last.c.outcome.label("last_outcome"))
    .select_from(tasks.outerjoin(_last, _last.c.id == _LAST_RUN_ID))
    .where(tasks.c.status == Status.READY, ~HAS_UNFINISHED_PARENT)
    .order_by(tasks.c.priority.desc(), tasks.c.created_at, tasks.c.id)
    .limit(bindparam("scan"))
)


def _open_runs_on(conn: Connection, host: str) -> int:
    return int(conn.execute(_OPEN_RUNS_ON_HOST, {"host_pattern": host_lock_pattern(host)}).scalar() or 0)


def _claim_candidates(conn: Connection, limit: int, excluded: Collection[str] = ()):
    """Ready tasks with no unfinished parent, best first, with their last run."""
    if not excluded:
        return conn.execute(_CLAIM_CANDIDATES, {"scan": limit}).all()
    return conn.execute(_CLAIM_CANDIDATES.where(tasks.c.id.notin_(bindparam("excluded", expanding=True))),
                        {"scan": limit, "excluded": sorted(excluded)}).all()


def _lock_ready(conn: Connection, task_id: str):
    """The task's row if it is still ready, locked for this transaction; None when
    it is not ready or (PostgreSQL) another transaction holds it. SQLite has one
    writer at a time, so there the plain read is already exclusive."""
    row = conn.execute(select(tasks).where(tasks.c.id == task_id, tasks.c.status == Status.READY)
                       .with_for_update(skip_locked=True)).first()
    return row


def _protocol_violation_streak(conn: Connection, task_id: str) -> int:
    """How many of the task's latest runs in a row ended as protocol violations."""
    streak = 0
    for outcome in conn.execute(select(task_runs.c.outcome)
                                .where(task_runs.c.task_id == task_id, task_runs.c.ended_at.is_not(None))
                                .order_by(task_runs.c.id.desc()).limit(50)).scalars():
        if outcome != Outcome.PROTOCOL_VIOLATION:
            break
        streak += 1
    return streak


def _synthesize_run(conn: Connection, row, outcome: Outcome, *, now: int,
                    summary: str | None = None, metadata: dict | None = None) -> int:
    """A zero-length, closed run for a terminal change on a never-claimed task,
    so the summary is kept in the attempt history (as Hermes does)."""
    return int(conn.execute(insert(task_runs).values(
        task_id=row.id, profile=row.assignee, step_key=row.current_step_key,
        status=str(outcome), outcome=str(outcome), summary=summary,
        metadata=_json(metadata), started_at=now, ended_at=now,
    )).inserted_primary_key[0])


def _event(conn: Connection, task_id: str, kind: str, payload: dict | None, *, now: int,
           run_id: int | None = None) -> None:
    conn.execute(insert(task_events).values(
        task_id=task_id, run_id=run_id, kind=kind, payload=_json(payload), created_at=now,
    ))


def _json(value: dict | None) -> str | None:
    return json.dumps(value, ensure_ascii=False) if value else None


def _statuses(conn: Connection, ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    return dict(conn.execute(select(tasks.c.id, tasks.c.status).where(tasks.c.id.in_(ids))).all())


def _unfinished_parents(conn: Connection, task_id: str) -> list[str]:
    rows = conn.execute(
        select(tasks.c.id)
        .join(task_links, task_links.c.parent_id == tasks.c.id)
        .where(task_links.c.child_id == task_id, tasks.c.status.not_in(list(FINISHED)))
        .order_by(tasks.c.id)
    ).scalars()
    return list(rows)


def _path_between(conn: Connection, start: str, goal: str) -> list[str]:
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


def _promote_children(conn: Connection, task_id: str, *, now: int) -> list[str]:
    children = select(task_links.c.child_id).where(task_links.c.parent_id == task_id)
    return _promote_where(conn, and_(tasks.c.status == Status.TODO, tasks.c.id.in_(children)),
                          now=now)


def _promote_where(conn: Connection, condition, *, now: int) -> list[str]:
    """Move matching ``todo`` tasks with no unfinished parent to ``ready``."""
    candidates = list(conn.execute(select(tasks.c.id).where(condition, ~HAS_UNFINISHED_PARENT)).scalars())
    promoted = []
    for child in candidates:
        won = conn.execute(update(tasks).where(tasks.c.id == child, tasks.c.status == Status.TODO)
                           .values(status=Status.READY)).rowcount
        if won == 1:
            _event(conn, child, "promoted", None, now=now)
            promoted.append(child)
    return promoted

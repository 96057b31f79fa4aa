"""The state machine: the one module that decides a task's status.

Every change follows one pattern, in one writing transaction (the writes
themselves are :mod:`sparkops.board.steps`'s, which take the target from here):

1. read the task row (``NotFound`` if there is none);
2. check the action is allowed from its status (:data:`TRANSITIONS`) and, for a
   worker's report, that ``run_id`` is still the task's current run (the fencing
   token; ``StaleRun`` otherwise);
3. a conditional ``UPDATE ... WHERE id = ? AND status = ? AND current_run_id IS ?``
   whose rowcount says whether we won (``TransitionRefused`` if not);
4. open or close the ``task_runs`` row and append a ``task_events`` row (on
   PostgreSQL 3 and 4 are one statement: see :mod:`sparkops.board.steps`).

Semantics follow Hermes Kanban (hermes-agent 0.19) so a board can be worked by
both: the same event kinds and payloads, run ``status``/``outcome`` pairs,
dependency gating (a child waits in ``todo`` until every parent is ``done`` or
``archived``), typed blocks, and the consecutive-failure circuit breaker.
Functions return a :class:`Change` that says what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from sparkops.board import steps
from sparkops.board.model import (
    BLOCK_KINDS,
    COUNTED_FAILURES,
    DEFAULT_CLAIM_TTL,
    ERROR_EXCERPT,
    FAILURE_OUTCOMES,
    FINISHED,
    Change,
    Outcome,
    RetryPolicy,
    Status,
    is_safe_id,
    new_task_id,
)
from sparkops.core.clock import epoch
from sparkops.core.errors import InvalidInput, NotFound, Refused, TransitionRefused
from sparkops.storage.db import Database
from sparkops.storage.schema import task_comments, task_links, tasks

log = logging.getLogger(__name__)


#: action -> the statuses it may start from. The target is decided by the action.
TRANSITIONS: dict[str, frozenset[Status]] = {
    "claim": frozenset({Status.READY, Status.REVIEW}),             # -> running
    "complete": frozenset({Status.RUNNING, Status.READY, Status.BLOCKED}),  # -> done
    "block": frozenset({Status.RUNNING, Status.READY}),            # -> blocked | todo | triage
    "unblock": frozenset({Status.BLOCKED, Status.SCHEDULED}),      # -> ready | todo
    "promote": frozenset({Status.TODO, Status.BLOCKED, Status.TRIAGE}),  # -> ready
    "archive": frozenset(set(Status) - {Status.ARCHIVED}),         # -> archived
    "reclaim": frozenset({Status.RUNNING}),                        # -> ready
    "fail": frozenset({Status.RUNNING}),                           # -> ready | blocked
}

#: How many of the best ready tasks a claim looks at before it looks further.
FIRST_LOOK = 8
#: Hermes' BLOCK_RECURRENCE_LIMIT: the same block kind this many times in a row
#: (with unblocks between) routes the task to triage instead of blocked.
BLOCK_RECURRENCE_LIMIT = 2

#: Columns cleared whenever a task stops being claimed by a run.
RELEASE_CLAIM = {"claim_lock": None, "claim_expires": None, "worker_pid": None,
                 "current_run_id": None}


# -- creating and linking ----------------------------------------------------------


_INSERT_TASK = insert(tasks)
_INSERT_LINK = insert(task_links)


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
                parent_status = steps.statuses(conn, parents)
                missing = [p for p in parents if p not in parent_status]
                if missing:
                    raise NotFound("task", ", ".join(missing))
                if triage:
                    status = Status.TRIAGE
                elif any(s not in FINISHED for s in parent_status.values()):
                    status = Status.TODO
                else:
                    status = Status.READY
                conn.execute(_INSERT_TASK, {
                    "id": task_id, "title": title.strip(), "body": body, "assignee": assignee,
                    "status": str(status), "priority": int(priority), "created_by": created_by,
                    "created_at": ts, "workspace_kind": "scratch", "idempotency_key": idempotency_key,
                    "max_runtime_seconds": max_runtime_seconds, "max_retries": max_retries,
                })
                for parent in parents:
                    conn.execute(_INSERT_LINK, {"parent_id": parent, "child_id": task_id})
                steps.event(conn, task_id, "created", {
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
        found = steps.statuses(conn, [parent_id, child_id])
        for ident in (parent_id, child_id):
            if ident not in found:
                raise NotFound("task", ident)
        if parent_id == child_id:
            raise Refused(f"cannot link {parent_id} to itself: a task cannot depend on itself")
        path = steps.path_between(conn, child_id, parent_id)
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
        steps.event(conn, child_id, "linked", {"parent": parent_id, "child": child_id}, now=ts)


def comment(db: Database, task_id: str, body: str, *, author: str = "user",
            now: float | None = None) -> int:
    if body is None or not body.strip():
        raise InvalidInput("a comment needs text; the text given was empty")
    author = (author or "").strip() or "user"
    ts = epoch(now)
    with db.write() as conn:
        steps.task_row(conn, task_id)
        comment_id = conn.execute(insert(task_comments).values(
            task_id=task_id, author=author, body=body.strip(), created_at=ts,
        )).inserted_primary_key[0]
        steps.event(conn, task_id, "commented", {"author": author, "len": len(body)}, now=ts)
    return int(comment_id)


# -- transitions -------------------------------------------------------------------


def claim(db: Database, task_id: str, *, lock: str, ttl_seconds: int = DEFAULT_CLAIM_TTL,
          now: float | None = None) -> Change:
    """``ready`` (or ``review``) -> ``running``: opens a run; ``lock`` is ``host:pid``."""
    ts = epoch(now)
    with db.write() as conn:
        row = _begin(conn, task_id, "claim")
        if row.status == Status.READY:
            unfinished = steps.unfinished_parents(conn, task_id)
            if unfinished:
                raise TransitionRefused(task_id, "claim", row.status,
                                        "parents not finished: " + ", ".join(unfinished))
        run_id = steps.open_run(conn, row, lock=lock, ttl_seconds=ttl_seconds, now=ts)
    return Change(task_id, "claim", row.status, Status.RUNNING, run_id)


def claim_next(db: Database, *, host: str, lock: str, capacity: int,
               policy: RetryPolicy = RetryPolicy(), workspace_root: str | None = None,
               ttl_seconds: int = DEFAULT_CLAIM_TTL, now: float | None = None,
               scan: int = 200, deferred: list[float] | None = None,
               excluded: Collection[str] = (), busy_runs: Collection[int] = (),
               unsafe: list[str] | None = None) -> Change | None:
    """The dispatcher's claim: the best eligible ``ready`` task, if ``host`` has
    fewer than ``capacity`` open runs. One transaction; None when there is nothing
    to claim (no slot, no eligible task).

    Order: priority, then age. Eligible: every parent finished, and the retry
    backoff (or the rate-limit cooldown) since its last run has passed. The count
    of open runs and the claim happen in the same transaction, so concurrent
    dispatchers of one host never exceed its capacity. Tasks passed over because
    their backoff has not run out add the time it does to ``deferred``; tasks in
    ``excluded`` (their requirements are not this host's labels, or an agent of
    theirs is still alive) are left alone. ``busy_runs``: runs whose agents are
    alive on this host (:mod:`sparkops.engine.workers`); each takes a slot whether or not
    its run is still open, since capacity counts live agents. A ready task whose id
    is not :func:`is_safe_id` is passed over and added to ``unsafe`` (the caller
    blocks it).

    On PostgreSQL the candidates are read and locked in one statement ``FOR UPDATE
    SKIP LOCKED``: dispatchers of other hosts pass over a task one of them is
    claiming instead of waiting for it, and the claim is decided by that row lock."""
    ts = epoch(now)
    with db.write() as conn:
        db.serialize_claims(conn, host)
        # The best candidate is nearly always eligible: look at a few first, at
        # ``scan`` only when none of them is (backoffs, unsafe ids).
        for limit in dict.fromkeys((min(FIRST_LOOK, scan), scan)):
            taken, rows = steps.claim_candidates(conn, limit, host=host, busy_runs=busy_runs, excluded=excluded)
            if taken >= capacity:
                return None
            for task in rows:
                if not is_safe_id(task.id):
                    if unsafe is not None and task.id not in unsafe:
                        unsafe.append(task.id)
                    continue
                not_before = policy.not_before(task.consecutive_failures or 0, task.last_outcome,
                                               task.last_end)
                if not_before > ts:
                    if deferred is not None:
                        deferred.append(not_before)
                    continue
                workspace = f"{workspace_root.rstrip('/')}/{task.id}" if workspace_root else None
                run_id = steps.open_run(conn, task, lock=lock, ttl_seconds=ttl_seconds, now=ts,
                                        workspace=workspace, metadata={"claimed_by": "sparkops", "host": host})
                return Change(task.id, "claim", task.status, Status.RUNNING, run_id)
            if len(rows) < limit:
                break
    return None


def complete(db: Database, task_id: str, *, run_id: int | None = None,
             result: str | None = None, summary: str | None = None,
             metadata: dict | None = None, reporter: dict | None = None,
             now: float | None = None) -> Change:
    """-> ``done``. With ``run_id`` (a worker's report) only that live run may
    complete the task. Children whose parents are now all finished become ready.
    ``reporter`` (who reported: see :func:`sparkops.engine.handoff.reporter`) is kept in the
    run's metadata; the shim lets its agent finish only after its own report."""
    ts = epoch(now)
    if reporter:
        metadata = {**(metadata or {}), "reporter": reporter}
    with db.write() as conn:
        row = _begin(conn, task_id, "complete", run_id)
        values = {**RELEASE_CLAIM, "result": result, "completed_at": ts, "block_kind": None,
                  "block_recurrences": 0, "consecutive_failures": 0, "last_failure_error": None}
        closing = summary if summary is not None else result
        first_line = (closing or "").strip().splitlines()[0][:400] if (closing or "").strip() else None
        logged = ("completed", {"result_len": len(result) if result else 0, "summary": first_line})
        if row.current_run_id is not None:
            closed = steps.end_run(conn, row, "complete", Status.DONE, values, logged, now=ts, status="done",
                                   outcome=Outcome.COMPLETED, summary=closing, metadata=metadata)
        else:
            steps.guarded_update(conn, row, "complete", Status.DONE, values)
            closed = None
            if closing or metadata:
                closed = steps.synthesize_run(conn, row, Outcome.COMPLETED, summary=closing,
                                              metadata=metadata, now=ts)
            steps.event(conn, task_id, *logged, run_id=closed, now=ts)
        if row.has_children:
            _promote_children(conn, task_id, now=ts)
    return Change(task_id, "complete", row.status, Status.DONE, closed)


def block(db: Database, task_id: str, *, reason: str | None = None, kind: str | None = None,
          run_id: int | None = None, reporter: dict | None = None, now: float | None = None) -> Change:
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
        if row.current_run_id is not None:
            closed = steps.end_run(conn, row, "block", target, clear, (event_kind, payload), now=ts,
                                   status="blocked", outcome=Outcome.BLOCKED, summary=reason,
                                   metadata={"reporter": reporter} if reporter else None)
        else:
            steps.guarded_update(conn, row, "block", target, clear)
            closed = steps.synthesize_run(conn, row, Outcome.BLOCKED, summary=reason, now=ts) if reason else None
            steps.event(conn, task_id, event_kind, payload, run_id=closed, now=ts)
    return Change(task_id, "block", row.status, target, closed)


def unblock(db: Database, task_id: str, *, now: float | None = None) -> Change:
    """``blocked``/``scheduled`` -> ``ready`` (``todo`` while parents are unfinished).
    A deliberate unblock gives the task a fresh failure budget."""
    ts = epoch(now)
    with db.write() as conn:
        row = _begin(conn, task_id, "unblock")
        target = Status.TODO if steps.unfinished_parents(conn, task_id) else Status.READY
        steps.guarded_update(conn, row, "unblock", target, {
            "current_run_id": None, "consecutive_failures": 0, "last_failure_error": None,
        })
        steps.close_run(conn, row, status="reclaimed", outcome=Outcome.RECLAIMED,
                        summary="invariant recovery on unblock", now=ts)
        steps.event(conn, task_id, "unblocked",
                    {"status": str(target)} if target != Status.READY else None, now=ts)
    return Change(task_id, "unblock", row.status, target)


def promote(db: Database, task_id: str, *, actor: str = "user", reason: str | None = None,
            force: bool = False, now: float | None = None) -> Change:
    """Manually move a ``todo``/``blocked``/``triage`` task to ``ready``. Refused
    while a parent is unfinished unless ``force``."""
    ts = epoch(now)
    with db.write() as conn:
        row = _begin(conn, task_id, "promote")
        unfinished = steps.unfinished_parents(conn, task_id)
        if unfinished and not force:
            raise TransitionRefused(task_id, "promote", row.status,
                                    "parents not finished: " + ", ".join(unfinished)
                                    + " (use --force to override)")
        steps.guarded_update(conn, row, "promote", Status.READY, {})
        steps.event(conn, task_id, "promoted_manual",
                    {"actor": actor, "reason": reason, "forced": force}, now=ts)
    return Change(task_id, "promote", row.status, Status.READY)


def archive(db: Database, task_id: str, *, now: float | None = None) -> Change:
    """-> ``archived``, from any status, as Hermes does. A running task's run is
    closed as ``reclaimed``; its agent is stopped by its shim, which watches its run
    (see :mod:`sparkops.engine.shim`), and holds its slot until it is gone."""
    ts = epoch(now)
    with db.write() as conn:
        row = steps.task_row(conn, task_id)
        _check_allowed(row, "archive")
        steps.guarded_update(conn, row, "archive", Status.ARCHIVED, RELEASE_CLAIM)
        closed = steps.close_run(conn, row, status="reclaimed", outcome=Outcome.RECLAIMED,
                                 summary="task archived with run still active", now=ts)
        steps.event(conn, task_id, "archived", None, run_id=closed, now=ts)
        if row.has_children:
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
        row = _begin(conn, task_id, "reclaim", run_id)  # fenced: run_id is the current run
        steps.end_run(conn, row, "reclaim", Status.READY, RELEASE_CLAIM,
                      ("reclaimed", {"reason": reason, "prev_lock": row.claim_lock}), now=ts,
                      status="reclaimed", outcome=Outcome.RECLAIMED, error=reason[:ERROR_EXCERPT])
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
    limit requeues without counting.

    Hermes' shapes, so that both tools read each other's runs alike: a protocol
    violation is booked as Hermes books one (run outcome ``crashed``,
    ``metadata.protocol_violation``, "protocol violation" in the error, event
    ``protocol_violation``), and its streak counts either tool's violations. A
    tripped breaker also writes a ``blocked`` event, which is what makes Hermes'
    ``recompute_ready`` (run by every ``hermes kanban list`` and ``dispatch``) leave
    a blocked task alone whatever its failure counter says."""
    outcome = Outcome(outcome)
    if outcome not in FAILURE_OUTCOMES:
        raise InvalidInput(f"{outcome} is not a failure outcome")
    ts = epoch(now)
    violation = outcome == Outcome.PROTOCOL_VIOLATION
    if violation and "protocol violation" not in (error or ""):
        error = f"protocol violation: {error}"
    excerpt = (error or "")[:ERROR_EXCERPT]
    with db.write() as conn:
        row = _begin(conn, task_id, "fail", run_id)
        counted = outcome in COUNTED_FAILURES
        failures = (row.consecutive_failures or 0) + (1 if counted else 0)
        if outcome == Outcome.PROTOCOL_VIOLATION:
            streak = steps.protocol_violation_streak(conn, task_id) + 1
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
        booked = Outcome.CRASHED if violation else outcome
        metadata: dict[str, Any] = {"failures": failures}
        if violation:
            metadata.update(protocol_violation=True, exit_code=0)
        steps.end_run(conn, row, "fail", target, values, (str(outcome), {"error": excerpt, "failures": failures}),
                      now=ts, status=str(booked), outcome=booked, error=excerpt, metadata=metadata)
        if tripped:
            steps.event(conn, task_id, "gave_up", {
                "failures": failures, "effective_limit": limit, "limit_source": source,
                "error": excerpt, "trigger_outcome": str(outcome),
            }, run_id=run_id, now=ts)
            steps.event(conn, task_id, "blocked", {"reason": excerpt, "kind": None, "gave_up": True}, now=ts)
    return Change(task_id, "fail", row.status, target, run_id)


def set_priority(db: Database, task_id: str, priority: int, *, now: float | None = None) -> int:
    """Change a task's priority (not its status); returns the old one."""
    ts = epoch(now)
    with db.write() as conn:
        row = steps.task_row(conn, task_id)
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(priority=int(priority)))
        steps.event(conn, task_id, "reprioritized", {"priority": int(priority), "was": row.priority}, now=ts)
    return row.priority or 0


def promote_ready(db: Database, *, now: float | None = None) -> list[str]:
    """Promote every ``todo`` task whose parents are all finished. Returns the ids.

    Completing or archiving a task promotes its children at once; this sweep is
    the safety net for boards that another tool (Hermes) also writes."""
    ts = epoch(now)
    with db.write() as conn:
        return _promote_where(conn, tasks.c.status == Status.TODO, now=ts)


# -- the pieces every transition uses ----------------------------------------------


def _check_allowed(row, action: str) -> None:
    allowed = TRANSITIONS[action]
    if row.status not in allowed:
        raise TransitionRefused(
            row.id, action, row.status,
            f"{action} applies to {', '.join(sorted(allowed))} tasks",
        )


_PROMOTABLE_CHILDREN = select(tasks.c.id).where(
    tasks.c.status == Status.TODO,
    tasks.c.id.in_(select(task_links.c.child_id).where(task_links.c.parent_id == bindparam("b_parent"))),
    ~steps.HAS_UNFINISHED_PARENT)
_PROMOTE = update(tasks).where(tasks.c.id == bindparam("b_id"), tasks.c.status == Status.TODO)


def _promote_children(conn: Connection, task_id: str, *, now: int) -> list[str]:
    candidates = list(conn.execute(_PROMOTABLE_CHILDREN, {"b_parent": task_id}).scalars())
    return _promote(conn, candidates, now=now)


def _promote_where(conn: Connection, condition, *, now: int) -> list[str]:
    """Move matching ``todo`` tasks with no unfinished parent to ``ready``."""
    candidates = list(conn.execute(select(tasks.c.id).where(condition, ~steps.HAS_UNFINISHED_PARENT)).scalars())
    return _promote(conn, candidates, now=now)


def _promote(conn: Connection, candidates: list[str], *, now: int) -> list[str]:
    promoted = []
    for child in candidates:
        won = conn.execute(_PROMOTE, {"b_id": child, "status": str(Status.READY)}).rowcount
        if won == 1:
            steps.event(conn, child, "promoted", None, now=now)
            promoted.append(child)
    return promoted


def _begin(conn: Connection, task_id: str, action: str, run_id: int | None = None):
    """The start of every transition: the row, the fencing check, the table check."""
    row = steps.task_row(conn, task_id)
    steps.check_run(row, run_id)
    _check_allowed(row, action)
    return row

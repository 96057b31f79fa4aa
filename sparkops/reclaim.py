"""The reclaimer: close runs whose worker is gone, silent or over its time.

For every open run (``task_runs.ended_at IS NULL``) :func:`assess` gives a
:class:`Verdict`:

* **this host, with a recorded identity** (see :mod:`sparkops.procs`): alive
  while the shim or the agent is the very process that was recorded (a reused
  pid does not count, and is never signalled); dead otherwise, or when the host
  has rebooted since. A live run past its max runtime (plus a margin that lets
  the shim stop it first) is terminated and booked ``timed_out``.
* **this host, no identity yet**: a SparkOps claim whose shim never recorded
  itself within ``reclaim.spawn_grace_seconds`` is ``spawn_failed`` (the
  dispatcher died mid-dispatch, or the shim could not start). A Hermes worker
  (``worker_pid`` set) is dead when that pid is gone; a bare claim (``hermes
  kanban claim`` from a shell) is released when its ``claim_expires`` passes.
* **another host**: dead when its last heartbeat is older than
  ``reclaim.heartbeat_timeout_seconds``; nothing is signalled there.

A dead worker's run is booked through :func:`sparkops.board.fail` (the attempt
counts; the breaker may block the task), a released bare claim through
:func:`sparkops.board.reclaim`. Both are fenced by the run id, so a verdict
reached on stale information changes nothing. A claim whose worker lives is
never released.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import psutil
from sqlalchemy import select

from sparkops import board, procs
from sparkops.board import Outcome
from sparkops.clock import epoch
from sparkops.errors import Refused
from sparkops.jobs import JobContext, JobReport
from sparkops.procs import RunIdentity
from sparkops.schema import task_runs, tasks

log = logging.getLogger(__name__)

#: Extra time past the max runtime before the reclaimer steps in, so the shim,
#: which enforces the limit itself, gets to book it first.
TIMEOUT_MARGIN_SECONDS = 30


@dataclass(frozen=True)
class Verdict:
    task_id: str
    run_id: int
    action: str  # "fail" | "release" | "terminate" | "close_orphan"
    outcome: str
    reason: str
    local: bool = False  # a dead run of this host, found by process identity
    remote: bool = False  # a run of another host, silent past the heartbeat timeout

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(ctx: JobContext, *, now: float | None = None, dry_run: bool = False) -> JobReport:
    """The ``reclaim`` job: assess every open run and act on the verdicts."""
    verdicts = [v for v in (assess(ctx, r, now=now) for r in open_runs(ctx)) if v is not None]
    if dry_run:
        return JobReport(f"would reclaim {len(verdicts)} run(s)" if verdicts else "nothing to reclaim",
                         acted=False, details={"verdicts": [v.as_dict() for v in verdicts]})
    done = [v for v in verdicts if not v.remote and act(ctx, v, now=now)]
    remote = [v for v in verdicts if v.remote]
    if remote:
        # Other hosts' silent runs: one reclaimer at a time across the fleet.
        with ctx.store.board.fleet_lock("reclaim-remote") as held:
            if held:
                done += [v for v in remote if act(ctx, v, now=now)]
            else:
                log.info("%d silent run(s) of other hosts left to the reclaimer that holds the fleet lock",
                         len(remote))
    if not done:
        return JobReport("nothing to reclaim", acted=False)
    return JobReport("; ".join(f"{v.task_id} run {v.run_id}: {v.outcome} ({v.reason})" for v in done),
                     details={"verdicts": [v.as_dict() for v in done]})


def reclaim_local_dead(ctx: JobContext, *, now: float | None = None,
                       rows: list[Any] | None = None) -> list[Verdict]:
    """The dispatcher's quick pass: close this host's runs whose processes are all
    gone (nothing to signal, so it is cheap and safe to do every tick). ``rows``:
    this host's open runs, when the caller has already read them."""
    closed = []
    for row in open_runs(ctx, host=ctx.host) if rows is None else rows:
        verdict = assess(ctx, row, now=now)
        if verdict is not None and verdict.local and verdict.action == "fail" and act(ctx, verdict, now=now):
            closed.append(verdict)
    return closed


# Built once: the dispatcher asks for this host's open runs every second.
_OPEN_RUNS = (select(task_runs.c.id, task_runs.c.task_id, task_runs.c.claim_lock, task_runs.c.claim_expires,
                     task_runs.c.worker_pid, task_runs.c.started_at, task_runs.c.last_heartbeat_at,
                     task_runs.c.metadata, tasks.c.status, tasks.c.current_run_id,
                     tasks.c.max_runtime_seconds)
              .select_from(task_runs.join(tasks, tasks.c.id == task_runs.c.task_id))
              .where(task_runs.c.ended_at.is_(None))
              .order_by(task_runs.c.id))
_OPEN_RUNS_ON_HOST = _OPEN_RUNS.where(board.claim_lock_of_host())


def open_runs(ctx: JobContext, host: str | None = None) -> list[Any]:
    """Open runs with their task's status, current run and max runtime (of one host's
    claims when ``host`` is given)."""
    with ctx.store.board.read() as conn:
        if host is None:
            return conn.execute(_OPEN_RUNS).all()
        return conn.execute(_OPEN_RUNS_ON_HOST, {"host_pattern": board.host_lock_pattern(host)}).all()


def assess(ctx: JobContext, row: Any, *, now: float | None = None) -> Verdict | None:
    """What to do with one open run, or None to leave it alone."""
    ts = epoch(now)
    settings = ctx.settings
    if row.current_run_id != row.id:
        # an open run row the task no longer points at (a leak from an older tool)
        return Verdict(row.task_id, row.id, "close_orphan", Outcome.RECLAIMED,
                       "run row left open while the task moved on")
    metadata = _metadata(row.metadata)
    identity = RunIdentity.from_metadata(metadata)
    lock_host = board.host_of_lock(row.claim_lock)
    run_host = identity.host if identity else lock_host
    max_runtime = int(row.max_runtime_seconds or settings["reclaim.max_runtime_seconds"])
    age = ts - int(row.started_at)

    if run_host != ctx.host:
        beat = int(row.last_heartbeat_at or row.started_at)
        silent = ts - beat
        if silent > settings["reclaim.heartbeat_timeout_seconds"]:
            return Verdict(row.task_id, row.id, "fail", Outcome.CRASHED,
                           f"no heartbeat from host {run_host or '?'} for {silent}s", remote=True)
        return None

    if identity is not None:
        if identity.boot_id and identity.boot_id != procs.boot_id():
            return Verdict(row.task_id, row.id, "fail", Outcome.CRASHED,
                           "the host rebooted during the run", local=True)
        shim_alive = procs.is_alive(identity.shim)
        agent_alive = procs.is_alive(identity.agent)
        if not shim_alive and not agent_alive:
            if identity.agent is not None and procs.group_alive(identity.agent):
                return Verdict(row.task_id, row.id, "terminate", Outcome.CRASHED,
                               f"shim and agent (pid {identity.agent.pid}) are gone; "
                               "their leftover processes are stopped")
            return Verdict(row.task_id, row.id, "fail", Outcome.CRASHED, _gone(identity), local=True)
        if age > max_runtime + TIMEOUT_MARGIN_SECONDS:
            return Verdict(row.task_id, row.id, "terminate", Outcome.TIMED_OUT,
                           f"ran {age}s, past its max runtime of {max_runtime}s")
        return None

    # No identity recorded.
    if (metadata or {}).get("claimed_by") == "sparkops":
        if age > settings["reclaim.spawn_grace_seconds"]:
            return Verdict(row.task_id, row.id, "fail", Outcome.SPAWN_FAILED,
                           f"no worker recorded itself {age}s after the claim "
                           f"(dispatcher {row.claim_lock} died mid-dispatch, or the shim could not start)",
                           local=True)
        return None
    if row.worker_pid:
        if not _pid_running(int(row.worker_pid)):
            return Verdict(row.task_id, row.id, "fail", Outcome.CRASHED,
                           f"worker pid {row.worker_pid} is gone", local=True)
        if age > max_runtime + TIMEOUT_MARGIN_SECONDS:
            return Verdict(row.task_id, row.id, "fail", Outcome.TIMED_OUT,
                           f"ran {age}s, past its max runtime of {max_runtime}s; pid {row.worker_pid} "
                           "has no recorded start time, so it is not signalled")
        return None
    if row.claim_expires is not None and ts > int(row.claim_expires):
        return Verdict(row.task_id, row.id, "release", Outcome.RECLAIMED,
                       f"claim {row.claim_lock} expired {ts - int(row.claim_expires)}s ago with no worker")
    return None


def act(ctx: JobContext, verdict: Verdict, *, now: float | None = None) -> bool:
    """Carry out a verdict; False when the run had already changed (nothing done)."""
    db = ctx.store.board
    what = ""
    if verdict.action == "terminate":
        what = _terminate(ctx, verdict)
    reason = verdict.reason + (f"; {what}" if what else "")
    if verdict.action == "close_orphan":
        if not board.close_orphan_run(db, verdict.run_id, reason=reason, now=now):
            return False
        log.warning("closed orphan run %d of %s: %s", verdict.run_id, verdict.task_id, reason)
        return True
    try:
        if verdict.action == "release":
            board.reclaim(db, verdict.task_id, run_id=verdict.run_id, reason=reason, now=now)
        else:
            board.fail(db, verdict.task_id, run_id=verdict.run_id, outcome=Outcome(verdict.outcome),
                       error=reason, failure_limit=ctx.settings["dispatch.failure_limit"],
                       protocol_violation_limit=ctx.settings["dispatch.protocol_violation_limit"], now=now)
    except Refused as err:
        log.info("run %d of %s changed before the reclaim: %s", verdict.run_id, verdict.task_id, err)
        return False
    log.warning("reclaimed %s run %d: %s (%s)", verdict.task_id, verdict.run_id, verdict.outcome, reason)
    return True


def _terminate(ctx: JobContext, verdict: Verdict) -> str:
    """Stop the run's processes: the shim first (so it cannot book the agent's
    death as a crash), then the agent's process group."""
    with ctx.store.board.read() as conn:
        metadata = conn.execute(select(task_runs.c.metadata).where(task_runs.c.id == verdict.run_id)).scalar()
    identity = RunIdentity.from_metadata(_metadata(metadata))
    if identity is None:
        return ""
    grace = ctx.settings["reclaim.term_grace_seconds"]
    parts = []
    if procs.is_alive(identity.shim):
        parts.append("shim: " + procs.terminate_group(identity.shim, grace=grace))
    if identity.agent is not None:
        parts.append("agent: " + procs.terminate_group(identity.agent, grace=grace))
    return "; ".join(parts)


def _gone(identity: RunIdentity) -> str:
    parts = []
    if identity.shim:
        parts.append(f"shim pid {identity.shim.pid}")
    if identity.agent:
        parts.append(f"agent pid {identity.agent.pid}")
    return (" and ".join(parts) or "its worker") + " no longer running"


def _metadata(raw: Any) -> dict[str, Any] | None:
    if isinstance(raw, dict):
        return raw
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _pid_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

"""The reclaimer: close runs whose worker is gone, silent or over its time.

For every open run (``task_runs.ended_at IS NULL``) :func:`assess` gives a
:class:`Verdict`:

* **this host, with a recorded identity** (see :mod:`sparkops.core.procs`): alive
  while the shim or the agent is the very process that was recorded (a reused
  pid does not count, and is never signalled); dead otherwise, or when the host
  has rebooted since. A live run past its max runtime (plus a margin that lets
  the shim stop it first) is terminated and booked ``timed_out``.
* **this host, no identity yet**: a SparkOps claim whose shim never recorded
  itself within ``reclaim.spawn_grace_seconds`` is ``spawn_failed`` (the
  dispatcher died mid-dispatch, or the shim could not start). A Hermes worker
  (``worker_pid`` set) is dead when that pid is gone; a bare claim (``hermes
  kanban claim`` from a shell) is released when its ``claim_expires`` passes.
  "This host" is ``host.name`` or the machine's hostname (Hermes' claim locks).
* **another host**: dead when its last heartbeat is older than
  ``reclaim.heartbeat_timeout_seconds``; nothing is signalled there.
* **a running task with no run row** (its claim only on the tasks row, as older
  Hermes boards and hand-edited fixes have it) first gets a run, as Hermes gives
  it (:func:`sparkops.board.runs.backfill_runs`), and is then judged as above.

A dead worker's run is booked through :func:`sparkops.board.transitions.fail` (the attempt
counts; the breaker may block the task), a released bare claim through
:func:`sparkops.board.transitions.reclaim`. Both are fenced by the run id, so a verdict
reached on stale information changes nothing. A claim whose worker lives is
never released.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict, dataclass
from typing import Any

import psutil
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from sparkops.board import model, runs, steps
from sparkops.board import transitions as board
from sparkops.board.model import Outcome
from sparkops.core import json_text, procs
from sparkops.core.clock import epoch
from sparkops.core.errors import NotFound, Refused, SparkOpsError
from sparkops.core.procs import RunIdentity
from sparkops.engine import workers
from sparkops.jobs.framework import JobContext, JobReport
from sparkops.meters import ledger
from sparkops.storage.schema import task_runs, tasks

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
    """The ``reclaim`` job: assess every open run and act on the verdicts. A running
    task with no run row (a claim only on the tasks row) first gets one, as Hermes
    gives it (not in a dry run, which changes nothing)."""
    if not dry_run:
        for task_id, run_id in runs.backfill_runs(ctx.store.board, now=now):
            log.info("%s was running with no run row; opened run %d for its claim", task_id, run_id)
    own = registry(ctx)
    verdicts = [v for v in (assess(ctx, r, now=now, own_workers=own) for r in open_runs(ctx)) if v is not None]
    if dry_run:
        return JobReport(f"would reclaim {len(verdicts)} run{'' if len(verdicts) == 1 else 's'}"
                         if verdicts else "nothing to reclaim",
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
    own = registry(ctx)
    for row in open_runs(ctx, host=ctx.host) if rows is None else rows:
        verdict = assess(ctx, row, now=now, own_workers=own)
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
_OPEN_RUNS_ON_HOST = _OPEN_RUNS.where(steps.claim_lock_of_host())


def open_runs(ctx: JobContext, host: str | None = None) -> list[Any]:
    """Open runs with their task's status, current run and max runtime (of one host's
    claims when ``host`` is given)."""
    with ctx.store.board.read() as conn:
        if host is None:
            return conn.execute(_OPEN_RUNS).all()
        return conn.execute(_OPEN_RUNS_ON_HOST, {"host_pattern": model.host_lock_pattern(host)}).all()


def assess(ctx: JobContext, row: Any, *, now: float | None = None,
           own_workers: dict[int, workers.Worker] | None = None) -> Verdict | None:
    """What to do with one open run, or None to leave it alone. ``own_workers``:
    :func:`registry`, when the caller has read it for several runs."""
    ts = epoch(now)
    settings = ctx.settings
    if row.current_run_id != row.id:
        # an open run row the task no longer points at (a leak from an older tool)
        return Verdict(row.task_id, row.id, "close_orphan", Outcome.RECLAIMED,
                       "run row left open while the task moved on")
    metadata = json_text.object_of(row.metadata)
    identity = RunIdentity.from_metadata(metadata)
    lock_host = model.host_of_lock(row.claim_lock)
    run_host = identity.host if identity else lock_host
    max_runtime = int(row.max_runtime_seconds or settings["reclaim.max_runtime_seconds"])
    age = ts - int(row.started_at if row.started_at is not None else ts)  # an unreadable start: no age

    own = (registry(ctx) if own_workers is None else own_workers).get(row.id)
    if (own is not None and own.task_id == row.task_id and own.identity.host == ctx.host
            and (own.shim_alive or procs.is_alive(own.identity.agent))):
        # this host's own record says its shim or agent lives, whatever the row says
        # (rows are data: another writer's metadata never gets a live run closed)
        if age > max_runtime + TIMEOUT_MARGIN_SECONDS:
            return Verdict(row.task_id, row.id, "terminate", Outcome.TIMED_OUT,
                           f"ran {age}s, past its max runtime of {max_runtime}s")
        return None
    if not is_local_host(ctx, run_host):
        beat = int(row.last_heartbeat_at or row.started_at or ts)
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
    pid = procs.pid_of(row.worker_pid)
    if pid is not None:
        if not _pid_running(pid):
            return Verdict(row.task_id, row.id, "fail", Outcome.CRASHED,
                           f"worker pid {pid} is gone", local=True)
        if age > max_runtime + TIMEOUT_MARGIN_SECONDS:
            return Verdict(row.task_id, row.id, "fail", Outcome.TIMED_OUT,
                           f"ran {age}s, past its max runtime of {max_runtime}s; pid {pid} "
                           "has no recorded start time, so it is not signalled")
        return None
    if row.claim_expires is not None and ts > int(row.claim_expires):
        return Verdict(row.task_id, row.id, "release", Outcome.RECLAIMED,
                       f"claim {row.claim_lock} expired {ts - int(row.claim_expires)}s ago with no worker")
    return None


def registry(ctx: JobContext) -> dict[int, workers.Worker]:
    """This host's worker registry by run id, read once per pass."""
    return {w.run_id: w for w in workers.scan(workers.directory(ctx.settings))}


def act(ctx: JobContext, verdict: Verdict, *, now: float | None = None) -> bool:
    """Carry out a verdict; False when the run had already changed (nothing done)."""
    db = ctx.store.board
    what = ""
    if verdict.action == "terminate":
        what = _terminate(ctx, verdict)
    reason = verdict.reason + (f"; {what}" if what else "")
    if verdict.action == "close_orphan":
        if not runs.close_orphan_run(db, verdict.run_id, reason=reason, now=now):
            return False
        log.warning("closed orphan run %d of %s: %s", verdict.run_id, verdict.task_id, reason)
        return True
    try:
        if verdict.action == "release":
            board.reclaim(db, verdict.task_id, run_id=verdict.run_id, reason=reason, now=now)
        else:
            board.fail(db, verdict.task_id, run_id=verdict.run_id, outcome=Outcome(verdict.outcome),
                       error=reason, **model.FailureLimits.from_settings(ctx.settings).as_kwargs(), now=now)
    except Refused as err:
        log.info("run %d of %s changed before the reclaim: %s", verdict.run_id, verdict.task_id, err)
        return False
    log.warning("reclaimed %s run %d: %s (%s)", verdict.task_id, verdict.run_id, verdict.outcome, reason)
    end_usage(ctx, verdict.run_id)
    return True


def end_usage(ctx: JobContext, run_id: int) -> None:
    """A run whose worker died: its usage stays where its last sample left it, and
    it no longer shares the host's later samples (:func:`sparkops.meters.ledger.close`)."""
    try:
        ledger.close(ctx.store.ops, run_id)
    except (DBAPIError, SparkOpsError) as exc:
        log.warning("closing run %d's usage failed: %s", run_id, exc)


def reclaim_task(ctx: JobContext, task_id: str, *, actor: str, reason: str | None = None,
                 now: float | None = None) -> tuple[model.Change, list[str]]:
    """An operator's reclaim (``sparkops task reclaim``, the app's button): stop the
    running task's worker on this host first, then release its claim; the task goes
    back to ready without counting a failure. Returns the change and what was
    stopped. Refused, with nothing changed, when the worker runs on another host,
    when a pid from the row cannot be shown to be the task's worker, or when the
    worker does not die."""
    db = ctx.store.board
    runs.backfill_runs(db, now=now)  # a claim on the tasks row only becomes a run
    with db.read() as conn:
        row = conn.execute(
            select(tasks.c.status, tasks.c.current_run_id, task_runs.c.claim_lock, task_runs.c.worker_pid,
                   task_runs.c.metadata, task_runs.c.started_at)
            .select_from(tasks.outerjoin(task_runs, task_runs.c.id == tasks.c.current_run_id))
            .where(tasks.c.id == task_id)).first()
    if row is None:
        raise NotFound("task", task_id)
    if row.status != model.Status.RUNNING or row.current_run_id is None:
        raise Refused(f"{task_id} is {row.status!r}, not running: nothing to reclaim")
    run_id = int(row.current_run_id)
    stopped = _stop_worker(ctx, task_id, run_id, row)
    why = f"reclaimed by {actor}" + (f": {reason}" if reason else "") + (f"; {'; '.join(stopped)}" if stopped else "")
    change = board.reclaim(db, task_id, run_id=run_id, reason=why, now=now)
    log.warning("%s reclaimed %s run %d%s", actor, task_id, run_id, f" ({'; '.join(stopped)})" if stopped else "")
    return change, stopped


def _stop_worker(ctx: JobContext, task_id: str, run_id: int, row: Any) -> list[str]:
    """Terminate the run's processes on this host, or refuse (see reclaim_task)."""
    grace = ctx.settings["reclaim.term_grace_seconds"]
    identity = RunIdentity.from_metadata(json_text.object_of(row.metadata))
    if identity is not None:
        if identity.host != ctx.host:
            raise Refused(f"run {run_id} of {task_id} runs on host {identity.host}; reclaim it there "
                          "(or wait for its heartbeat to time out)")
        own = own_record(ctx, task_id, run_id)
        if own is None:
            return [NOT_OURS.format(run_id=run_id)]
        # The agent only: its shim, if it lives, sees the agent killed, waits for the
        # run to be closed (below) and books nothing; a shim killed here would have
        # its death booked as a crash by the runner before the release.
        agent = own.agent
        if agent is None or not (procs.is_alive(agent) or procs.group_alive(agent)):
            return []
        what = procs.terminate_group(agent, grace=grace)
        if procs.is_alive(agent):
            raise Refused(f"the agent of {task_id} (pid {agent.pid}) is still alive; not releasing its claim")
        return [f"agent: {what}"]
    pid = procs.pid_of(row.worker_pid)
    if pid is None or not _pid_running(pid):
        return []
    lock_host = model.host_of_lock(row.claim_lock)
    if not is_local_host(ctx, lock_host):
        raise Refused(f"run {run_id} of {task_id} has worker pid {pid} on host {lock_host or '?'}; "
                      "reclaim it there")
    worker = procs.worker_of(pid, task_id, not_before=int(row.started_at or 0))
    if worker is None:
        raise Refused(f"pid {pid} (the worker_pid of {task_id}) is not the task's worker (its environment "
                      "does not name the task, or it started before the run, or it does not lead its own "
                      "process group); it was not signalled and the claim is kept")
    what = procs.terminate_group(worker, grace=grace)
    if procs.is_alive(worker):
        raise Refused(f"the worker of {task_id} (pid {pid}) is still alive; not releasing its claim")
    return [f"worker: {what}"]


def is_local_host(ctx: JobContext, lock_host: str) -> bool:
    """A claim of this host: its SparkOps name, or the machine's hostname (Hermes
    claims as hostname:pid whatever host.name says)."""
    return lock_host in (ctx.host, socket.gethostname())


#: Why a run's processes were not signalled: the row is data, this host's own
#: record of the worker (:mod:`sparkops.engine.workers`) is the only proof.
NOT_OURS = ("not signalled: this host has no record of starting run {run_id} (the process identity in "
            "the row is data, not proof)")


def own_record(ctx: JobContext, task_id: str, run_id: int) -> RunIdentity | None:
    """The identity this host's shim recorded when it started ``run_id`` of
    ``task_id`` (its entry in the worker registry), or None."""
    for worker in workers.scan(workers.directory(ctx.settings)):
        if worker.run_id == run_id and worker.task_id == task_id and worker.identity.host == ctx.host:
            return worker.identity
    return None


def _terminate(ctx: JobContext, verdict: Verdict) -> str:
    """Stop the run's processes: the shim first (so it cannot book the agent's
    death as a crash), then the agent's process group; only as this host's own
    record of them has them, never as the row says."""
    identity = own_record(ctx, verdict.task_id, verdict.run_id)
    if identity is None:
        return NOT_OURS.format(run_id=verdict.run_id)
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


def _pid_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

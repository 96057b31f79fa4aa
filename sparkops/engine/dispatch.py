"""The dispatcher: fill free slots with ready work, about once a second.

One step (:func:`run`, the ``dispatch`` job):

1. reap worker shims this process started that have exited (a shim that died
   before closing its run has the run closed here, with its log's last lines);
2. close local runs whose processes are all gone (:func:`sparkops.engine.reclaim.reclaim_local_dead`),
   so a crashed agent frees its slot at the next tick, not at the next cron;
3. read this host's live workers (:mod:`sparkops.engine.workers`): each takes a slot,
   open run or not, and its task is not started again while it lives; an agent
   whose shim died and whose run someone else closed is stopped here;
4. while this host has fewer live runs than ``dispatch.max_in_progress``, claim
   the best eligible ready task (:func:`sparkops.board.transitions.claim_next`: priority,
   age, dependencies, retry backoff) and give it to a worker shim in its own
   session, with its output appended to the run's log: forked by the warm
   forkserver the runner keeps (:mod:`sparkops.engine.forkserver`, so neither an
   interpreter's start-up nor its imports sit between a free slot and the next
   agent), else a new ``python -m sparkops.engine.shim TASK RUN``.

In the runner, a tick that finds nothing to do remembers the board's files; the
next ticks only ``stat`` them until something changes (see :class:`ShimTracker`).

``dispatch.mode = "hermes"`` runs ``hermes kanban dispatch --max N --json``
instead, for boards that Hermes workers serve.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, func, select

from sparkops.board import model, requirements, runs
from sparkops.board import transitions as board
from sparkops.board.model import Change, Outcome, RetryPolicy
from sparkops.config import Settings
from sparkops.core import json_text, procs
from sparkops.core.clock import epoch
from sparkops.core.errors import ConfigError, Refused
from sparkops.core.procs import RunIdentity
from sparkops.engine import reclaim, workers
from sparkops.engine.environment import shim_env, shim_environment
from sparkops.engine.forkserver import ForkedShim, Forkserver
from sparkops.engine.runlog import log_tail, run_log_path
from sparkops.jobs.framework import JobContext, JobReport
from sparkops.storage.schema import task_runs, tasks

log = logging.getLogger(__name__)

HERMES_TIMEOUT_SECONDS = 300
#: A worker shim as the dispatcher tracks it: forked by the forkserver, or started plainly.
ShimProcess = ForkedShim | subprocess.Popen


@dataclass(frozen=True)
class ShimExit:
    task_id: str
    run_id: int
    returncode: int
    log_path: Path


class ShimTracker:
    """The dispatcher's memory in the runner: the worker shims it started and has
    not yet reaped (so dead shims never linger as zombies and their exit is seen at
    once), and what the board looked like at the last tick that found nothing to do.

    An idle runner then costs a ``stat`` a second: while no run of this host is open
    and the board's files are unchanged (:meth:`sparkops.storage.db.Database.change_token`),
    there is nothing new to claim, except a task whose retry backoff runs out: the
    next full look is due then (and at least every :data:`FULL_LOOK_SECONDS`)."""

    FULL_LOOK_SECONDS = 60.0

    def __init__(self) -> None:
        self._running: dict[int, tuple[ShimProcess, str, int, Path]] = {}
        self._idle_token: object = None
        self._full_look_by = 0.0
        self._standby: Forkserver | None = None
        self._standby_retry_at = 0.0

    # -- the standby: a warm forkserver, imported and waiting on its stdin ---------

    STANDBY_RETRY_SECONDS = 60.0

    def keep_standby(self, settings: Settings) -> None:
        """Have the warm forkserver running (:mod:`sparkops.engine.forkserver`), so a
        run's shim costs a ``fork``, not an interpreter's start-up and imports (about
        half a CPU second). One that died is not replaced for a minute (a broken
        install must not spin); runs get plain shims meanwhile."""
        standby = self._standby
        if standby is not None:
            if standby.alive():
                return
            log.warning("the worker shims' forkserver exited (%s)", procs.exit_description(standby.proc.returncode))
            self._standby = None
            self._standby_retry_at = time.monotonic() + self.STANDBY_RETRY_SECONDS
        if time.monotonic() < self._standby_retry_at:
            return
        try:
            self._standby = Forkserver.start(cwd=settings.base_dir, env=shim_env(settings))
        except OSError as exc:
            log.warning("cannot start the worker shims' forkserver: %s", exc)
            self._standby_retry_at = time.monotonic() + self.STANDBY_RETRY_SECONDS

    def hand_to_standby(self, task_id: str, run_id: int, log_path: Path) -> ForkedShim | None:
        """Have the forkserver fork the run's shim; None if there is none alive, or it
        did not (it is then stopped: the next tick starts another)."""
        standby = self._standby
        if standby is None or not standby.alive():
            return None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        forked = standby.hand(handover_record(task_id, run_id, log_path), run_id)
        if forked is None:
            log.warning("the worker shims' forkserver did not fork the shim of run %d; stopping it", run_id)
            self._standby = None
            standby.proc.kill()
            standby.stop()
        return forked

    def stop_standby(self) -> None:
        """End the forkserver (closing its stdin is its signal to exit); the shims it
        forked run on."""
        standby, self._standby = self._standby, None
        if standby is not None:
            standby.stop()

    def quiet(self, token: object, now: float) -> bool:
        """True when the last tick was idle and nothing has changed since."""
        return (token is not None and token == self._idle_token and not self._running
                and now < self._full_look_by)

    def note_idle(self, token: object, now: float, look_again_at: float | None = None) -> None:
        """After a full tick: ``token`` if it found nothing to do, else None."""
        self._idle_token = token
        self._full_look_by = min(now + self.FULL_LOOK_SECONDS,
                                 look_again_at if look_again_at is not None else float("inf"))

    def add(self, proc: ShimProcess, task_id: str, run_id: int, log_path: Path) -> None:
        self._running[proc.pid] = (proc, task_id, run_id, log_path)

    def reap(self) -> list[ShimExit]:
        exited = []
        for pid, (proc, task_id, run_id, log_path) in list(self._running.items()):
            code = proc.poll()
            if code is not None:
                del self._running[pid]
                exited.append(ShimExit(task_id, run_id, code, log_path))
        return exited

    def __len__(self) -> int:
        return len(self._running)


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        backoff_seconds=settings["dispatch.retry_backoff_seconds"],
        backoff_max_seconds=settings["dispatch.retry_backoff_max_seconds"],
        rate_limit_cooldown_seconds=settings["dispatch.rate_limit_cooldown_seconds"],
    )


def run(ctx: JobContext, *, now: float | None = None) -> JobReport:
    """The ``dispatch`` job (see the module docstring)."""
    mode = ctx.settings["dispatch.mode"]
    if mode == "off":
        return JobReport("dispatch is off (dispatch.mode = off)", acted=False)
    if mode == "hermes":
        return dispatch_hermes(ctx, now=now)
    return dispatch_native(ctx, now=now)


def dispatch_native(ctx: JobContext, *, now: float | None = None) -> JobReport:
    tracker = ctx.shims
    if tracker is not None and tracker.quiet(ctx.store.board.change_token(), epoch(now)):
        return JobReport("nothing changed since the last look", acted=False)
    notes: list[str] = []
    for shim in tracker.reap() if tracker is not None else []:
        if close_after_shim_death(ctx, shim, now=now):
            notes.append(f"shim of {shim.task_id} died ({shim.returncode})")
    local = reclaim.open_runs(ctx, host=ctx.host)
    recovered = reclaim.reclaim_local_dead(ctx, now=now, rows=local)
    notes += [f"reclaimed {v.task_id}: {v.reason}" for v in recovered]
    # Capacity counts live agents: a run closed by someone else keeps its slot (and
    # its task waits) until its shim has stopped the agent.
    registry = workers.directory(ctx.settings)
    live = workers.live(registry)
    still_open = {r.id for r in local if r.current_run_id == r.id} - {v.run_id for v in recovered}
    for stray in workers.strays(live, still_open):
        what = workers.stop(registry, stray, grace=ctx.settings["reclaim.term_grace_seconds"])
        notes.append(f"stopped the agent of {stray.task_id} (run {stray.run_id}, closed while its shim "
                     f"was gone): {what}")
    live = [w for w in live if w.alive]

    started: list[Change] = []
    deferred: list[float] = []  # when tasks waiting out a retry backoff become eligible
    if not ctx.settings["dispatch.agent_argv"]:
        if not notes:
            return JobReport("no agent configured (dispatch.agent_argv is empty); ready tasks wait",
                             acted=False)
    else:
        policy = retry_policy(ctx.settings)
        lock = model.claim_lock(ctx.host, os.getpid())
        excluded = requirements.excluded_for(ctx.store.ops, ctx.settings["host.labels"]) | {w.task_id for w in live}
        unsafe: list[str] = []
        capacity = ctx.settings["dispatch.max_in_progress"]
        # What this tick has read already: a host it shows full does not open a
        # write transaction at all (claim_next counts again, in the transaction).
        held = len({r.id for r in local} - {v.run_id for v in recovered} | {w.run_id for w in live})
        while held < capacity:
            deferred.clear()
            change = board.claim_next(
                ctx.store.board, host=ctx.host, lock=lock, capacity=capacity, policy=policy,
                workspace_root=str(ctx.settings["dispatch.workspace_root"]), now=now,
                deferred=deferred, excluded=excluded, busy_runs={w.run_id for w in live},
                ttl_seconds=ctx.settings["dispatch.claim_ttl_seconds"], unsafe=unsafe)
            if change is None:
                break
            started.append(change)
            if start_shim(ctx, change, now=now) is not None:  # else booked spawn_failed: no slot taken
                held += 1
        notes += block_unsafe_ids(ctx, set(unsafe), now=now)
        if tracker is not None:
            tracker.keep_standby(ctx.settings)
    notes += [f"started {c.task_id} (run {c.run_id})" for c in started]
    if tracker is not None:
        # Nothing running here and nothing started: until the board changes, the
        # next ticks only look at the board's files (see ShimTracker.quiet).
        idle = not started and len(local) == len(recovered) and not len(tracker) and not live
        tracker.note_idle(ctx.store.board.change_token() if idle else None, epoch(now),
                          look_again_at=min(deferred, default=None))
    if not notes:
        return JobReport("no free slot or no eligible ready task", acted=False)
    return JobReport("; ".join(notes), details={"started": [c.task_id for c in started],
                                                "reclaimed": [v.task_id for v in recovered]})


def handover_record(task_id: str, run_id: int, log_path: Path) -> bytes:
    """The dispatcher's hand-over to the forkserver: one JSON object on a line
    (an id is data: it is never spliced into a line another program splits)."""
    return (json.dumps({"task_id": task_id, "run_id": int(run_id), "log": str(log_path)}) + "\n").encode()


def block_unsafe_ids(ctx: JobContext, ids: set[str], *, now: float | None = None) -> list[str]:
    """Block the ready tasks whose ids are not plain (another tool wrote them): they
    never become a path, an argv element or a hand-over record; the tick goes on."""
    notes = []
    for task_id in sorted(ids):
        try:
            board.block(ctx.store.board, task_id, reason=model.unsafe_id_reason(task_id), now=now)
        except Refused:
            continue
        log.warning("blocked task %r: its id is not a plain id", task_id)
        notes.append(f"blocked {task_id!r}: not a plain id")
    return notes


def shim_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sparkops.engine.shim", *args]


def start_shim(ctx: JobContext, change: Change, *, now: float | None = None) -> ShimProcess | None:
    """Have the warm forkserver fork the run's shim when there is one, else start
    ``python -m sparkops.engine.shim TASK RUN`` in its own session. A shim that cannot be
    started books the run as ``spawn_failed``."""
    log_path = run_log_path(ctx.settings, change.task_id, change.run_id)
    tracker = ctx.shims
    proc = tracker.hand_to_standby(change.task_id, change.run_id, log_path) if tracker is not None else None
    if proc is None:
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(shim_argv(change.task_id, str(change.run_id)),
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        cwd=ctx.settings.base_dir, env=shim_env(ctx.settings),
                                        start_new_session=True, close_fds=True)
        except OSError as exc:
            _fail_quietly(ctx, change.task_id, change.run_id, Outcome.SPAWN_FAILED,
                          f"cannot start the worker shim: {exc}", now=now)
            return None
    if tracker is not None:
        tracker.add(proc, change.task_id, change.run_id, log_path)
    log.info("dispatched %s (run %d) to shim pid %d; log %s", change.task_id, change.run_id,
             proc.pid, log_path)
    return proc


def close_after_shim_death(ctx: JobContext, shim: ShimExit, *, now: float | None = None) -> bool:
    """A shim exits 0 after it closed its run. Anything else with the run still
    open means the shim died before it could: book a crash with its log's tail.
    While the run's agent still lives, the claim is kept (a claim whose worker is
    alive is never released); the reclaimer closes the run once the agent is gone,
    or stops it at its max runtime."""
    if shim.returncode == 0:
        return False
    agent = _live_agent(ctx, shim.run_id)
    if agent is not None:
        log.warning("worker shim of %s (run %d) %s but its agent (pid %d) still runs; the claim "
                    "is kept until the agent ends", shim.task_id, shim.run_id,
                    procs.exit_description(shim.returncode), agent.pid)
        return False
    reclaim.end_usage(ctx, shim.run_id)
    tail = log_tail(shim.log_path)
    reason = f"worker shim {procs.exit_description(shim.returncode)} before closing the run"
    return _fail_quietly(ctx, shim.task_id, shim.run_id, Outcome.CRASHED,
                         reason + (f": {tail}" if tail else ""), now=now)


def _live_agent(ctx: JobContext, run_id: int) -> procs.Proc | None:
    """The run's recorded agent, if it (or a process of its group) still runs."""
    with ctx.store.board.read() as conn:
        raw = conn.execute(select(task_runs.c.metadata).where(task_runs.c.id == run_id)).scalar()
    identity = RunIdentity.from_metadata(json_text.object_of(raw))
    if identity is None or identity.agent is None:
        return None
    if procs.is_alive(identity.agent) or procs.group_alive(identity.agent):
        return identity.agent
    return None


def _fail_quietly(ctx: JobContext, task_id: str, run_id: int, outcome: Outcome, error: str,
                  *, now: float | None = None) -> bool:
    """Book a failure unless the run was already closed (then it changes nothing)."""
    try:
        board.fail(ctx.store.board, task_id, run_id=run_id, outcome=outcome, error=error,
                   **model.FailureLimits.from_settings(ctx.settings).as_kwargs(), now=now)
        log.warning("%s run %d: %s: %s", task_id, run_id, outcome, error)
        return True
    except Refused:
        return False


#: The last line of a Python traceback (``ValueError: bad input``, ``KeyboardInterrupt``).
# -- hermes mode ------------------------------------------------------------------------


def dispatch_hermes(ctx: JobContext, *, now: float | None = None) -> JobReport:
    """Run ``hermes kanban dispatch --max N --json`` against the board.

    Hermes' ``--max`` caps the tasks running on the whole board (every host, every
    assignee): it starts at most N minus those. So N is what runs on the board now,
    less the other hosts' expired claims that Hermes will release first, plus this
    host's free slots (``dispatch.max_in_progress`` less the open runs claimed with
    this machine's hostname, as Hermes claims).

    ``hermes`` starts as a whole Python program (about a second of CPU), so it runs
    only when the board changed since its last run (the files' size and time), or
    every ``dispatch.hermes_interval_seconds`` (so a worker that died without a
    word is noticed, as Hermes' gateway notices it every minute)."""
    db = ctx.store.board
    if not db.is_sqlite:
        raise ConfigError("dispatch.mode = hermes needs a SQLite board (Hermes reads only SQLite)")
    argv_template = ctx.settings["dispatch.hermes_argv"]
    if not argv_template:
        raise ConfigError("dispatch.hermes_argv is empty; it needs the hermes command, e.g. "
                          '["hermes", "kanban", "dispatch", "--max", "{max}", "--json"]')
    last = ctx.last_seen.get("dispatch")
    if last is not None and last[0] == db.change_token() and \
            time.monotonic() < last[1] + ctx.settings["dispatch.hermes_interval_seconds"]:
        return JobReport("nothing changed since the last hermes dispatch", acted=False)
    report = _run_hermes_dispatch(ctx, argv_template, now=now)
    ctx.last_seen["dispatch"] = (db.change_token(), time.monotonic())
    return report




def _run_hermes_dispatch(ctx: JobContext, argv_template: list[str], *, now: float | None) -> JobReport:
    db = ctx.store.board
    hostname = socket.gethostname()  # Hermes claims as hostname:pid, whatever host.name says
    used = runs.count_open_runs(db, hostname)
    free = ctx.settings["dispatch.max_in_progress"] - used
    if free <= 0:
        return JobReport(f"at capacity ({used} running)", acted=False)
    on_board = hermes_running_count(db, hostname, now=now)
    cap = on_board + free
    argv = [part.replace("{max}", str(cap)) for part in argv_template]
    env = shim_environment(ctx.settings)
    env["HERMES_KANBAN_DB"] = str(db.path)
    try:
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=HERMES_TIMEOUT_SECONDS)
    except FileNotFoundError:
        raise ConfigError(f"dispatch.hermes_argv: {argv[0]!r} not found; install hermes-agent "
                          "or set the full path") from None
    except OSError as exc:
        raise ConfigError(f"dispatch.hermes_argv: cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: "
                           f"{(done.stderr or done.stdout).strip()[-400:]}")
    head = f"hermes dispatch --max {cap} ({on_board} running on the board, {free} free here)"
    try:
        result = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    except ValueError:
        return JobReport(f"{head}: {done.stdout.strip()[-200:]}")
    spawned = result.get("spawned") or []
    reclaimed = result.get("reclaimed") or 0
    acted = bool(spawned or reclaimed or result.get("crashed") or result.get("timed_out")
                 or result.get("promoted"))
    summary = f"{head}: spawned {len(spawned)}, reclaimed {reclaimed}"
    unassigned = result.get("skipped_unassigned") or []
    if unassigned:
        summary += (f"; {len(unassigned)} ready task(s) skipped: no assignee (Hermes starts only "
                    "assigned tasks; set one with `hermes kanban assign` or kanban.default_assignee)")
    return JobReport(summary, acted=acted, details=result)


def hermes_running_count(db, hostname: str, *, now: float | None = None) -> int:
    """What ``hermes kanban dispatch`` will count as running once it has released
    the expired claims of other hosts (its first step)."""
    ts = epoch(now)
    expired_elsewhere = and_(tasks.c.claim_expires.is_not(None), tasks.c.claim_expires < ts,
                             ~func.coalesce(tasks.c.claim_lock, "").like(model.host_lock_pattern(hostname),
                                                                         escape="\\"))
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(tasks)
                                .where(tasks.c.status == model.Status.RUNNING, ~expired_elsewhere)).scalar() or 0)

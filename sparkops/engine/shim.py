"""The worker shim: ``python -m sparkops.engine.shim TASK_ID RUN_ID``.

The dispatcher starts one shim per run, in its own session, with its output
appended to the run's log. The shim:

1. records the run's process identity (host, boot id, its own pid and start
   time) in the run row, fenced by the run id: a run reclaimed before the shim
   got going is left alone;
2. makes the workspace (``<workspace_root>/<task_id>``, re-created if it was
   deleted) and writes ``TASK.md`` with the title and body;
3. starts the agent from ``dispatch.agent_argv`` (an argv template, never a
   shell; the task's text only reaches the agent through ``TASK.md``) in its own
   process group, with ``SPARKOPS_*`` and ``HERMES_KANBAN_*`` variables and no
   SparkOps secrets, its output appended to the run log, and records the agent's
   identity too;
4. registers the worker on this host (:mod:`sparkops.engine.workers`) before the agent
   starts and until its process group is gone, so its slot stays taken and its
   task is not started again while it lives;
5. heartbeats every ``dispatch.heartbeat_seconds`` (which also keeps the claim's
   ``claim_expires`` ahead, as Hermes expects of a live worker), and stops the
   agent at its max runtime (closing the run as ``timed_out``);
   it meters the run (``usage.meter``): a sample of the host's meters (vLLM's
   token counters, the GPUs' energy) before the agent starts, at each heartbeat
   and when the run ends, kept with the run's usage by :mod:`sparkops.meters.ledger`;
6. when the agent exits, books the outcome unless the run was already closed:
   exit 0 without a report is a protocol violation, 75 a rate limit, a vanished
   workspace ``workspace_missing``, anything else a crash with the log's tail;
   then stops what is left of the agent's process group.

**A run ends its agent, whoever ends the run.** The board is shared: an operator's
``task block|complete|archive``, the app, ``hermes kanban block|complete|reclaim``
or another host's reclaimer can close the run while the agent works. The shim
looks at its run every :data:`WATCH_SECONDS` (on SQLite only when the board's files
changed) and, once the run is no longer the task's current open run, stops the
agent's process group (SIGTERM, ``reclaim.term_grace_seconds``, SIGKILL) and books
nothing: the run ended as whoever closed it said. Only the agent's own report
(made with the token the shim gave it, :data:`sparkops.engine.handoff.REPORT_TOKEN_ENV`)
lets it finish, for up to ``dispatch.report_exit_grace_seconds``. An agent killed
by a stop signal the shim did not send (or exiting 128 + it, as agents that catch
SIGTERM do: ``hermes kanban reclaim`` SIGTERMs the worker first, then closes the
run) gets :data:`KILL_SETTLE_SECONDS` for its killer to close the run before its
death is booked as a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import string
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from sparkops import PACKAGE_ROOT
from sparkops.board import model, runs
from sparkops.board import transitions as board
from sparkops.board.model import Change, Outcome
from sparkops.config import Settings, load_settings
from sparkops.core import json_text, procs
from sparkops.core.errors import (
    ConfigError,
    InvalidInput,
    NotFound,
    Refused,
    SparkOpsError,
    StaleRun,
    StorageError,
)
from sparkops.core.procs import Proc, RunIdentity
from sparkops.engine import handoff, workers
from sparkops.engine import workspace as workspace_of
from sparkops.engine.environment import shim_environment
from sparkops.engine.runlog import log_tail, run_log_path
from sparkops.meters import ledger, reported
from sparkops.storage.db import error_line, retrying
from sparkops.storage.schema import task_runs, tasks
from sparkops.storage.store import Store, open_store

log = logging.getLogger("sparkops.engine.shim")

EXIT_RATE_LIMITED = 75
#: Run outcomes that a report makes (``sparkops task complete|block``).
REPORTED = frozenset({Outcome.COMPLETED, Outcome.BLOCKED})
#: How often the shim looks whether its run is still the task's current open run.
WATCH_SECONDS = 1.0
#: An agent killed by a signal the shim did not send: how long its killer gets to
#: close the run (Hermes' reclaim waits up to 5 s for SIGTERM to work, then writes).
KILL_SETTLE_SECONDS = 6.0
PLACEHOLDERS = ("task_id", "run_id", "workspace", "prompt_file", "log_file", "python")


def render_argv(template: Sequence[str], values: dict[str, str]) -> list[str]:
    """Fill ``{placeholders}`` in each argv element; unknown ones are a ConfigError."""
    argv = []
    for part in template:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(part)]
        except ValueError as exc:  # a lone brace: "{" or "}"
            raise ConfigError(f"dispatch.agent_argv: {part!r} is not a valid template ({exc}); "
                              "write {{ and }} for literal braces") from None
        for field in fields:
            if field is not None and field not in values:
                raise ConfigError(
                    f"dispatch.agent_argv: unknown placeholder {{{field}}} in {part!r}; "
                    f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)} (write {{{{ }}}} for braces)")
        argv.append(part.format_map(values))
    return argv


def agent_environment(settings: Settings, *, task_id: str, run_id: int, workspace: Path,
                      prompt_file: Path, log_file: Path, claim_lock: str,
                      board_path: Path | None, base: dict[str, str] | None = None) -> dict[str, str]:
    env = shim_environment(settings, base)
    python_path = env.get("PYTHONPATH", "")
    env.update({
        "SPARKOPS_TASK_ID": task_id,
        "SPARKOPS_RUN_ID": str(run_id),
        "SPARKOPS_WORKSPACE": str(workspace),
        "SPARKOPS_PROMPT_FILE": str(prompt_file),
        "SPARKOPS_LOG_FILE": str(log_file),
        "SPARKOPS_STORAGE_BOARD_URL": settings["storage.board_url"],
        "SPARKOPS_STORAGE_OPS_URL": settings["storage.ops_url"],
        "HERMES_KANBAN_TASK": task_id,
        "HERMES_KANBAN_RUN_ID": str(run_id),
        "HERMES_KANBAN_WORKSPACE": str(workspace),
        "HERMES_KANBAN_CLAIM_LOCK": claim_lock,
        # so that `python -m sparkops task complete ...` works from the workspace
        "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_ROOT), python_path) if p),
    })
    if board_path is not None:
        env["HERMES_KANBAN_DB"] = str(board_path)
    # Without a config file of our own, point the agent's CLI at an empty one, so a
    # sparkops.toml lying in the workspace (the agent's cwd) is never picked up.
    env.setdefault("SPARKOPS_CONFIG", os.devnull)
    return env


#: Signals that stop a process from outside (a reclaim, an operator); an agent may
#: also exit 128 + one of these after catching it, as shells and agents do.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP)


def terminated(code: int) -> bool:
    """Did the agent end because someone stopped it (by a signal, or exiting 128+N)?"""
    return -code in STOP_SIGNALS or code - 128 in STOP_SIGNALS


@dataclass(frozen=True)
class RunState:
    """The shim's run as the board has it now."""

    ours: bool                # still the task's current, open run
    outcome: str | None       # how it ended, if it did
    reporter: dict[str, Any]  # who reported its end (``metadata.reporter``)
    task_status: str | None

    def describe(self) -> str:
        if self.outcome:
            return f"closed as {self.outcome}"
        return f"no longer the task's current run (task {self.task_status or 'gone'})"


class Shim:
    def __init__(self, settings: Settings, store: Store, task_id: str, run_id: int):
        self.settings = settings
        self.store = store
        self.task_id = task_id
        self.run_id = run_id
        self.host = procs.host_name(settings["host.name"])
        self.boot_id = procs.boot_id()
        self.me = procs.describe(os.getpid()) or Proc(os.getpid(), time.time(), os.getpgid(0))
        self.claim_lock = model.claim_lock(self.host, os.getpid())
        self.registry = workers.directory(settings)
        self.report_token = secrets.token_hex(16)
        self.stopped_agent = False  # the shim itself signalled the agent
        self.reported: Change | None = None  # the agent's report, when it came through the shim
        self.meter = ledger.RunMeter(settings, store.ops, run_id=run_id, task_id=task_id, host=self.host)

    # -- the steps ---------------------------------------------------------------

    def run(self) -> int:
        if not model.is_safe_id(self.task_id):
            raise InvalidInput(model.unsafe_id_reason(self.task_id))
        task = self._record(agent=None)
        if task is None:
            log.info("run %d of %s is no longer current; nothing to do", self.run_id, self.task_id)
            return 0
        predecessor = self._predecessor()
        if predecessor is not None:
            return self._release(f"an agent of {self.task_id} from run {predecessor.run_id} still runs "
                                 "on this host; never two agents in one workspace")
        workers.register(self.registry, self.task_id, self.run_id, self._identity(agent=None))
        try:
            return self._run(task)
        finally:
            workers.unregister(self.registry, self.run_id)

    def _run(self, task) -> int:
        workspace = workspace_of.path_of(self.settings, self.task_id)
        log_file = run_log_path(self.settings, self.task_id, self.run_id)
        try:
            if not workspace.exists():
                log.info("creating workspace %s", workspace)
            workspace, prompt_file = workspace_of.prepare(self.settings, self.task_id, task.title, task.body)
            log_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return self._book(Outcome.SPAWN_FAILED, f"cannot prepare workspace {workspace}: {exc}")

        values = {"task_id": self.task_id, "run_id": str(self.run_id), "workspace": str(workspace),
                  "prompt_file": str(prompt_file), "log_file": str(log_file), "python": sys.executable}
        try:
            argv = render_argv(self.settings["dispatch.agent_argv"], values)
            if not argv:
                raise ConfigError("dispatch.agent_argv is empty: no agent to start")
        except ConfigError as err:
            return self._book(Outcome.SPAWN_FAILED, str(err))
        env = agent_environment(
            self.settings, task_id=self.task_id, run_id=self.run_id, workspace=workspace,
            prompt_file=prompt_file, log_file=log_file, claim_lock=self.claim_lock,
            board_path=self.store.board.path)
        env[handoff.REPORT_TOKEN_ENV] = self.report_token
        listener = self._listen()
        if listener is not None:
            env[handoff.SOCKET_ENV] = listener.name
        agent_proc: Proc | None = None
        self.meter.keep()
        try:
            log.info("starting agent: %s (cwd %s)", argv, workspace)
            try:
                with open(log_file, "ab") as out:
                    agent = subprocess.Popen(argv, cwd=workspace, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, env=env, process_group=0,
                                             close_fds=True)
            except OSError as exc:
                return self._book(Outcome.SPAWN_FAILED,
                                  f"cannot start the agent {argv[0]!r}: {exc.strerror or exc}")
            agent_proc = procs.describe(agent.pid) or Proc(agent.pid, time.time(), agent.pid)
            workers.register(self.registry, self.task_id, self.run_id, self._identity(agent=agent_proc))
            if self._record(agent=agent_proc) is None:
                self._after_close(agent, agent_proc, self._state())
                return 0
            code = self._supervise(agent, agent_proc, started_at=task.run_started_at,
                                   max_runtime=task.max_runtime_seconds)
            self.meter.keep(ended=True)
            if code is None:
                return 0  # already booked (timed out), or closed by someone else
            return self._classify(code, workspace, log_file)
        finally:
            if listener is not None:
                listener.close()
            self.meter.keep(ended=True)
            self._clear_group(agent_proc)

    def _listen(self) -> handoff.Listener | None:
        try:
            return handoff.Listener(task_id=self.task_id, run_id=self.run_id, token=self.report_token,
                                    handle=self.take_report)
        except OSError as exc:  # the agent's report process makes its report itself
            log.warning("cannot listen for the agent's report: %s", exc)
            return None

    def take_report(self, request: dict[str, Any], pid: int) -> dict[str, Any]:
        """The agent's report, handed over by its report process ``pid`` (on the
        listener's thread): the change, or the error the direct path would give."""
        reporter = handoff.reporter({handoff.REPORT_TOKEN_ENV: self.report_token}, pid=pid)
        before = self.meter.read()  # the run's last sample: taken before the report frees its slot
        try:
            usage = reported.parse(request["usage"], where="the report's usage") if request.get("usage") else None
            if request.get("verb") == "complete":
                metadata = request.get("metadata")
                if metadata is not None and not isinstance(metadata, dict):
                    raise InvalidInput("--metadata must be a JSON object")
                change = self._retrying(lambda: board.complete(
                    self.store.board, self.task_id, run_id=self.run_id, result=_text(request, "result"),
                    summary=_text(request, "summary"), metadata=metadata, reporter=reporter),
                    "the agent's report")
            elif request.get("verb") == "block":
                change = self._retrying(lambda: board.block(
                    self.store.board, self.task_id, reason=_text(request, "reason"),
                    kind=_text(request, "kind"), run_id=self.run_id, reporter=reporter),
                    "the agent's report")
            else:
                raise InvalidInput(f"a report is complete or block, not {request.get('verb')!r}")
        except SparkOpsError as err:
            return {"error": str(err), "code": err.exit_code}
        except DBAPIError as exc:
            return {"error": f"database error: {error_line(exc)}", "code": StorageError.exit_code}
        log.info("the agent reported: %s", change.as_dict())
        self.reported = change
        self.meter.keep(ended=True, taken=before)
        if usage is not None:
            self.meter.report(usage)
        return {"change": change.as_dict()}

    def _supervise(self, agent: subprocess.Popen, agent_proc: Proc, started_at: int,
                   max_runtime: int | None) -> int | None:
        """Wait for the agent, watching the run and heartbeating; enforce the max
        runtime (the task's, else reclaim.max_runtime_seconds). None when the run
        ended otherwise (nothing left to book)."""
        limit = int(max_runtime or self.settings["reclaim.max_runtime_seconds"])
        deadline = started_at + limit
        beat = self.settings["dispatch.heartbeat_seconds"]
        next_beat = time.monotonic() + beat
        seen: object = None
        while True:
            wait = max(0.0, min(WATCH_SECONDS, deadline - time.time()))
            try:
                return agent.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
            if time.time() >= deadline:
                log.warning("agent passed its max runtime of %ss; stopping it", limit)
                what = self._stop(agent_proc)
                agent.wait()
                self.meter.keep(ended=True)
                self._book(Outcome.TIMED_OUT, f"ran longer than its max runtime of {limit}s; {what}")
                return None
            token = self.store.board.change_token()
            if token is None or token != seen:  # PostgreSQL has no cheap signal: always look
                seen = token
                state = self._state_or_none()
                if state is not None and not state.ours:
                    self._after_close(agent, agent_proc, state)
                    return None
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + beat
            try:
                runs.heartbeat(self.store.board, self.task_id, run_id=self.run_id,
                               ttl_seconds=self.settings["dispatch.claim_ttl_seconds"])
            except StaleRun:
                self._after_close(agent, agent_proc, self._state())
                return None
            except (DBAPIError, SparkOpsError) as exc:
                log.warning("heartbeat failed (will retry): %s", exc)
            else:
                self.meter.keep()

    def _after_close(self, agent: subprocess.Popen, agent_proc: Proc, state: RunState) -> None:
        """The run is no longer ours. After the agent's own report it may finish
        (within dispatch.report_exit_grace_seconds); otherwise it is stopped now."""
        if state.outcome in REPORTED and self._own_report(state):
            grace = self.settings["dispatch.report_exit_grace_seconds"]
            try:
                agent.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                log.warning("the agent reported (%s) but still runs after %ss; stopping it", state.outcome, grace)
        else:
            log.warning("run %d was %s while its agent worked; stopping the agent", self.run_id,
                        state.describe())
        self._stop(agent_proc)
        agent.wait()

    def _classify(self, code: int, workspace: Path, log_file: Path) -> int:
        if self.reported is not None:  # booked by the shim itself: the run is closed
            log.info("agent %s after its report (%s)", procs.exit_description(code), self.reported.action)
            return 0
        state = self._state()
        if state.ours and terminated(code) and not self.stopped_agent:
            state = self._settle(code)
        if not state.ours:  # reported by the agent, or closed by someone else: nothing to book
            log.info("agent %s; run already %s", procs.exit_description(code), state.describe())
            return 0
        if not workspace.exists():
            return self._book(Outcome.WORKSPACE_MISSING,
                              f"workspace {workspace} disappeared during the run "
                              f"(agent {procs.exit_description(code)})")
        if code == 0:
            return self._book(Outcome.PROTOCOL_VIOLATION,
                              "agent exited 0 without reporting: a worker must finish with "
                              f"`sparkops task complete {self.task_id} --run {self.run_id}` (or block)")
        if code == EXIT_RATE_LIMITED:
            return self._book(Outcome.RATE_LIMITED, "agent exited 75 (rate limited); retried after the cooldown")
        tail = log_tail(log_file)
        return self._book(Outcome.CRASHED, f"agent {procs.exit_description(code)}" + (f": {tail}" if tail else ""))

    # -- helpers -----------------------------------------------------------------

    def _record(self, agent: Proc | None):
        """Record the shim and agent on the run; the task's row, or None once the
        run is no longer current."""
        identity = RunIdentity(self.host, self.boot_id, shim=self.me, agent=agent)
        try:
            return self._retrying(lambda: runs.record_process(
                self.store.board, self.task_id, run_id=self.run_id, claim_lock=self.claim_lock,
                worker_pid=agent.pid if agent else None, identity={"process": identity.as_dict()}),
                "recording the worker")
        except (StaleRun, NotFound):
            return None

    def _state(self) -> RunState:
        """The run as the board has it now (one read, retried through a restart)."""
        def read():
            with self.store.board.read() as conn:
                return conn.execute(
                    select(task_runs.c.ended_at, task_runs.c.outcome, task_runs.c.metadata,
                           tasks.c.status, tasks.c.current_run_id)
                    .select_from(task_runs.outerjoin(tasks, tasks.c.id == task_runs.c.task_id))
                    .where(task_runs.c.id == self.run_id)).first()
        row = self._retrying(read, "reading the run")
        if row is None:
            return RunState(False, None, {}, None)
        ours = row.ended_at is None and row.current_run_id == self.run_id and row.status == model.Status.RUNNING
        reporter = json_text.object_of(row.metadata).get("reporter")
        return RunState(ours, row.outcome if row.ended_at is not None else None,
                        reporter if isinstance(reporter, dict) else {}, row.status)

    def _state_or_none(self) -> RunState | None:
        try:
            return self._state()
        except (DBAPIError, SparkOpsError) as exc:
            log.warning("cannot read the run (will look again): %s", exc)
            return None

    def _settle(self, code: int) -> RunState:
        """The agent was killed by a signal the shim did not send: give its killer
        (``hermes kanban reclaim``, an operator) time to close the run."""
        deadline = time.monotonic() + KILL_SETTLE_SECONDS
        state = self._state()
        while state.ours and time.monotonic() < deadline:
            time.sleep(0.1)
            state = self._state()
        if state.ours:
            log.info("agent %s and nobody closed its run within %ss", procs.exit_description(code),
                     KILL_SETTLE_SECONDS)
        return state

    def _own_report(self, state: RunState) -> bool:
        return state.reporter.get("token") == handoff.token_digest(self.report_token)

    def _identity(self, agent: Proc | None) -> RunIdentity:
        return RunIdentity(self.host, self.boot_id, shim=self.me, agent=agent)

    def _predecessor(self) -> workers.Worker | None:
        """A live agent of this task from another run on this host, after waiting
        for it as long as stopping it takes (SIGTERM, grace, SIGKILL)."""
        deadline = time.monotonic() + self.settings["reclaim.term_grace_seconds"] + 5
        while True:
            others = [w for w in workers.live(self.registry)
                      if w.task_id == self.task_id and w.run_id != self.run_id]
            if not others or time.monotonic() > deadline:
                return others[0] if others else None
            time.sleep(0.1)

    def _release(self, reason: str) -> int:
        """Give the run back without counting a failure."""
        try:
            self._retrying(lambda: board.reclaim(self.store.board, self.task_id, run_id=self.run_id,
                                                 reason=reason), "releasing the run")
            log.warning("run %d of %s released: %s", self.run_id, self.task_id, reason)
        except Refused as err:
            log.info("not releasing run %d: %s", self.run_id, err)
        return 0

    def _clear_group(self, agent: Proc | None) -> None:
        """Stop what is left of the agent's process group once the agent is gone."""
        if agent is not None and procs.group_alive(agent):
            log.info("stopping what is left of the agent's process group %d: %s", agent.pgid, self._stop(agent))

    def _retrying(self, fn, what: str):
        """``fn()`` through a database restart (see storage.retry_seconds)."""
        return retrying(fn, seconds=self.settings["storage.retry_seconds"], what=f"shim of run {self.run_id}: {what}")

    def _stop(self, agent: Proc) -> str:
        self.stopped_agent = True
        return procs.terminate_group(agent, grace=self.settings["reclaim.term_grace_seconds"])

    def _book(self, outcome: Outcome, error: str) -> int:
        try:
            self._retrying(lambda: board.fail(
                self.store.board, self.task_id, run_id=self.run_id, outcome=outcome, error=error,
                **model.FailureLimits.from_settings(self.settings).as_kwargs()), f"booking {outcome}")
            log.info("run %d of %s: %s: %s", self.run_id, self.task_id, outcome, error)
        except Refused as err:
            log.info("not booking %s: %s", outcome, err)
        return 0


def _text(request: dict[str, Any], key: str) -> str | None:
    value = request.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"{key} must be text")
    return value


def parse_assignment(line: str) -> tuple[str, int, Path]:
    """One hand-over record: (task id, run id, log path); InvalidInput for anything
    that is not one (an id is checked before it becomes a path or an argv element)."""
    try:
        record = json.loads(line)
        task_id, run_id, log_path = record["task_id"], record["run_id"], record["log"]
    except (ValueError, TypeError, KeyError):
        raise InvalidInput(f"the hand-over record is not one: {line[:200]!r}") from None
    if not model.is_safe_id(task_id) or not isinstance(run_id, int) or not isinstance(log_path, str):
        raise InvalidInput(f"the hand-over record names no plain task and run: {line[:200]!r}")
    return task_id, run_id, Path(log_path)


def run_assignment(settings: Settings, task_id: str, run_id: int) -> int:
    """Open the store and run the shim for one run; its exit code."""
    try:
        store = retrying(lambda: open_store(settings), seconds=settings["storage.retry_seconds"],
                         what="shim: opening the store")
    except SparkOpsError as err:
        log.error("%s", err)
        return 1
    try:
        return Shim(settings, store, task_id, run_id).run()
    except (SparkOpsError, DBAPIError) as exc:
        log.error("shim failed: %s", exc)
        return 1
    finally:
        store.dispose()


def redirect_output(log_path: Path) -> None:
    """Send this process's stdout and stderr to the run's log (appending)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparkops.engine.shim",
                                     description="Run one task's agent for one run (started by the dispatcher; "
                                                 "usually forked by its warm forkserver, sparkops.engine.forkserver).")
    parser.add_argument("task_id")
    parser.add_argument("run_id", type=int)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        settings = load_settings()
    except SparkOpsError as err:
        log.error("%s", err)
        return 1
    return run_assignment(settings, args.task_id, args.run_id)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s shim[%(process)d] %(levelname)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())

"""The worker shim: ``python -m sparkops.shim TASK_ID RUN_ID``.

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
4. heartbeats every ``dispatch.heartbeat_seconds``, and stops the agent at its
   max runtime (closing the run as ``timed_out``);
5. when the agent exits, books the outcome unless the agent reported it: exit 0
   without a report is a protocol violation, 75 a rate limit, a vanished
   workspace ``workspace_missing``, anything else a crash with the log's tail.

If the run stops being current while the agent still works (it was reclaimed),
the shim stops the agent: a run that lost its claim must not keep working.
"""

from __future__ import annotations

import argparse
import logging
import os
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from sparkops import board, procs
from sparkops.board import Outcome
from sparkops.config import Settings, load_settings
from sparkops.db import retrying
from sparkops.dispatch import log_tail, run_log_path, shim_environment
from sparkops.errors import ConfigError, NotFound, Refused, SparkOpsError, StaleRun
from sparkops.procs import Proc, RunIdentity
from sparkops.schema import task_runs, tasks
from sparkops.store import Store, open_store

log = logging.getLogger("sparkops.shim")

EXIT_RATE_LIMITED = 75
#: Run outcomes that mean the agent reported (``sparkops task complete|block``).
REPORTED = frozenset({Outcome.COMPLETED, Outcome.BLOCKED})
PLACEHOLDERS = ("task_id", "run_id", "workspace", "prompt_file", "log_file", "python")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


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


class Shim:
    def __init__(self, settings: Settings, store: Store, task_id: str, run_id: int):
        self.settings = settings
        self.store = store
        self.task_id = task_id
        self.run_id = run_id
        self.host = procs.host_name(settings["host.name"])
        self.boot_id = procs.boot_id()
        self.me = procs.describe(os.getpid()) or Proc(os.getpid(), time.time(), os.getpgid(0))
        self.claim_lock = f"{self.host}:{os.getpid()}"

    # -- the steps ---------------------------------------------------------------

    def run(self) -> int:
        if not self._record(agent=None):
            log.info("run %d of %s is no longer current; nothing to do", self.run_id, self.task_id)
            return 0
        task = self._task()
        workspace = Path(task.workspace_path or Path(self.settings["dispatch.workspace_root"]) / self.task_id)
        log_file = run_log_path(self.settings, self.task_id, self.run_id)
        try:
            if not workspace.exists():
                log.info("creating workspace %s", workspace)
            workspace.mkdir(parents=True, exist_ok=True)
            prompt_file = workspace / "TASK.md"
            prompt_file.write_text(f"# {task.title}\n\n{task.body or ''}\n", encoding="utf-8")
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
        if not self._record(agent=agent_proc) and not self._reported():
            log.warning("run %d was reclaimed while the agent started; stopping it", self.run_id)
            self._stop(agent_proc)
            agent.wait()
            return 0
        code = self._supervise(agent, agent_proc, started_at=task.started_at_run)
        if code is None:
            return 0  # already booked (timed out, or reclaimed)
        return self._classify(code, workspace, log_file)

    def _supervise(self, agent: subprocess.Popen, agent_proc: Proc, started_at: int) -> int | None:
        """Wait for the agent, heartbeating; enforce the max runtime."""
        limit = self._max_runtime()
        deadline = started_at + limit
        beat = self.settings["dispatch.heartbeat_seconds"]
        heartbeating = True
        while True:
            wait = max(0.0, min(beat, deadline - time.time()))
            try:
                return agent.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
            if time.time() >= deadline:
                log.warning("agent passed its max runtime of %ss; stopping it", limit)
                what = self._stop(agent_proc)
                agent.wait()
                self._book(Outcome.TIMED_OUT, f"ran longer than its max runtime of {limit}s; {what}")
                return None
            if not heartbeating:
                continue
            try:
                board.heartbeat(self.store.board, self.task_id, run_id=self.run_id)
            except StaleRun:
                if self._reported():
                    heartbeating = False  # the agent reported and is finishing up
                    continue
                log.warning("run %d was reclaimed while the agent ran; stopping it", self.run_id)
                self._stop(agent_proc)
                agent.wait()
                return None
            except (DBAPIError, SparkOpsError) as exc:
                log.warning("heartbeat failed (will retry): %s", exc)

    def _classify(self, code: int, workspace: Path, log_file: Path) -> int:
        ended, outcome = self._ended()
        if ended:  # reported by the agent, or closed by someone else: nothing to book
            log.info("agent %s; run already closed (%s)", procs.exit_description(code), outcome)
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

    def _record(self, agent: Proc | None) -> bool:
        identity = RunIdentity(self.host, self.boot_id, shim=self.me, agent=agent)
        try:
            self._retrying(lambda: board.record_process(
                self.store.board, self.task_id, run_id=self.run_id, claim_lock=self.claim_lock,
                worker_pid=agent.pid if agent else None, identity={"process": identity.as_dict()}),
                "recording the worker")
            return True
        except (StaleRun, NotFound):
            return False

    def _task(self):
        def read():
            with self.store.board.read() as conn:
                return conn.execute(
                    select(tasks.c.title, tasks.c.body, tasks.c.workspace_path, tasks.c.max_runtime_seconds,
                           task_runs.c.started_at.label("started_at_run"))
                    .select_from(tasks.join(task_runs, task_runs.c.id == self.run_id))
                    .where(tasks.c.id == self.task_id)).first()
        row = self._retrying(read, "reading the task")
        if row is None:
            raise NotFound("task", self.task_id)
        return row

    def _max_runtime(self) -> int:
        def read():
            with self.store.board.read() as conn:
                return conn.execute(select(tasks.c.max_runtime_seconds)
                                    .where(tasks.c.id == self.task_id)).scalar()
        return int(self._retrying(read, "reading the max runtime") or self.settings["reclaim.max_runtime_seconds"])

    def _ended(self) -> tuple[bool, str | None]:
        """Has the run been closed (by anyone), and with what outcome?"""
        def read():
            with self.store.board.read() as conn:
                return conn.execute(select(task_runs.c.ended_at, task_runs.c.outcome)
                                    .where(task_runs.c.id == self.run_id)).first()
        row = self._retrying(read, "reading the run")
        return (row is not None and row.ended_at is not None), (row.outcome if row else None)

    def _retrying(self, fn, what: str):
        """``fn()`` through a database restart (see storage.retry_seconds)."""
        return retrying(fn, seconds=self.settings["storage.retry_seconds"], what=f"shim of run {self.run_id}: {what}")

    def _reported(self) -> bool:
        """Did the agent close the run with its own report (complete or block)? A run
        closed otherwise (reclaimed, failed by the reclaimer) lost its claim."""
        ended, outcome = self._ended()
        return ended and outcome in REPORTED

    def _stop(self, agent: Proc) -> str:
        return procs.terminate_group(agent, grace=self.settings["reclaim.term_grace_seconds"])

    def _book(self, outcome: Outcome, error: str) -> int:
        try:
            self._retrying(lambda: board.fail(
                self.store.board, self.task_id, run_id=self.run_id, outcome=outcome, error=error,
                failure_limit=self.settings["dispatch.failure_limit"],
                protocol_violation_limit=self.settings["dispatch.protocol_violation_limit"]), f"booking {outcome}")
            log.info("run %d of %s: %s: %s", self.run_id, self.task_id, outcome, error)
        except Refused as err:
            log.info("not booking %s: %s", outcome, err)
        return 0


def wait_for_assignment(stream=None) -> tuple[str, int, Path] | None:
    """A standby shim's wait: one line ``TASK_ID RUN_ID LOG_PATH`` from the
    dispatcher, or None at end of input (the runner went away)."""
    line = (stream or sys.stdin).readline()
    if not line.strip():
        return None
    task_id, run_id, log_path = line.rstrip("\n").split(" ", 2)
    return task_id, int(run_id), Path(log_path)


def _redirect_output(log_path: Path) -> None:
    """Send this process's stdout and stderr to the run's log (appending)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparkops.shim",
                                     description="Run one task's agent for one run (started by the dispatcher).")
    parser.add_argument("task_id", nargs="?")
    parser.add_argument("run_id", nargs="?", type=int)
    parser.add_argument("--standby", action="store_true",
                        help="start up, then wait for 'TASK_ID RUN_ID LOG_PATH' on stdin "
                             "(the dispatcher keeps one shim warm so a slot is refilled at once)")
    args = parser.parse_args(argv)
    if not args.standby and (args.task_id is None or args.run_id is None):
        parser.error("TASK_ID and RUN_ID are required (or --standby)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s shim[%(process)d] %(levelname)s: %(message)s")
    try:
        settings = load_settings()
        store = retrying(lambda: open_store(settings), seconds=settings["storage.retry_seconds"],
                         what="shim: opening the store")
    except SparkOpsError as err:
        if args.standby:
            # Say why in the run's log, not in the void: take the run, then fail it.
            assignment = wait_for_assignment()
            if assignment is None:
                return 1
            _redirect_output(assignment[2])
        log.error("%s", err)
        return 1
    try:
        task_id, run_id = args.task_id, args.run_id
        if args.standby:
            assignment = wait_for_assignment()
            if assignment is None:
                return 0
            task_id, run_id, log_path = assignment
            _redirect_output(log_path)
        return Shim(settings, store, task_id, run_id).run()
    except (SparkOpsError, DBAPIError) as exc:
        log.error("shim failed: %s", exc)
        return 1
    finally:
        store.dispose()


if __name__ == "__main__":
    sys.exit(main())

"""The reclaimer: verdicts on backdated runs with the clock passed in, then the
engine's failure scenarios on real processes and a real SQLite board.

The scenarios run the real dispatch job, which starts the real worker shim
(``python -m sparkops.engine.shim``) in its own session, which starts the agent from
``SPARKOPS_DISPATCH_AGENT_ARGV`` (the small script :data:`AGENT`) in its own
process group. Processes are killed, stopped and resumed with real signals;
time that only the reclaimer's arithmetic needs is passed as ``now=``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import NOW, ROOT, make_settings, run_cli, wait_for
from sqlalchemy import select, update

from sparkops.board import model, queries, runs
from sparkops.board import transitions as board
from sparkops.board.model import Outcome
from sparkops.config import Settings
from sparkops.core import procs
from sparkops.core.procs import Proc, RunIdentity
from sparkops.engine import reclaim
from sparkops.engine.dispatch import ShimTracker, retry_policy
from sparkops.engine.reclaim import TIMEOUT_MARGIN_SECONDS, Verdict
from sparkops.jobs.framework import JobContext, JobRun
from sparkops.runner.registry import run_job
from sparkops.storage.schema import ops_hosts, task_events, task_runs, tasks
from sparkops.storage.store import Store, open_store

#: What closes a run, as task_events kinds.
CLOSING_EVENTS = {"completed", "blocked", "dependency_wait", "block_loop_detected", "reclaimed",
                  *(str(o) for o in Outcome if o not in (Outcome.COMPLETED, Outcome.BLOCKED, Outcome.GAVE_UP))}

#: The test agent: ``agent.py DELAY ACTION [--ignore-term] [--child] [--wait-go]``.
#: It works for DELAY seconds (and with ``--wait-go`` until the test creates
#: ``go-RUN`` in the workspace), then ACTION: ``report`` (``sparkops task complete
#: --run``, its exit code and output kept in ``report-RUN``), ``crash`` (a reason on
#: stdout, exit 1) or an exit code. ``--ignore-term`` notes a SIGTERM in
#: ``sigterm-RUN`` and carries on; ``--child`` starts a child in its group.
AGENT = textwrap.dedent('''
    import os, pathlib, signal, subprocess, sys, time

    delay, action, flags = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
    run_id = os.environ["SPARKOPS_RUN_ID"]
    here = pathlib.Path.cwd()
    if "--ignore-term" in flags:
        signal.signal(signal.SIGTERM, lambda *_: (here / ("sigterm-" + run_id)).touch())
    if "--child" in flags:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        (here / ("child-" + run_id)).write_text(str(child.pid))
    print("agent of run", run_id, "working", flush=True)
    end = time.monotonic() + delay
    while time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    while "--wait-go" in flags and not (here / ("go-" + run_id)).exists():
        time.sleep(0.02)
    if action == "report":
        done = subprocess.run([sys.executable, "-m", "sparkops", "task", "complete",
                               os.environ["SPARKOPS_TASK_ID"], "--run", run_id,
                               "--result", "result of run " + run_id], capture_output=True, text=True)
        (here / ("report-" + run_id)).write_text(str(done.returncode) + "\\n" + done.stdout + done.stderr)
        sys.exit(done.returncode)
    if action == "crash":
        print("fatal: cannot load the model weights (errno " + str(6 * 7) + ")", flush=True)
        sys.exit(1)
    sys.exit(int(action))
''')
CRASH_REASON = "fatal: cannot load the model weights (errno 42)"




def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False


@dataclass
class Engine:
    """One board with the dispatcher's context (which tracks the shims it starts)."""

    tmp_path: Path
    settings: Settings
    store: Store
    ctx: JobContext
    env: dict[str, str]

    @property
    def db(self):
        return self.store.board

    def other_ctx(self, *, claims: bool = True, **env: str) -> JobContext:
        """Another process's view (no shim tracker), with some settings changed;
        ``claims=False``: a dispatcher with no agent configured, which reaps and
        reclaims but starts nothing."""
        if not claims:
            env["SPARKOPS_DISPATCH_AGENT_ARGV"] = "[]"
        return JobContext.create(make_settings(self.tmp_path, **{**self.env, **env}), self.store)

    def create(self, title: str = "task", **kwargs: Any) -> str:
        return board.create_task(self.db, title, **kwargs)

    def dispatch(self, now: float | None = None, ctx: JobContext | None = None, *,
                 claims: bool = True) -> JobRun:
        """A pass of the dispatcher (by default the runner's, which tracks its shims);
        ``claims=False``: the same dispatcher with no agent configured, so that it
        reaps and reclaims but does not start a retry (a first failure has no backoff)."""
        if not claims:
            ctx = self.other_ctx(claims=False)
            ctx.shims = self.ctx.shims
        result = run_job(ctx or self.ctx, "dispatch", now=now, trigger="schedule")
        assert result.ok, result.error
        return result

    def reclaim(self, now: float | None = None, ctx: JobContext | None = None) -> JobRun:
        result = run_job(ctx or self.ctx, "reclaim", now=now, trigger="schedule")
        assert result.ok, result.error
        return result

    def task(self, task_id: str) -> dict:
        return queries.get_task(self.db, task_id)

    def runs(self, task_id: str) -> list[dict]:
        return list(reversed(queries.list_runs(self.db, task_id=task_id)))

    def run(self, run_id: int) -> dict:
        with self.db.read() as conn:
            row = dict(conn.execute(select(task_runs).where(task_runs.c.id == run_id)).one()._mapping)
        return queries._decode(row, "metadata")

    def events(self, task_id: str, *kinds: str) -> list[dict]:
        return list(reversed(queries.list_events(self.db, task_id=task_id, kinds=kinds or None,
                                                 limit=1000)))

    def wait_agent(self, task_id: str, active_only: bool = True) -> tuple[dict, RunIdentity]:
        """The task's (open) run, once its shim has recorded the agent."""
        def found():
            for run in queries.list_runs(self.db, task_id=task_id, active_only=active_only):
                identity = RunIdentity.from_metadata(run["metadata"])
                if identity is not None and identity.agent is not None:
                    return run, identity
            return None
        return wait_for(found, f"the agent of {task_id} to be recorded")

    def wait_closed(self, run_id: int, timeout: float = 30) -> dict:
        return wait_for(lambda: (r := self.run(run_id))["ended_at"] is not None and r,
                        f"run {run_id} to be closed", timeout)

    def wait_shims(self) -> None:
        """Until every shim the dispatcher started has exited and been reaped."""
        wait_for(lambda: (self.ctx.shims.reap(), len(self.ctx.shims) == 0)[1], "the shims to exit")

    def workspace(self, task_id: str) -> Path:
        return Path(self.settings["dispatch.workspace_root"]) / task_id

    def go(self, task_id: str, run_id: int) -> None:
        """Let the agent of ``run_id`` (started with ``--wait-go``) finish."""
        (self.workspace(task_id) / f"go-{run_id}").touch()


@pytest.fixture
def engine(tmp_path: Path, monkeypatch, storage_env: dict[str, str]) -> Iterator[Callable[..., Engine]]:
    """``engine(DELAY, ACTION, *FLAGS, **SETTINGS_ENV)``: settings in the environment
    (so the shims and agents inherit them), the board, the dispatcher's context.
    Afterwards every process group recorded in a run is stopped and every shim reaped."""
    made: list[Engine] = []
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    for name in list(os.environ):
        if name.startswith(("SPARKOPS_", "HERMES_")):
            monkeypatch.delenv(name)

    def make(*agent: str, **env: str) -> Engine:
        env = {
            **storage_env,
            "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(["{python}", str(script), *agent]),
            "SPARKOPS_DISPATCH_HEARTBEAT_SECONDS": "0.5",
            "SPARKOPS_RECLAIM_TERM_GRACE_SECONDS": "2",
            "SPARKOPS_RUNNER_LOG_FILE": str(tmp_path / "logs" / "runner.log"),
            **env,
        }
        for name, value in {**env, "PYTHONPATH": str(ROOT)}.items():
            monkeypatch.setenv(name, value)
        settings = make_settings(tmp_path, **env)
        store = open_store(settings, create=True)
        made.append(Engine(tmp_path, settings, store,
                           JobContext.create(settings, store, shims=ShimTracker()), env))
        return made[-1]

    yield make
    for eng in made:
        for run in queries.list_runs(eng.db, limit=10_000):
            identity = RunIdentity.from_metadata(run["metadata"])
            for proc in (identity.shim, identity.agent) if identity else ():
                if proc is not None and (procs.is_alive(proc) or procs.group_alive(proc)):
                    try:
                        os.killpg(proc.pgid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                    procs.terminate_group(proc, grace=0)
        deadline = time.monotonic() + 15
        while len(eng.ctx.shims) and time.monotonic() < deadline:
            eng.ctx.shims.reap()
            time.sleep(0.05)
        eng.store.dispose()


def assert_consistent(db) -> None:
    """Every task in one state; an open run only as the current run of a running
    task; every closed run closed once (one closing event, an outcome)."""
    with db.read() as conn:
        all_tasks = conn.execute(select(tasks)).all()
        all_runs = conn.execute(select(task_runs)).all()
        all_events = conn.execute(select(task_events)).all()
    runs_by_id = {r.id: r for r in all_runs}
    for task in all_tasks:
        if task.status == "running":
            run = runs_by_id[task.current_run_id]
            assert run.task_id == task.id and run.ended_at is None, task
        else:
            assert task.current_run_id is None, task
    for run in all_runs:
        closing = [e for e in all_events if e.run_id == run.id and e.kind in CLOSING_EVENTS]
        if run.ended_at is None:
            task = next(t for t in all_tasks if t.id == run.task_id)
            assert (task.status, task.current_run_id) == ("running", run.id), run
            assert closing == [], run
        else:
            assert run.outcome is not None and len(closing) == 1, (run, closing)
            violation = model.is_protocol_violation(run.outcome, run.error, run.metadata)
            assert closing[0].kind == ("protocol_violation" if violation else run.outcome)


def no_process_left(*recorded: Proc | None) -> bool:
    return not any(procs.is_alive(p) or procs.group_alive(p) for p in recorded if p is not None)


# -- verdicts on backdated runs ------------------------------------------------------------


@pytest.fixture
def sleeper(tmp_path) -> Iterator[Callable[[], subprocess.Popen]]:
    """Live processes in their own sessions, killed at the end."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                start_new_session=True, stdin=subprocess.DEVNULL)
        started.append(proc)
        wait_for(lambda: procs.describe(proc.pid), "a sleeper")
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def dead(sleeper) -> Callable[[], Proc]:
    """The recorded identity of a process that has ended."""

    def make() -> Proc:
        proc = sleeper()
        recorded = procs.describe(proc.pid)
        proc.kill()
        proc.wait()
        return recorded

    return make


@pytest.fixture
def ctx(settings, store) -> JobContext:
    return JobContext.create(settings, store)


def claimed(ctx: JobContext, *, host: str | None = None, max_runtime: int | None = None,
            at: int = NOW) -> tuple[str, int]:
    """A task claimed at ``at`` as ``host:4242`` (Hermes' ``kanban claim``)."""
    task_id = board.create_task(ctx.store.board, "task", max_runtime_seconds=max_runtime, now=at - 10)
    change = board.claim(ctx.store.board, task_id, lock=f"{host or ctx.host}:4242", now=at)
    return task_id, change.run_id


def with_identity(ctx: JobContext, task_id: str, run_id: int, *, shim: Proc | None, agent: Proc | None,
                  host: str | None = None, boot: str | None = None, at: int = NOW) -> None:
    host = host or ctx.host
    identity = RunIdentity(host, boot or procs.boot_id(), shim=shim, agent=agent)
    runs.record_process(ctx.store.board, task_id, run_id=run_id,
                        claim_lock=f"{host}:{shim.pid if shim else 1}",
                        worker_pid=agent.pid if agent else None,
                        identity={"process": identity.as_dict()}, now=at)


def assess(ctx: JobContext, run_id: int, now: float) -> Verdict | None:
    row = next(r for r in reclaim.open_runs(ctx) if r.id == run_id)
    return reclaim.assess(ctx, row, now=now)


def set_worker_pid(ctx: JobContext, task_id: str, run_id: int, pid: int) -> None:
    """What Hermes' dispatcher records: a worker pid, no start time."""
    with ctx.store.board.write() as conn:
        conn.execute(update(task_runs).where(task_runs.c.id == run_id).values(worker_pid=pid))
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(worker_pid=pid))


def test_a_local_run_whose_processes_are_all_gone_is_a_crash(ctx, dead):
    shim, agent = dead(), dead()
    task_id, run_id = claimed(ctx)
    with_identity(ctx, task_id, run_id, shim=shim, agent=agent)
    assert assess(ctx, run_id, NOW + 5) == Verdict(
        task_id, run_id, "fail", Outcome.CRASHED,
        f"shim pid {shim.pid} and agent pid {agent.pid} no longer running", local=True)
    # a shim that died before it started the agent
    task_2, run_2 = claimed(ctx)
    with_identity(ctx, task_2, run_2, shim=shim, agent=None)
    assert assess(ctx, run_2, NOW + 5).reason == f"shim pid {shim.pid} no longer running"


def test_a_local_run_is_alive_while_its_shim_or_its_agent_is(ctx, sleeper, dead):
    live = procs.describe(sleeper().pid)
    for shim, agent in ((live, None), (live, dead()), (dead(), live)):
        task_id, run_id = claimed(ctx)
        with_identity(ctx, task_id, run_id, shim=shim, agent=agent)
        # no heartbeat for a day: a local run is judged by its processes, not its heartbeat
        assert assess(ctx, run_id, NOW + 1000) is None


def test_a_live_run_past_its_max_runtime_plus_the_margin_is_terminated(ctx, sleeper):
    live = procs.describe(sleeper().pid)
    task_id, run_id = claimed(ctx)
    with_identity(ctx, task_id, run_id, shim=live, agent=live)
    limit = ctx.settings["reclaim.max_runtime_seconds"]
    assert assess(ctx, run_id, NOW + limit + TIMEOUT_MARGIN_SECONDS) is None  # the shim's turn
    assert assess(ctx, run_id, NOW + limit + TIMEOUT_MARGIN_SECONDS + 1) == Verdict(
        task_id, run_id, "terminate", Outcome.TIMED_OUT,
        f"ran {limit + TIMEOUT_MARGIN_SECONDS + 1}s, past its max runtime of {limit}s")


def test_a_tasks_own_max_runtime_wins(ctx, sleeper):
    live = procs.describe(sleeper().pid)
    task_id, run_id = claimed(ctx, max_runtime=100)
    with_identity(ctx, task_id, run_id, shim=live, agent=live)
    assert assess(ctx, run_id, NOW + 130) is None
    verdict = assess(ctx, run_id, NOW + 131)
    assert (verdict.action, verdict.outcome, verdict.reason) == (
        "terminate", Outcome.TIMED_OUT, "ran 131s, past its max runtime of 100s")


def test_another_hosts_run_is_judged_by_its_heartbeat_and_never_signalled(ctx, sleeper):
    # pids that happen to be live here mean nothing for a run of another host
    live = procs.describe(sleeper().pid)
    task_id, run_id = claimed(ctx, host="gb10-b")
    with_identity(ctx, task_id, run_id, shim=live, agent=live, host="gb10-b", at=NOW)
    runs.heartbeat(ctx.store.board, task_id, run_id=run_id, now=NOW + 50)
    timeout = ctx.settings["reclaim.heartbeat_timeout_seconds"]
    assert assess(ctx, run_id, NOW + 50 + timeout) is None
    assert assess(ctx, run_id, NOW + 50 + timeout + 1) == Verdict(
        task_id, run_id, "fail", Outcome.CRASHED, f"no heartbeat from host gb10-b for {timeout + 1}s",
        remote=True)
    # a Hermes claim of another host (no identity): its claim lock names the host
    _, run_2 = claimed(ctx, host="gb10-c")
    assert assess(ctx, run_2, NOW + timeout) is None
    assert assess(ctx, run_2, NOW + timeout + 1).reason == f"no heartbeat from host gb10-c for {timeout + 1}s"


def test_a_sparkops_claim_without_a_worker_is_spawn_failed_after_the_grace(ctx):
    task_id = board.create_task(ctx.store.board, "task", now=NOW - 10)
    change = board.claim_next(ctx.store.board, host=ctx.host, lock=f"{ctx.host}:999999", capacity=1, now=NOW)
    assert change.task_id == task_id
    grace = ctx.settings["reclaim.spawn_grace_seconds"]
    assert assess(ctx, change.run_id, NOW + grace) is None
    verdict = assess(ctx, change.run_id, NOW + grace + 1)
    assert (verdict.action, verdict.outcome, verdict.local) == ("fail", Outcome.SPAWN_FAILED, True)
    assert verdict.reason.startswith(f"no worker recorded itself {grace + 1}s after the claim "
                                     f"(dispatcher {ctx.host}:999999 died mid-dispatch")


def test_a_hermes_worker_is_judged_by_its_pid_and_never_signalled(ctx, sleeper, dead, tmp_path):
    gone = dead()
    task_id, run_id = claimed(ctx)
    set_worker_pid(ctx, task_id, run_id, gone.pid)
    assert assess(ctx, run_id, NOW + 5) == Verdict(
        task_id, run_id, "fail", Outcome.CRASHED, f"worker pid {gone.pid} is gone", local=True)

    live = sleeper()
    task_2, run_2 = claimed(ctx)
    set_worker_pid(ctx, task_2, run_2, live.pid)
    limit = ctx.settings["reclaim.max_runtime_seconds"]
    assert assess(ctx, run_2, NOW + limit + TIMEOUT_MARGIN_SECONDS) is None
    verdict = assess(ctx, run_2, NOW + limit + TIMEOUT_MARGIN_SECONDS + 1)
    assert (verdict.action, verdict.outcome) == ("fail", Outcome.TIMED_OUT)
    assert "has no recorded start time, so it is not signalled" in verdict.reason
    # acted on: booked, and the process with that pid (which may be anyone by now) untouched
    assert reclaim.act(ctx, verdict, now=NOW + limit + 100)
    assert queries.get_task(ctx.store.board, task_2)["status"] == "ready"
    assert live.poll() is None


def test_a_bare_claim_is_released_when_it_expires_and_the_attempt_is_not_counted(ctx):
    task_id, run_id = claimed(ctx)  # hermes kanban claim: 15 minutes, no worker
    ttl = model.DEFAULT_CLAIM_TTL
    assert assess(ctx, run_id, NOW + ttl) is None
    verdict = assess(ctx, run_id, NOW + ttl + 1)
    assert verdict == Verdict(task_id, run_id, "release", Outcome.RECLAIMED,
                              f"claim {ctx.host}:4242 expired 1s ago with no worker")
    report = reclaim.run(ctx, now=NOW + ttl + 1)
    assert report.acted and report.details["verdicts"] == [verdict.as_dict()]
    task = queries.get_task(ctx.store.board, task_id)
    assert (task["status"], task["consecutive_failures"], task["current_run_id"]) == ("ready", 0, None)
    run = queries.list_runs(ctx.store.board, task_id=task_id)[0]
    assert (run["outcome"], run["error"], run["ended_at"]) == ("reclaimed", verdict.reason, NOW + ttl + 1)


def test_a_run_from_before_a_reboot_is_a_crash(ctx, dead):
    task_id, run_id = claimed(ctx)
    with_identity(ctx, task_id, run_id, shim=dead(), agent=dead(), boot="a-boot-long-ago")
    assert assess(ctx, run_id, NOW + 5) == Verdict(
        task_id, run_id, "fail", Outcome.CRASHED, "the host rebooted during the run", local=True)


def test_a_verdict_on_a_run_that_changed_meanwhile_changes_nothing(ctx, dead):
    task_id, run_id = claimed(ctx)
    with_identity(ctx, task_id, run_id, shim=dead(), agent=dead())
    verdict = assess(ctx, run_id, NOW + 5)
    board.complete(ctx.store.board, task_id, run_id=run_id, result="made it", now=NOW + 6)  # a late report
    assert reclaim.act(ctx, verdict, now=NOW + 7) is False
    assert queries.get_task(ctx.store.board, task_id)["status"] == "done"
    assert [r["outcome"] for r in queries.list_runs(ctx.store.board, task_id=task_id)] == ["completed"]


def test_the_dispatchers_quick_pass_only_closes_local_dead_runs(ctx, sleeper, dead):
    live = procs.describe(sleeper().pid)
    limit = ctx.settings["reclaim.max_runtime_seconds"]
    dead_task, dead_run = claimed(ctx)
    with_identity(ctx, dead_task, dead_run, shim=dead(), agent=dead())
    slow_task, slow_run = claimed(ctx)
    with_identity(ctx, slow_task, slow_run, shim=live, agent=live)
    _, remote_run = claimed(ctx, host="gb10-b")
    later = NOW + limit + 1000

    closed = reclaim.reclaim_local_dead(ctx, now=later)

    assert [(v.task_id, v.outcome) for v in closed] == [(dead_task, Outcome.CRASHED)]
    still_open = {r.id for r in reclaim.open_runs(ctx)}
    assert still_open == {slow_run, remote_run}  # a kill and another host: the reclaim job's work
    assert reclaim.open_runs(ctx, host=ctx.host)[0].id == slow_run


def test_dry_run_lists_the_verdicts_and_changes_nothing(ctx, dead, tmp_path):
    crashed_task, crashed_run = claimed(ctx)
    with_identity(ctx, crashed_task, crashed_run, shim=dead(), agent=dead())
    spawn_task = board.create_task(ctx.store.board, "never started", now=NOW - 10)
    spawn_run = board.claim_next(ctx.store.board, host=ctx.host, lock=f"{ctx.host}:999999",
                                 capacity=5, now=NOW).run_id
    bare_task, bare_run = claimed(ctx)

    def snapshot():
        with ctx.store.board.read() as conn:
            return (conn.execute(select(tasks).order_by(tasks.c.id)).all(),
                    conn.execute(select(task_runs).order_by(task_runs.c.id)).all(),
                    conn.execute(select(task_events).order_by(task_events.c.id)).all())

    before = snapshot()
    report = reclaim.run(ctx, now=NOW + 1000, dry_run=True)
    assert (report.summary, report.acted) == ("would reclaim 3 runs", False)
    assert [(v["task_id"], v["run_id"], v["action"], v["outcome"]) for v in report.details["verdicts"]] == [
        (crashed_task, crashed_run, "fail", "crashed"), (spawn_task, spawn_run, "fail", "spawn_failed"),
        (bare_task, bare_run, "release", "reclaimed")]
    assert snapshot() == before

    storage = {"SPARKOPS_STORAGE_BOARD_URL": ctx.settings["storage.board_url"],
               "SPARKOPS_STORAGE_OPS_URL": ctx.settings["storage.ops_url"]}
    cli = run_cli("reclaim", "--dry-run", cwd=tmp_path, env=storage)  # the real clock: these runs are months old
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.splitlines()
    assert lines[0] == "reclaim: ok: would reclaim 3 runs"
    assert lines[1].startswith(f"  {crashed_task} run {crashed_run}: crashed: shim pid ")
    assert lines[2].startswith(f"  {spawn_task} run {spawn_run}: spawn_failed: no worker recorded itself")
    assert lines[3].startswith(f"  {bare_task} run {bare_run}: reclaimed: claim {ctx.host}:4242 expired")
    assert snapshot() == before

    cli = run_cli("reclaim", cwd=tmp_path, env=storage)
    assert cli.returncode == 0 and cli.stdout.startswith("reclaim: ok: " + crashed_task), cli.stdout
    assert {queries.get_task(ctx.store.board, t)["status"] for t in (crashed_task, spawn_task, bare_task)} == {"ready"}
    assert reclaim.open_runs(ctx) == []
    assert_consistent(ctx.store.board)


def test_an_open_run_row_the_task_no_longer_points_at_is_closed(ctx):
    task_id, run_id = claimed(ctx)
    with ctx.store.board.write() as conn:  # an older tool moved the task on without closing its run
        conn.execute(update(tasks).where(tasks.c.id == task_id)
                     .values(status="ready", current_run_id=None, claim_lock=None))
    verdict = assess(ctx, run_id, NOW + 5)
    assert (verdict.action, verdict.reason) == ("close_orphan", "run row left open while the task moved on")
    reclaim.run(ctx, now=NOW + 5)
    assert reclaim.open_runs(ctx) == []


# -- (2) kill -9 ---------------------------------------------------------------------------


def test_kill_9_of_the_agents_group_is_booked_once_as_a_crash(engine):
    e = engine("30", "0")
    task_id = e.create("sleepy")
    e.dispatch()
    run, identity = e.wait_agent(task_id)

    os.killpg(identity.agent.pgid, signal.SIGKILL)

    closed = e.wait_closed(run["id"])
    assert (closed["outcome"], closed["status"]) == ("crashed", "crashed")
    assert closed["error"].startswith("agent killed by SIGKILL")
    e.wait_shims()
    for _ in range(2):  # the dispatcher's and the reclaimer's passes find nothing more to do
        assert not e.dispatch(claims=False).acted
        assert not e.reclaim().acted
    task = e.task(task_id)
    assert (task["status"], task["consecutive_failures"]) == ("ready", 1)
    assert "SIGKILL" in task["last_failure_error"]
    assert [r["outcome"] for r in e.runs(task_id)] == ["crashed"]
    assert len(e.events(task_id, "crashed")) == 1
    assert no_process_left(identity.shim, identity.agent)
    assert_consistent(e.db)


@pytest.mark.parametrize("closer", ["dispatcher", "reclaimer"])
def test_kill_9_of_the_shim_and_the_agent_together_is_booked_once(engine, closer):
    e = engine("30", "0")
    task_id = e.create("sleepy")
    e.dispatch()
    run, identity = e.wait_agent(task_id)

    os.killpg(identity.shim.pgid, signal.SIGKILL)
    os.killpg(identity.agent.pgid, signal.SIGKILL)
    wait_for(lambda: no_process_left(identity.shim, identity.agent), "both groups to die")

    if closer == "dispatcher":  # the runner: it reaps the shim it started
        assert e.dispatch(claims=False).acted
        reason = "worker shim killed by SIGKILL before closing the run"
    else:  # a reclaim pass in another process
        assert e.reclaim(ctx=e.other_ctx()).acted
        reason = f"shim pid {identity.shim.pid} and agent pid {identity.agent.pid} no longer running"
    closed = e.run(run["id"])
    assert closed["outcome"] == "crashed" and closed["error"].startswith(reason)
    for _ in range(2):  # whoever comes next finds it closed
        assert not e.dispatch(claims=False).acted
        assert not e.reclaim().acted
    assert len(e.ctx.shims) == 0
    task = e.task(task_id)
    assert (task["status"], task["consecutive_failures"]) == ("ready", 1)
    assert task["last_failure_error"].startswith(reason)
    assert [r["outcome"] for r in e.runs(task_id)] == ["crashed"]
    assert_consistent(e.db)


def test_leftovers_of_a_dead_shim_and_agent_are_stopped_by_the_reclaimer(engine):
    """kill -9 of the shim's and the agent's pids only: the agent's child lives on in
    its group. The reclaim job stops it, then books the crash."""
    e = engine("30", "0", "--child")
    task_id = e.create("builds things")
    e.dispatch()
    run, identity = e.wait_agent(task_id)
    child_file = e.workspace(task_id) / f"child-{run['id']}"
    child = int(wait_for(lambda: child_file.exists() and child_file.read_text(), "the agent's child"))

    os.kill(identity.shim.pid, signal.SIGKILL)
    os.kill(identity.agent.pid, signal.SIGKILL)
    wait_for(lambda: not procs.is_alive(identity.shim) and not procs.is_alive(identity.agent), "the kills")
    assert running(child) and procs.group_alive(identity.agent)
    assert not e.dispatch(claims=False).acted  # the runner reaps the shim; the group still runs
    assert reclaim.reclaim_local_dead(e.ctx) == []  # not the quick pass's job: it signals

    result = e.reclaim(ctx=e.other_ctx())

    assert result.acted
    closed = e.run(run["id"])
    assert closed["outcome"] == "crashed"
    assert closed["error"] == (f"shim and agent (pid {identity.agent.pid}) are gone; their leftover "
                               f"processes are stopped; agent: process group {identity.agent.pgid} "
                               "ended after SIGTERM")
    assert not running(child)
    assert no_process_left(identity.shim, identity.agent)
    assert_consistent(e.db)


# -- (3) kill -9 of the shim, the runner mid-dispatch, the reclaimer mid-reclaim -------------


def test_kill_9_of_the_shim_alone_leaves_the_claim_to_the_living_agent_which_reports(engine):
    e = engine("0", "report", "--wait-go")
    task_id = e.create("outlives its shim", priority=1)
    other = e.create("waits for the slot")
    e.dispatch()
    run, identity = e.wait_agent(task_id)

    os.kill(identity.shim.pid, signal.SIGKILL)
    wait_for(lambda: not procs.is_alive(identity.shim), "the shim to die")
    elsewhere = e.other_ctx()  # a pass of the reclaim job or a CLI dispatch: no shim tracker
    for _ in range(3):
        assert not e.dispatch().acted  # the runner reaps the dead shim and keeps the claim
        assert not e.reclaim(ctx=elsewhere).acted
        assert not e.dispatch(ctx=elsewhere).acted  # the slot is the living agent's
        assert e.task(other)["status"] == "ready"
        assert procs.is_alive(identity.agent) and e.run(run["id"])["ended_at"] is None
    assert len(e.ctx.shims) == 0  # reaped

    e.go(task_id, run["id"])  # the agent reports
    closed = e.wait_closed(run["id"])
    assert (closed["outcome"], e.task(task_id)["status"]) == ("completed", "done")
    assert e.task(task_id)["result"] == f"result of run {run['id']}"
    wait_for(lambda: not procs.is_alive(identity.agent), "the agent to exit")
    assert not e.reclaim(ctx=elsewhere).acted and not e.dispatch(claims=False).acted
    assert [r["outcome"] for r in e.runs(task_id)] == ["completed"]
    assert len(e.events(task_id, "completed")) == 1
    assert no_process_left(identity.shim, identity.agent)
    assert_consistent(e.db)


def test_kill_9_of_the_shim_alone_then_the_agent_exits_without_reporting(engine):
    e = engine("0", "3", "--wait-go")
    task_id = e.create("outlives its shim")
    e.dispatch()
    run, identity = e.wait_agent(task_id)

    os.kill(identity.shim.pid, signal.SIGKILL)
    wait_for(lambda: not procs.is_alive(identity.shim), "the shim to die")
    assert not e.dispatch(claims=False).acted  # the agent lives: its claim stands
    assert not e.reclaim().acted
    assert len(e.ctx.shims) == 0  # the dead shim was reaped all the same
    e.go(task_id, run["id"])  # the agent exits 3, and nobody is left to classify that
    wait_for(lambda: not procs.is_alive(identity.agent), "the agent to exit")

    result = e.dispatch(claims=False)  # the dispatcher's quick pass books it

    assert result.acted and result.details["reclaimed"] == [task_id]
    closed = e.run(run["id"])
    assert (closed["outcome"], closed["error"]) == (
        "crashed", f"shim pid {identity.shim.pid} and agent pid {identity.agent.pid} no longer running")
    assert (e.task(task_id)["status"], e.task(task_id)["consecutive_failures"]) == ("ready", 1)
    assert not e.reclaim().acted
    assert_consistent(e.db)


def test_a_dispatcher_killed_between_claim_and_shim_leaves_a_claim_that_runs_again_once(engine):
    """The runner died right after claim_next: a sparkops claim with no worker. It
    holds the slot through the spawn grace, is then booked spawn_failed, and the
    task runs again after its backoff, once."""
    e = engine("0.2", "report")
    task_id = e.create("unlucky")
    claimed_at = int(time.time()) - 1000
    change = board.claim_next(e.db, host=e.ctx.host, lock=f"{e.ctx.host}:999999", capacity=1,
                              workspace_root=str(e.settings["dispatch.workspace_root"]), now=claimed_at)
    grace = e.settings["reclaim.spawn_grace_seconds"]
    backoff = retry_policy(e.settings).backoff(1)

    assert not e.dispatch(now=claimed_at + grace).acted  # within the grace: the claim holds the slot
    result = e.dispatch(now=claimed_at + grace + 1)
    assert result.details["reclaimed"] == [task_id]
    assert e.run(change.run_id)["outcome"] == "spawn_failed"
    if backoff:
        assert result.details["started"] == []
        assert not e.dispatch(now=claimed_at + grace + backoff).acted
        result = e.dispatch(now=claimed_at + grace + 1 + backoff)
    assert result.details["started"] == [task_id]

    wait_for(lambda: e.task(task_id)["status"] == "done", "the second run to complete")
    runs = e.runs(task_id)
    assert [r["outcome"] for r in runs] == ["spawn_failed", "completed"]
    assert runs[1]["started_at"] == claimed_at + grace + 1 + backoff
    e.wait_shims()
    assert not e.dispatch().acted and not e.reclaim().acted
    assert len(e.events(task_id, "claimed")) == 2
    assert_consistent(e.db)


def test_kill_9_of_the_jobs_runner_mid_run_loses_nothing_and_runs_nothing_twice(engine, tmp_path):
    """A real jobs_runner.py starts a shim and is killed -9; the shim (in its own
    session) lives on and its agent reports. A new runner leaves that run alone,
    keeps the slot for it, and dispatches the next task only when it is done."""
    e = engine("0", "report", "--wait-go", SPARKOPS_DISPATCH_INTERVAL_SECONDS="0.2")
    first = e.create("first", priority=1)
    second = e.create("second")

    def start_runner(name: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.out", "wb") as out:
            return subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def runner_beat(proc: subprocess.Popen) -> bool:
        with e.store.ops.read() as conn:
            return conn.execute(select(ops_hosts.c.pid)).scalar() == proc.pid

    runners = [start_runner("runner1")]
    try:
        run, identity = e.wait_agent(first)
        runners[0].kill()
        assert runners[0].wait(timeout=10) == -signal.SIGKILL
        assert procs.is_alive(identity.shim)
        runners.append(start_runner("runner2"))
        wait_for(lambda: runner_beat(runners[1]), "the new runner to start")
        time.sleep(5 * 0.2)  # five of its dispatch ticks
        assert e.task(second)["status"] == "ready"  # the slot is the first run's
        assert [r["id"] for r in queries.list_runs(e.db, active_only=True)] == [run["id"]]

        e.go(first, run["id"])
        wait_for(lambda: e.task(first)["status"] == "done", "the first task to be done")
        second_run, _ = e.wait_agent(second)
        e.go(second, second_run["id"])
        wait_for(lambda: e.task(second)["status"] == "done", "the second task to be done")
        runners[1].send_signal(signal.SIGTERM)
        assert runners[1].wait(timeout=30) == 0, (tmp_path / "runner2.out").read_text()
    finally:
        for runner in runners:
            if runner.poll() is None:
                runner.kill()
                runner.wait()

    first_runs, second_runs = e.runs(first), e.runs(second)
    assert [(r["id"], r["outcome"]) for r in first_runs] == [(run["id"], "completed")]
    assert [r["outcome"] for r in second_runs] == ["completed"]
    assert second_runs[0]["started_at"] >= first_runs[0]["ended_at"]  # one slot, never two runs
    assert e.task(first)["result"] == f"result of run {run['id']}"
    assert_consistent(e.db)


RECLAIMER = textwrap.dedent("""
    import sys
    from sparkops.config import load_settings
    from sparkops.jobs.framework import JobContext
    from sparkops.runner.registry import run_job
    from sparkops.storage.store import open_store
    settings = load_settings()
    run_job(JobContext.create(settings, open_store(settings)), "reclaim", now=float(sys.argv[1]))
""")


def test_kill_9_of_the_reclaimer_mid_reclaim_is_finished_by_the_next_pass(engine, tmp_path):
    """A reclaim pass (a real process) stops an overdue run: it kills the shim, sends
    the agent SIGTERM, which it ignores, and is killed -9 during the grace. The
    next pass gets the lock, finishes the job and books the run once."""
    e = engine("60", "0", "--ignore-term")
    task_id = e.create("overdue", max_runtime_seconds=600)
    e.dispatch()
    run, identity = e.wait_agent(task_id)
    overdue = run["started_at"] + 600 + TIMEOUT_MARGIN_SECONDS + 1

    reclaimer = subprocess.Popen([sys.executable, "-c", RECLAIMER, str(overdue)], cwd=tmp_path,
                                 env={**os.environ, "SPARKOPS_RECLAIM_TERM_GRACE_SECONDS": "60"},
                                 stdin=subprocess.DEVNULL)
    try:
        sigterm = e.workspace(task_id) / f"sigterm-{run['id']}"
        wait_for(sigterm.exists, "the reclaimer to send the agent SIGTERM")
    finally:
        reclaimer.kill()
        reclaimer.wait()
    assert not procs.is_alive(identity.shim)  # it went first
    assert procs.is_alive(identity.agent)
    assert e.run(run["id"])["ended_at"] is None  # killed before it could book

    result = e.reclaim(now=overdue, ctx=e.other_ctx(SPARKOPS_RECLAIM_TERM_GRACE_SECONDS="0.3"))

    assert result.acted
    closed = e.run(run["id"])
    assert closed["outcome"] == "timed_out"
    assert closed["error"] == (f"ran {overdue - run['started_at']}s, past its max runtime of 600s; "
                               f"agent: process group {identity.agent.pgid} killed (SIGKILL after 0.3s)")
    assert no_process_left(identity.shim, identity.agent)
    assert not e.reclaim(now=overdue).acted
    assert not e.dispatch(claims=False).acted  # reaps the killed shim: nothing more is booked
    assert len(e.ctx.shims) == 0
    assert [r["outcome"] for r in e.runs(task_id)] == ["timed_out"]
    assert (e.task(task_id)["status"], e.task(task_id)["consecutive_failures"]) == ("ready", 1)
    assert_consistent(e.db)


# -- (4) slow but alive; over its time ------------------------------------------------------


def test_a_slow_worker_that_heartbeats_is_never_reclaimed(engine):
    e = engine("3", "report", SPARKOPS_RECLAIM_HEARTBEAT_TIMEOUT_SECONDS="1")
    task_id = e.create("slow")
    e.dispatch()
    run, identity = e.wait_agent(task_id)
    beats = set()
    deadline = time.monotonic() + 30
    while e.run(run["id"])["ended_at"] is None:
        assert time.monotonic() < deadline, "the slow agent never finished"
        beats.add(e.run(run["id"])["last_heartbeat_at"])
        assert not e.reclaim().acted
        # a minute without a heartbeat would be death for another host's run; a local
        # run is judged by its processes
        assert reclaim.run(e.ctx, now=time.time() + 60, dry_run=True).details["verdicts"] == []
        e.dispatch()
        time.sleep(0.2)

    assert len(beats) >= 2  # it was heartbeating
    assert [r["outcome"] for r in e.runs(task_id)] == ["completed"]
    assert e.task(task_id)["status"] == "done"
    e.wait_shims()
    assert no_process_left(identity.shim, identity.agent)
    assert_consistent(e.db)


def test_the_shim_stops_an_agent_past_its_max_runtime_and_books_timed_out(engine):
    e = engine("30", "0", SPARKOPS_RECLAIM_TERM_GRACE_SECONDS="0.5")
    task_id = e.create("endless", max_runtime_seconds=1)
    e.dispatch()
    run, identity = e.wait_agent(task_id, active_only=False)  # it may be over before we look

    closed = e.wait_closed(run["id"], timeout=15)

    assert closed["outcome"] == "timed_out"
    assert closed["error"] == (f"ran longer than its max runtime of 1s; process group "
                               f"{identity.agent.pgid} ended after SIGTERM")
    assert no_process_left(identity.agent)
    assert (e.task(task_id)["status"], e.task(task_id)["consecutive_failures"]) == ("ready", 1)
    assert not e.reclaim().acted
    assert_consistent(e.db)


def test_the_reclaimer_stops_an_overdue_run_whose_shim_is_stopped(engine):
    """The shim is SIGSTOPped, so only the reclaimer can act. Past the max runtime
    and the margin it kills the stopped shim and the agent (which ignores SIGTERM)
    and books timed_out."""
    e = engine("60", "0", "--ignore-term", SPARKOPS_RECLAIM_TERM_GRACE_SECONDS="0.3")
    task_id = e.create("endless", max_runtime_seconds=300)
    e.dispatch()
    run, identity = e.wait_agent(task_id)
    os.kill(identity.shim.pid, signal.SIGSTOP)
    wait_for(lambda: stopped(identity.shim.pid), "the shim to stop")
    deadline = run["started_at"] + 300 + TIMEOUT_MARGIN_SECONDS

    assert not e.reclaim(now=deadline).acted  # the margin: the shim's turn
    result = e.reclaim(now=deadline + 1)

    assert result.acted
    closed = e.run(run["id"])
    assert closed["outcome"] == "timed_out"
    # (whether SIGTERM ends a stopped process at once or only SIGKILL does depends on the kernel)
    assert re.fullmatch(
        f"ran 331s, past its max runtime of 300s; "
        f"shim: process group {identity.shim.pgid} (ended after SIGTERM|killed \\(SIGKILL after 0.3s\\)); "
        f"agent: process group {identity.agent.pgid} killed \\(SIGKILL after 0.3s\\)", closed["error"])
    assert (e.workspace(task_id) / f"sigterm-{run['id']}").exists()
    assert no_process_left(identity.shim, identity.agent)
    e.wait_shims()
    assert [r["outcome"] for r in e.runs(task_id)] == ["timed_out"]
    assert_consistent(e.db)


# -- (5) fencing ----------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["operator", "another-host"])
def test_a_stopped_worker_that_resumes_after_its_run_was_reclaimed_changes_nothing(engine, route):
    """Fencing. The worker (shim and agent) is stopped with SIGSTOP and its run is
    reclaimed. While the old agent lives (stopped is alive) its task does not run
    again on this host: never two agents in one workspace. The old agent resumes:
    its ``task complete --run OLD`` is refused; its shim resumes, finds its run
    closed, stops the agent and books nothing. Then a new run completes the task.

    Why these routes: on its own host a stopped worker is alive by its process
    identity, and the reclaimer rightly never releases a live worker's claim; at
    its max runtime it would kill it, and a killed worker cannot resume. A live but
    silent worker's run is reclaimed in two honest ways: by an operator who
    believes it dead (``board.reclaim``), or by the reclaimer of another host,
    which sees only heartbeats, and a stopped shim stops heartbeating."""
    e = engine("0", "report", "--wait-go", SPARKOPS_HOST_NAME="gb10-a")
    task_id = e.create("fenced")
    e.dispatch()
    old, identity = e.wait_agent(task_id)
    os.killpg(identity.agent.pgid, signal.SIGSTOP)
    os.kill(identity.shim.pid, signal.SIGSTOP)
    wait_for(lambda: stopped(identity.agent.pid) and stopped(identity.shim.pid), "the worker to stop")

    if route == "operator":
        board.reclaim(e.db, task_id, run_id=old["id"], reason="operator: worker hung, presumed dead")
    else:
        beat = e.run(old["id"])["last_heartbeat_at"]
        later = beat + 5 + 1
        assert not e.reclaim(now=later).acted  # its own host: the stopped worker is alive
        other_host = e.other_ctx(SPARKOPS_HOST_NAME="gb10-b", SPARKOPS_RECLAIM_HEARTBEAT_TIMEOUT_SECONDS="5")
        assert e.reclaim(now=later, ctx=other_host).acted
        assert e.run(old["id"])["error"] == "no heartbeat from host gb10-a for 6s"
    reclaimed = e.run(old["id"])
    assert reclaimed["ended_at"] is not None
    after_backoff = reclaimed["ended_at"] + e.settings["dispatch.retry_backoff_seconds"]
    assert not e.dispatch(now=after_backoff).details.get("started")  # the old agent still lives
    events_before = e.events(task_id)

    e.go(task_id, old["id"])
    os.killpg(identity.agent.pgid, signal.SIGCONT)  # the old agent resumes and reports
    report = e.workspace(task_id) / f"report-{old['id']}"
    wait_for(report.exists, "the old agent's report")
    code, _, output = report.read_text().partition("\n")
    assert code == "1"
    assert f"run {old['id']} is not the current run of {task_id}" in output
    assert "nothing was changed" in output
    os.kill(identity.shim.pid, signal.SIGCONT)  # then its shim
    wait_for(lambda: not procs.is_alive(identity.shim), "the old shim to exit", timeout=15)
    assert e.run(old["id"]) == reclaimed
    assert e.events(task_id) == events_before  # the old worker changed nothing
    e.wait_shims()
    assert no_process_left(identity.shim, identity.agent)

    result = e.dispatch(now=after_backoff)
    assert result.details["started"] == [task_id]
    started, _ = e.wait_agent(task_id)
    e.go(task_id, started["id"])
    wait_for(lambda: e.task(task_id)["status"] == "done", "the new run to complete")
    new = e.runs(task_id)[-1]
    assert new["id"] != old["id"] and new["outcome"] == "completed"
    task = e.task(task_id)
    assert (task["status"], task["result"]) == ("done", f"result of run {new['id']}")
    e.wait_shims()
    assert_consistent(e.db)


def test_the_shim_stops_the_agent_of_a_run_reclaimed_under_it(engine):
    """A run that lost its claim must not keep working: at its next heartbeat the
    shim finds the run closed by someone else and stops the agent, booking nothing."""
    e = engine("30", "0")
    task_id = e.create("reclaimed under its worker")
    e.dispatch()
    run, identity = e.wait_agent(task_id)
    board.reclaim(e.db, task_id, run_id=run["id"], reason="operator: presumed dead")
    wait_for(lambda: not procs.is_alive(identity.agent), "the shim to stop the agent", timeout=10)
    wait_for(lambda: not procs.is_alive(identity.shim), "the shim to exit", timeout=10)
    assert no_process_left(identity.shim, identity.agent)
    assert [(r["outcome"], r["error"]) for r in e.runs(task_id)] == [("reclaimed", "operator: presumed dead")]
    assert_consistent(e.db)


# -- (6) PID reuse --------------------------------------------------------------------------


STRANGER = textwrap.dedent("""
    import pathlib, signal, sys, time
    def noted(signum, frame):
        pathlib.Path(sys.argv[1] + ".sigterm").touch()
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, noted)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(120)
""")


def test_a_dead_workers_pid_taken_by_another_process_is_dead_and_that_process_is_never_signalled(
        ctx, dead, tmp_path):
    """The worker's processes died and its agent's pid now belongs to an unrelated
    process (recorded the way a reuse looks: that pid with the dead agent's start
    time). The run is booked crashed, even past its max runtime, and the stranger
    is never signalled."""
    shim, agent = dead(), dead()
    # A pid comes round again only after the kernel has handed out all the others,
    # never within START_TOLERANCE of the first start: keep the two starts apart.
    time.sleep(2 * procs.START_TOLERANCE)
    marker = tmp_path / "stranger"
    stranger = subprocess.Popen([sys.executable, "-c", STRANGER, str(marker)], start_new_session=True,
                                stdin=subprocess.DEVNULL)
    try:
        wait_for(marker.exists, "the stranger to be ready")
        reused = Proc(pid=stranger.pid, start=agent.start, pgid=stranger.pid)
        task_id, run_id = claimed(ctx)
        with_identity(ctx, task_id, run_id, shim=shim, agent=reused)
        far_later = NOW + ctx.settings["reclaim.max_runtime_seconds"] + 10_000

        report = reclaim.run(ctx, now=far_later)

        assert report.acted
        run = queries.list_runs(ctx.store.board, task_id=task_id)[0]
        assert (run["outcome"], run["error"]) == (
            "crashed", f"shim pid {shim.pid} and agent pid {stranger.pid} no longer running")
        time.sleep(0.2)  # a signal, had one been sent, would have been handled by now
        assert running(stranger.pid)
        assert not Path(f"{marker}.sigterm").exists()
    finally:
        stranger.terminate()  # the control: it does note a SIGTERM
        assert stranger.wait(timeout=10) == 0
    assert Path(f"{marker}.sigterm").exists()


# -- (7) poison pill ------------------------------------------------------------------------


def test_a_task_that_crashes_every_time_is_blocked_after_the_failure_limit_with_growing_backoff(engine):
    e = engine("0", "crash", SPARKOPS_DISPATCH_FAILURE_LIMIT="4", SPARKOPS_DISPATCH_RETRY_BACKOFF_SECONDS="10")
    policy = retry_policy(e.settings)
    waits = [policy.backoff(failures) for failures in (1, 2, 3)]
    assert waits[2] > waits[1] > 0  # it grows (see RetryPolicy.backoff for the first one)
    task_id = e.create("poison pill")
    now = time.time()
    for attempt in (1, 2, 3, 4):
        result = e.dispatch(now=now)
        assert result.details["started"] == [task_id], (attempt, result)
        run = e.wait_closed(e.runs(task_id)[-1]["id"])
        e.wait_shims()  # its slot is free once its shim has stopped what was left (as SIGCHLD tells the runner)
        assert run["outcome"] == "crashed"
        assert e.task(task_id)["consecutive_failures"] == attempt
        if attempt < 4:
            assert e.task(task_id)["status"] == "ready"
            wait = waits[attempt - 1]
            if wait:
                assert not e.dispatch(now=run["ended_at"] + wait - 1).acted  # still backing off
            now = run["ended_at"] + wait

    runs = e.runs(task_id)
    assert [r["started_at"] - prev["ended_at"] for prev, r in itertools.pairwise(runs)] == waits
    assert [r["outcome"] for r in runs] == ["crashed"] * 4
    task = e.task(task_id)
    assert (task["status"], task["consecutive_failures"]) == ("blocked", 4)
    assert task["last_failure_error"].startswith("agent exit 1: ")
    assert CRASH_REASON in task["last_failure_error"]
    gave_up = e.events(task_id, "gave_up")
    assert len(gave_up) == 1 and gave_up[0]["run_id"] == runs[-1]["id"]
    assert gave_up[0]["payload"]["failures"] == 4 and gave_up[0]["payload"]["effective_limit"] == 4
    assert CRASH_REASON in gave_up[0]["payload"]["error"]
    e.wait_shims()
    assert not e.dispatch(now=now + 10_000).acted  # blocked: never claimed again
    assert_consistent(e.db)

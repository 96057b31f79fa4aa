"""The dispatcher: ``board.claim_next`` (order, dependencies, capacity, backoff), 8
real processes claiming 1,000 tasks, the ``dispatch`` job starting real worker
shims and agents, and hermes mode with the real ``hermes`` CLI.

The clock is passed in and failed runs are backdated with ``board.fail(now=...)``;
process events are polled with a deadline.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NOW, gone, make_settings, wait_for
from sqlalchemy import func, insert, select

from sparkops.board import model, queries, runs
from sparkops.board import transitions as board
from sparkops.board.model import Outcome, RetryPolicy
from sparkops.config import load_settings
from sparkops.core import procs
from sparkops.core.errors import ConfigError
from sparkops.core.procs import RunIdentity
from sparkops.engine import runlog
from sparkops.engine.dispatch import ShimTracker, dispatch_hermes
from sparkops.jobs.framework import JobContext, JobRun
from sparkops.runner.registry import run_job
from sparkops.storage.schema import task_events, task_runs, tasks
from sparkops.storage.store import open_store

HOUR = 3600
#: Event kinds that close a run (they follow the run's ``claimed`` event).
CLOSING = {"completed", "blocked", "reclaimed", *(str(o) for o in model.FAILURE_OUTCOMES)}


def claim(db, host: str = "h", *, capacity: int = 10, now: float = NOW, **kwargs) -> model.Change | None:
    return board.claim_next(db, host=host, lock=f"{host}:1", capacity=capacity, now=now, **kwargs)


def max_open_runs(db) -> int:
    """The most runs open at once, read from the event log: walk it in id order,
    +1 on ``claimed``, -1 on an event that closes a run."""
    with db.read() as conn:
        events = conn.execute(select(task_events.c.kind, task_events.c.run_id).order_by(task_events.c.id)).all()
    level = peak = 0
    for kind, run_id in events:
        if kind == "claimed":
            level += 1
            peak = max(peak, level)
        elif kind in CLOSING and run_id is not None:  # a breaker's "blocked" closes no run
            level -= 1
        assert level >= 0, "a run closed that was never claimed"
    return peak


# -- claim_next --------------------------------------------------------------------------


def test_claim_next_takes_priority_then_age(store):
    db = store.board
    old_low = board.create_task(db, "old, low", priority=0, now=NOW - 300)
    new_high = board.create_task(db, "new, high", priority=5, now=NOW - 10)
    old_high = board.create_task(db, "old, high", priority=5, now=NOW - 200)
    middle = board.create_task(db, "middle", priority=1, now=NOW - 100)

    order = [claim(db).task_id for _ in range(4)]

    assert order == [old_high, new_high, middle, old_low]
    assert claim(db) is None  # nothing left to claim


def test_claim_next_waits_for_parents(store):
    db = store.board
    parent = board.create_task(db, "parent", priority=0, now=NOW - 100)
    child = board.create_task(db, "child", priority=9, parents=[parent], now=NOW - 50)
    # forced to ready while its parent is unfinished (or made ready by another tool)
    forced = board.create_task(db, "forced", priority=9, parents=[parent], now=NOW - 40)
    board.promote(db, forced, force=True, now=NOW - 30)
    assert queries.get_task(db, forced)["status"] == "ready"

    first = claim(db)
    assert first.task_id == parent  # the higher-priority children wait for it
    assert claim(db) is None
    board.complete(db, parent, run_id=first.run_id, now=NOW + 1)

    assert [claim(db, now=NOW + 2).task_id for _ in range(2)] == [child, forced]


def test_capacity_counts_this_hosts_open_runs_only(store):
    db = store.board
    ids = [board.create_task(db, f"task {i}", now=NOW + i) for i in range(7)]
    # Runs of other hosts, two with names that a careless LIKE would take for "h_1".
    for lock in ("h_10:7", "hx1:7", "other:7"):
        assert board.claim_next(db, host=lock.split(":")[0], lock=lock, capacity=5, now=NOW)

    a = board.claim_next(db, host="h_1", lock="h_1:100", capacity=2, now=NOW)
    b = board.claim_next(db, host="h_1", lock="h_1:200", capacity=2, now=NOW)  # another dispatcher
    assert a and b
    assert board.claim_next(db, host="h_1", lock="h_1:300", capacity=2, now=NOW) is None
    assert runs.count_open_runs(db, "h_1") == 2
    assert runs.count_open_runs(db, "h_10") == 1 and runs.count_open_runs(db, "hx1") == 1

    # Counted from live runs: closing one, however it ends, frees its slot.
    board.complete(db, a.task_id, run_id=a.run_id, now=NOW + 1)
    c = board.claim_next(db, host="h_1", lock="h_1:100", capacity=2, now=NOW + 1)
    assert c is not None
    board.fail(db, b.task_id, run_id=b.run_id, outcome=Outcome.SPAWN_FAILED, error="x",
               failure_limit=5, now=NOW + 2)
    assert board.claim_next(db, host="h_1", lock="h_1:100", capacity=2, now=NOW + 2) is not None
    assert runs.count_open_runs(db, "h_1") == 2
    assert {r["task_id"] for r in queries.list_runs(db, active_only=True)} <= set(ids)


def test_retry_backoff_grows_with_consecutive_failures_up_to_the_max(store):
    db = store.board
    policy = RetryPolicy(backoff_seconds=30, backoff_max_seconds=100, rate_limit_cooldown_seconds=300)
    task_id = board.create_task(db, "flaky", priority=5, now=NOW)
    change = claim(db, policy=policy)
    at = NOW + 10
    # The first retry is immediate (a lone crash should not idle the slot), then
    # base, 2x base, ... up to the maximum.
    for failures, wait in ((1, 0), (2, 30), (3, 60), (4, 100), (5, 100)):
        board.fail(db, task_id, run_id=change.run_id, outcome=Outcome.CRASHED, error="boom",
                   failure_limit=10, now=at)
        assert queries.get_task(db, task_id)["consecutive_failures"] == failures
        if wait:
            assert claim(db, policy=policy, now=at + wait - 1) is None, f"claimed before {wait}s"
        change = claim(db, policy=policy, now=at + wait)
        assert change is not None and change.task_id == task_id
        at += wait + 10
    assert [policy.backoff(n) for n in range(7)] == [0, 0, 30, 60, 100, 100, 100]


def test_a_task_in_backoff_does_not_hold_back_other_work(store):
    db = store.board
    flaky = board.create_task(db, "flaky", priority=9, now=NOW)
    steady = board.create_task(db, "steady", priority=0, now=NOW)
    for at in (NOW + 1, NOW + 2):  # two failures in a row: a 30 s backoff
        change = claim(db, now=at - 1)
        assert change.task_id == flaky
        board.fail(db, flaky, run_id=change.run_id, outcome=Outcome.TIMED_OUT, error="slow",
                   failure_limit=5, now=at)
    assert claim(db, now=NOW + 3).task_id == steady
    assert claim(db, now=NOW + 3) is None  # flaky waits out its 30 s
    assert claim(db, now=NOW + 32).task_id == flaky


def test_rate_limit_waits_the_cooldown_and_is_not_counted(store):
    db = store.board
    policy = RetryPolicy(backoff_seconds=30, backoff_max_seconds=1800, rate_limit_cooldown_seconds=300)
    task_id = board.create_task(db, "busy model", now=NOW)
    change = claim(db, policy=policy)
    board.fail(db, task_id, run_id=change.run_id, outcome=Outcome.CRASHED, error="boom",
               failure_limit=5, now=NOW + 1)
    change = claim(db, policy=policy, now=NOW + 1)  # the first retry is immediate
    board.fail(db, task_id, run_id=change.run_id, outcome=Outcome.RATE_LIMITED, error="429",
               failure_limit=5, now=NOW + 40)

    task = queries.get_task(db, task_id)
    assert task["consecutive_failures"] == 1  # unchanged by the rate limit
    assert task["last_failure_error"] == "boom"
    assert claim(db, policy=policy, now=NOW + 40 + 299) is None
    assert claim(db, policy=policy, now=NOW + 40 + 300).task_id == task_id


def test_claim_sets_workspace_and_marks_the_run_as_ours(store, tmp_path):
    db = store.board
    task_id = board.create_task(db, "t", now=NOW)
    bare = board.create_task(db, "no workspace root", now=NOW + 1)
    change = board.claim_next(db, host="gpu1", lock="gpu1:42", capacity=5, ttl_seconds=600,
                              workspace_root=f"{tmp_path}/ws/", now=NOW)

    detail = queries.task_detail(db, task_id)
    assert detail["task"]["workspace_path"] == f"{tmp_path}/ws/{task_id}"
    assert (detail["task"]["status"], detail["task"]["claim_lock"]) == ("running", "gpu1:42")
    [run] = detail["runs"]
    assert run["id"] == change.run_id and run["metadata"] == {"claimed_by": "sparkops", "host": "gpu1"}
    assert (run["claim_lock"], run["claim_expires"], run["started_at"]) == ("gpu1:42", NOW + 600, NOW)
    assert detail["events"][-1]["kind"] == "claimed"

    board.claim_next(db, host="gpu1", lock="gpu1:42", capacity=5, now=NOW)
    assert queries.get_task(db, bare)["workspace_path"] is None


# -- scenario 1: 8 processes, 1,000 tasks ------------------------------------------------------

CLAIMERS = 8
CAPACITY = 4
TASKS = 1000


def _claim_and_complete(url: str, worker: int, barrier, results) -> None:
    """Child process: claim and complete until no ready task is left; report back
    how many it did and every exception it saw."""
    from sparkops.storage.db import Database

    db = Database(url, role="board")
    done, full, errors = 0, 0, []
    try:
        barrier.wait(timeout=60)
        while True:
            change = board.claim_next(db, host="h", lock=f"h:{worker}", capacity=CAPACITY, now=NOW + 10)
            if change is None:
                with db.read() as conn:
                    left = conn.execute(select(func.count()).select_from(tasks)
                                        .where(tasks.c.status == "ready")).scalar()
                if not left:
                    break
                full += 1
                time.sleep(0.002)  # at capacity: a tiny back-off
                continue
            board.complete(db, change.task_id, run_id=change.run_id, now=NOW + 11)
            done += 1
    except Exception as exc:  # noqa: BLE001 - every exception goes back to the test
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        db.dispose()
    results.put((worker, done, full, errors))


def test_eight_processes_claim_1000_tasks_each_exactly_once_within_capacity(store, settings):
    db = store.board
    rows = [{"id": f"t_{i:08x}", "title": f"task {i}", "status": "ready", "priority": i % 3,
             "created_at": NOW - TASKS + (i * 7919) % TASKS, "workspace_kind": "scratch"}
            for i in range(TASKS)]
    with db.write() as conn:
        conn.execute(insert(tasks), rows)

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(CLAIMERS), ctx.Queue()
    workers = [ctx.Process(target=_claim_and_complete,
                           args=(settings["storage.board_url"], i, barrier, results))
               for i in range(CLAIMERS)]
    for w in workers:
        w.start()
    reports = [results.get(timeout=240) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0

    assert [r[3] for r in reports] == [[]] * CLAIMERS  # no exception, "database is locked" included
    assert sum(r[1] for r in reports) == TASKS
    with db.read() as conn:
        statuses = dict(conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status)).all())
        runs_per_task = conn.execute(select(task_runs.c.task_id, func.count())
                                     .group_by(task_runs.c.task_id)).all()
        claimed = conn.execute(select(task_events.c.task_id).where(task_events.c.kind == "claimed")
                               .order_by(task_events.c.id)).scalars().all()
    assert statuses == {"done": TASKS}
    assert len(runs_per_task) == TASKS and {n for _, n in runs_per_task} == {1}
    assert len(claimed) == len(set(claimed)) == TASKS
    peak = max_open_runs(db)
    assert peak <= CAPACITY
    # Claims are serialized and each takes the best ready task: the claim order is
    # exactly priority, then age, then id.
    best_first = sorted(rows, key=lambda r: (-r["priority"], r["created_at"], r["id"]))
    assert claimed == [r["id"] for r in best_first]


def _claim_once(url: str, worker: int, barrier, results) -> None:
    """Child process: wait for the others, then try one claim."""
    from sparkops.storage.db import Database

    db = Database(url, role="board")
    try:
        barrier.wait(timeout=60)
        change = board.claim_next(db, host="h", lock=f"h:{worker}", capacity=CAPACITY, now=NOW + 10)
        results.put((worker, change.task_id if change else None, None))
    except Exception as exc:  # noqa: BLE001 - every exception goes back to the test
        results.put((worker, None, f"{type(exc).__name__}: {exc}"))
    finally:
        db.dispose()


def test_eight_dispatchers_racing_for_the_last_free_slot_fill_only_that_slot(store, settings):
    db = store.board
    ids = [board.create_task(db, f"task {i}", now=NOW + i) for i in range(12)]
    for _ in range(CAPACITY - 1):  # the host has one free slot left
        assert board.claim_next(db, host="h", lock="h:busy", capacity=CAPACITY, now=NOW)

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(CLAIMERS), ctx.Queue()
    workers = [ctx.Process(target=_claim_once, args=(settings["storage.board_url"], i, barrier, results))
               for i in range(CLAIMERS)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)

    assert [o[2] for o in outcomes if o[2]] == []
    assert len([o for o in outcomes if o[1]]) == 1
    assert runs.count_open_runs(db, "h") == CAPACITY
    assert sum(1 for t in ids if queries.get_task(db, t)["status"] == "running") == CAPACITY


# -- the dispatch job --------------------------------------------------------------------------


def py(*code: str) -> list[str]:
    """An agent argv running ``code`` with the shim's Python (braces doubled: the
    argv is a template where ``{name}`` is a placeholder)."""
    source = "\n".join(textwrap.dedent(c).strip("\n") for c in code)
    return ["{python}", "-c", source.replace("{", "{{").replace("}", "}}")]


REPORTS = py("""
    import os, subprocess, sys, time
    time.sleep(0.2)
    sys.exit(subprocess.run([sys.executable, "-m", "sparkops", "task", "complete",
                             os.environ["SPARKOPS_TASK_ID"], "--run", os.environ["SPARKOPS_RUN_ID"],
                             "--summary", "done by the test agent"]).returncode)
""")
SLEEPS = py("import time", 'print("sleeping", flush=True)', "time.sleep(60)")
DEMO_AGENT = ["{python}", "-m", "sparkops", "demo-agent", "--min-seconds", "0", "--max-seconds", "0.1"]






class Engine:
    """Settings from the environment, as the runner reads them (the shims it
    starts inherit that environment), a fresh board (SQLite or PostgreSQL, the
    test's ``backend``) and a ShimTracker."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, Any],
                 storage: dict[str, str]):
        values = {
            **storage,
            "SPARKOPS_DISPATCH_WORKSPACE_ROOT": str(tmp_path / "workspaces"),
            "SPARKOPS_DISPATCH_RUN_LOG_ROOT": str(tmp_path / "logs"),
            "SPARKOPS_DISPATCH_HEARTBEAT_SECONDS": "0.5",
            "SPARKOPS_RECLAIM_TERM_GRACE_SECONDS": "2",
            **env,
        }
        for name, value in values.items():
            monkeypatch.setenv(name, value if isinstance(value, str) else json.dumps(value))
        self.settings = load_settings(cwd=tmp_path)
        self.store = open_store(self.settings, create=True)
        self.db = self.store.board
        self.ctx = JobContext.create(self.settings, self.store, shims=ShimTracker())
        self.open_counts: list[int] = []

    def tick(self) -> JobRun:
        result = run_job(self.ctx, "dispatch")
        assert result.outcome == "ok", result.error
        self.open_counts.append(runs.count_open_runs(self.db, self.ctx.host))
        return result

    def tick_until(self, done: Callable[[], Any], what: str, timeout: float = 60.0) -> list[JobRun]:
        deadline = time.monotonic() + timeout
        ticks = []
        while True:
            ticks.append(self.tick())
            if done():
                return ticks
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; last tick: "
                                     f"{ticks[-1].summary}")
            time.sleep(0.05)

    def statuses(self) -> dict[str, str]:
        return {t["id"]: t["status"] for t in queries.list_tasks(self.db)}

    def identity(self, run_id: int) -> RunIdentity | None:
        with self.db.read() as conn:
            raw = conn.execute(select(task_runs.c.metadata).where(task_runs.c.id == run_id)).scalar()
        return RunIdentity.from_metadata(json.loads(raw) if raw else None)

    def close(self) -> None:
        """Stop what a failed test left running (agents by their recorded group,
        then the shims this test started), then reap."""
        for run in queries.list_runs(self.db, active_only=True):
            ident = self.identity(run["id"])
            if ident and ident.agent and procs.group_alive(ident.agent):
                os.killpg(ident.agent.pgid, signal.SIGKILL)
        for proc, *_ in list(self.ctx.shims._running.values()):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        self.ctx.shims.stop_standby()
        self.store.dispose()


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           storage_env: dict[str, str]) -> Iterator[Callable[..., Engine]]:
    """Make an :class:`Engine` with these ``SPARKOPS_*`` settings. Nothing of the
    test process's own environment leaks in, PYTHONPATH included: the shim must
    find SparkOps by itself."""
    for name in list(os.environ):
        if name.startswith(("SPARKOPS_", "HERMES_")) or name == "PYTHONPATH":
            monkeypatch.delenv(name)
    made: list[Engine] = []

    def make(**env: Any) -> Engine:
        made.append(Engine(tmp_path, monkeypatch, env, storage_env))
        return made[-1]

    yield make
    for e in made:
        e.close()


def test_dispatch_runs_ready_tasks_to_done_within_capacity(engine):
    e = engine(SPARKOPS_DISPATCH_AGENT_ARGV=DEMO_AGENT, SPARKOPS_DISPATCH_MAX_IN_PROGRESS="2")
    ids = [board.create_task(e.db, f"task {i}", body="Write a haiku about queues.") for i in range(5)]

    ticks = e.tick_until(lambda: set(e.statuses().values()) == {"done"}, "every task to be done")

    assert max(e.open_counts) <= 2
    assert max_open_runs(e.db) == 2  # capacity was used, never exceeded
    started = [t for tick in ticks for t in tick.details.get("started", [])]
    assert sorted(started) == sorted(ids)
    for task_id in ids:
        [run] = queries.task_detail(e.db, task_id)["runs"]
        assert run["outcome"] == "completed" and run["metadata"]["agent"] == "sparkops demo-agent"
        shim = run["metadata"]["process"]["shim"]
        assert shim["pgid"] == shim["pid"]  # the shim runs in its own session
        assert (Path(e.settings["dispatch.workspace_root"]) / task_id / "RESULT.md").exists()
    # Exited shims are reaped at the next ticks, so none lingers as a zombie.
    e.tick_until(lambda: len(e.ctx.shims) == 0, "the shims to be reaped", timeout=15)


def test_dispatch_without_an_agent_claims_nothing_and_says_so(engine):
    e = engine()  # dispatch.agent_argv is empty by default
    task_id = board.create_task(e.db, "waits")

    result = e.tick()

    assert not result.acted
    assert "no agent configured (dispatch.agent_argv is empty)" in result.summary
    assert queries.get_task(e.db, task_id)["status"] == "ready"
    assert queries.list_runs(e.db) == []


def test_dispatch_mode_off_does_nothing(engine):
    e = engine(SPARKOPS_DISPATCH_MODE="off", SPARKOPS_DISPATCH_AGENT_ARGV=REPORTS)
    task_id = board.create_task(e.db, "waits")

    result = e.tick()

    assert not result.acted and result.summary == "dispatch is off (dispatch.mode = off)"
    assert queries.get_task(e.db, task_id)["status"] == "ready"
    assert queries.list_runs(e.db) == [] and len(e.ctx.shims) == 0


def test_shim_that_fails_has_its_run_closed_at_the_next_tick_with_its_log_tail(engine, monkeypatch):
    e = engine(SPARKOPS_DISPATCH_AGENT_ARGV=REPORTS)
    task_id = board.create_task(e.db, "doomed")
    # The shim reads its settings from the environment it inherits: break them
    # after the dispatcher has read its own, so every shim dies before recording itself.
    monkeypatch.setenv("SPARKOPS_DISPATCH_HEARTBEAT_SECONDS", "often")

    first = e.tick()
    assert first.details["started"] == [task_id]
    # The first retry is immediate; the second crash trips the breaker (failure_limit 2).
    ticks = e.tick_until(lambda: queries.get_task(e.db, task_id)["status"] == "blocked",
                         "the dead shims' runs to be closed", timeout=20)

    summaries = " ".join(t.summary for t in ticks)
    assert summaries.count(f"shim of {task_id} died (1)") == 2
    detail = queries.task_detail(e.db, task_id)
    for run in detail["runs"]:
        assert run["outcome"] == "crashed"
        assert run["error"].startswith("worker shim exit 1 before closing the run: ")
        assert "dispatch.heartbeat_seconds must be a number" in run["error"]  # the log's tail
    assert len(detail["runs"]) == 2 and [e["kind"] for e in detail["events"][-2:]] == ["gave_up", "blocked"]
    assert detail["task"]["consecutive_failures"] == 2
    assert len(e.ctx.shims) == 0


def test_a_crash_is_summed_up_by_the_exceptions_own_line(tmp_path):
    """A Python agent's traceback (with 3.11's ``~~^^^`` markers) is summed up by its
    last line, not by the markers and frames before it; other logs by their tail."""
    log, agent = tmp_path / "run.log", tmp_path / "agent.py"  # a file: tracebacks quote its lines
    agent.write_text("print('loading the plan')\nplan = {'api': None}\nstep = plan['api']['port'] + 1\n")
    with open(log, "wb") as out:
        subprocess.run([sys.executable, str(agent)], stdout=out, stderr=subprocess.STDOUT, timeout=60)
    assert "^^^^" in log.read_text()
    assert runlog.log_tail(log) == "TypeError: 'NoneType' object is not subscriptable"
    log.write_text("step 1\n\nstep 2: cannot reach the repo\n")
    assert runlog.log_tail(log) == "step 1 | step 2: cannot reach the repo"
    assert runlog.log_tail(tmp_path / "missing.log") == ""


def test_killed_shim_with_a_live_agent_keeps_the_claim_until_the_agent_is_gone(engine):
    e = engine(SPARKOPS_DISPATCH_AGENT_ARGV=SLEEPS)
    task_id = board.create_task(e.db, "long job")
    assert e.tick().details["started"] == [task_id]
    run_id = queries.get_task(e.db, task_id)["current_run_id"]
    ident = wait_for(lambda: (i := e.identity(run_id)) and i.agent and i, "the agent to start")

    os.kill(ident.shim.pid, signal.SIGKILL)
    wait_for(lambda: gone(ident.shim.pid), "the shim to die")
    e.tick()  # reaps the shim; its agent still works, so the claim stays

    task = queries.get_task(e.db, task_id)
    assert (task["status"], task["current_run_id"]) == ("running", run_id)  # not requeued
    assert procs.is_alive(ident.agent)
    assert len(e.ctx.shims) == 0  # and no second shim started for it

    os.killpg(ident.agent.pgid, signal.SIGKILL)
    wait_for(lambda: gone(ident.agent.pid), "the agent to die")
    result = e.tick()

    assert f"reclaimed {task_id}" in result.summary
    first = queries.task_detail(e.db, task_id)["runs"][0]
    assert first["id"] == run_id and first["outcome"] == "crashed"
    assert f"shim pid {ident.shim.pid} and agent pid {ident.agent.pid} no longer running" in first["error"]
    # requeued, and (first retry immediate) claimed again in the same tick
    assert result.details["started"] == [task_id]


@pytest.mark.parametrize("backend", ["sqlite"])  # a host-local failure; on PostgreSQL the job
# locks live under the deleted directory and would make it again
def test_shim_that_cannot_start_is_booked_spawn_failed(engine, tmp_path):
    config = tmp_path / "gone" / "sparkops.toml"
    config.parent.mkdir()
    config.write_text("")
    e = engine(SPARKOPS_DISPATCH_AGENT_ARGV=REPORTS, SPARKOPS_CONFIG=str(config))
    task_id = board.create_task(e.db, "nowhere to run")
    shutil.rmtree(e.settings.base_dir)  # the shim's working directory

    result = e.tick()

    # The first retry is immediate, the second failure trips the breaker: one tick.
    detail = queries.task_detail(e.db, task_id)
    assert [r["outcome"] for r in detail["runs"]] == ["spawn_failed", "spawn_failed"]
    assert all(r["error"].startswith("cannot start the worker shim: ") for r in detail["runs"])
    assert detail["task"]["status"] == "blocked"
    assert result.details["started"] == [task_id, task_id] and len(e.ctx.shims) == 0


# -- hermes mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"])  # Hermes reads only SQLite boards
def test_hermes_mode_runs_hermes_dispatch_on_the_board_with_the_free_slots(hermes_bin, engine, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("HERMES_HOME", str(tmp_path / "hermes-home"))  # never the user's ~/.hermes
    argv = [str(hermes_bin), "kanban", "dispatch", "--max", "{max}", "--json"]
    e = engine(SPARKOPS_DISPATCH_MODE="hermes", SPARKOPS_DISPATCH_MAX_IN_PROGRESS="3",
               SPARKOPS_DISPATCH_HERMES_ARGV=argv)
    now = int(time.time())
    # A live claim of this host (takes one of the three slots), a stale claim of
    # another host (Hermes reclaims it), and a ready task Hermes cannot assign.
    live = board.create_task(e.db, "live here")
    board.claim(e.db, live, lock=f"{socket.gethostname()}:{os.getpid()}", now=now)
    stale = board.create_task(e.db, "stale elsewhere")
    board.claim(e.db, stale, lock="elsewhere:1", ttl_seconds=60, now=now - HOUR)
    waiting = board.create_task(e.db, "unassigned")

    result = e.tick()

    # Hermes' --max caps the whole board: 1 running (the stale claim elsewhere is released
    # first) + the 2 free slots here
    assert result.summary.startswith("hermes dispatch --max 3 (1 running on the board, 2 free here): "
                                     "spawned 0, reclaimed 1; 2 ready task(s) skipped: no assignee")  # the released too
    assert result.acted
    assert result.details["reclaimed"] == 1 and waiting in result.details["skipped_unassigned"]
    assert queries.get_task(e.db, stale)["status"] == "ready"
    [run] = queries.task_detail(e.db, stale)["runs"]
    assert run["outcome"] == "reclaimed" and "elsewhere:1" in run["error"]
    assert queries.get_task(e.db, live)["status"] == "running"


@pytest.mark.parametrize("backend", ["sqlite"])  # Hermes reads only SQLite boards
def test_hermes_mode_passes_the_free_slots_and_the_board_without_secrets(engine, monkeypatch):
    report = ("import json, os, sys; print('hermes says hi'); print(json.dumps({'argv': sys.argv[1:], "
              "'db': os.environ.get('HERMES_KANBAN_DB'), 'secret': os.environ.get('SPARKOPS_UI_PASSWORD')}))")
    e = engine(SPARKOPS_DISPATCH_MODE="hermes", SPARKOPS_DISPATCH_MAX_IN_PROGRESS="3",
               SPARKOPS_DISPATCH_HERMES_ARGV=[sys.executable, "-c", report, "--max", "{max}"])
    monkeypatch.setenv("SPARKOPS_UI_PASSWORD", "hunter2")
    host_lock = f"{socket.gethostname()}:{os.getpid()}"
    busy = [board.create_task(e.db, f"busy {i}") for i in range(3)]
    board.claim(e.db, busy[0], lock=host_lock)

    report_1 = dispatch_hermes(e.ctx)
    assert report_1.summary == "hermes dispatch --max 3 (1 running on the board, 2 free here): spawned 0, " \
                               "reclaimed 0" and not report_1.acted
    assert report_1.details == {"argv": ["--max", "3"], "db": str(e.db.path), "secret": None}
    # nothing changed: hermes (a second of CPU) is not started again until the interval ends
    assert dispatch_hermes(e.ctx).summary == "nothing changed since the last hermes dispatch"

    board.claim(e.db, busy[1], lock="another-host:1")  # another host's run counts on the board
    assert dispatch_hermes(e.ctx).details["argv"] == ["--max", "4"]

    board.claim(e.db, busy[2], lock=host_lock)
    board.create_task(e.db, "one more")
    board.claim(e.db, board.create_task(e.db, "and more"), lock=host_lock)
    at_capacity = dispatch_hermes(e.ctx)
    assert at_capacity.summary == "at capacity (3 running)" and not at_capacity.acted


@pytest.mark.parametrize("backend", ["sqlite"])  # Hermes reads only SQLite boards
def test_hermes_mode_runs_hermes_again_after_the_interval_even_when_nothing_changed(engine, tmp_path):
    counter = tmp_path / "hermes-runs"
    fake = f"open({str(counter)!r}, 'a').write('x'); print('{{}}')"
    e = engine(SPARKOPS_DISPATCH_MODE="hermes", SPARKOPS_DISPATCH_HERMES_INTERVAL_SECONDS="1",
               SPARKOPS_DISPATCH_HERMES_ARGV=[sys.executable, "-c", fake, "{max}"])
    dispatch_hermes(e.ctx)
    dispatch_hermes(e.ctx)
    assert counter.read_text() == "x"
    time.sleep(1.1)  # the interval is the runner's wall clock, not board time
    dispatch_hermes(e.ctx)
    assert counter.read_text() == "xx"


@pytest.mark.parametrize("backend", ["sqlite"])  # Hermes reads only SQLite boards
def test_hermes_mode_with_two_slots_and_one_long_task_starts_a_second(hermes_bin, engine, tmp_path,
                                                                      monkeypatch):
    """Hermes reads --max as the cap of the whole board's running tasks: passing the
    free slots (1) with one task running would start nothing."""
    monkeypatch.setenv("HERMES_HOME", str(tmp_path / "hermes-home"))
    worker = tmp_path / "fake-hermes-worker.sh"  # what Hermes spawns as its worker (HERMES_BIN)
    worker.write_text("#!/bin/sh\nexec sleep 60\n")
    worker.chmod(0o755)
    monkeypatch.setenv("HERMES_BIN", str(worker))
    e = engine(SPARKOPS_DISPATCH_MODE="hermes", SPARKOPS_DISPATCH_MAX_IN_PROGRESS="2",
               SPARKOPS_DISPATCH_HERMES_ARGV=[str(hermes_bin), "kanban", "dispatch", "--max", "{max}", "--json"])
    spawned: list[int] = []
    try:
        first = board.create_task(e.db, "long task", assignee="default")
        assert e.tick().details["spawned"][0]["task_id"] == first
        spawned.append(queries.get_task(e.db, first)["worker_pid"])
        second = board.create_task(e.db, "second task", assignee="default")

        result = e.tick()

        assert result.summary.startswith("hermes dispatch --max 2 (1 running on the board, 1 free here)")
        assert [s["task_id"] for s in result.details["spawned"]] == [second]
        spawned.append(queries.get_task(e.db, second)["worker_pid"])
        assert {queries.get_task(e.db, t)["status"] for t in (first, second)} == {"running"}
        third = board.create_task(e.db, "waits", assignee="default")
        assert e.tick().summary == "at capacity (2 running)"
        assert queries.get_task(e.db, third)["status"] == "ready"
    finally:
        for pid in spawned:
            if pid:
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize("backend", ["sqlite"])  # Hermes reads only SQLite boards
@pytest.mark.parametrize("binary", ["/nonexistent/bin/hermes", "hermes-not-installed-anywhere"])
def test_hermes_mode_with_a_missing_binary_is_a_config_error_naming_it(engine, binary):
    e = engine(SPARKOPS_DISPATCH_MODE="hermes",
               SPARKOPS_DISPATCH_HERMES_ARGV=[binary, "kanban", "dispatch", "--max", "{max}", "--json"])

    with pytest.raises(ConfigError, match=f"dispatch.hermes_argv: '{binary}' not found"):
        dispatch_hermes(e.ctx)
    result = run_job(e.ctx, "dispatch")  # the job records the error and does not raise
    assert result.outcome == "error" and result.error.startswith("ConfigError: ") and binary in result.error


def test_hermes_mode_on_a_postgresql_board_is_a_config_error(tmp_path, pg_url):
    settings = make_settings(tmp_path, board_url=pg_url, SPARKOPS_DISPATCH_MODE="hermes")
    store = open_store(settings, create=True)
    try:
        with pytest.raises(ConfigError, match="needs a SQLite board"):
            dispatch_hermes(JobContext.create(settings, store))
    finally:
        store.dispose()


# -- the idle fast path --------------------------------------------------------------------


def test_shim_tracker_is_quiet_only_while_nothing_changed():
    tracker = ShimTracker()
    assert not tracker.quiet(("token",), NOW)  # never looked yet
    tracker.note_idle(("token",), NOW)
    assert tracker.quiet(("token",), NOW + 1)
    assert not tracker.quiet(("other",), NOW + 1)  # the board changed
    assert not tracker.quiet(None, NOW + 1)  # no cheap signal (PostgreSQL): always look
    assert not tracker.quiet(("token",), NOW + ShimTracker.FULL_LOOK_SECONDS)  # look now and then
    tracker.note_idle(("token",), NOW, look_again_at=NOW + 7)  # a backoff runs out at +7
    assert tracker.quiet(("token",), NOW + 6) and not tracker.quiet(("token",), NOW + 7)
    tracker.note_idle(None, NOW)  # a tick that did something
    assert not tracker.quiet(("token",), NOW + 1)


def test_claim_next_reports_when_deferred_tasks_become_eligible(sqlite_store):
    db = sqlite_store.board
    task = board.create_task(db, "flaky", now=NOW)
    policy = RetryPolicy(backoff_seconds=10)
    for at in (NOW, NOW + 1):  # two failures: the next retry waits 10 s
        run = claim(db, now=at, policy=policy).run_id
        board.fail(db, task, run_id=run, outcome=Outcome.CRASHED, error="x", failure_limit=5, now=at)
    deferred: list[float] = []
    assert claim(db, now=NOW + 2, policy=policy, deferred=deferred) is None
    assert deferred == [NOW + 1 + 10]


def test_an_idle_dispatcher_notices_new_work_at_once(sqlite_store, tmp_path, monkeypatch):
    """After an idle tick the dispatcher only stats the board's files; a task
    created by another process changes them, so the next tick claims it."""
    monkeypatch.setenv("SPARKOPS_DISPATCH_AGENT_ARGV", json.dumps(["{python}", "-c", "pass"]))
    settings = make_settings(tmp_path, SPARKOPS_DISPATCH_AGENT_ARGV=json.dumps(["{python}", "-c", "pass"]))
    ctx = JobContext.create(settings, sqlite_store, shims=ShimTracker())
    assert run_job(ctx, "dispatch", now=NOW, trigger="schedule").summary.startswith("no free slot")
    assert run_job(ctx, "dispatch", now=NOW + 1, trigger="schedule").summary == \
        "nothing changed since the last look"
    other = open_store(settings)  # another connection, as the CLI would be
    try:
        task = board.create_task(other.board, "new work", now=NOW + 2)
    finally:
        other.dispose()
    result = run_job(ctx, "dispatch", now=NOW + 2, trigger="schedule")
    assert result.details["started"] == [task]


def test_the_warm_forkserver_forks_each_runs_shim(sqlite_store, tmp_path, monkeypatch):
    """The dispatcher keeps one forkserver started (imported and waiting), and each
    run's shim is forked by it: no interpreter start-up on the critical path. The
    forkserver outlives the runs it served and ends with end of input."""
    agent = json.dumps(["{python}", "-c", "pass"])
    monkeypatch.setenv("SPARKOPS_STORAGE_BOARD_URL", f"sqlite:///{tmp_path}/data/kanban.db")
    monkeypatch.setenv("SPARKOPS_STORAGE_OPS_URL", f"sqlite:///{tmp_path}/data/sparkops.db")
    monkeypatch.setenv("SPARKOPS_DISPATCH_AGENT_ARGV", agent)
    settings = make_settings(tmp_path, SPARKOPS_DISPATCH_AGENT_ARGV=agent, SPARKOPS_DISPATCH_MAX_IN_PROGRESS="2")
    tracker = ShimTracker()
    ctx = JobContext.create(settings, sqlite_store, shims=tracker)
    try:
        run_job(ctx, "dispatch", now=NOW)  # nothing to do yet: the forkserver is started
        server = tracker._standby
        assert server is not None and server.alive()
        tasks = [board.create_task(sqlite_store.board, f"work {i}", now=NOW) for i in range(2)]
        assert sorted(run_job(ctx, "dispatch", now=NOW + 1).details["started"]) == sorted(tasks)

        def shim_pid(task: str) -> int | None:
            [run] = queries.list_runs(sqlite_store.board, task_id=task)
            return ((run.get("metadata") or {}).get("process") or {}).get("shim", {}).get("pid")
        wait_for(lambda: all(shim_pid(t) for t in tasks), "both shims to record themselves", timeout=30)
        forked = {entry[0].pid for entry in tracker._running.values()} | {shim_pid(t) for t in tasks}
        assert len(forked) == 2 and server.pid not in forked  # two shims, neither the forkserver
        assert tracker._standby is server and server.alive()  # one forkserver served both
        # the shims end (each books its protocol violation) and the forkserver tells their exits
        exits = []
        wait_for(lambda: exits.extend(tracker.reap()) or not tracker._running, "the shims' exits", timeout=30)
        assert sorted(e.task_id for e in exits) == sorted(tasks) and {e.returncode for e in exits} == {0}
    finally:
        tracker.stop_standby()
    assert tracker._standby is None and server.proc.returncode == 0

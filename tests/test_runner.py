"""The jobs runner: the promote job, failing jobs, the loop, the lock, the process."""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import NOW, ROOT, make_settings, run_cli, wait_for
from sqlalchemy import create_engine, update

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.core.procs import host_name
from sparkops.engine import promote
from sparkops.jobs.framework import JobContext, JobReport, JobSpec
from sparkops.runner.loop import AlreadyRunning, Runner, RunnerLock, lock_path
from sparkops.sprint import export
from sparkops.storage.schema import tasks
from sparkops.storage.store import open_store
from sparkops.watch import services


def finish_behind_our_back(board_file: Path, task_id: str, at: int) -> None:
    """What Hermes does: mark a task done with its own connection, without
    promoting the children."""
    engine = create_engine(f"sqlite:///{board_file}")
    with engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == task_id)
                     .values(status="done", completed_at=at))
    engine.dispose()


def ctx_for(store, tmp_path) -> JobContext:
    return JobContext.create(make_settings(tmp_path), store)


def spec(name: str, func) -> JobSpec:
    """A job on the promote interval (5 s by default): tests make it due by hand."""
    return JobSpec(name, func, "runner.promote_interval_seconds", f"test job {name}")


def make_due(runner: Runner, name: str) -> None:
    """Backdate a job's next run instead of sleeping until it is due."""
    job = next(j for j in runner.scheduler.jobs if name in j.tags)
    job.next_run = datetime.datetime.now() - datetime.timedelta(seconds=1)


# -- jobs and the loop, in process ----------------------------------------------------------


def test_promote_job_promotes_a_child_whose_parent_was_finished_elsewhere(sqlite_store, tmp_path):
    parent = board.create_task(sqlite_store.board, "parent", now=NOW)
    child = board.create_task(sqlite_store.board, "child", parents=[parent], now=NOW)
    finish_behind_our_back(tmp_path / "data" / "kanban.db", parent, at=NOW + 5)
    assert queries.get_task(sqlite_store.board, child)["status"] == "todo"

    runner = Runner(ctx_for(sqlite_store, tmp_path), {"promote": spec("promote", promote.run)},
                    clock=lambda: NOW + 10)
    result = runner.run_job("promote")

    assert result.ok and result.details == {"promoted": [child]}
    assert queries.get_task(sqlite_store.board, child)["status"] == "ready"
    events = queries.list_events(sqlite_store.board, task_id=child, kinds=["promoted"])
    assert [e["created_at"] for e in events] == [NOW + 10]  # the runner's clock reached the job
    again = runner.run_job("promote")  # nothing left to promote
    assert again.ok and not again.acted


def test_promote_runs_when_due_on_the_schedule(sqlite_store, tmp_path):
    parent = board.create_task(sqlite_store.board, "parent", now=NOW)
    child = board.create_task(sqlite_store.board, "child", parents=[parent], now=NOW)
    finish_behind_our_back(tmp_path / "data" / "kanban.db", parent, at=NOW + 5)
    runner = Runner(ctx_for(sqlite_store, tmp_path), {"promote": spec("promote", promote.run)},
                    clock=lambda: NOW + 10)

    assert runner.run_pending_once() == []  # not due yet
    assert queries.get_task(sqlite_store.board, child)["status"] == "todo"
    make_due(runner, "promote")
    ran = runner.run_pending_once()
    assert [(r.job, r.ok, r.details) for r in ran] == [("promote", True, {"promoted": [child]})]


def test_intervals_come_from_the_settings(sqlite_store, tmp_path):
    settings = make_settings(tmp_path, SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS="2.5",
                             SPARKOPS_DISPATCH_INTERVAL_SECONDS="0.5")
    runner = Runner(JobContext.create(settings, sqlite_store))
    assert runner.intervals() == {"dispatch": 0.5, "reclaim": 30.0, "promote": 2.5, "watchdog": 300.0,
                                  "disk": 300.0, "gpu-sample": 30.0, "review": 600.0, "export": 300.0,
                                  "push": 300.0, "tunnel": 30.0, "remote-gpu": 60.0}


def test_a_failing_job_is_logged_and_stays_scheduled(sqlite_store, tmp_path, caplog):
    calls = []

    def flaky(ctx, *, now):
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("model server unreachable")
        return JobReport("ok")

    runner = Runner(ctx_for(sqlite_store, tmp_path), {"flaky": spec("flaky", flaky)}, clock=lambda: NOW)
    make_due(runner, "flaky")
    with caplog.at_level(logging.ERROR, logger="sparkops.jobs.framework"):
        ran = runner.run_pending_once()

    assert [(r.ok, r.error) for r in ran] == [(False, "RuntimeError: model server unreachable")]
    assert "job flaky failed" in caplog.text and "model server unreachable" in caplog.text
    assert len(runner.scheduler.jobs) == 1  # still scheduled...
    assert runner.next_run("flaky") > datetime.datetime.now()  # ...for its next interval
    assert runner.run_pending_once() == []

    make_due(runner, "flaky")
    ran = runner.run_pending_once()
    assert [(r.ok, r.summary) for r in ran] == [(True, "ok")]
    assert calls == [NOW, NOW]
    assert runner.last_results["flaky"].ok


def test_run_forever_finishes_the_current_job_then_returns(sqlite_store, tmp_path):
    finished = []

    def stops_midway(ctx, *, now):
        runner.request_stop("test")  # as a SIGTERM during the job would
        finished.append(now)
        return JobReport("stopped")

    def never(ctx, *, now):
        raise AssertionError("no job starts after a stop was requested")

    runner = Runner(ctx_for(sqlite_store, tmp_path),
                    {"first": spec("first", stops_midway), "second": spec("second", never)},
                    clock=lambda: NOW)
    make_due(runner, "first")
    make_due(runner, "second")
    runner.run_forever(poll_seconds=0.01)

    assert finished == [NOW]
    assert runner.stop_reason == "test"
    assert "second" not in runner.last_results


# -- the lock ---------------------------------------------------------------------------------


def test_lock_file_sits_next_to_the_ops_database(tmp_path):
    settings = make_settings(tmp_path)
    assert lock_path(settings) == tmp_path / "data" / "locks" / "runner.lock"


def test_second_lock_is_refused_naming_the_lock_and_the_holder(tmp_path):
    path = tmp_path / "data" / "locks" / "runner.lock"
    with RunnerLock(path):
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(AlreadyRunning) as refused:
            RunnerLock(path).acquire()
        assert refused.value.holder == str(os.getpid())
        assert str(path) in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
    with RunnerLock(path):  # released: the next runner gets it
        pass


# -- the real process ---------------------------------------------------------------------


def runner_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
    env.update({
        "PYTHONPATH": str(ROOT),
        "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
        "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db",
        "SPARKOPS_RUNNER_LOG_FILE": str(tmp_path / "logs" / "runner.log"),
        "SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS": "0.2",
        **extra,
    })
    return env




@pytest.fixture
def started_runner(tmp_path):
    """A real ``jobs_runner.py``, started and logged in; killed if a test fails."""
    log_file = tmp_path / "logs" / "runner.log"
    with open(tmp_path / "runner.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path,
                                env=runner_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log_file.exists() and "jobs runner started" in log_file.read_text(),
                 "the runner's start-up line in its log", proc=proc)
        yield proc, log_file
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_runner_process_promotes_refuses_a_second_runner_and_stops_on_sigterm(started_runner, tmp_path):
    proc, log_file = started_runner

    settings = make_settings(tmp_path)
    store = open_store(settings)  # the runner created the databases
    try:
        # the checks ran at start, not one interval later (the watchdog's is 60 s, the review's 600 s)
        host = host_name(settings["host.name"])
        wait_for(lambda: services.load_states(store.ops, host) and export.latest_review_metrics(store.ops),
                 "the first watchdog pass and review", timeout=30, proc=proc)
        assert {s.name for s in settings.services if s.enabled} == set(services.load_states(store.ops, host))
        parent = board.create_task(store.board, "parent")
        child = board.create_task(store.board, "child", parents=[parent])
        finish_behind_our_back(tmp_path / "data" / "kanban.db", parent, at=int(time.time()))
        wait_for(lambda: queries.get_task(store.board, child)["status"] == "ready",
                 "the runner to promote the child", proc=proc)
    finally:
        store.dispose()
    assert "job promote: promoted 1 task: " + child in log_file.read_text()

    second = subprocess.run([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path,
                            env=runner_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert str(lock_path(settings)) in second.stderr
    assert f"pid {proc.pid}" in second.stderr
    assert proc.poll() is None  # the first one is unharmed

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 5
    assert "jobs runner stopped (SIGTERM)" in log_file.read_text()


def test_runner_process_stops_cleanly_on_sigint(started_runner):
    proc, log_file = started_runner
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert "jobs runner stopped (SIGINT)" in log_file.read_text()


@pytest.mark.parametrize("args, extra_env, expected", [
    (["--config", "missing.toml"], {}, "missing.toml does not exist"),
    ([], {"SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS": "0"}, "runner.promote_interval_seconds must be"),
])
def test_bad_config_is_one_line_on_stderr_and_exit_2(tmp_path, args, extra_env, expected):
    result = subprocess.run([sys.executable, str(ROOT / "jobs_runner.py"), *args], cwd=tmp_path,
                            env=runner_env(tmp_path, **extra_env), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("jobs_runner: error: ") and expected in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()  # nothing was created


def test_runner_process_runs_cli_tasks_to_done_with_the_demo_agent(tmp_path):
    """The whole engine, no manual step: tasks created with the CLI (one depending on
    another) are dispatched by a real jobs_runner.py, run by real shims and demo
    agents, reported through the CLI, and end done, each with exactly one run."""
    agent = ["{python}", "-m", "sparkops", "demo-agent", "--min-seconds", "0.1", "--max-seconds", "0.4"]
    env = runner_env(tmp_path, SPARKOPS_DISPATCH_AGENT_ARGV=json.dumps(agent),
                     SPARKOPS_DISPATCH_MAX_IN_PROGRESS="2")
    cli_env = {k: v for k, v in env.items() if k.startswith("SPARKOPS_")}
    assert run_cli("init", cwd=tmp_path, env=cli_env).returncode == 0
    first = run_cli("task", "create", "Write the parser", "--body", "Parse the config file.",
                    cwd=tmp_path, env=cli_env).stdout.strip()
    ids = [first] + [run_cli("task", "create", f"Task {i}", "--parent", first, cwd=tmp_path,
                             env=cli_env).stdout.strip() for i in range(3)]
    with open(tmp_path / "runner.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    store = open_store(make_settings(tmp_path))
    try:
        wait_for(lambda: all(queries.get_task(store.board, t)["status"] == "done" for t in ids),
                 "every task to be done", timeout=90, proc=proc)
        for task_id in ids:
            runs = queries.list_runs(store.board, task_id=task_id)
            assert [(r["outcome"], r["status"]) for r in runs] == [("completed", "done")]
            assert (tmp_path / "data" / "workspaces" / task_id / "RESULT.md").exists()
        first_done = queries.get_task(store.board, first)["completed_at"]
        assert all(queries.get_task(store.board, t)["started_at"] >= first_done for t in ids[1:])
    finally:
        store.dispose()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_stopping_the_runner_leaves_running_workers_alone(tmp_path):
    """SIGTERM to the runner while an agent works: the runner exits 0 at once, the
    worker (its own session) keeps going, reports, and its shim closes the run."""
    agent = ["{python}", "-m", "sparkops", "demo-agent", "--min-seconds", "2", "--max-seconds", "2"]
    env = runner_env(tmp_path, SPARKOPS_DISPATCH_AGENT_ARGV=json.dumps(agent))
    cli_env = {k: v for k, v in env.items() if k.startswith("SPARKOPS_")}
    assert run_cli("init", cwd=tmp_path, env=cli_env).returncode == 0
    task = run_cli("task", "create", "Outlive the runner", cwd=tmp_path, env=cli_env).stdout.strip()
    with open(tmp_path / "runner.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    store = open_store(make_settings(tmp_path))
    try:
        def agent_pid():
            runs = queries.list_runs(store.board, task_id=task)
            return runs and (runs[0]["metadata"] or {}).get("process", {}).get("agent", {}) or None
        agent = wait_for(agent_pid, "the agent to start", proc=proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert psutil.pid_exists(agent["pid"])  # the worker was not touched
        wait_for(lambda: queries.get_task(store.board, task)["status"] == "done",
                 "the orphaned worker to finish and report")
        [run] = queries.list_runs(store.board, task_id=task)
        assert run["outcome"] == "completed"
    finally:
        store.dispose()
        if proc.poll() is None:
            proc.kill()


def test_the_runner_backs_off_while_the_database_is_unreachable_and_says_so(tmp_path, caplog):
    from sparkops.storage.db import Database
    from sparkops.storage.store import Store

    settings = make_settings(tmp_path)
    good = open_store(settings, create=True)
    away = Database("postgresql://nobody@127.0.0.1:1/none", role="board")  # nothing listens on port 1
    state = {"store": Store(board=away, ops=good.ops)}
    calls = []

    def touch(ctx, now=None):
        calls.append(now)
        state["store"].board.ping()
        return JobReport("board reached")

    specs = {"touch": JobSpec("touch", touch, "dispatch.interval_seconds", "reads the board")}
    runner = Runner(JobContext.create(settings, good), specs)
    caplog.set_level(logging.WARNING)
    failed = runner.run_job("touch")
    assert failed.outcome == "error" and failed.database_unreachable
    assert runner.waiting_for_database()
    runner._scheduled("touch")  # a scheduled tick during the backoff does nothing
    assert len(calls) == 1
    assert "the database is unreachable; scheduled jobs wait 1 s before trying again" in caplog.text
    assert "Traceback" not in caplog.text  # one line per failure, not a stack trace

    state["store"] = good
    runner._database_back_at = 0.0  # the backoff is over (instead of sleeping through it)
    runner._scheduled("touch")
    assert len(calls) == 2 and runner.last_results["touch"].ok and not runner.waiting_for_database()
    assert "the database is reachable again" in caplog.text
    away.dispose()
    good.dispose()

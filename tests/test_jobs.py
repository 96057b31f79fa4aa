"""Jobs: the run record in ops_job_runs, a job that raises, the per-job lock held
by another real process, and the ``job list`` / ``job run`` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import NOW, ROOT, make_settings, run_cli
from sqlalchemy import select, update

from sparkops.board import transitions as board
from sparkops.jobs.framework import JobBusy, JobContext, JobLock, JobReport, JobSpec, lock_dir
from sparkops.runner import registry
from sparkops.runner.registry import run_job
from sparkops.storage.schema import ops_job_runs, tasks


def recorded(store) -> list[dict]:
    with store.ops.read() as conn:
        return [dict(r._mapping) for r in conn.execute(select(ops_job_runs).order_by(ops_job_runs.c.id))]


def spec(name: str, func) -> JobSpec:
    return JobSpec(name, func, "runner.promote_interval_seconds", f"test job {name}")


@pytest.fixture
def ctx(sqlite_store, tmp_path) -> JobContext:
    return JobContext.create(make_settings(tmp_path), sqlite_store)


def test_acting_and_failing_runs_are_recorded_idle_scheduled_ticks_are_not(ctx, sqlite_store):
    def acting(ctx, *, now):
        return JobReport("started t_1 (run 1)")

    def idle(ctx, *, now):
        return JobReport("no free slot or no eligible ready task", acted=False)

    def broken(ctx, *, now):
        raise RuntimeError("board unreachable")

    specs = {s.name: s for s in (spec("acting", acting), spec("idle", idle), spec("broken", broken))}
    for name in ("acting", "idle", "broken", "idle"):
        run_job(ctx, name, now=NOW, trigger="schedule", specs=specs)
    run_job(ctx, "idle", now=NOW + 1, trigger="cli", specs=specs)  # asked for by a person: recorded

    rows = recorded(sqlite_store)
    assert [(r["job"], r["trigger"], r["outcome"], r["summary"], r["error"]) for r in rows] == [
        ("acting", "schedule", "ok", "started t_1 (run 1)", None),
        ("broken", "schedule", "error", "failed", "RuntimeError: board unreachable"),
        ("idle", "cli", "ok", "no free slot or no eligible ready task", None),
    ]
    assert [r["started_at"] for r in rows] == [NOW, NOW, NOW + 1]
    assert all(r["host"] == ctx.host and r["pid"] == os.getpid() and r["ended_at"] >= r["started_at"]
               and r["duration_ms"] >= 0 for r in rows)


def test_a_job_that_raises_is_recorded_with_its_error_and_does_not_raise(ctx, sqlite_store, caplog):
    def broken(ctx, *, now):
        raise ValueError("disk full")

    specs = {"broken": spec("broken", broken)}
    result = run_job(ctx, "broken", now=NOW, trigger="schedule", specs=specs)  # does not raise

    assert (result.outcome, result.ok, result.summary, result.error) == (
        "error", False, "failed", "ValueError: disk full")
    assert "job broken failed (it stays scheduled): ValueError: disk full" in caplog.text
    assert "Traceback" in caplog.text
    assert [(r["job"], r["outcome"], r["error"]) for r in recorded(sqlite_store)] == [
        ("broken", "error", "ValueError: disk full")]
    # the lock was released: the next run gets it
    again = run_job(ctx, "broken", now=NOW + 1, trigger="schedule", specs=specs)
    assert again.outcome == "error"


def test_the_real_jobs_record_cli_runs_and_skip_idle_ticks(ctx, sqlite_store, tmp_path):
    assert sorted(registry.all_jobs()) == ["disk", "dispatch", "export", "gpu-sample", "promote", "push", "reclaim",
                                           "remote-gpu", "review", "tunnel", "watchdog"]
    for name in ("promote", "reclaim", "dispatch"):  # an empty board: nothing to do
        result = run_job(ctx, name, now=NOW, trigger="schedule")
        assert result.ok and not result.acted, (name, result)
    assert recorded(sqlite_store) == []

    done = run_cli("job", "run", "promote", cwd=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "promote: ok: nothing to promote")
    rows = recorded(sqlite_store)
    assert [(r["job"], r["trigger"], r["outcome"]) for r in rows] == [("promote", "cli", "ok")]
    assert rows[0]["pid"] != os.getpid()  # the CLI's own process


def test_a_scheduled_run_that_acts_is_recorded_with_its_summary(ctx, sqlite_store):
    parent = board.create_task(sqlite_store.board, "parent", now=NOW)
    child = board.create_task(sqlite_store.board, "child", parents=[parent], now=NOW)
    with sqlite_store.board.write() as conn:  # finished by another tool, which promotes nothing
        conn.execute(update(tasks).where(tasks.c.id == parent).values(status="done"))
    result = run_job(ctx, "promote", now=NOW + 5, trigger="schedule")
    assert result.acted
    assert [(r["job"], r["trigger"], r["summary"]) for r in recorded(sqlite_store)] == [
        ("promote", "schedule", f"promoted 1 task: {child}")]


# -- the lock ------------------------------------------------------------------------------


HOLDER = """
    import pathlib, sys, time
    from sparkops.jobs.framework import JobLock
    JobLock(pathlib.Path(sys.argv[1])).acquire()
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path, sqlite_settings):
    """Another real process holding the reclaim job's lock."""
    path = lock_dir(sqlite_settings) / "reclaim.lock"
    ready = tmp_path / "holder.ready"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(path), str(ready)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, f"the lock holder exited {proc.returncode}"
            assert time.monotonic() < deadline, "the lock holder did not start"
            time.sleep(0.02)
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_job_held_by_another_process_is_refused_and_says_who_holds_it(holder, sqlite_store, tmp_path, ctx):
    proc, path = holder
    assert path.read_text().strip() == str(proc.pid)

    busy = run_cli("job", "run", "reclaim", cwd=tmp_path)
    assert busy.returncode == 1
    assert busy.stdout.strip() == (f"reclaim: skipped: reclaim is already running "
                                   f"(pid {proc.pid} holds {path})")
    in_process = run_job(ctx, "reclaim", trigger="ui")
    assert (in_process.outcome, in_process.acted) == ("skipped", False)
    assert f"pid {proc.pid}" in in_process.summary
    with pytest.raises(JobBusy) as refused:
        JobLock(path).acquire()
    assert refused.value.holder == str(proc.pid)
    # other jobs have their own locks
    assert run_cli("job", "run", "promote", cwd=tmp_path).returncode == 0

    proc.send_signal(signal.SIGKILL)  # the kernel drops the lock of a process that dies
    proc.wait()
    free = run_cli("job", "run", "reclaim", cwd=tmp_path)
    assert (free.returncode, free.stdout.strip()) == (0, "reclaim: ok: nothing to reclaim")
    assert [(r["job"], r["trigger"], r["outcome"]) for r in recorded(sqlite_store)] == [
        ("reclaim", "cli", "skipped"), ("reclaim", "ui", "skipped"), ("promote", "cli", "ok"),
        ("reclaim", "cli", "ok")]


def test_the_lock_file_names_its_holder_and_is_emptied_on_release(tmp_path):
    path = tmp_path / "locks" / "dispatch.lock"
    with JobLock(path):
        assert path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(JobBusy, match=f"dispatch is already running \\(pid {os.getpid()} holds"):
            JobLock(path).acquire()  # a second open file, even in this process
    assert path.read_text() == ""
    with JobLock(path):
        pass


def test_locks_live_next_to_a_sqlite_ops_database(tmp_path):
    settings = make_settings(tmp_path, ops_url=f"sqlite:///{tmp_path}/state/ops.db")
    assert lock_dir(settings) == tmp_path / "state" / "locks"


# -- the commands --------------------------------------------------------------------------


def test_job_list_shows_every_job_with_its_interval_from_the_settings(sqlite_store, tmp_path):
    env = {"SPARKOPS_DISPATCH_INTERVAL_SECONDS": "0.5", "SPARKOPS_RECLAIM_INTERVAL_SECONDS": "12",
           "SPARKOPS_RUNNER_PROMOTE_INTERVAL_SECONDS": "2.5"}
    listed = run_cli("job", "list", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["dispatch", "every", "0.5s"], ["reclaim", "every", "12s"], ["promote", "every", "2.5s"],
        ["watchdog", "every", "300s"], ["disk", "every", "300s"], ["gpu-sample", "every", "30s"],
        ["review", "every", "600s"], ["export", "every", "300s"], ["push", "every", "300s"],
        ["tunnel", "every", "30s"], ["remote-gpu", "every", "60s"]]
    assert "(reclaim.interval_seconds)" in lines[1]

    as_json = json.loads(run_cli("job", "list", "--json", cwd=tmp_path, env=env).stdout)
    assert {r["name"]: (r["every_seconds"], r["setting"]) for r in as_json} == {
        "dispatch": (0.5, "dispatch.interval_seconds"),
        "reclaim": (12.0, "reclaim.interval_seconds"),
        "promote": (2.5, "runner.promote_interval_seconds"),
        "watchdog": (300.0, "watchdog.interval_seconds"),
        "disk": (300.0, "watchdog.interval_seconds"),
        "gpu-sample": (30.0, "gpu.sample_interval_seconds"),
        "review": (600.0, "review.interval_seconds"),
        "export": (300.0, "export.interval_seconds"),
        "push": (300.0, "remote.push_interval_seconds"),
        "tunnel": (30.0, "remote.tunnel_interval_seconds"),
        "remote-gpu": (60.0, "remote.gpu_interval_seconds"),
    }
    assert all(r["help"] for r in as_json)


def test_an_unknown_job_is_exit_1_with_the_list_of_jobs(sqlite_store, tmp_path):
    result = run_cli("job", "run", "nope", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == ("sparkops: error: job 'nope' (jobs: disk, dispatch, export, gpu-sample, "
                                     "promote, push, reclaim, remote-gpu, review, tunnel, watchdog) not found")
    assert result.stdout == ""


def test_job_run_json_and_a_failing_job_exit_1(sqlite_store, tmp_path):
    ok = run_cli("job", "run", "reclaim", "--json", cwd=tmp_path)
    payload = json.loads(ok.stdout)
    assert ok.returncode == 0
    assert {k: payload[k] for k in ("job", "outcome", "summary", "error")} == {
        "job": "reclaim", "outcome": "ok", "summary": "nothing to reclaim", "error": None}
    # hermes mode on a PostgreSQL-less, hermes-less box: the job raises, the CLI says so and exits 1
    failing = run_cli("job", "run", "dispatch", cwd=tmp_path,
                      env={"SPARKOPS_DISPATCH_MODE": "hermes",
                           "SPARKOPS_DISPATCH_HERMES_ARGV": json.dumps(["/nonexistent/hermes"])})
    assert failing.returncode == 1
    assert failing.stdout.startswith("dispatch: error: failed (ConfigError: dispatch.hermes_argv: "
                                     "'/nonexistent/hermes' not found")

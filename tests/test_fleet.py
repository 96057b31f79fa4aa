"""The fleet's pieces: host labels and task requirements, claims that skip locked
rows, fleet-wide locks, the database's clock and the host registry."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import NOW, ROOT, make_settings, run_cli, wait_for
from sqlalchemy import select, update

from sparkops.board import queries, requirements
from sparkops.board import transitions as board
from sparkops.core import clock
from sparkops.core.errors import InvalidInput, NotFound
from sparkops.engine import reclaim
from sparkops.jobs import hosts as fleet
from sparkops.jobs.framework import JobContext, JobReport, JobSpec
from sparkops.runner import registry
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_hosts, tasks
from sparkops.storage.store import open_store

# -- labels and requirements ---------------------------------------------------------------


def test_labels_are_key_value_and_bad_ones_are_named():
    assert requirements.parse_labels([" gpu=gb10", "zone=lab", "gpu=gb10"]) == ["gpu=gb10", "zone=lab"]
    for bad in ("gb10", "gpu=", "=gb10", "gpu = gb10", "gpu=gb 10"):
        with pytest.raises(InvalidInput, match=f"label {bad!r} is not key=value"):
            requirements.parse_label(bad)


def test_requirements_exclude_tasks_from_hosts_without_the_labels(store):
    gpu_task = board.create_task(store.board, "needs the GB10", priority=5, now=NOW)
    any_task = board.create_task(store.board, "runs anywhere", now=NOW + 1)
    assert requirements.require(store.board, store.ops, gpu_task, ["gpu=gb10", "zone=lab"]) == ["gpu=gb10", "zone=lab"]
    assert requirements.excluded_for(store.ops, []) == {gpu_task}
    assert requirements.excluded_for(store.ops, ["gpu=gb10"]) == {gpu_task}  # needs both
    assert requirements.excluded_for(store.ops, ["gpu=gb10", "zone=lab", "x=y"]) == set()

    # the plain host passes over the better task and takes the one it may run
    change = board.claim_next(store.board, host="cpu-box", lock="cpu-box:1", capacity=4, now=NOW + 10,
                              excluded=requirements.excluded_for(store.ops, []))
    assert change.task_id == any_task
    assert board.claim_next(store.board, host="cpu-box", lock="cpu-box:1", capacity=4, now=NOW + 10,
                            excluded=requirements.excluded_for(store.ops, [])) is None
    change = board.claim_next(store.board, host="spark-1", lock="spark-1:1", capacity=4, now=NOW + 11,
                              excluded=requirements.excluded_for(store.ops, ["gpu=gb10", "zone=lab"]))
    assert change.task_id == gpu_task

    assert requirements.unrequire(store.ops, gpu_task, ["zone=lab"]) == ["gpu=gb10"]
    assert requirements.unrequire(store.ops, gpu_task) == []
    with pytest.raises(NotFound):
        requirements.require(store.board, store.ops, "t_missing", ["gpu=gb10"])


def test_cli_require_and_bad_labels_change_nothing(tmp_path):
    env = {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db"}
    assert run_cli("init", cwd=tmp_path, env=env).returncode == 0
    bad = run_cli("task", "create", "GPU work", "--require", "gb10", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "--require 'gb10' is not key=value" in bad.stderr
    assert json.loads(run_cli("task", "list", "--json", cwd=tmp_path, env=env).stdout) == []

    made = run_cli("task", "create", "GPU work", "--require", "gpu=gb10", cwd=tmp_path, env=env)
    task_id = made.stdout.strip()
    added = run_cli("task", "require", task_id, "zone=lab", "--json", cwd=tmp_path, env=env)
    assert json.loads(added.stdout) == {"task": task_id, "requires": ["gpu=gb10", "zone=lab"]}
    missing = run_cli("task", "require", "t_nothere", "gpu=gb10", cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "t_nothere" in missing.stderr
    cleared = run_cli("task", "unrequire", task_id, cwd=tmp_path, env=env)
    assert cleared.stdout.strip() == f"{task_id} requires: nothing (any host)"

    started = subprocess.run([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60,
                             env={**{k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")},
                                  **env, "SPARKOPS_HOST_LABELS": '["gb10"]', "PYTHONPATH": str(ROOT)})
    assert started.returncode == 2
    assert "host.labels entry 'gb10' is not key=value" in started.stderr


# -- claims on PostgreSQL skip a row another host is claiming --------------------------------


def test_claim_next_skips_a_task_locked_by_another_transaction(pg_url, tmp_path):
    store = open_store(make_settings(tmp_path, board_url=pg_url, ops_url=pg_url), create=True, now=NOW)
    try:
        first = board.create_task(store.board, "first", priority=9, now=NOW)
        second = board.create_task(store.board, "second", now=NOW + 1)
        other = Database(pg_url, role="board")
        with other.write() as conn:  # another host's claim transaction, still open
            conn.execute(select(tasks.c.id).where(tasks.c.id == first).with_for_update())
            got: list = []
            worker = threading.Thread(target=lambda: got.append(board.claim_next(
                store.board, host="b", lock="b:1", capacity=4, now=NOW + 5)))
            worker.start()
            worker.join(timeout=30)
            assert not worker.is_alive(), "claim_next waited for the locked row"
        assert got[0].task_id == second
        assert queries.get_task(store.board, first)["status"] == "ready"
        other.dispose()
    finally:
        store.dispose()


# -- fleet-wide locks ------------------------------------------------------------------------


def _hold(url: str, name: str, ready, release) -> None:
    db = Database(url, role="ops")
    with db.fleet_lock(name) as held:
        ready.put(held)
        release.wait(60)


def test_fleet_lock_is_one_holder_at_a_time_and_dies_with_its_process(pg_url):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Queue(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(pg_url, "review", ready, release))
    holder.start()
    assert ready.get(timeout=60) is True
    db = Database(pg_url, role="ops")
    with db.fleet_lock("review") as held:
        assert held is False
    with db.fleet_lock("reclaim-remote") as held:  # another name: free
        assert held is True
    os.kill(holder.pid, signal.SIGKILL)  # its connection goes, and the lock with it
    holder.join(timeout=30)

    def free() -> bool:
        with db.fleet_lock("review") as held:
            return held
    wait_for(free, "the dead holder's lock to be released", timeout=30)
    db.dispose()


def test_sqlite_fleet_lock_is_always_held(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/x.db", role="ops")
    with db.fleet_lock("review") as first, db.fleet_lock("review") as second:
        assert first and second


def test_a_fleet_job_runs_on_one_host_at_a_time(pg_url, tmp_path):
    store = open_store(make_settings(tmp_path, board_url=pg_url, ops_url=pg_url), create=True, now=NOW)
    calls = []
    specs = {"solo": JobSpec("solo", lambda ctx, now=None: calls.append(1) or JobReport("did it"),
                             "review.interval_seconds", "test", fleet=True)}
    ctx = JobContext.create(make_settings(tmp_path, board_url=pg_url, ops_url=pg_url), store)
    try:
        with store.ops.fleet_lock("job:solo") as held:  # another host is running it
            assert held
            skipped = registry.run_job(ctx, "solo", specs=specs)
        assert skipped.ok and not skipped.acted and calls == []
        assert skipped.summary == "another host is running it (one at a time across the fleet)"
        ran = registry.run_job(ctx, "solo", specs=specs)
        assert ran.summary == "did it" and calls == [1]
    finally:
        store.dispose()


def test_other_hosts_silent_runs_are_left_to_the_reclaimer_holding_the_lock(pg_url, tmp_path):
    settings = make_settings(tmp_path, board_url=pg_url, ops_url=pg_url)
    store = open_store(settings, create=True, now=NOW)
    ctx = JobContext(settings=settings, store=store, host="spark-a")
    try:
        task_id = board.create_task(store.board, "on b", now=NOW)
        run_id = board.claim(store.board, task_id, lock="spark-b:99", now=NOW).run_id
        late = NOW + settings["reclaim.heartbeat_timeout_seconds"] + 1
        with store.board.fleet_lock("reclaim-remote") as held:  # host c's reclaimer is at it
            assert held
            report = reclaim.run(ctx, now=late)
        assert not report.acted and queries.get_task(store.board, task_id)["status"] == "running"
        report = reclaim.run(ctx, now=late)
        assert report.acted and "no heartbeat from host spark-b" in report.summary
        [run] = queries.list_runs(store.board, task_id=task_id)
        assert run["id"] == run_id and run["outcome"] == "crashed"
    finally:
        store.dispose()


# -- the database's clock ------------------------------------------------------------------


def test_a_fleet_uses_the_databases_clock(pg_url, tmp_path, monkeypatch):
    monkeypatch.setattr(clock, "_offset", 0.0)
    db = Database(pg_url, role="board")
    measured = db.clock_offset()
    assert abs(measured) < 1.0  # the same machine: the same clock, give or take the round trip
    assert Database(f"sqlite:///{tmp_path}/x.db", role="board").clock_offset() is None
    # a host whose clock is an hour behind the database's
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    assert clock.follow_database(db) == pytest.approx(3600, abs=1.0)
    assert abs(clock.epoch() - real()) <= 1
    assert clock.epoch(NOW) == NOW  # an explicit clock is never shifted
    db.dispose()


# -- the host registry ----------------------------------------------------------------------


def test_hosts_are_up_down_or_stopped_with_their_open_runs(store):
    timeout = 300
    with store.ops.write() as conn:
        for name, beat, stopped in (("spark-1", NOW - 10, None), ("spark-2", NOW - timeout - 1, None),
                                    ("old", NOW - 5000, NOW - 5000)):
            conn.execute(ops_hosts.insert().values(
                host=name, pid=100, boot_id="b", version="0.7.0", capacity=4, started_at=NOW - 9000,
                heartbeat_at=beat, stopped_at=stopped,
                info=json.dumps({"labels": ["gpu=gb10"], "gpu": {"devices": [{"name": "NVIDIA GB10"}]}})))
    for n, host in enumerate(["spark-1", "spark-1", "spark-2"]):
        task_id = board.create_task(store.board, f"t{n}", now=NOW)
        board.claim(store.board, task_id, lock=f"{host}:{n}", now=NOW)
    found = {h.host: h for h in fleet.hosts(store.ops, store.board, timeout_seconds=timeout, now=NOW)}
    assert {name: h.state for name, h in found.items()} == {"spark-1": "up", "spark-2": "down", "old": "stopped"}
    assert (found["spark-1"].open_runs, found["spark-2"].open_runs, found["old"].open_runs) == (2, 1, 0)
    assert found["spark-1"].labels == ["gpu=gb10"] and found["spark-1"].gpu["devices"][0]["name"] == "NVIDIA GB10"
    with store.ops.write() as conn:
        conn.execute(update(ops_hosts).where(ops_hosts.c.host == "spark-1").values(info="not json"))
    again = {h.host: h for h in fleet.hosts(store.ops, store.board, timeout_seconds=timeout, now=NOW)}
    assert again["spark-1"].labels == [] and again["spark-1"].state == "up"

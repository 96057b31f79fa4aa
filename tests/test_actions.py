"""Audited actions (every button of the app) and the playbook's diagnoses and fixes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import NOW, make_settings, wait_for

from sparkops.board import queries, runs
from sparkops.board import transitions as board
from sparkops.control import actions, playbook
from sparkops.core.procs import RunIdentity, boot_id, describe
from sparkops.engine import workers
from sparkops.jobs.framework import JobContext
from sparkops.storage.store import open_store


@pytest.fixture
def ctx(tmp_path):
    settings = make_settings(tmp_path, SPARKOPS_SERVICES=json.dumps(
        {name: {"enabled": False} for name in ("vllm", "gateway", "redis", "ui", "tunnel")}))
    store = open_store(settings, create=True, now=NOW)
    yield JobContext.create(settings, store)
    store.dispose()


def audit(ctx) -> list[tuple]:
    return [(r["actor"], r["action"], r["target"], r["result"]) for r in reversed(actions.audit_log(ctx.store.ops))]


def test_task_actions_change_the_board_and_are_audited(ctx):
    made = actions.create_task(ctx, "ui@10.0.0.7", "Fix the parser", body="details", priority=1)
    task = made.data["task_id"]
    assert made.ok and queries.get_task(ctx.store.board, task)["created_by"] == "ui@10.0.0.7"
    assert actions.set_priority(ctx, "ui@10.0.0.7", task, 5).message == f"{task}: priority 1 -> 5"
    assert actions.block(ctx, "ui@10.0.0.7", task, "needs a key").ok
    assert queries.get_task(ctx.store.board, task)["status"] == "blocked"
    assert actions.requeue(ctx, "ui@10.0.0.7", task).ok
    assert queries.get_task(ctx.store.board, task)["status"] == "ready"
    assert actions.comment(ctx, "ui@10.0.0.7", task, "looks fine").ok
    assert actions.archive(ctx, "ui@10.0.0.7", task).ok
    refused = actions.archive(ctx, "ui@10.0.0.7", task)  # twice: refused with the library's message
    assert not refused.ok and "cannot archive" in refused.message
    assert audit(ctx) == [
        ("ui@10.0.0.7", "task.create", None, "ok"), ("ui@10.0.0.7", "task.priority", task, "ok"),
        ("ui@10.0.0.7", "task.block", task, "ok"), ("ui@10.0.0.7", "task.requeue", task, "ok"),
        ("ui@10.0.0.7", "task.comment", task, "ok"), ("ui@10.0.0.7", "task.archive", task, "ok"),
        ("ui@10.0.0.7", "task.archive", task, "refused")]


def test_an_unexpected_failure_is_an_audited_message_not_an_exception(ctx):
    result = actions.perform(ctx, "ui@x", "test.boom", "t", {"a": 1}, lambda: 1 / 0)
    assert not result.ok and "ZeroDivisionError" in result.message
    assert audit(ctx)[-1] == ("ui@x", "test.boom", "t", "error")


def test_reclaim_stops_the_live_worker_before_releasing_the_claim(ctx):
    task = board.create_task(ctx.store.board, "long job", now=NOW)
    run = board.claim(ctx.store.board, task, lock=f"{ctx.host}:1", now=NOW).run_id
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        agent = describe(worker.pid)
        identity = RunIdentity(ctx.host, boot_id(), agent=agent)
        runs.record_process(ctx.store.board, task, run_id=run, claim_lock=f"{ctx.host}:{worker.pid}",
                            worker_pid=worker.pid, identity={"process": identity.as_dict()}, now=NOW)
        workers.register(workers.directory(ctx.settings), task, run, identity)  # as the shim records it
        result = actions.reclaim_task(ctx, "ui@ops", task)
        assert result.ok, result.message
        wait_for(lambda: worker.poll() is not None, "the worker to be stopped")
        assert queries.get_task(ctx.store.board, task)["status"] == "ready"
    finally:
        worker.kill()
        worker.wait()
    not_running = actions.reclaim_task(ctx, "ui@ops", task)
    assert not not_running.ok and "not running" in not_running.message


def test_reclaim_never_signals_a_process_only_the_row_names(ctx):
    """The row is data: a process identity SparkOps has no record of starting is
    not signalled; the claim is released, saying so."""
    task = board.create_task(ctx.store.board, "forged", now=NOW)
    run = board.claim(ctx.store.board, task, lock=f"{ctx.host}:1", now=NOW).run_id
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        identity = RunIdentity(ctx.host, boot_id(), agent=describe(stranger.pid))
        runs.record_process(ctx.store.board, task, run_id=run, claim_lock=f"{ctx.host}:1",
                            worker_pid=stranger.pid, identity={"process": identity.as_dict()}, now=NOW)
        result = actions.reclaim_task(ctx, "ui@ops", task)
        assert result.ok and "not signalled: this host has no record of starting run" in result.message
        time.sleep(0.2)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_run_a_job_now(ctx):
    result = actions.run_job_now(ctx, "ui@ops", "promote")
    assert result.ok and result.message == "promote: nothing to promote"
    assert audit(ctx)[-1] == ("ui@ops", "job.promote", "promote", "ok")


def test_playbook_capacity_diagnosis_and_its_fix(ctx):
    """The seed's "At capacity: 1/1 running" with nothing running: a claim whose worker
    never started. The diagnosis says so; the fix reclaims it."""
    task = board.create_task(ctx.store.board, "stuck", now=NOW - 3600)
    board.claim_next(ctx.store.board, host=ctx.host, lock=f"{ctx.host}:999999", capacity=1, now=NOW - 3600)
    [capacity] = [d for d in playbook.diagnose(ctx) if d.key == "reclaim"]
    assert capacity.happening and task in capacity.evidence[0]
    assert capacity.preview == [f"would close {task} run 1 as spawn_failed"]
    assert runs.count_open_runs(ctx.store.board, ctx.host) == 1  # diagnosing changed nothing
    result = playbook.apply(ctx, "ui@ops", "reclaim")
    assert result.ok and runs.count_open_runs(ctx.store.board, ctx.host) == 0
    assert audit(ctx)[-1][1:] == ("job.reclaim", "reclaim", "ok")


def test_playbook_missing_workspace_is_recreated(ctx, tmp_path):
    task = board.create_task(ctx.store.board, "needs a dir", body="body text", now=NOW)
    root = ctx.settings["dispatch.workspace_root"]
    board.claim_next(ctx.store.board, host=ctx.host, lock=f"{ctx.host}:1", capacity=1,
                     workspace_root=str(root), now=NOW)
    [workspace] = [d for d in playbook.diagnose(ctx) if d.key == "workspace"]
    assert workspace.happening and workspace.target == task
    assert playbook.apply(ctx, "ui@ops", "workspace", task).ok
    assert (root / task / "TASK.md").read_text() == "# needs a dir\n\nbody text\n"


def test_playbook_service_fixes_need_a_restart_command(ctx):
    result = playbook.apply(ctx, "ui@ops", "restart.gateway")
    assert not result.ok and "not configured" in result.message
    unknown = playbook.apply(ctx, "ui@ops", "none")
    assert not unknown.ok and "no fix" in unknown.message

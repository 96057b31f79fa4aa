"""The demo agent as the worker shim runs it: a real subprocess in a workspace,
reporting through the real CLI to a real SQLite board; every drawn ending forced
with a rate of 1, a stale run, bad options, a missing environment, determinism."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, make_settings

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.core.errors import InvalidInput
from sparkops.demo.agent import STEPS, Options, Scenario, derive_seed, plan_run
from sparkops.storage.store import Store, open_store

FAST = ["--min-seconds", "0", "--max-seconds", "0.2"]
TASK_TEXT = "# Add a health endpoint\n\nAdd GET /health returning 200 and the version; test it.\n"


@pytest.fixture
def board_store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(make_settings(tmp_path), create=True)
    try:
        yield store
    finally:
        store.dispose()


@pytest.fixture
def claimed(tmp_path: Path, board_store: Store):
    """A claimed task with its workspace and TASK.md, as the shim prepares them."""
    task_id = board.create_task(board_store.board, "Add a health endpoint",
                                body="Add GET /health returning 200 and the version; test it.")
    run_id = board.claim(board_store.board, task_id, lock="host:1").run_id
    workspace = tmp_path / "workspaces" / task_id
    workspace.mkdir(parents=True)
    (workspace / "TASK.md").write_text(TASK_TEXT, encoding="utf-8")
    return task_id, run_id, workspace


def agent_env(tmp_path: Path, task_id: str, run_id: int, workspace: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
    env.update({
        "PYTHONPATH": str(ROOT),
        "SPARKOPS_TASK_ID": task_id, "SPARKOPS_RUN_ID": str(run_id),
        "SPARKOPS_WORKSPACE": str(workspace),
        "SPARKOPS_PROMPT_FILE": str(workspace / "TASK.md"),
        "SPARKOPS_LOG_FILE": str(tmp_path / "logs" / f"{task_id}-{run_id}.log"),
        "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
        "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db",
        "HERMES_KANBAN_TASK": task_id, "HERMES_KANBAN_RUN_ID": str(run_id),
        "HERMES_KANBAN_WORKSPACE": str(workspace),
    })
    return env


def run_agent(tmp_path, claimed, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    workspace = claimed[2]
    return subprocess.run([sys.executable, "-m", "sparkops.demo.agent", *args], check=False,
                          cwd=workspace, env=env or agent_env(tmp_path, *claimed),
                          capture_output=True, text=True, timeout=30)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_completes_through_the_cli(tmp_path, claimed, board_store):
    task_id, run_id, workspace = claimed

    done = run_agent(tmp_path, claimed, *FAST)

    assert done.returncode == 0, done.stderr
    task = queries.get_task(board_store.board, task_id)
    assert task["status"] == "done"
    words = len(TASK_TEXT.split())
    assert f"({words} words, sha256 " in task["result"]
    assert "\n" not in task["result"]
    (run,) = queries.list_runs(board_store.board, task_id=task_id)
    assert (run["id"], run["outcome"]) == (run_id, "completed")
    assert run["metadata"]["files_written"] == ["WORKLOG.md", "RESULT.md"]
    assert 0 <= run["metadata"]["duration_seconds"] < 5
    result = (workspace / "RESULT.md").read_text()
    assert f"- task words: {words}\n" in result
    assert f"- steps done: {len(STEPS)} of {len(STEPS)}\n" in result
    worklog = (workspace / "WORKLOG.md").read_text()
    assert all(f"step {n}/{len(STEPS)}" in worklog for n in range(1, len(STEPS) + 1))
    assert "reported completion" in worklog
    assert sorted(p.name for p in workspace.iterdir()) == ["RESULT.md", "TASK.md", "WORKLOG.md"]
    assert f"Completed {task_id}: running -> done (run {run_id})" in done.stdout
    assert str(tmp_path) not in done.stdout + done.stderr  # no paths or URLs printed


@pytest.mark.parametrize("flag, code, message", [
    ("--fail-rate", 1, "SimulatedCrash: step "),
    ("--rate-limit-rate", 75, "model rate limited"),
    ("--no-report-rate", 0, "could not reach the model"),
])
def test_forced_ending_leaves_the_task_to_the_shim(tmp_path, claimed, board_store, flag, code, message):
    task_id, run_id, workspace = claimed

    done = run_agent(tmp_path, claimed, *FAST, flag, "1")

    assert done.returncode == code, done.stderr
    assert message in done.stderr
    if code == 1:
        assert done.stderr.startswith("Traceback (most recent call last):")
    task = queries.get_task(board_store.board, task_id)
    assert (task["status"], task["current_run_id"]) == ("running", run_id)
    assert not (workspace / "RESULT.md").exists()
    assert "step 1/" in (workspace / "WORKLOG.md").read_text()  # it stopped partway


def test_hang_lives_until_sigterm(tmp_path, claimed, board_store):
    task_id, _, workspace = claimed
    worklog = workspace / "WORKLOG.md"
    proc = subprocess.Popen([sys.executable, "-m", "sparkops.demo.agent", *FAST, "--hang-rate", "1"],
                            cwd=workspace, env=agent_env(tmp_path, *claimed),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while "step 1/" not in (worklog.read_text() if worklog.exists() else ""):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the agent made no progress"
            time.sleep(0.02)
        time.sleep(0.4)  # longer than --max-seconds: a run that did not hang would be over
        assert proc.poll() is None

        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 143
        assert time.monotonic() - sent < 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = worklog.read_text()
    assert "terminated by SIGTERM" in log
    assert f"step {len(STEPS)}/" not in log
    assert queries.get_task(board_store.board, task_id)["status"] == "running"


def test_stale_run_report_is_refused(tmp_path, claimed, board_store):
    task_id, stale_run, workspace = claimed
    board.reclaim(board_store.board, task_id, run_id=stale_run, reason="x")
    current_run = board.claim(board_store.board, task_id, lock="host:2").run_id

    done = run_agent(tmp_path, claimed, *FAST)

    assert done.returncode == 3, done.stderr
    assert f"run {stale_run} is not the current run of {task_id}" in done.stderr
    task = queries.get_task(board_store.board, task_id)
    assert (task["status"], task["current_run_id"], task["result"]) == ("running", current_run, None)
    outcomes = {r["id"]: r["outcome"] for r in queries.list_runs(board_store.board, task_id=task_id)}
    assert outcomes == {stale_run: "reclaimed", current_run: None}
    assert "the report was refused" in (workspace / "WORKLOG.md").read_text()


@pytest.mark.parametrize("args, fragment", [
    (["--fail-rate", "1.5"], "--fail-rate must be between 0 and 1"),
    (["--fail-rate", "0.6", "--hang-rate", "0.6"], "add up to 1.2"),
    (["--min-seconds", "3", "--max-seconds", "1"], "--min-seconds 3 is more than --max-seconds 1"),
    (["--min-seconds", "-1"], "--min-seconds must be a number of seconds >= 0"),
    (["--hang-rate", "nan"], "--hang-rate must be between 0 and 1"),
    (["--seed", "abc"], "argument --seed: invalid int value"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, claimed, args, fragment):
    done = run_agent(tmp_path, claimed, *args)

    assert done.returncode == 2
    assert fragment in one_line(done.stderr)
    assert not (claimed[2] / "WORKLOG.md").exists()


@pytest.mark.parametrize("change, fragment", [
    ({"SPARKOPS_TASK_ID": None}, "SPARKOPS_TASK_ID not set"),
    ({"SPARKOPS_RUN_ID": None, "SPARKOPS_WORKSPACE": None},
     "SPARKOPS_RUN_ID, SPARKOPS_WORKSPACE not set"),
    ({"SPARKOPS_RUN_ID": "seven"}, "SPARKOPS_RUN_ID must be a run number"),
    ({"SPARKOPS_WORKSPACE": "/nonexistent/workspace"}, "SPARKOPS_WORKSPACE must be an existing"),
    ({"SPARKOPS_PROMPT_FILE": "/nonexistent/TASK.md"}, "(SPARKOPS_PROMPT_FILE) is not a readable file"),
])
def test_missing_environment_exits_2_with_one_line(tmp_path, claimed, change, fragment):
    env = agent_env(tmp_path, *claimed)
    for name, value in change.items():
        if value is None:
            del env[name]
        else:
            env[name] = value

    done = run_agent(tmp_path, claimed, *FAST, env=env)

    assert done.returncode == 2
    line = one_line(done.stderr)
    assert fragment in line
    assert "/nonexistent" not in line  # names the variable, never prints its value


def test_same_seed_same_outcome_and_duration(tmp_path, claimed):
    ends = ["--fail-rate", "0.5", "--no-report-rate", "0.5"]  # both end quickly, no report

    first = run_agent(tmp_path, claimed, *FAST, *ends, "--seed", "7")
    (claimed[2] / "WORKLOG.md").unlink()
    second = run_agent(tmp_path, claimed, *FAST, *ends, "--seed", "7")

    planned = [re.search(r"planned: .*", r.stdout).group(0) for r in (first, second)]
    assert planned[0] == planned[1]
    assert first.returncode == second.returncode
    options = Options(min_seconds=0, max_seconds=0.2, fail_rate=0.5, no_report_rate=0.5, seed=7)
    expected = plan_run(options, "t_other", 99)  # an explicit seed ignores the ids
    assert planned[0] == expected.describe()
    assert first.returncode == (1 if expected.scenario == Scenario.CRASH else 0)


def test_draw_is_per_run_and_follows_the_rates():
    options = Options(min_seconds=1, max_seconds=3, fail_rate=0.25, hang_rate=0.25)

    assert plan_run(options, "t_1", 1) == plan_run(options, "t_1", 1)
    plans = [plan_run(options, "t_1", run) for run in range(1, 401)]
    assert len({p.seconds for p in plans}) == len(plans)  # a rerun draws again
    assert all(1 <= p.seconds <= 3 for p in plans)
    counts = {s: sum(p.scenario == s for p in plans) for s in Scenario}
    assert 60 <= counts[Scenario.CRASH] <= 140 and 60 <= counts[Scenario.HANG] <= 140
    assert counts[Scenario.RATE_LIMITED] == counts[Scenario.NO_REPORT] == 0
    assert all((p.stop_after == len(STEPS)) == (p.scenario == Scenario.COMPLETE) for p in plans)
    assert plan_run(options, "t_1", 1).seed == derive_seed("t_1", 1)
    # the duration of a seed does not depend on the rates
    assert plan_run(Options(seed=5, fail_rate=1), "a", 1).seconds == plan_run(Options(seed=5), "b", 2).seconds


def test_options_reject_what_the_cli_would():
    with pytest.raises(InvalidInput, match="add up to 1.5"):
        Options(fail_rate=0.5, hang_rate=0.5, rate_limit_rate=0.25, no_report_rate=0.25)
    assert Options(fail_rate=0.1, hang_rate=0.2, rate_limit_rate=0.3, no_report_rate=0.4)

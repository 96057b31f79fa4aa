"""A board that others write too: operators (the CLI), the app's actions and the real
``hermes kanban`` CLI act on runs of a real ``jobs_runner.py``, its shims and agents.

Whoever ends a run, its agent's process group is gone within seconds, the next
agent starts only after, and live agents (sampled from /proc all along) never
exceed ``dispatch.max_in_progress``; both tools then read the task alike. Hermes'
own shapes (a claim on the tasks row only, an expired lease, its breaker fields,
its protocol violations) are read and kept the way Hermes reads and keeps them.

Needs the real ``hermes`` CLI (``.venv-hermes``, installed by ``scripts/test``):
skipped without it, except under CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, gone, make_settings, run_cli, wait_for

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.board.model import Outcome
from sparkops.control import actions
from sparkops.jobs.framework import JobContext
from sparkops.storage.store import open_store

HOSTNAME = socket.gethostname()
#: The agent of these tests: appends to WORKLOG.md every 0.1 s until stopped; a task
#: titled "stubborn" ignores SIGTERM, "graceful" exits 143 on it; "quick" completes at once.
AGENT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    task = sys.argv[1]
    title = open("TASK.md").readline()
    if "stubborn" in title:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "graceful" in title:  # catches SIGTERM and exits 128 + 15, as the demo agent does
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log = open("WORKLOG.md", "a", buffering=1)
    log.write(f"{os.getpid()} start\\n")
    if "quick" in title:
        sys.exit(subprocess.run([sys.executable, "-m", "sparkops", "task", "complete", task,
                                 "--result", "quick work"]).returncode)
    while True:
        log.write(f"{os.getpid()} working\\n")
        time.sleep(0.1)
""")


class Census:
    """Live agents of this test, sampled from /proc every 50 ms: an agent is a
    process running this test's agent script (zombies do not count)."""

    def __init__(self, script: Path):
        self.script = str(script)
        self.seen: dict[int, dict[str, Any]] = {}  # pid -> task, first, last
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="census", daemon=True)

    def start(self) -> Census:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now, live = time.monotonic(), 0
            for proc in psutil.process_iter(["pid", "cmdline", "status"]):
                cmd = proc.info["cmdline"] or []
                if len(cmd) >= 3 and cmd[1] == self.script and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    live += 1
                    entry = self.seen.setdefault(proc.info["pid"], {"task": cmd[2], "first": now})
                    entry["last"] = now
            self.peak = max(self.peak, live)
            self._stop.wait(0.05)

    def agents_of(self, task_id: str) -> list[int]:
        return [pid for pid, e in sorted(self.seen.items(), key=lambda kv: kv[1]["first"]) if e["task"] == task_id]

    def started_after(self, pid: int) -> list[int]:
        """Agents first seen after ``pid`` was seen for the last time."""
        last = self.seen[pid]["last"]
        return [p for p, e in self.seen.items() if p != pid and e["first"] > last]


class Box:
    """A board in tmp_path, the runner's settings, a real runner, the CLIs."""

    def __init__(self, tmp_path: Path, hermes: Path, **settings: str):
        self.tmp = tmp_path
        self.hermes = hermes
        self.board_file = tmp_path / "data" / "kanban.db"
        self.script = tmp_path / "agent.py"
        self.script.write_text(AGENT)
        self.env = {
            "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{self.board_file}",
            "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db",
            "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(["{python}", str(self.script), "{task_id}"]),
            "SPARKOPS_DISPATCH_MAX_IN_PROGRESS": "1",
            "SPARKOPS_DISPATCH_HEARTBEAT_SECONDS": "0.5",
            "SPARKOPS_RECLAIM_TERM_GRACE_SECONDS": "2",
            "SPARKOPS_RECLAIM_INTERVAL_SECONDS": "1",
            "SPARKOPS_DISPATCH_WORKSPACE_ROOT": str(tmp_path / "workspaces"),
            "SPARKOPS_DISPATCH_RUN_LOG_ROOT": str(tmp_path / "logs" / "runs"),
            "SPARKOPS_RUNNER_LOG_FILE": str(tmp_path / "logs" / "runner.log"),
            "SPARKOPS_SERVICES": json.dumps({n: {"enabled": False} for n in ("vllm", "gateway", "redis", "tunnel")}),
            **settings,
        }
        self.settings = make_settings(tmp_path, **{k: v for k, v in self.env.items()
                                                   if not k.startswith("SPARKOPS_STORAGE_")})
        self.store = open_store(self.settings, create=True)
        self.db = self.store.board
        self.runner: subprocess.Popen | None = None
        self.census = Census(self.script).start()

    # -- processes ----------------------------------------------------------------------

    def start_runner(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
        env.update(self.env, PYTHONPATH=str(ROOT))
        with open(self.tmp / "runner.out", "ab") as out:
            self.runner = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=self.tmp, env=env,
                                           stdout=out, stderr=subprocess.STDOUT)
        return self.runner

    def stop_runner(self) -> None:
        if self.runner is not None and self.runner.poll() is None:
            self.runner.send_signal(signal.SIGTERM)
            assert self.runner.wait(timeout=30) == 0, (self.tmp / "runner.out").read_text()

    def close(self) -> None:
        self.census.stop()
        if self.runner is not None and self.runner.poll() is None:
            self.runner.kill()
            self.runner.wait()
        for pid in list(self.census.seen):  # leave no agent behind
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.store.dispose()

    def agent(self, task_id: str, nth: int = 1, timeout: float = 30) -> int:
        """The pid of ``task_id``'s ``nth`` agent, once it runs."""
        return wait_for(lambda: len(self.census.agents_of(task_id)) >= nth and self.census.agents_of(task_id)[nth - 1],
                        f"agent {nth} of {task_id}", timeout=timeout, proc=self.runner)

    def ctx(self) -> JobContext:
        return JobContext.create(self.settings, self.store)

    # -- the two CLIs -------------------------------------------------------------------

    def sparkops(self, *args: str) -> subprocess.CompletedProcess:
        result = run_cli(*args, cwd=self.tmp, env=self.env)
        assert result.returncode == 0, f"sparkops {' '.join(args)}: {result.stderr}"
        return result

    def hermes_run(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
        env.update(HERMES_KANBAN_DB=str(self.board_file), HOME=str(self.tmp / "home"),
                   HERMES_HOME=str(self.tmp / "home" / ".hermes"))
        result = subprocess.run([str(self.hermes), "kanban", *args], env=env, capture_output=True, text=True,
                                timeout=120, cwd=self.tmp)
        # hermes exits 0 even when it refuses ("cannot block ..."): check what it said
        assert result.returncode == 0 and "cannot" not in result.stdout + result.stderr, \
            f"hermes kanban {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def hermes_json(self, *args: str) -> Any:
        return json.loads(self.hermes_run(*args, "--json").stdout)

    def both_views(self, task_id: str) -> tuple[dict, dict]:
        """The task as each tool shows it: status, runs (id, status, outcome) and
        event kinds with their runs."""
        mine = json.loads(self.sparkops("task", "show", task_id, "--json").stdout)
        theirs = self.hermes_json("show", task_id)

        def view(task: dict, runs: list[dict], events: list[dict]) -> dict:
            return {"status": task["status"],
                    "runs": sorted((r["id"], r["status"], r["outcome"]) for r in runs),
                    "events": sorted((e["kind"], e.get("run_id")) for e in events)}
        return (view(mine["task"], mine["runs"], mine["events"]),
                view(theirs["task"], theirs["runs"], theirs["events"]))


@pytest.fixture
def box(tmp_path: Path, hermes_bin: Path):
    boxes: list[Box] = []

    def make(**settings: str) -> Box:
        boxes.append(Box(tmp_path, hermes_bin, **settings))
        return boxes[-1]
    yield make
    for b in boxes:
        b.close()


def pgid_gone(pid: int) -> bool:
    """No process is left in the process group ``pid`` led."""
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.info["pid"]) == pid:
                return False
        except (psutil.Error, ProcessLookupError):
            continue
    return True


# -- whoever ends the run, the agent goes ------------------------------------------------------


def _app(action: Callable[..., actions.ActionResult], *args: str) -> Callable[[Box, str], None]:
    def act(b: Box, task_id: str) -> None:
        result = action(b.ctx(), "ui@test", task_id, *args)
        assert result.ok, result.message
    return act


ACTIONS: dict[str, tuple[Callable[[Box, str], Any], str, str]] = {
    # name: (act on the task, its status after, its first run's outcome)
    "sparkops task block": (lambda b, t: b.sparkops("task", "block", t, "operator", "stop"), "blocked", "blocked"),
    "sparkops task complete": (lambda b, t: b.sparkops("task", "complete", t, "--result", "by hand"),
                               "done", "completed"),
    "sparkops task archive": (lambda b, t: b.sparkops("task", "archive", t), "archived", "reclaimed"),
    "sparkops task reclaim": (lambda b, t: b.sparkops("task", "reclaim", t), "running", "reclaimed"),
    "the app's Reclaim": (_app(actions.reclaim_task), "running", "reclaimed"),
    "the app's Block": (_app(actions.block, "needs a human"), "blocked", "blocked"),
    "hermes kanban block": (lambda b, t: b.hermes_run("block", t, "stop", "now"), "blocked", "blocked"),
    "hermes kanban complete": (lambda b, t: b.hermes_run("complete", t, "--result", "by hermes"),
                               "done", "completed"),
    "hermes kanban reclaim": (lambda b, t: b.hermes_run("reclaim", t, "--reason", "hermes says"),
                              "running", "reclaimed"),
    # the agent catches Hermes' SIGTERM and exits 143 before Hermes closes the run
    "hermes kanban reclaim, graceful agent": (
        lambda b, t: b.hermes_run("reclaim", t, "--reason", "hermes says"), "running", "reclaimed"),
}


@pytest.mark.parametrize("name", list(ACTIONS))
def test_whoever_ends_a_run_its_agent_stops_and_the_slot_frees_only_after(box, name):
    act, status_after, outcome = ACTIONS[name]
    b = box()
    first_task = board.create_task(b.db, "graceful first task" if "graceful" in name else "first task",
                                   priority=5)
    second_task = board.create_task(b.db, "second task", priority=1)
    b.start_runner()
    first = b.agent(first_task)
    worklog = b.tmp / "workspaces" / first_task / "WORKLOG.md"
    wait_for(lambda: worklog.exists() and "working" in worklog.read_text(), "the first agent to work")

    acted = time.monotonic()
    act(b, first_task)
    wait_for(lambda: pgid_gone(first), f"the first agent's process group to be gone ({name})", timeout=5)
    assert time.monotonic() - acted <= 5

    # the slot is used again, only after the first agent is gone, and never twice at once
    after = wait_for(lambda: b.census.started_after(first), "the next agent", timeout=30, proc=b.runner)
    assert b.census.peak == 1, f"{b.census.peak} agents were alive at once"
    expected_next = first_task if status_after == "running" else second_task  # a reclaimed task runs again first
    assert b.census.seen[after[0]]["task"] == expected_next
    b.stop_runner()

    detail = queries.task_detail(b.db, first_task)
    runs = sorted(detail["runs"], key=lambda r: r["id"])
    assert runs[0]["outcome"] == outcome, runs
    assert detail["task"]["status"] == status_after
    assert detail["task"]["consecutive_failures"] == 0, "the agent's death was counted as a failure"
    assert not [r for r in runs if r["outcome"] in ("crashed", "timed_out")], runs
    mine, theirs = b.both_views(first_task)
    assert mine == theirs


def test_an_unblocked_task_waits_for_its_old_agent(box):
    """Block then unblock at once, while the old agent (which ignores SIGTERM) is still
    being stopped: the task gets its next agent only after the old one is gone, and
    two agents' lines never interleave in its WORKLOG.md."""
    b = box(SPARKOPS_RECLAIM_TERM_GRACE_SECONDS="3")
    task = board.create_task(b.db, "stubborn task")
    b.start_runner()
    first = b.agent(task)
    b.sparkops("task", "block", task, "wait")
    b.sparkops("task", "unblock", task)
    second = b.agent(task, nth=2, timeout=30)
    assert b.census.seen[second]["first"] > b.census.seen[first]["last"]
    assert b.census.peak == 1
    b.stop_runner()

    lines = [line.split()[0] for line in (b.tmp / "workspaces" / task / "WORKLOG.md").read_text().splitlines()]
    owners = [pid for i, pid in enumerate(lines) if i == 0 or pid != lines[i - 1]]
    assert owners == [str(first), str(second)], f"the agents' lines interleave: {owners}"
    runs = sorted(queries.task_detail(b.db, task)["runs"], key=lambda r: r["id"])
    # the dispatcher waited for the old agent: no run was claimed and given back meanwhile
    assert [(r["outcome"], r["ended_at"] is None) for r in runs] == [("blocked", False), (None, True)]


def test_a_quick_agent_that_reports_is_not_stopped(box):
    """Its own report (with the shim's token) lets the agent finish normally."""
    b = box()
    task = board.create_task(b.db, "quick task")
    b.start_runner()
    wait_for(lambda: queries.get_task(b.db, task)["status"] == "done", "the quick task to be done", proc=b.runner)
    b.stop_runner()
    [run] = queries.task_detail(b.db, task)["runs"]
    assert run["outcome"] == "completed" and run["metadata"]["reporter"]["token"]
    log = (b.tmp / "logs" / "runs" / task / f"run-{run['id']}.log").read_text()
    assert "stopping the agent" not in log


# -- Hermes' shapes -------------------------------------------------------------------------------


def _bare_claim(board_file: Path, task_id: str, pid: int, *, started: int) -> None:
    """A running task with its claim on the tasks row only (no run row): the seed's
    hand-edited fix, and boards from older Hermes versions."""
    conn = sqlite3.connect(board_file)
    with conn:
        conn.execute("UPDATE tasks SET status='running', claim_lock=?, claim_expires=?, worker_pid=?, "
                     "started_at=? WHERE id=?", (f"{HOSTNAME}:{pid}", started + 900, pid, started, task_id))
    conn.close()


def test_a_bare_claim_is_reclaimed_when_its_worker_is_dead_and_spared_while_it_lives(box):
    b = box()
    now = int(time.time())
    dead_worker = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_worker.wait()
    live_worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                   env={**os.environ}, process_group=0)
    try:
        dead, live = board.create_task(b.db, "dead worker"), board.create_task(b.db, "live worker")
        _bare_claim(b.board_file, dead, dead_worker.pid, started=now - 60)
        _bare_claim(b.board_file, live, live_worker.pid, started=now - 60)

        out = b.sparkops("reclaim").stdout
        assert f"{dead} run" in out and f"worker pid {dead_worker.pid} is gone" in out
        assert live not in out
        assert queries.get_task(b.db, dead)["status"] == "ready"
        assert queries.get_task(b.db, live)["status"] == "running"
        [crashed] = queries.task_detail(b.db, dead)["runs"]
        assert crashed["outcome"] == "crashed"
        [kept] = queries.task_detail(b.db, live)["runs"]
        assert kept["ended_at"] is None and kept["worker_pid"] == live_worker.pid
        for task_id in (dead, live):
            mine, theirs = b.both_views(task_id)
            assert mine == theirs
        assert live_worker.poll() is None  # never signalled
    finally:
        live_worker.kill()
        live_worker.wait()


def test_a_live_run_longer_than_its_lease_is_not_reclaimed_by_hermes_dispatch(box):
    """A fleet host name (not this machine's hostname) and a 3-second lease: Hermes'
    dispatcher releases expired claims of other hosts, so the heartbeats must keep
    the lease ahead while the agent works for 8 s."""
    b = box(SPARKOPS_HOST_NAME="gb10-fleet", SPARKOPS_DISPATCH_CLAIM_TTL_SECONDS="3")
    task = board.create_task(b.db, "long task")
    b.start_runner()
    agent = b.agent(task)
    started = time.monotonic()
    while time.monotonic() - started < 8:
        result = b.hermes_json("dispatch", "--max", "1")
        assert result["reclaimed"] == 0, result
        time.sleep(1)
    assert not gone(agent) and queries.get_task(b.db, task)["status"] == "running"
    [run] = queries.task_detail(b.db, task)["runs"]
    assert run["ended_at"] is None
    with sqlite3.connect(b.board_file) as conn:
        expires = conn.execute("SELECT claim_expires FROM tasks WHERE id=?", (task,)).fetchone()[0]
    assert expires > time.time()


# -- the breakers, as Hermes reads them ----------------------------------------------------------


def _trip(db, task_id: str, outcome: Outcome, times: int, *, hours_from_now: int = 0, **limits: int) -> None:
    """Claim and fail the task ``times`` times, an hour apart (past any backoff)."""
    for n in range(times):
        at = time.time() + (hours_from_now + n) * 3600
        change = board.claim_next(db, host="h", lock=f"h:{n}", capacity=10, now=at)
        assert change is not None and change.task_id == task_id
        board.fail(db, task_id, run_id=change.run_id, outcome=outcome, error="exit 0, no report", now=at,
                   **limits)


@pytest.mark.parametrize("outcome, limits, times", [
    (Outcome.CRASHED, {"failure_limit": 1}, 1),  # 1 failure: below Hermes' own limit of 2
    (Outcome.PROTOCOL_VIOLATION, {"failure_limit": 2, "protocol_violation_limit": 2}, 2),  # counter stays 0
], ids=["failure limit", "protocol violations"])
def test_a_tripped_breaker_stays_blocked_through_hermes_list_and_dispatch(box, outcome, limits, times):
    b = box()
    task = board.create_task(b.db, "doomed", assignee="default")
    _trip(b.db, task, outcome, times, **limits)
    assert queries.get_task(b.db, task)["status"] == "blocked"

    b.hermes_json("list")
    b.hermes_json("dispatch", "--max", "4")
    assert queries.get_task(b.db, task)["status"] == "blocked"
    mine, theirs = b.both_views(task)
    assert mine == theirs

    b.sparkops("task", "unblock", task)  # a deliberate unblock still works, for both tools
    assert queries.get_task(b.db, task)["status"] == "ready"


def _hermes_streak(b: Box, task_id: str) -> int:
    """Hermes' own count of the task's protocol-violation streak (its code, its venv)."""
    code = ("import sqlite3, sys; from hermes_cli.kanban_db import _protocol_violation_streak as s; "
            "c = sqlite3.connect(sys.argv[1]); c.row_factory = sqlite3.Row; print(s(c, sys.argv[2]))")
    out = subprocess.run([str(b.hermes.parent / "python"), "-c", code, str(b.board_file), task_id],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_protocol_violations_count_in_both_tools_streaks(box):
    b = box()
    task = board.create_task(b.db, "exits 0")
    _trip(b.db, task, Outcome.PROTOCOL_VIOLATION, 1, failure_limit=2, protocol_violation_limit=3)
    run = queries.task_detail(b.db, task)["runs"][0]
    assert run["outcome"] == "crashed" and run["metadata"]["protocol_violation"] is True
    assert _hermes_streak(b, task) == 1

    # one booked the way Hermes books it (its worker exited 0 without a report)
    change = board.claim_next(b.db, host="h", lock="h:9", capacity=10, now=time.time() + 3600)
    conn = sqlite3.connect(b.board_file)
    with conn:
        conn.execute("UPDATE task_runs SET status='crashed', outcome='crashed', ended_at=?, metadata=?, "
                     "error='worker exited cleanly (rc=0) without calling kanban_complete or kanban_block "
                     "— protocol violation.' WHERE id=?",
                     (int(time.time()) + 3600, json.dumps({"exit_code": 0, "protocol_violation": True}),
                      change.run_id))
        conn.execute("UPDATE tasks SET status='ready', current_run_id=NULL, claim_lock=NULL WHERE id=?", (task,))
    conn.close()
    assert _hermes_streak(b, task) == 2

    _trip(b.db, task, Outcome.PROTOCOL_VIOLATION, 1, hours_from_now=2, failure_limit=2,
          protocol_violation_limit=3)
    assert queries.get_task(b.db, task)["status"] == "blocked"  # the third in a row, counted across tools
    assert _hermes_streak(b, task) == 3
    kinds = [e["kind"] for e in queries.task_detail(b.db, task)["events"]]
    assert kinds[-3:] == ["protocol_violation", "gave_up", "blocked"]


# -- SparkOps acting on Hermes' runs -------------------------------------------------------------


def test_sparkops_task_reclaim_stops_a_hermes_worker_it_can_prove_and_spares_a_stranger(box, tmp_path):
    """A worker that ``hermes kanban dispatch`` started (HERMES_BIN: a script that
    sleeps): ``sparkops task reclaim`` checks the row's worker_pid (its environment
    names the task, it started after the run, it leads its group) before it signals
    it. A worker_pid that points at a stranger is never signalled."""
    b = box()
    worker = tmp_path / "fake-hermes-worker.sh"
    worker.write_text("#!/bin/sh\nexec sleep 60\n")
    worker.chmod(0o755)
    task = board.create_task(b.db, "hermes works on it", assignee="default")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
    env.update(HERMES_KANBAN_DB=str(b.board_file), HOME=str(b.tmp / "home"),
               HERMES_HOME=str(b.tmp / "home" / ".hermes"), HERMES_BIN=str(worker))
    out = subprocess.run([str(b.hermes), "kanban", "dispatch", "--max", "1", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert [s["task_id"] for s in json.loads(out.stdout)["spawned"]] == [task], out.stdout + out.stderr
    pid = queries.get_task(b.db, task)["worker_pid"]
    assert pid and not gone(pid)

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], process_group=0)
    try:
        other = board.create_task(b.db, "a forged row")
        board.claim(b.db, other, lock=f"{HOSTNAME}:1")
        with sqlite3.connect(b.board_file) as conn:
            conn.execute("UPDATE tasks SET worker_pid=? WHERE id=?", (stranger.pid, other))
            conn.execute("UPDATE task_runs SET worker_pid=? WHERE task_id=?", (stranger.pid, other))
        refused = run_cli("task", "reclaim", other, cwd=b.tmp, env=b.env)
        assert refused.returncode == 1 and "is not the task's worker" in refused.stderr
        assert stranger.poll() is None and queries.get_task(b.db, other)["status"] == "running"
    finally:
        stranger.kill()
        stranger.wait()

    result = b.sparkops("task", "reclaim", task, "--reason", "operator")
    assert "worker: process group" in result.stdout
    wait_for(lambda: gone(pid), "the hermes worker to be gone", timeout=5)
    assert queries.get_task(b.db, task)["status"] == "ready"
    mine, theirs = b.both_views(task)
    assert mine == theirs

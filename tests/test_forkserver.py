"""The warm forkserver (``sparkops/engine/forkserver.py``) as the runner uses it: a real
``python -m sparkops.engine.forkserver`` forking real shims on a real SQLite board.
Each forked shim is a shim as a plain start makes it (its own session, its output in
the run's log); exits are told, forged records start nothing, and a forkserver that
dies leaves its shims running and their exits known as unknown once they end."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, gone, wait_for

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.board.model import RetryPolicy
from sparkops.config import load_settings
from sparkops.core import procs
from sparkops.engine import forkserver
from sparkops.engine.dispatch import handover_record
from sparkops.storage.store import open_store

HOST = socket.gethostname()
NO_BACKOFF = RetryPolicy(backoff_seconds=0, backoff_max_seconds=0, rate_limit_cooldown_seconds=0)
REPORTS = ["{python}", "-m", "sparkops", "task", "complete", "{task_id}", "--result", "forked"]
WAITS_FOR_GO = ["{python}", "-c", "import os, time\nwhile not os.path.exists('go'): time.sleep(0.02)\n"
                "raise SystemExit(3)"]


class Board:
    def __init__(self, tmp_path: Path, agent: list[str]):
        self.tmp = tmp_path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
        self.env.update({
            "PYTHONPATH": str(ROOT),
            "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/kanban.db",
            "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/sparkops.db",
            "SPARKOPS_DISPATCH_WORKSPACE_ROOT": str(tmp_path / "workspaces"),
            "SPARKOPS_DISPATCH_RUN_LOG_ROOT": str(tmp_path / "logs"),
            "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(agent),
            "SPARKOPS_DISPATCH_REPORT_EXIT_GRACE_SECONDS": "5",
        })
        self.store = open_store(load_settings(env=self.env, cwd=tmp_path), create=True)

    def claim(self, title: str = "fork me") -> tuple[str, int]:
        task_id = board.create_task(self.store.board, title)
        change = board.claim_next(self.store.board, host=HOST, lock=f"{HOST}:{os.getpid()}", capacity=100,
                                  policy=NO_BACKOFF, workspace_root=str(self.tmp / "workspaces"))
        return task_id, change.run_id

    def log(self, task_id: str, run_id: int) -> Path:
        return self.tmp / "logs" / task_id / f"run-{run_id}.log"

    def start(self) -> forkserver.Forkserver:
        return forkserver.Forkserver.start(cwd=self.tmp, env=self.env)


@pytest.fixture
def servers() -> Iterator[list[forkserver.Forkserver]]:
    started: list[forkserver.Forkserver] = []
    yield started
    for server in started:
        if server.alive():
            server.stop()


def test_each_run_gets_a_forked_shim_in_its_own_session_and_its_exit_is_told(tmp_path, servers):
    b = Board(tmp_path, REPORTS)
    server = b.start()
    servers.append(server)
    runs = [b.claim(f"task {i}") for i in range(3)]
    shims = [server.hand(handover_record(t, r, b.log(t, r)), r) for t, r in runs]
    assert all(s is not None for s in shims) and len({s.pid for s in shims}) == 3
    wait_for(lambda: all(s.poll() is not None for s in shims), "the shims to end", timeout=60)
    assert [s.returncode for s in shims] == [0, 0, 0]
    for task_id, run_id in runs:
        detail = queries.task_detail(b.store.board, task_id)
        assert detail["task"]["status"] == "done" and detail["task"]["result"] == "forked"
        [run] = detail["runs"]
        shim = run["metadata"]["process"]["shim"]
        assert shim["pid"] in {s.pid for s in shims} and shim["sid"] == shim["pid"]  # its own session
        assert "starting agent" in b.log(task_id, run_id).read_text()  # the shim's own lines, in its log
    assert server.alive()  # one forkserver, many runs
    b.store.dispose()


def test_a_forged_record_starts_nothing_and_the_forkserver_goes_on(tmp_path, servers):
    b = Board(tmp_path, REPORTS)
    server = b.start()
    servers.append(server)
    forged = (json.dumps({"task_id": "../../evil", "run_id": 1, "log": str(tmp_path / "evil.log")}) + "\n").encode()
    assert server.hand(forged, 1) is None  # refused: no shim is forked for it
    assert not (tmp_path / "evil.log").exists() and not (tmp_path.parent / "evil").exists()
    task_id, run_id = b.claim()
    shim = server.hand(handover_record(task_id, run_id, b.log(task_id, run_id)), run_id)
    assert shim is not None
    wait_for(lambda: shim.poll() is not None, "the shim to end", timeout=60)
    assert queries.get_task(b.store.board, task_id)["status"] == "done"
    b.store.dispose()


def test_shims_outlive_their_forkserver_and_their_end_is_then_unknown(tmp_path, servers):
    b = Board(tmp_path, WAITS_FOR_GO)
    server = b.start()
    servers.append(server)
    task_id, run_id = b.claim()
    shim = server.hand(handover_record(task_id, run_id, b.log(task_id, run_id)), run_id)
    assert shim is not None
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait()
    assert shim.poll() is None and not gone(shim.pid)  # the shim runs on
    workspace = tmp_path / "workspaces" / task_id
    wait_for(lambda: workspace.is_dir(), "the workspace")
    (workspace / "go").touch()  # the agent exits 3: the shim books a crash and ends
    wait_for(lambda: shim.poll() is not None, "the shim to end", timeout=60)
    assert shim.returncode == forkserver.EXIT_UNKNOWN
    [run] = queries.list_runs(b.store.board, task_id=task_id)
    assert run["outcome"] == "crashed"
    assert procs.is_alive(shim.recorded) is False
    b.store.dispose()

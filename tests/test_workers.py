"""The registry of live workers (``sparkops/engine/workers.py``), on real processes: entries
written and read back, dead ones dropped, malformed ones ignored, and a stray agent
(its shim gone, its run closed) stopped by its recorded identity only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import gone, wait_for

from sparkops.core import procs
from sparkops.core.procs import Proc, RunIdentity
from sparkops.engine import workers


def spawn(seconds: float = 60) -> subprocess.Popen:
    """A process in a group and a session of its own, as an agent under its shim
    (the shim leads a session; the agent leads a group in it). Under pytest's own
    session it would not do: where that session is led from outside this pid
    namespace (as in CI) it reads 0, and no group is provably ours."""
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"],
                            start_new_session=True)


def identity_of(agent: subprocess.Popen | None, shim: Proc | None = None) -> RunIdentity:
    return RunIdentity("h", procs.boot_id(), shim=shim,
                       agent=procs.describe(agent.pid) if agent is not None else None)


def explain(entries: list[workers.Worker]) -> str:
    """What each entry recorded and what the kernel says of those processes now."""
    return "entries (run, recorded, /proc now, alive, group): " + repr([
        (w.run_id, p, procs.stat_of(p.pid), procs.is_alive(p), procs.group_members(p))
        for w in entries for p in (w.identity.shim, w.identity.agent) if p is not None])


def only_live(root: Path) -> workers.Worker:
    """The one live worker under ``root`` (a failure says why there is not one)."""
    entries = workers.scan(root)
    found = workers.live(root)
    assert len(found) == 1, explain(entries)
    return found[0]


@pytest.fixture
def procs_started():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_registered_worker_is_live_until_its_processes_are_gone(tmp_path: Path, procs_started):
    agent = spawn()
    procs_started.append(agent)
    workers.register(tmp_path, "t_00000001", 7, identity_of(agent))

    worker = only_live(tmp_path)
    assert (worker.task_id, worker.run_id, worker.agent_alive, worker.shim_alive) == ("t_00000001", 7, True, False)

    agent.kill()
    agent.wait()
    assert workers.live(tmp_path) == []
    assert not (tmp_path / "7.json").exists()  # a dead entry is dropped


def test_a_leftover_in_the_agents_group_keeps_the_worker_live(tmp_path: Path, procs_started):
    """The agent exits but a child it left in its process group still runs."""
    agent = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
                              "'import time; time.sleep(60)']); print('left a child', flush=True)"],
                             start_new_session=True, stdout=subprocess.PIPE, text=True)
    procs_started.append(agent)
    recorded = procs.describe(agent.pid)
    assert agent.stdout.readline().strip() == "left a child"
    agent.wait()
    workers.register(tmp_path, "t_00000002", 8, RunIdentity("h", procs.boot_id(), agent=recorded))

    worker = only_live(tmp_path)
    assert worker.agent_alive
    assert workers.stop(tmp_path, worker, grace=2).startswith("process group")
    assert workers.live(tmp_path) == []


def test_malformed_entries_are_ignored(tmp_path: Path):
    (tmp_path / "1.json").write_text("{not json")
    (tmp_path / "2.json").write_text(json.dumps({"task_id": "t_1", "run_id": 3, "process": {}}))  # wrong run
    (tmp_path / "4.json").write_text(json.dumps({"task_id": ["x"], "run_id": 4}))
    (tmp_path / "5.json").write_text(json.dumps({"task_id": "t_1", "run_id": 5, "process": "pid 1"}))
    (tmp_path / "notes.txt").write_text("hello")
    assert workers.scan(tmp_path) == []
    assert workers.scan(tmp_path / "missing") == []


def test_strays_are_agents_of_closed_runs_whose_shim_is_gone(tmp_path: Path, procs_started):
    shim, agent = spawn(), spawn()
    procs_started += [shim, agent]
    workers.register(tmp_path, "t_a", 1, identity_of(agent, shim=procs.describe(shim.pid)))  # shim alive
    lone = spawn()
    procs_started.append(lone)
    workers.register(tmp_path, "t_b", 2, identity_of(lone))  # shim gone

    entries = workers.scan(tmp_path)
    live = workers.live(tmp_path)
    assert {w.run_id for w in live} == {1, 2}, explain(entries)
    assert {w.run_id for w in workers.strays(live, open_runs={2})} == set()  # its run is open: keep the claim
    assert {w.run_id for w in workers.strays(live, open_runs=set())} == {2}  # the shim of run 1 will stop it


def test_a_reused_pid_is_never_signalled(tmp_path: Path, procs_started):
    """An entry whose recorded start time does not match the process now holding the
    pid describes a process that is gone: dropped, nothing signalled."""
    stranger = spawn()
    procs_started.append(stranger)
    real = procs.describe(stranger.pid)
    forged = RunIdentity("h", procs.boot_id(), agent=Proc(real.pid, real.start - 100, real.pgid))
    workers.register(tmp_path, "t_c", 3, forged)

    assert workers.live(tmp_path) == []
    time.sleep(0.2)
    assert stranger.poll() is None and not gone(stranger.pid)


def test_register_replaces_the_entry_whole(tmp_path: Path, procs_started):
    agent = spawn()
    procs_started.append(agent)
    workers.register(tmp_path, "t_d", 9, RunIdentity("h", procs.boot_id(), shim=procs.describe(os.getpid())))
    workers.register(tmp_path, "t_d", 9, identity_of(agent, shim=procs.describe(os.getpid())))
    worker = only_live(tmp_path)
    assert worker.identity.agent.pid == agent.pid
    assert [p.name for p in tmp_path.iterdir()] == ["9.json"]  # no temporaries left
    workers.unregister(tmp_path, 9)
    workers.unregister(tmp_path, 9)  # twice is fine
    wait_for(lambda: workers.scan(tmp_path) == [], "the entry to go")

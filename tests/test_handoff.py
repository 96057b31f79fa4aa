"""The hand-off of a worker's report to its shim (``sparkops/engine/handoff.py``,
``sparkops/cli/report.py``) on a real socket: only the run's own token and run are
taken, the reporter is the connecting process, and everything else falls back to
the full command line. The end-to-end report through a real shim is in test_shim.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT

from sparkops.cli import report
from sparkops.engine import handoff

TOKEN = "a" * 32


@pytest.fixture
def listener() -> Iterator[tuple[handoff.Listener, list[tuple[dict[str, Any], int]]]]:
    taken: list[tuple[dict[str, Any], int]] = []

    def handle(request: dict[str, Any], pid: int) -> dict[str, Any]:
        taken.append((request, pid))
        return {"change": {"task_id": request["task_id"], "from": "running", "to": "done",
                           "run_id": request["run_id"]}}

    server = handoff.Listener(task_id="t_00000001", run_id=7, token=TOKEN, handle=handle)
    yield server, taken
    server.close()


def env_for(server: handoff.Listener, **extra: str) -> dict[str, str]:
    return {handoff.SOCKET_ENV: server.name, handoff.REPORT_TOKEN_ENV: TOKEN,
            "SPARKOPS_TASK_ID": "t_00000001", "SPARKOPS_RUN_ID": "7", **extra}


def test_the_shim_takes_its_own_runs_report_and_knows_who_sent_it(listener, capsys):
    server, taken = listener
    assert report.hand_off(["task", "complete", "t_00000001", "--result", "ok"], env_for(server)) == 0
    assert capsys.readouterr().out == "Completed t_00000001: running -> done (run 7)\n"
    [(request, pid)] = taken
    assert pid == os.getpid()  # from the socket's peer credentials, not from the request
    assert (request["verb"], request["run_id"], request["result"], request["metadata"]) == ("complete", 7, "ok", None)


def test_a_report_process_is_the_peer(listener):
    """A separate process: the pid the shim records is that process's."""
    server, taken = listener
    env = {**os.environ, **env_for(server), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sparkops", "task", "block", "t_00000001", "needs", "a", "key",
                           "--kind", "needs_input", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [(request, pid)] = taken
    assert (request["verb"], request["reason"], request["kind"]) == ("block", "needs a key", "needs_input")
    assert pid != os.getpid() and '"to": "done"' in done.stdout


@pytest.mark.parametrize("change", [
    {handoff.REPORT_TOKEN_ENV: "b" * 32},   # not the run's token
    {"SPARKOPS_RUN_ID": "8"},               # another run's worker
])
def test_a_request_that_is_not_the_runs_own_is_not_taken(listener, change):
    server, taken = listener
    request = {"verb": "complete", "task_id": "t_00000001", "run_id": int(env_for(server, **change)["SPARKOPS_RUN_ID"]),
               "token": env_for(server, **change)[handoff.REPORT_TOKEN_ENV]}
    assert handoff.ask(server.name, request) == {"handled": False}
    assert taken == []


@pytest.mark.parametrize("argv, env_change", [
    (["task", "show", "t_00000001"], {}),                                  # not a report
    (["task", "complete", "t_00000001", "--config", "x.toml"], {}),        # its own settings
    (["--config", "x.toml", "task", "complete", "t_00000001"], {}),
    (["task", "complete", "t_00000002"], {}),                              # another task
    (["task", "complete", "t_00000001", "--run", "8"], {}),                # another run
    (["task", "complete", "t_00000001", "--metadata", "[1]"], {}),         # the full CLI says why
    (["task", "block", "t_00000001", "--kind", "nonsense"], {}),
    (["task", "complete", "t_00000001", "--help"], {}),
    (["task", "complete", "t_00000001"], {handoff.SOCKET_ENV: ""}),       # no shim
])
def test_anything_else_goes_to_the_full_command_line(listener, argv, env_change):
    server, taken = listener
    assert report.hand_off(argv, env_for(server, **env_change)) is None
    assert taken == []


def test_a_shim_that_is_gone_sends_the_report_to_the_full_command_line(listener):
    server, taken = listener
    env = env_for(server)
    server.close()
    assert report.hand_off(["task", "complete", "t_00000001"], env) is None
    assert handoff.ask(env[handoff.SOCKET_ENV], {"token": TOKEN}) is None


def test_an_error_is_said_with_its_exit_code(capsys):
    def refuse(request: dict[str, Any], pid: int) -> dict[str, Any]:
        return {"error": "run 7 is not the current run of t_00000001 (it is 9)", "code": 1}

    server = handoff.Listener(task_id="t_00000001", run_id=7, token=TOKEN, handle=refuse)
    try:
        assert report.hand_off(["task", "complete", "t_00000001"], env_for(server)) == 1
    finally:
        server.close()
    assert capsys.readouterr().err == "sparkops: error: run 7 is not the current run of t_00000001 (it is 9)\n"


def test_a_stopped_shim_does_not_hold_up_the_report():
    """A shim that does not take the report at once (stopped, stuck: the kernel
    completes the connection, nobody answers) is passed over and the full command line
    makes the report (test_reclaim.py: refused as stale, after a reclaim)."""
    name = "@sparkops-test-stopped-" + os.urandom(6).hex()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.bind("\0" + name[1:])
        stuck.listen(1)  # never accepts, never answers
        started = time.monotonic()
        assert handoff.ask(name, {"token": TOKEN, "task_id": "t_00000001", "run_id": 7}, take_timeout=0.5) is None
        assert time.monotonic() - started < 5

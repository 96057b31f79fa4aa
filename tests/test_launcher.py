"""``python -m sparkops up``: both children start, the app answers, signals stop
both; unsafe bindings are refused before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, http_status, make_settings, run_cli

from sparkops.config import Secrets
from sparkops.core import procs
from sparkops.core.errors import ConfigError
from sparkops.engine import workers
from sparkops.runner.launcher import app_url, check_ui_binding, is_loopback
from sparkops.runner.loop import RunnerLock, lock_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def up_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
    env.update({
        "PYTHONPATH": str(ROOT),
        "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
        "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db",
        "SPARKOPS_RUNNER_LOG_FILE": str(tmp_path / "logs" / "runner.log"),
        "SPARKOPS_UI_PORT": str(port),
        **extra,
    })
    return env


def output(tmp_path: Path) -> str:
    return (tmp_path / "up.out").read_text(errors="replace")


def streamlit_on(port: int) -> list[int]:
    """Pids of any Streamlit server for ``port`` (there should be none left)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "streamlit" in cmdline and str(port) in cmdline:
            found.append(proc.info["pid"])
    return found


@pytest.fixture
def start_up(tmp_path):
    """Start ``python -m sparkops up ...``; kill it and its children if a test fails."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, port: int) -> subprocess.Popen:
        with open(tmp_path / "up.out", "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "sparkops", "up", *args], cwd=tmp_path,
                                    env=up_env(tmp_path, port), stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


def wait_until_healthy(proc: subprocess.Popen, port: int, tmp_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`sparkops up` exited with {proc.returncode}:\n{output(tmp_path)}")
        if http_status(f"http://127.0.0.1:{port}/_stcore/health") == 200:
            return
        time.sleep(0.1)
    pytest.fail(f"the app did not answer on port {port} within {timeout}s:\n{output(tmp_path)}")


def stop_agents_left(tmp_path: Path) -> None:
    """The agents an ``up`` left to finish (by design) are the test's to end."""
    for worker in workers.live(tmp_path / "data" / "workers"):
        procs.terminate_group(worker.identity.agent, grace=2)
        procs.terminate_group(worker.identity.shim, grace=2)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_starts_runner_and_app_and_a_signal_stops_both(start_up, tmp_path, stop_signal):
    port = free_port()
    proc = start_up("--demo", "--port", str(port), port=free_port())  # --port wins over ui.port
    wait_until_healthy(proc, port, tmp_path)

    children = psutil.Process(proc.pid).children()
    commands = sorted(" ".join(c.cmdline()) for c in children)
    assert len(children) == 4, commands  # the runner, the app, and the demo's vLLM and planner
    assert any(c.endswith("-m sparkops.runner") for c in commands)
    assert any("-m sparkops demo-vllm --port " in c for c in commands)
    assert any("-m sparkops demo-planner" in c for c in commands)
    assert any("-m streamlit run" in c and str(ROOT / "sparkops" / "app" / "Home.py") in c
               and f"--server.address 127.0.0.1 --server.port {port}" in c for c in commands)
    assert http_status(f"http://127.0.0.1:{port}/") == 200
    runner_log = tmp_path / "logs" / "runner.log"
    deadline = time.monotonic() + 30
    while "jobs runner started" not in (runner_log.read_text() if runner_log.exists() else ""):
        assert time.monotonic() < deadline, "the runner never logged its start"
        time.sleep(0.05)
    # "up" is said once the app answers, not before
    deadline = time.monotonic() + 30
    while "SparkOps is up" not in output(tmp_path):
        assert time.monotonic() < deadline, output(tmp_path)
        time.sleep(0.05)
    text = output(tmp_path)
    assert text.index("Starting the jobs runner") < text.index("SparkOps is up")
    # a demo agent at work when the operator stops: it is left to finish, and said so
    deadline = time.monotonic() + 60
    while not [w for w in workers.live(tmp_path / "data" / "workers") if w.agent_alive]:
        assert time.monotonic() < deadline, "no demo agent started"
        time.sleep(0.1)

    try:
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=30) == 0, output(tmp_path)
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert alive == []
        assert not any(psutil.pid_exists(c.pid) for c in children)
        assert http_status(f"http://127.0.0.1:{port}/_stcore/health") is None
        text = output(tmp_path)
        assert f"http://127.0.0.1:{port}" in text
        assert "Added 10 demo tasks" in text
        assert "jobs runner stopped (SIGTERM)" in runner_log.read_text()
        assert "agent(s) still work and are left to finish: t_" in text, text
    finally:
        stop_agents_left(tmp_path)


def test_up_refuses_to_start_beside_another_runner_or_on_a_busy_port(start_up, tmp_path):
    """Checked before anything starts: one message, a non-zero exit, no app, no runner."""
    port = free_port()
    with RunnerLock(lock_path(make_settings(tmp_path))):
        proc = start_up(port=port)
        assert proc.wait(timeout=60) == 1  # refused
    assert f"another jobs runner is already running (pid {os.getpid()}" in output(tmp_path)
    assert "SparkOps is up" not in output(tmp_path) and streamlit_on(port) == []

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proc = start_up(port=taken)
        assert proc.wait(timeout=60) == 2  # a setting to change
    text = output(tmp_path)
    assert f"ui.port {taken} on 127.0.0.1 is in use by another program" in text
    assert f"`sparkops up --port {taken + 1}`" in text and streamlit_on(taken) == []


def test_up_stops_the_app_when_the_runner_dies(start_up, tmp_path):
    port = free_port()
    proc = start_up(port=port)
    wait_until_healthy(proc, port, tmp_path)
    [runner] = [c for c in psutil.Process(proc.pid).children() if c.cmdline()[-2:] == ["-m", "sparkops.runner"]]
    runner.kill()
    assert proc.wait(timeout=60) == 1
    assert "the jobs runner was killed by SIGKILL; stopping the web app" in output(tmp_path)
    assert streamlit_on(port) == []


def test_up_refuses_a_public_address_without_a_password(tmp_path):
    port = free_port()
    result = run_cli("up", cwd=tmp_path, env=up_env(tmp_path, port, SPARKOPS_UI_ADDRESS="0.0.0.0"),
                     timeout=60)
    assert result.returncode == 2
    assert "ui.address is '0.0.0.0'" in result.stderr and "SPARKOPS_UI_PASSWORD" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()  # no database, no child started
    assert streamlit_on(port) == []


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("192.168.1.20", False),
    ("spark-05b8", False),
])
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_public_address_needs_a_password_or_an_explicit_opt_in(tmp_path):
    public = make_settings(tmp_path, SPARKOPS_UI_ADDRESS="0.0.0.0")
    with pytest.raises(ConfigError, match="ui.allow_unauthenticated_remote"):
        check_ui_binding(public, Secrets())
    check_ui_binding(public, Secrets(ui_password="s3cret"))
    check_ui_binding(make_settings(tmp_path, SPARKOPS_UI_ADDRESS="0.0.0.0",
                                   SPARKOPS_UI_ALLOW_UNAUTHENTICATED_REMOTE="true"), Secrets())
    check_ui_binding(make_settings(tmp_path), Secrets())  # 127.0.0.1 by default
    assert app_url(make_settings(tmp_path, SPARKOPS_UI_PORT="8600")) == "http://127.0.0.1:8600"

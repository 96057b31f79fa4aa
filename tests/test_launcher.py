"""``python -m sparkops up``: both children start, the app answers, signals stop
both; unsafe bindings are refused before anything starts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, make_settings, run_cli
from sparkops.config import Secrets
from sparkops.errors import ConfigError
from sparkops.launcher import app_url, check_ui_binding, is_loopback
from sparkops.runner import RunnerLock, lock_path


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


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


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


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_starts_runner_and_app_and_a_signal_stops_both(start_up, tmp_path, stop_signal):
    port = free_port()
    proc = start_up("--demo", port=port)
    wait_until_healthy(proc, port, tmp_path)

    children = psutil.Process(proc.pid).children()
    commands = sorted(" ".join(c.cmdline()) for c in children)
    assert len(children) == 2, commands
    assert any(str(ROOT / "jobs_runner.py") in c for c in commands)
    assert any("-m streamlit run" in c and str(ROOT / "Home.py") in c
               and f"--server.address 127.0.0.1 --server.port {port}" in c for c in commands)
    assert http_status(f"http://127.0.0.1:{port}/") == 200
    runner_log = tmp_path / "logs" / "runner.log"
    deadline = time.monotonic() + 30
    while "jobs runner started" not in (runner_log.read_text() if runner_log.exists() else ""):
        assert time.monotonic() < deadline, "the runner never logged its start"
        time.sleep(0.05)

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


def test_up_stops_the_app_when_the_runner_dies(start_up, tmp_path):
    port = free_port()
    # Another runner holds the lock: the launcher's runner exits 1 at once.
    with RunnerLock(lock_path(make_settings(tmp_path))):
        proc = start_up(port=port)
        code = proc.wait(timeout=60)
    assert code == 1
    text = output(tmp_path)
    assert "another jobs runner is already running" in text
    assert "the jobs runner exited with code 1; stopping the web app" in text
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

"""The reverse tunnel against a real OpenSSH server on loopback: an HTTP request
carried end to end, both modes (paramiko and a supervised ``ssh -R``), the server
killed and restarted, ExitOnForwardFailure, the runner keeping it alive."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from conftest import NOW, ROOT, make_settings, remote_env, run_cli, wait_for
from sshd import free_port

from sparkops.net import ssh as remote
from sparkops.remote import tunnel
from sparkops.storage.store import open_store


class App(http.server.BaseHTTPRequestHandler):
    """The "app" the tunnel leads to: a real HTTP server on loopback."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"ok" if self.path == "/_stcore/health" else f"page {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def app():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def tunnel_env(ssh_server, tmp_path, app_port: int, mode: str = "paramiko") -> dict[str, str]:
    return {**remote_env(ssh_server, tmp_path), "SPARKOPS_REMOTE_TUNNEL_HOST": "vps",
            "SPARKOPS_REMOTE_TUNNEL_MODE": mode, "SPARKOPS_REMOTE_TUNNEL_REMOTE_PORT": str(free_port()),
            "SPARKOPS_REMOTE_TUNNEL_LOCAL_PORT": str(app_port),
            "SPARKOPS_REMOTE_CONNECT_TIMEOUT_SECONDS": "5", "SPARKOPS_REMOTE_KEEPALIVE_SECONDS": "2",
            "SPARKOPS_RUNNER_LOG_FILE": str(tmp_path / "logs" / "runner.log")}


def through_tunnel(settings, path: str = "/board?x=1") -> str:
    """What the VPS's proxy would get: an HTTP request to the remote end of the tunnel
    (the test server is this machine, so its loopback port is ours to reach)."""
    url = f"http://127.0.0.1:{settings['remote.tunnel_remote_port']}{path}"
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


@pytest.mark.parametrize("mode", ["paramiko", "openssh"])
def test_the_tunnel_carries_an_http_request_end_to_end(ssh_server, tmp_path, app, mode):
    settings = make_settings(tmp_path, **tunnel_env(ssh_server, tmp_path, app, mode))
    keeper = tunnel.Tunnel(settings)
    try:
        first = keeper.step(now=NOW)
        assert first.status == "up" and first.changed, first
        assert "/_stcore/health answered 200 through it" in first.detail
        assert through_tunnel(settings) == "page /board?x=1"
        second = keeper.step(now=NOW + 30)
        assert second.status == "up" and not second.changed and keeper.opened == 1
        if mode == "openssh":
            argv = keeper.proc.args
            assert "ExitOnForwardFailure=yes" in argv and "StrictHostKeyChecking=yes" in argv
            assert f"UserKnownHostsFile={tmp_path / 'known_hosts'}" in argv and "BatchMode=yes" in argv
    finally:
        keeper.close()
    with pytest.raises(OSError):
        through_tunnel(settings)


@pytest.mark.parametrize("mode", ["paramiko", "openssh"])
def test_the_tunnel_comes_back_after_the_server_is_killed_and_restarted(ssh_server, tmp_path, app, mode):
    settings = make_settings(tmp_path, **tunnel_env(ssh_server, tmp_path, app, mode))
    keeper = tunnel.Tunnel(settings)
    try:
        assert keeper.step(now=NOW).status == "up"
        ssh_server.kill()
        if mode == "paramiko":  # the dead peer is noticed (EOF, or the keepalive)
            wait_for(lambda: not keeper.conn.active, "the connection to notice the server is gone")
        else:  # ssh exits on its own (ServerAliveInterval)
            wait_for(lambda: keeper.proc.poll() is not None, "ssh to exit", timeout=20)

        down = keeper.step(now=NOW + 10)
        assert down.status == "down" and down.attempted and down.retry_at == NOW + 11
        assert "cannot open" in down.detail and "Connection refused" in down.detail
        waiting = keeper.step(now=NOW + 10.5)  # inside the backoff: no attempt
        assert waiting.status == "down" and not waiting.attempted
        again = keeper.step(now=NOW + 11)
        assert again.status == "down" and again.retry_at == NOW + 13  # 1 s, then 2 s

        ssh_server.start()
        back = keeper.step(now=NOW + 13)
        assert back.status == "up" and back.changed, back
        assert through_tunnel(settings, "/after") == "page /after"
        assert keeper.opened == 2 and keeper.backoff == 0
    finally:
        keeper.close()


def test_a_broken_forward_is_noticed_by_the_probe_and_reopened(ssh_server, tmp_path, app):
    settings = make_settings(tmp_path, **tunnel_env(ssh_server, tmp_path, app))
    keeper = tunnel.Tunnel(settings)
    try:
        assert keeper.step(now=NOW).status == "up"
        # the server drops the forward but keeps the connection: only an end-to-end probe sees it
        keeper.conn.transport.cancel_port_forward(settings["remote.tunnel_remote_address"],
                                                  settings["remote.tunnel_remote_port"])
        broken = keeper.step(now=NOW + 30)
        assert broken.status == "down" and "the probe through" in broken.detail
        assert "while the app answers locally (200); reconnecting" in broken.detail
        assert keeper.step(now=NOW + 31).status == "up"
        assert through_tunnel(settings) == "page /board?x=1"
    finally:
        keeper.close()


def test_an_app_that_does_not_answer_is_not_blamed_on_the_tunnel(ssh_server, tmp_path):
    settings = make_settings(tmp_path, **tunnel_env(ssh_server, tmp_path, free_port()))  # nothing there
    keeper = tunnel.Tunnel(settings)
    try:
        status = keeper.step(now=NOW)
        assert status.status == "up" and "does not answer" in status.detail and keeper.opened == 1
        assert keeper.step(now=NOW + 30).status == "up" and keeper.opened == 1  # not torn down
    finally:
        keeper.close()


def test_openssh_exits_on_forward_failure_and_says_why(ssh_server, tmp_path, app):
    settings = make_settings(tmp_path, **tunnel_env(ssh_server, tmp_path, app, "openssh"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", settings["remote.tunnel_remote_port"]))  # the remote port is in use
    taken.listen()
    keeper = tunnel.Tunnel(settings)
    try:
        status = keeper.step(now=NOW)
        assert status.status == "down"
        assert "ssh exited 255" in status.detail and "remote port forwarding failed" in status.detail
    finally:
        keeper.close()
        taken.close()


def test_the_runner_keeps_the_tunnel_alive_by_itself(ssh_server, tmp_path, app):
    """A real jobs_runner.py: the tunnel opens, the server is killed and restarted, the
    tunnel comes back with no one stepping in; the state is recorded for the pages."""
    env = {**tunnel_env(ssh_server, tmp_path, app), "SPARKOPS_REMOTE_TUNNEL_INTERVAL_SECONDS": "1",
           "SPARKOPS_REMOTE_TUNNEL_BACKOFF_MAX_SECONDS": "2",
           "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db"}
    settings = make_settings(tmp_path, **env)
    assert run_cli("init", cwd=tmp_path, env=env).returncode == 0
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
    runner = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path,
                              env={**full_env, **env, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    store = open_store(settings)
    try:
        def state():
            return remote.load_state(store.ops, settings_host(settings), tunnel.KIND, "vps")

        wait_for(lambda: state() is not None and state().status == "up", "the tunnel to open", proc=runner)
        assert through_tunnel(settings) == "page /board?x=1"
        ssh_server.kill()
        wait_for(lambda: state().status == "down", "the runner to see the tunnel down", proc=runner)
        ssh_server.start()
        wait_for(lambda: state().status == "up", "the tunnel to come back by itself", timeout=30, proc=runner)
        assert through_tunnel(settings, "/back") == "page /back"
        assert state().data["opened"] >= 2

        listed = json.loads(run_cli("remote", "check", "--json", cwd=tmp_path, env=env).stdout)
        assert listed[0]["ok"] and listed[0]["roles"] == ["tunnel"]
        checked = run_cli("job", "run", "tunnel", cwd=tmp_path, env=env)  # elsewhere: a probe only
        assert checked.returncode == 0 and "answers (200) end to end" in checked.stdout
    finally:
        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=30)
        store.dispose()
    assert runner.returncode == 0, err[-2000:]
    assert "tunnel: opened" in err
    with pytest.raises(OSError):  # the runner closed the tunnel when it stopped
        through_tunnel(settings)


def settings_host(settings) -> str:
    from sparkops.core.procs import host_name

    return host_name(settings["host.name"])


def test_remote_tunnel_holds_it_in_the_foreground_until_ctrl_c(ssh_server, tmp_path, app):
    env = {**tunnel_env(ssh_server, tmp_path, app),
           "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db"}
    settings = make_settings(tmp_path, **env)
    assert run_cli("init", cwd=tmp_path, env=env).returncode == 0
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
    proc = subprocess.Popen([sys.executable, "-m", "sparkops", "remote", "tunnel"], cwd=tmp_path,
                            env={**full_env, **env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert "up: opened: vps:127.0.0.1:" in first, first + proc.stderr.read() if proc.poll() else first
        assert through_tunnel(settings) == "page /board?x=1"
        busy = run_cli("job", "run", "tunnel", cwd=tmp_path, env=env)  # the runner's job would wait
        assert busy.returncode == 1 and "skipped" in busy.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.strip().endswith("tunnel closed")
    with pytest.raises(OSError):
        through_tunnel(settings)


def test_a_tunnel_to_the_app_needs_the_apps_password(ssh_server, tmp_path):
    """The tunnel publishes the app on the remote host: the rule of a public address."""
    from sparkops.config import Secrets
    from sparkops.core.errors import ConfigError
    from sparkops.jobs.framework import JobContext
    from sparkops.runner.registry import run_job

    env = {**tunnel_env(ssh_server, tmp_path, 0), "SPARKOPS_REMOTE_TUNNEL_LOCAL_PORT": "0"}  # 0: ui.port
    settings = make_settings(tmp_path, **env)
    assert tunnel.exposure(settings, Secrets()) and "SPARKOPS_UI_PASSWORD" in tunnel.exposure(settings, Secrets())
    assert tunnel.exposure(settings, Secrets(ui_password="s3cret")) is None
    allowed = make_settings(tmp_path, **env, SPARKOPS_UI_ALLOW_UNAUTHENTICATED_REMOTE="true")
    assert tunnel.exposure(allowed, Secrets()) is None

    store = open_store(settings, create=True, now=NOW)
    try:
        ctx = JobContext.create(settings, store)
        ctx.resident = True
        result = run_job(ctx, "tunnel", now=NOW)
        assert result.outcome == "error" and "without a password" in result.error
        assert "tunnel" not in ctx.kept_open  # nothing was opened
        with pytest.raises(ConfigError):
            tunnel.run(ctx, now=NOW)
    finally:
        store.dispose()
    refused = run_cli("remote", "tunnel", cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "without a password" in refused.stderr
    assert "Accepted publickey" not in ssh_server.log.read_text()  # it never logged in

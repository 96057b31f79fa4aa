"""Tunnel: a reverse port forward from a remote host to this host's app, kept alive.

The seed ran ``ssh -R`` from cron every 2 minutes so the VPS's proxy could reach
the board. Here the ``tunnel`` job keeps ``remote.tunnel_remote_address:
remote.tunnel_remote_port`` on ``remote.tunnel_host`` forwarded to
``127.0.0.1:remote.tunnel_local_port`` (the app by default), in one of two modes:

* ``paramiko`` (the default): this process holds the SSH connection (host key
  verified, SSH and TCP keepalives, see :mod:`sparkops.net.ssh`) and asks the server
  for the forward; each connection that arrives through it is piped to the local
  port by a thread.
* ``openssh``: it supervises ``ssh -N -R ...`` with ``ExitOnForwardFailure=yes``,
  ``StrictHostKeyChecking=yes`` against the same known_hosts, ``BatchMode`` and
  ``ServerAliveInterval`` (:func:`ssh_argv`); the child dies with its parent.

Either way, :meth:`Tunnel.step` (the one-step entry point, run by the job every
``remote.tunnel_interval_seconds``) **probes end to end**: it opens a channel to the
forwarded port *on the remote host* and sends an HTTP request for
``remote.tunnel_probe_path``, which travels remote port -> SSH -> this host -> the
app and back. When the probe fails but the app answers locally, the tunnel is
broken: it is torn down and opened again; when the app itself does not answer, the
tunnel is left alone and the state says so. A failed connection is retried after a
wait that starts at 1 s and doubles up to ``remote.tunnel_backoff_max_seconds``;
the clock is a parameter, so tests step through it without sleeping.

The state (up, down, and why) is kept in ``ops_remote`` (kind ``tunnel``) for the
Home and Jobs pages. Only the jobs runner (or ``python -m sparkops remote tunnel``)
holds a tunnel; a "Run now" elsewhere only probes it (:func:`check`). A tunnel to the
app publishes it on the remote host, so it opens only when the app has a password
(or ``ui.allow_unauthenticated_remote``), as for a non-loopback address (:func:`exposure`).
"""

from __future__ import annotations

import ctypes
import logging
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from sparkops.config import Settings, child_environment
from sparkops.core import procs
from sparkops.core.errors import ConfigError
from sparkops.jobs.framework import JobReport
from sparkops.net import ssh as remote

if TYPE_CHECKING:
    from sparkops.jobs.framework import JobContext

log = logging.getLogger(__name__)

KIND = "tunnel"
PIPE_BUFFER = 32 * 1024
#: how often a fresh ``ssh -R`` is probed while it sets up its forward
OPENSSH_SETTLE_SECONDS = 0.2


@dataclass(frozen=True)
class TunnelStatus:
    status: str  # up | down
    detail: str
    changed: bool = False  # opened (again) in this step
    retry_at: float | None = None  # while down: when the next attempt is due
    attempted: bool = True  # False: it only waited for the backoff in this step


# -- one probe -----------------------------------------------------------------------------


def http_probe(open_channel: Any, path: str, timeout: float) -> tuple[int | None, str]:
    """Send ``GET path`` through a channel or socket from ``open_channel()``; returns
    (status code, problem). The code is None when nothing HTTP came back."""
    started = time.monotonic()
    try:
        chan = open_channel()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        return None, remote.why(exc)
    try:
        chan.settimeout(timeout)
        chan.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data and len(data) < 4096:
            chunk = chan.recv(4096)
            if not chunk:
                break
            data += chunk
    except (paramiko.SSHException, OSError, EOFError) as exc:
        return None, remote.why(exc)
    finally:
        chan.close()
    line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return None, f"no HTTP answer ({line[:80]!r})" if line else "the connection closed without an answer"
    code = int(parts[1])
    took = (time.monotonic() - started) * 1000
    return code, "" if 200 <= code < 400 else f"HTTP {code} in {took:.0f} ms"


def local_probe(port: int, path: str, timeout: float) -> tuple[int | None, str]:
    """The same request straight to the local port (is the app itself answering?)."""
    return http_probe(lambda: socket.create_connection(("127.0.0.1", port), timeout=timeout), path, timeout)


def remote_probe(conn: remote.Connection, address: str, port: int, path: str,
                 timeout: float) -> tuple[int | None, str]:
    """The request sent from the remote host's side of the tunnel: a ``direct-tcpip``
    channel to ``address:port`` there, which the forward brings back here."""
    return http_probe(lambda: conn.transport.open_channel("direct-tcpip", (address, port), ("127.0.0.1", 0),
                                                          timeout=timeout), path, timeout)


# -- the tunnel ----------------------------------------------------------------------------


class Tunnel:
    """A kept-alive reverse tunnel (see the module docstring). Not thread-safe: one
    caller steps it."""

    def __init__(self, settings: Settings, *, log_dir: Path | None = None):
        self.settings = settings
        self.name = settings["remote.tunnel_host"]
        self.mode = settings["remote.tunnel_mode"]
        self.remote_address = settings["remote.tunnel_remote_address"]
        self.remote_port = settings["remote.tunnel_remote_port"]
        self.local_port = settings["remote.tunnel_local_port"] or settings["ui.port"]
        self.path = settings["remote.tunnel_probe_path"]
        self.timeout = min(settings["remote.io_timeout_seconds"], 10.0)
        self.log_path = (log_dir or settings["runner.log_file"].parent) / "tunnel-ssh.log"
        self.conn: remote.Connection | None = None
        self.proc: subprocess.Popen | None = None
        self.backoff = 0.0
        self.retry_at = 0.0
        self.last_problem = ""
        self.opened = 0  # how many times it was opened

    @property
    def route(self) -> str:
        return (f"{self.name}:{self.remote_address}:{self.remote_port} -> 127.0.0.1:{self.local_port} "
                f"({self.mode})")

    def step(self, now: float | None = None) -> TunnelStatus:
        """Open the tunnel if it is not open (when the backoff allows), probe it end to
        end, and reopen it when the probe shows it broken."""
        ts = time.time() if now is None else float(now)
        changed = False
        if not self._open_now():
            if ts < self.retry_at:
                return TunnelStatus("down", f"{self.last_problem}; next attempt in "
                                            f"{self.retry_at - ts:.0f}s", retry_at=self.retry_at,
                                    attempted=False)
            try:
                self._open()
            except (remote.RemoteError, paramiko.SSHException, OSError, EOFError) as exc:
                return self._failed(ts, f"cannot open {self.route}: {remote.why(exc)}")
            changed = True
        code, problem = self._probe()
        if not problem:
            self.backoff = 0.0
            what = "opened" if changed else "up"
            return TunnelStatus("up", f"{what}: {self.route}; {self.path} answered {code} through it",
                                changed=changed)
        local_code, local_problem = local_probe(self.local_port, self.path, self.timeout)
        if local_problem:
            return TunnelStatus("up", f"the tunnel is open ({self.route}) but the app on 127.0.0.1:"
                                      f"{self.local_port} does not answer: {local_problem}", changed=changed)
        self._close_quietly()
        return self._failed(ts, f"the probe through {self.route} failed ({problem}) while the app "
                                f"answers locally ({local_code}); reconnecting")

    def _failed(self, ts: float, problem: str) -> TunnelStatus:
        self.backoff = min(max(self.backoff * 2, 1.0), self.settings["remote.tunnel_backoff_max_seconds"])
        self.retry_at = ts + self.backoff
        self.last_problem = problem
        log.warning("tunnel: %s (next attempt in %.0fs)", problem, self.backoff)
        return TunnelStatus("down", f"{problem}; next attempt in {self.backoff:.0f}s", retry_at=self.retry_at)

    # -- modes ---------------------------------------------------------------------------

    def _open_now(self) -> bool:
        if self.mode == "openssh":
            return self.proc is not None and self.proc.poll() is None
        return self.conn is not None and self.conn.active

    def _open(self) -> None:
        self._close_quietly()
        if self.mode == "openssh":
            self._start_ssh()
        else:
            self._forward()
        self.opened += 1
        log.info("tunnel: opened %s", self.route)

    def _forward(self) -> None:
        conn = remote.connect(self.settings, self.name)
        try:
            conn.transport.request_port_forward(self.remote_address, self.remote_port, handler=self._accept)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            conn.close()
            raise remote.RemoteError(self.name, f"{self.name} refused the forward of "
                                                f"{self.remote_address}:{self.remote_port} ({remote.why(exc)}); "
                                                "is the port taken there, or AllowTcpForwarding off?") from None
        self.conn = conn

    def _accept(self, channel: paramiko.Channel, origin: Any, server: Any) -> None:
        """paramiko's callback for a connection through the forward (its transport
        thread: hand it to a thread of its own at once)."""
        threading.Thread(target=pipe, args=(channel, self.local_port, self.timeout), daemon=True,
                         name=f"tunnel-{origin}").start()

    def _start_ssh(self) -> None:
        spec = self.settings.remote(self.name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        procs.rotate_log(self.log_path, max_bytes=self.settings["runner.log_max_bytes"],
                         backups=self.settings["runner.log_backups"])
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(ssh_argv(self.settings, spec, self.local_port), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                         env=child_environment())
        deadline = time.monotonic() + self.settings["remote.connect_timeout_seconds"] + self.timeout
        while time.monotonic() < deadline:  # until the forward is up, or ssh gave up
            if self.proc.poll() is not None:
                raise remote.RemoteError(self.name, f"ssh exited {self.proc.returncode}: {self._ssh_tail()}")
            if not self._probe()[1]:
                return
            time.sleep(OPENSSH_SETTLE_SECONDS)

    def _ssh_tail(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "(no output)"
        return " / ".join(lines[-3:]) or "(no output)"

    def _probe(self) -> tuple[int | None, str]:
        if self.mode == "openssh":
            try:
                with remote.connect(self.settings, self.name) as conn:
                    return remote_probe(conn, self.remote_address, self.remote_port, self.path, self.timeout)
            except remote.RemoteError as exc:
                return None, str(exc)
        assert self.conn is not None
        return remote_probe(self.conn, self.remote_address, self.remote_port, self.path, self.timeout)

    def _close_quietly(self) -> None:
        if self.conn is not None:
            try:
                self.conn.transport.cancel_port_forward(self.remote_address, self.remote_port)
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass
            self.conn.close()
            self.conn = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None

    def close(self) -> None:
        """Close the tunnel (the runner stops)."""
        self._close_quietly()


def ssh_argv(settings: Settings, spec: Any, local_port: int) -> list[str]:
    """The supervised OpenSSH command: no shell, no config file but these options."""
    argv = [settings["remote.ssh_binary"], "-N", "-T", "-F", "/dev/null",
            "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={spec.known_hosts}",
            "-o", f"ServerAliveInterval={max(1, int(settings['remote.keepalive_seconds']))}",
            "-o", "ServerAliveCountMax=3", "-o", "TCPKeepAlive=yes",
            "-o", f"ConnectTimeout={max(1, int(settings['remote.connect_timeout_seconds']))}",
            "-p", str(spec.port)]
    if spec.key_file:
        argv += ["-i", str(spec.key_file), "-o", "IdentitiesOnly=yes"]
    if spec.jump:
        jump = settings.remote(spec.jump)
        argv += ["-J", f"{jump.user}@{jump.address}:{jump.port}"]
    argv += ["-R", f"{settings['remote.tunnel_remote_address']}:{settings['remote.tunnel_remote_port']}:"
                   f"127.0.0.1:{local_port}",
             f"{spec.user}@{spec.address}"]
    return argv


def _die_with_parent() -> None:
    """In the ssh child: SIGTERM it when its parent (the runner) dies, so a killed
    runner never leaves a stale forward holding the remote port."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def pipe(channel: paramiko.Channel, port: int, timeout: float) -> None:
    """Copy bytes both ways between a forwarded channel and 127.0.0.1:port until
    either side closes."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        log.warning("tunnel: cannot reach 127.0.0.1:%d for a forwarded connection: %s", port, remote.why(exc))
        channel.close()
        return
    try:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small answers go at once
        while True:
            ready, _, _ = select.select([sock, channel], [], [], 60)
            if sock in ready:
                data = sock.recv(PIPE_BUFFER)
                if not data:
                    break
                channel.sendall(data)
            if channel in ready:
                data = channel.recv(PIPE_BUFFER)
                if not data:
                    break
                sock.sendall(data)
            if not ready and channel.closed:
                break
    except (OSError, EOFError, paramiko.SSHException) as exc:
        log.debug("tunnel: a forwarded connection ended: %s", exc)
    finally:
        try:
            channel.close()  # over a transport that died with the server, this raises too
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("tunnel: closing a forwarded channel: %s", exc)
        sock.close()


# -- the job ---------------------------------------------------------------------------------


def run(ctx: JobContext, *, now: float | None = None) -> JobReport:
    """The ``tunnel`` job. In the jobs runner it keeps the tunnel open across runs;
    anywhere else (a button, ``job run tunnel``) it only checks it end to end."""
    name = ctx.settings["remote.tunnel_host"]
    if not name:
        return JobReport("off (remote.tunnel_host is not set)", acted=False)
    if not ctx.resident:
        return check(ctx, now=now)
    refused = exposure(ctx.settings, ctx.secrets)
    if refused:
        raise ConfigError(refused)
    keeper = ctx.kept_open.get(KIND)
    if not isinstance(keeper, Tunnel):
        keeper = ctx.kept_open[KIND] = Tunnel(ctx.settings)
    before = remote.load_state(ctx.store.ops, ctx.host, KIND, name)
    result = step_and_record(ctx, keeper, now=now)
    if result.status == "down" and not result.attempted:
        return JobReport(result.detail, acted=False)
    if result.status == "down":
        raise remote.RemoteError(name, f"tunnel down: {result.detail}")
    return JobReport(result.detail, acted=result.changed or (before is not None and before.status != "up"))


def exposure(settings: Settings, secrets: Any) -> str | None:
    """Why the tunnel must not open, or None. It would publish the app on the remote
    host (the app sees the tunnel's connections come from 127.0.0.1), so it takes
    the rule of a non-loopback address: a UI password, or
    ui.allow_unauthenticated_remote."""
    local = settings["remote.tunnel_local_port"] or settings["ui.port"]
    if local != settings["ui.port"] or getattr(secrets, "ui_password", None) \
            or settings["ui.allow_unauthenticated_remote"]:
        return None
    return (f"the tunnel would publish the app (127.0.0.1:{local}) on {settings['remote.tunnel_host']} "
            "without a password; set SPARKOPS_UI_PASSWORD (or ui_password in .streamlit/secrets.toml) "
            "and restart, or set ui.allow_unauthenticated_remote = true if the remote side guards it")


def step_and_record(ctx: JobContext, keeper: Tunnel, *, now: float | None = None) -> TunnelStatus:
    """One step of ``keeper``, its state recorded in ``ops_remote`` for the pages."""
    result = keeper.step(now)
    remote.save_state(ctx.store.ops, ctx.host, KIND, keeper.name, result.status, result.detail,
                      {"route": keeper.route, "opened": keeper.opened, "retry_at": result.retry_at}, now=now)
    return result


def check(ctx: JobContext, *, now: float | None = None) -> JobReport:
    """Probe the tunnel from the remote side without holding it (one SSH login)."""
    settings = ctx.settings
    name = settings["remote.tunnel_host"]
    port = settings["remote.tunnel_remote_port"]
    address = settings["remote.tunnel_remote_address"]
    with remote.connect(settings, name) as conn:
        code, problem = remote_probe(conn, address, port, settings["remote.tunnel_probe_path"],
                                     min(settings["remote.io_timeout_seconds"], 10.0))
    if problem:
        raise remote.RemoteError(name, f"the tunnel on {name}:{address}:{port} does not answer: {problem}")
    return JobReport(f"the tunnel on {name}:{address}:{port} answers ({code}) end to end", acted=False)


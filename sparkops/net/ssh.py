"""Remote hosts over SSH (paramiko): verified connections, commands, trusted keys.

A remote host is a ``[remotes.NAME]`` table in the settings (:class:`RemoteSpec`).
:func:`connect` opens an SSH connection to it and **verifies the host's key**
against the host's ``known_hosts`` file: an unknown key raises
:class:`HostKeyUnknown`, a different key :class:`HostKeyChanged`; nothing is ever
accepted on its own. An operator records a key deliberately with
``python -m sparkops remote trust-host NAME``, which shows the key's SHA-256
fingerprint (as ``ssh-keygen -l`` prints it) first (:func:`scan_key`, :func:`trust`).

Every connection has bounded timeouts (``remote.connect_timeout_seconds`` for TCP,
banner and authentication), SSH keepalives and TCP keepalive on its socket
(``remote.keepalive_seconds``), and goes through the host's ``jump`` host when one is
named (a ``direct-tcpip`` channel, like ``ssh -J``). Failures are small exceptions
that say what to do: :class:`Unreachable`, :class:`AuthFailed`.

Commands run as argv lists (:func:`run`): each word is quoted with ``shlex`` for the
remote shell, so no text is ever interpreted there.

The jobs built on this live in :mod:`sparkops.remote.push` (the export to the VPS over
SFTP), :mod:`sparkops.remote.tunnel` (the reverse tunnel to the app) and
:func:`sparkops.remote.gpu` (other hosts' GPUs through ``nvidia-smi``). This is the
only module that imports paramiko.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shlex
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from paramiko.hostkeys import HostKeyEntry, HostKeys
from sqlalchemy import select, update

from sparkops.config import RemoteSpec, Settings
from sparkops.core.clock import epoch
from sparkops.core.errors import ConfigError, Refused, SparkOpsError
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_remote

log = logging.getLogger(__name__)

# -- errors ------------------------------------------------------------------------------


class RemoteError(SparkOpsError):
    """Something went wrong with remote host ``host``; the message says what to do."""

    def __init__(self, host: str, message: str):
        self.host = host
        super().__init__(message)


class Unreachable(RemoteError):
    """No SSH conversation: refused, timed out, no route, not an SSH server."""


class AuthFailed(RemoteError):
    """The host refused every key offered."""


class HostKeyUnknown(RemoteError):
    """The host's key is not in its known_hosts file: refused until trusted."""

    def __init__(self, spec: RemoteSpec, key: paramiko.PKey):
        self.key_type = key.get_name()
        self.fingerprint = fingerprint(key)
        super().__init__(spec.name, (
            f"the host key of {spec.name} ({host_entry(spec)}) is not in {spec.known_hosts}: "
            f"{self.key_type} {self.fingerprint}; nothing was sent. If that is the host's key "
            f"(compare it with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on the host), record "
            f"it with `python -m sparkops remote trust-host {spec.name}`"))


class HostKeyChanged(RemoteError):
    """The host offered a key other than the one recorded for it: refused."""

    def __init__(self, spec: RemoteSpec, key: paramiko.PKey, expected: paramiko.PKey):
        self.key_type = key.get_name()
        self.fingerprint = fingerprint(key)
        self.expected_fingerprint = fingerprint(expected)
        super().__init__(spec.name, (
            f"the host key of {spec.name} ({host_entry(spec)}) has CHANGED: it offers "
            f"{self.key_type} {self.fingerprint}, {spec.known_hosts} holds {expected.get_name()} "
            f"{self.expected_fingerprint}; refused (someone may be in the middle). If the host was "
            f"reinstalled, check the new fingerprint with its administrator, then run "
            f"`python -m sparkops remote trust-host {spec.name} --replace`"))


# -- keys --------------------------------------------------------------------------------


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:...``, as ``ssh-keygen -l`` and ``ssh`` print it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def host_entry(spec: RemoteSpec) -> str:
    """The host's name in known_hosts: ``address``, or ``[address]:port`` off port 22."""
    return spec.address if spec.port == 22 else f"[{spec.address}]:{spec.port}"


def known_keys(spec: RemoteSpec) -> dict[str, paramiko.PKey]:
    """The keys ``spec.known_hosts`` records for the host, by key type."""
    if not spec.known_hosts.exists():
        return {}
    keys = HostKeys(str(spec.known_hosts)).lookup(host_entry(spec))
    return dict(keys) if keys else {}


class _Refuse(paramiko.MissingHostKeyPolicy):
    """An unknown host key is never accepted (paramiko's RejectPolicy, with our message)."""

    def __init__(self, spec: RemoteSpec):
        self.spec = spec

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyUnknown(self.spec, key)


# -- connections -------------------------------------------------------------------------


class Connection:
    """A logged-in SSH connection to remote host ``name`` (and the jump host's it goes
    through). A context manager; :meth:`close` closes both."""

    def __init__(self, name: str, client: paramiko.SSHClient, jump: Connection | None = None):
        self.name = name
        self.client = client
        self.jump = jump

    @property
    def transport(self) -> paramiko.Transport:
        transport = self.client.get_transport()
        if transport is None:
            raise Unreachable(self.name, f"the connection to {self.name} is closed")
        return transport

    @property
    def active(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def run(self, argv: list[str], *, timeout: float) -> Completed:
        return run(self.client, argv, timeout=timeout, host=self.name)

    def close(self) -> None:
        self.client.close()
        if self.jump is not None:
            self.jump.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def connect(settings: Settings, name: str) -> Connection:
    """Log in to remote host ``name``, its key verified against its known_hosts."""
    spec = settings.remote(name)
    if spec.key_file is not None and not spec.key_file.is_file():
        raise ConfigError(f"remotes.{name}.key_file {spec.key_file} does not exist; give the path of "
                          f"the private key, or leave it empty to use ssh-agent and ~/.ssh/id_*")
    timeout = settings["remote.connect_timeout_seconds"]
    jump = connect(settings, spec.jump) if spec.jump else None
    try:
        sock = _channel_via(jump, spec, timeout) if jump else _socket(spec, settings)
        try:
            client = _login(spec, sock, settings)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        if jump is not None:
            jump.close()
        raise
    client.get_transport().set_keepalive(max(1, int(settings["remote.keepalive_seconds"])))
    return Connection(name, client, jump)


def _login(spec: RemoteSpec, sock: Any, settings: Settings) -> paramiko.SSHClient:
    name, timeout = spec.name, settings["remote.connect_timeout_seconds"]
    client = paramiko.SSHClient()
    if spec.known_hosts.exists():
        client.load_host_keys(str(spec.known_hosts))
    client.set_missing_host_key_policy(_Refuse(spec))
    try:
        client.connect(
            spec.address, port=spec.port, username=spec.user, sock=sock,
            key_filename=str(spec.key_file) if spec.key_file else None,
            look_for_keys=spec.key_file is None, allow_agent=True,
            timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
            channel_timeout=settings["remote.io_timeout_seconds"])
    except RemoteError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise HostKeyChanged(spec, exc.key, exc.expected_key) from None
    except paramiko.PasswordRequiredException:
        client.close()
        raise AuthFailed(name, f"the key {spec.key_file} of {name} has a passphrase; add it to "
                               "ssh-agent (ssh-add) and leave it to the agent") from None
    except paramiko.AuthenticationException as exc:
        client.close()
        offered = str(spec.key_file) if spec.key_file else "the keys of ssh-agent and ~/.ssh"
        raise AuthFailed(name, f"{spec.destination} ({name}) refused {offered} ({exc}); add the "
                               f"public key to ~{spec.user}/.ssh/authorized_keys there, or set "
                               f"remotes.{name}.key_file / remotes.{name}.user") from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        client.close()
        raise Unreachable(name, f"no SSH conversation with {name} at {spec.address}:{spec.port}: "
                                f"{why(exc)}") from None
    return client


def _socket(spec: RemoteSpec, settings: Settings) -> socket.socket:
    timeout = settings["remote.connect_timeout_seconds"]
    try:
        raw = socket.create_connection((spec.address, spec.port), timeout=timeout)
    except OSError as exc:
        raise Unreachable(spec.name, f"cannot reach {spec.name} at {spec.address}:{spec.port}: "
                                     f"{why(exc)}") from None
    sock = _QuickAckSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
    sock.settimeout(timeout)
    keepalive(sock, settings["remote.keepalive_seconds"])
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as ssh does: no Nagle delay on small packets
    return sock


class _QuickAckSocket(socket.socket):
    """A socket that acknowledges what it read at once. sshd holds a small packet
    (Nagle) until its previous one is acknowledged, and Linux delays an ACK up to
    40 ms: without this every connection through the tunnel waited that long
    (bench/bench_remote.py: 45 ms p50 per request, 2 ms with it)."""

    def recv(self, *args: Any) -> bytes:
        data = super().recv(*args)
        if hasattr(socket, "TCP_QUICKACK"):
            try:
                self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass
        return data


def keepalive(sock: socket.socket, seconds: float) -> None:
    """TCP keepalive: probe an idle connection after ``seconds``, give up after 3 misses."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", seconds), ("TCP_KEEPINTVL", seconds), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), max(1, int(value)))


def _channel_via(jump: Connection, spec: RemoteSpec, timeout: float) -> paramiko.Channel:
    try:
        return jump.transport.open_channel("direct-tcpip", (spec.address, spec.port), ("127.0.0.1", 0),
                                           timeout=timeout)
    except (paramiko.SSHException, OSError) as exc:
        raise Unreachable(spec.name, f"the jump host {spec.jump} cannot reach {spec.name} at "
                                     f"{spec.address}:{spec.port}: {why(exc)}") from None


def why(exc: BaseException) -> str:
    """An OS or SSH error in a few words, for messages."""
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# -- commands ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    """A remote command's exit status and output (decoded as UTF-8, errors replaced)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def run(client: paramiko.SSHClient, argv: list[str], *, timeout: float, host: str = "") -> Completed:
    """Run ``argv`` on the remote host (each word quoted for its shell) and wait for it,
    at most ``timeout`` seconds for each read."""
    command = shlex.join(argv)
    try:
        _stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
        _stdin.close()
        out = stdout.read()
        err = stderr.read()
        code = stdout.channel.recv_exit_status()
    except TimeoutError:
        raise RemoteError(host, f"{argv[0]} on {host or 'the remote host'} did not answer within "
                                f"{timeout:g}s (remote.io_timeout_seconds)") from None
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise Unreachable(host, f"running {argv[0]} on {host or 'the remote host'} failed: "
                                f"{why(exc)}") from None
    return Completed(tuple(argv), code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))


# -- trusting a host key -----------------------------------------------------------------


def scan_key(settings: Settings, name: str) -> paramiko.PKey:
    """The key remote host ``name`` offers (the SSH handshake only; no login)."""
    spec = settings.remote(name)
    timeout = settings["remote.connect_timeout_seconds"]
    jump = connect(settings, spec.jump) if spec.jump else None
    try:
        sock = _channel_via(jump, spec, timeout) if jump else _socket(spec, settings)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = timeout
        try:
            transport.start_client(timeout=timeout)
            return transport.get_remote_server_key()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Unreachable(name, f"no SSH handshake with {name} at {spec.address}:{spec.port}: "
                                    f"{why(exc)}") from None
        finally:
            transport.close()
    finally:
        if jump is not None:
            jump.close()


def trust(spec: RemoteSpec, key: paramiko.PKey, *, replace: bool = False) -> str:
    """Record ``key`` for ``spec`` in its known_hosts file; returns what was done.

    A different key already recorded for the host is kept (Refused) unless
    ``replace``; then every line for the host is removed and the new one added, the
    rest of the file (comments, other hosts, hashed names) kept byte for byte."""
    entry = host_entry(spec)
    recorded = known_keys(spec)
    if recorded.get(key.get_name()) == key:
        return f"{entry} {key.get_name()} {fingerprint(key)} is already trusted in {spec.known_hosts}"
    others = {t: k for t, k in recorded.items() if k != key}
    if others and not replace:
        old = ", ".join(f"{t} {fingerprint(k)}" for t, k in others.items())
        raise Refused(f"{spec.known_hosts} already holds another key for {entry} ({old}); nothing was "
                      f"changed. If the host's key really changed, check the new fingerprint "
                      f"{fingerprint(key)} with its administrator and run "
                      f"`python -m sparkops remote trust-host {spec.name} --replace`")
    path = spec.known_hosts
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    if others:
        lines = [line for line in lines if not _names(line, entry)]
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    lines.append(f"{entry} {key.get_name()} {key.get_base64()}\n")
    _write_private(path, "".join(lines))
    done = "replaced the key of" if others else "trusted"
    return f"{done} {entry}: {key.get_name()} {fingerprint(key)} (recorded in {path})"


def _names(line: str, entry: str) -> bool:
    """True when known_hosts ``line`` is about host ``entry`` (plain or hashed name)."""
    try:
        parsed = HostKeyEntry.from_line(line)
    except Exception:  # noqa: BLE001 - a line paramiko cannot read is kept as it is
        return False
    if parsed is None:
        return False
    for name in parsed.hostnames:
        if name == entry or (name.startswith("|1|") and HostKeys.hash_host(entry, name) == name):
            return True
    return False


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` whole (a temporary file, then a rename), mode 0600, its folder 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# -- what this host knows of its remotes (ops_remote) ------------------------------------


@dataclass(frozen=True)
class RemoteState:
    """One ``ops_remote`` row: a tunnel's, a push's or a host's GPUs' last state."""

    kind: str
    remote: str
    status: str
    since: int
    checked_at: int
    detail: str
    data: dict[str, Any]


def load_state(ops: Database, host: str, kind: str, remote: str) -> RemoteState | None:
    with ops.read() as conn:
        row = conn.execute(select(ops_remote).where(
            ops_remote.c.host == host, ops_remote.c.kind == kind, ops_remote.c.remote == remote)).first()
    return _state(row) if row else None


def states(ops: Database, host: str | None = None, kind: str | None = None) -> list[RemoteState]:
    """Every recorded state (of ``host``, of ``kind``), by kind and remote."""
    query = select(ops_remote).order_by(ops_remote.c.kind, ops_remote.c.remote)
    if host is not None:
        query = query.where(ops_remote.c.host == host)
    if kind is not None:
        query = query.where(ops_remote.c.kind == kind)
    with ops.read() as conn:
        return [_state(row) for row in conn.execute(query)]


def _state(row: Any) -> RemoteState:
    return RemoteState(row.kind, row.remote, row.status, row.since, row.checked_at, row.detail or "",
                       json.loads(row.data) if row.data else {})


def save_state(ops: Database, host: str, kind: str, remote: str, status: str, detail: str,
               data: dict[str, Any] | None = None, *, now: float | None = None) -> None:
    """Record the state; ``since`` moves only when the status changes."""
    ts = epoch(now)
    values = {"status": status, "checked_at": ts, "detail": detail[:2000],
              "data": json.dumps(data or {}, sort_keys=True)}
    with ops.write() as conn:
        row = conn.execute(select(ops_remote.c.status).where(
            ops_remote.c.host == host, ops_remote.c.kind == kind, ops_remote.c.remote == remote)).first()
        if row is None:
            conn.execute(ops_remote.insert().values(host=host, kind=kind, remote=remote, since=ts, **values))
            return
        if row.status != status:
            values["since"] = ts
        conn.execute(update(ops_remote).where(
            ops_remote.c.host == host, ops_remote.c.kind == kind, ops_remote.c.remote == remote)
            .values(**values))

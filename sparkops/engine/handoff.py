"""A worker's report handed to its shim: the fast path of ``task complete|block --run``.

A report as a fresh process would pay for importing the database layer (most of its
half second) to make two writes. The shim that started the agent already holds an
open store, so it listens on a local socket for its agent's report (:class:`Listener`)
and the report process, which imports only this module and the standard library,
asks it (:func:`ask`). The shim makes the report through the same transition, with
the same fencing (``run_id``), as the direct path, and answers with what changed or
with the error and its exit code.

The socket is an abstract Unix socket (Linux: no file, gone with the shim), named
in the agent's environment (:data:`SOCKET_ENV`). A request carries the run's report
token (:data:`REPORT_TOKEN_ENV`); the shim takes only a request for its own task and
run with its own token (it says ``taken`` at once, then answers), and records the
reporting process from the socket's peer credentials. Whenever the shim does not
answer (it is gone, stopped or stuck past :data:`TAKE_TIMEOUT`, it refused the
request, the connection dropped) the report process makes the report itself: the
result is the same either way.

Standard library only: the report process imports this before anything heavy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: The shim gives its agent a random token in this variable; a report made with it
#: (``sparkops task complete|block --run``) is known to be the agent's own.
REPORT_TOKEN_ENV = "SPARKOPS_REPORT_TOKEN"
#: The name of the shim's report socket, in the agent's environment.
SOCKET_ENV = "SPARKOPS_REPORT_SOCKET"
#: The largest request or reply (a result text is kept whole).
MAX_MESSAGE = 16 * 1024 * 1024
#: How long a report process waits for the shim to take its report: a shim that is
#: stopped (SIGSTOP) or stuck does not hold up the report, which is then made directly.
TAKE_TIMEOUT = 3.0
#: How long it then waits for the shim's answer before reporting itself (the shim
#: retries through a database restart for ``storage.retry_seconds``).
REPLY_TIMEOUT = 300.0
_LENGTH = struct.Struct(">I")
_PEER = struct.Struct("3i")  # struct ucred: pid, uid, gid

#: ``handle(request, peer_pid)``: the shim's answer to a request for its run.
Handler = Callable[[dict[str, Any], int], dict[str, Any]]


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def reporter(environ: Mapping[str, str] | None = None, pid: int | None = None) -> dict[str, Any]:
    """Who is reporting a run's end: the process, and the digest of the report
    token when it runs under a shim (stored in the run's metadata)."""
    token = (os.environ if environ is None else environ).get(REPORT_TOKEN_ENV)
    found: dict[str, Any] = {"pid": os.getpid() if pid is None else pid}
    if token:
        found["token"] = token_digest(token)
    return found


class Listener:
    """The shim's end: takes its agent's reports on a thread of its own."""

    def __init__(self, *, task_id: str, run_id: int, token: str, handle: Handler):
        self.task_id, self.run_id, self._token, self._handle = task_id, run_id, token, handle
        self.name = f"@sparkops-report-{secrets.token_hex(12)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(_address(self.name))
            self._sock.listen(8)
        except OSError:
            self._sock.close()
            raise
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"report-{run_id}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=REPLY_TIMEOUT)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(30)
                    pid = _PEER.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER.size))[0]
                    request = _receive(conn)
                    if not self._own(request):
                        _send(conn, {"handled": False})
                        continue
                    _send(conn, {"taken": True})
                    _send(conn, {"handled": True, **self._handle(request, pid)})
                except (OSError, ValueError) as exc:
                    log.warning("a report on the socket failed: %s", exc)

    def _own(self, request: dict[str, Any]) -> bool:
        """A report of this run, made with its token."""
        token = request.get("token")
        return (isinstance(token, str) and hmac.compare_digest(token, self._token)
                and request.get("task_id") == self.task_id and request.get("run_id") == self.run_id)


def ask(name: str, request: dict[str, Any], *, take_timeout: float = TAKE_TIMEOUT,
        timeout: float = REPLY_TIMEOUT) -> dict[str, Any] | None:
    """The report process's end: the shim's answer, or None if it gave none (it
    is gone, did not take the report within ``take_timeout``, or dropped it)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(take_timeout)
            sock.connect(_address(name))
            _send(sock, request)
            first = _receive(sock)
            if not first.get("taken"):
                return first
            sock.settimeout(timeout)
            return _receive(sock)
    except (OSError, ValueError):
        return None


def _address(name: str) -> str:
    """``@name`` is Linux's abstract namespace; anything else a path."""
    return "\0" + name[1:] if name.startswith("@") else name


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _receive(sock: socket.socket) -> dict[str, Any]:
    (size,) = _LENGTH.unpack(_read(sock, _LENGTH.size))
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is over {MAX_MESSAGE}")
    message = json.loads(_read(sock, size))
    if not isinstance(message, dict):
        raise ValueError("a message is a JSON object")
    return message


def _read(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise ValueError("the connection closed mid-message")
        data += chunk
    return bytes(data)

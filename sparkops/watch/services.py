"""Services the watchdog keeps an eye on: checks, restarts, the give-up rule.

A service is declared in settings (:class:`sparkops.config.ServiceSpec`). One
watchdog pass runs :func:`check` for each, then :func:`assess` turns the result and
the service's remembered state (``ops_services``) into what to do:

* up again after being down: a recovery alert;
* down for ``failures_before_restart`` checks in a row: an alert (the cooldown in
  :mod:`sparkops.watch.alerts` keeps repeats quiet) and, when ``restart_argv`` is set, a
  restart, unless ``restart_limit`` restarts already happened within
  ``restart_window_minutes``: then the watchdog gives up on the service and alerts
  once, until the service is seen up again;
* within ``start_grace_seconds`` after a restart, failures are not counted.

Checks: ``http`` (a GET, the expected status), ``tcp`` (a connection), ``redis``
(``PING``), ``process`` (a command line matching a pattern) and ``vllm``: ``/health``
(200 healthy, 503 engine dead), a hang check on ``/metrics`` (requests running or
waiting while the generation-token counter does not move between two checks;
several vLLM versions' metric names are accepted) and the model list from
``/v1/models`` (a 401 with an API key set still means alive).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import insert, select, update

from sparkops.config import Secrets, ServiceSpec, Settings, child_environment
from sparkops.core import procs
from sparkops.core.clock import epoch
from sparkops.meters.prometheus import (
    DIRECT,
    VLLM_GENERATION_TOKENS,
    VLLM_RUNNING,
    VLLM_WAITING,
    first_of,
    http_get,
    parse_prometheus,
)
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_services

log = logging.getLogger(__name__)



@dataclass
class CheckResult:
    ok: bool
    detail: str
    #: what else the check learned (vLLM: health, metrics, models), for the state and the UI
    data: dict[str, Any] = field(default_factory=dict)


# -- checks ------------------------------------------------------------------------


#: A check's total deadline, in its own timeouts: vLLM makes three requests.
DEADLINE_TIMEOUTS = 3


def check(spec: ServiceSpec, *, secrets: Secrets | None = None,
          memory: dict[str, Any] | None = None, now: float | None = None) -> CheckResult:
    """Run the service's check once, within a total deadline of
    :data:`DEADLINE_TIMEOUTS` x ``timeout_seconds`` (+1 s), however slowly the
    service answers (a server that sends a byte a second included). Never raises:
    a failure, or the deadline, is a result. ``memory`` is what the previous check
    of this service remembered (vLLM)."""
    deadline = spec.timeout_seconds * DEADLINE_TIMEOUTS + 1
    outcome: list[CheckResult] = []
    worker = threading.Thread(target=lambda: outcome.append(_check(spec, secrets, memory, now)),
                              name=f"check-{spec.name}", daemon=True)
    worker.start()
    worker.join(deadline)
    if outcome:
        return outcome[0]
    return CheckResult(False, f"{spec.check} check gave no complete answer within {deadline:g}s "
                              f"({DEADLINE_TIMEOUTS} x services.{spec.name}.timeout_seconds + 1)")


def _check(spec: ServiceSpec, secrets: Secrets | None, memory: dict[str, Any] | None,
           now: float | None) -> CheckResult:
    try:
        if spec.check == "http":
            status = _http_status(spec.url, spec.timeout_seconds)
            ok = status == spec.expect_status
            expected = "" if ok else f", expected {spec.expect_status}"
            return CheckResult(ok, f"HTTP {status} from {spec.url}{expected}")
        if spec.check == "tcp":
            with socket.create_connection((spec.host, spec.port), timeout=spec.timeout_seconds):
                return CheckResult(True, f"{spec.host}:{spec.port} accepts connections")
        if spec.check == "redis":
            return _redis_ping(spec)
        if spec.check == "process":
            return _process_running(spec)
        if spec.check == "vllm":
            return check_vllm(spec, secrets=secrets or Secrets(), memory=memory or {}, now=now)
    except OSError as exc:
        return CheckResult(False, f"{spec.check} check failed: {_reason(exc)}")
    except Exception as exc:  # noqa: BLE001 - a check never raises
        return CheckResult(False, f"{spec.check} check failed: {type(exc).__name__}: {exc}")
    raise AssertionError(f"unknown check {spec.check}")  # config.py only admits known ones


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _http_status(url: str, timeout: float, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _redis_ping(spec: ServiceSpec) -> CheckResult:
    with socket.create_connection((spec.host, spec.port), timeout=spec.timeout_seconds) as sock:
        sock.settimeout(spec.timeout_seconds)
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = sock.recv(128)
    if reply.startswith(b"+PONG"):
        return CheckResult(True, f"redis {spec.host}:{spec.port} answered PONG")
    if reply.startswith(b"-NOAUTH"):
        return CheckResult(True, f"redis {spec.host}:{spec.port} is up (needs a password to PING)")
    return CheckResult(False, f"redis {spec.host}:{spec.port} answered {reply[:60]!r}")


def _process_running(spec: ServiceSpec) -> CheckResult:
    pattern = re.compile(spec.pattern)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline and pattern.search(cmdline):
            return CheckResult(True, f"pid {proc.info['pid']} matches {spec.pattern!r}")
    return CheckResult(False, f"no process matches {spec.pattern!r}")


def check_vllm(spec: ServiceSpec, *, secrets: Secrets, memory: dict[str, Any],
               now: float | None = None) -> CheckResult:
    """``/health``, the hang check on ``/metrics``, and ``/v1/models``."""
    ts = epoch(now)
    base = spec.url.rstrip("/")
    try:
        status = _http_status(f"{base}/health", spec.timeout_seconds)
    except OSError as exc:
        return CheckResult(False, f"vLLM does not answer at {base}: {_reason(exc)}", {"health": "no answer"})
    if status == 503:
        return CheckResult(False, "vLLM /health answered 503: the engine is dead", {"health": "engine dead"})
    if status != 200:
        return CheckResult(False, f"vLLM /health answered {status}", {"health": f"HTTP {status}"})
    data: dict[str, Any] = {"health": "ok"}

    try:
        code, body = http_get(f"{base}/metrics", spec.timeout_seconds)
    except OSError:
        code, body = 0, b""
    metrics = parse_prometheus(body.decode("utf-8", "replace")) if code == 200 else {}
    running = first_of(metrics, VLLM_RUNNING)
    waiting = first_of(metrics, VLLM_WAITING)
    tokens = first_of(metrics, VLLM_GENERATION_TOKENS)
    data.update({"running": running, "waiting": waiting, "generation_tokens": tokens, "checked_at": ts})

    headers = {"Authorization": f"Bearer {secrets.vllm_api_key}"} if secrets.vllm_api_key else {}
    try:
        code, body = http_get(f"{base}/v1/models", spec.timeout_seconds, headers)
        if code == 200:
            data["models"] = [m.get("id") for m in json.loads(body or b"{}").get("data", [])]
        elif code == 401:
            data["models"] = None
            data["models_note"] = "the model list needs an API key (SPARKOPS_VLLM_API_KEY)"
    except (OSError, ValueError):
        pass

    busy = (running or 0) + (waiting or 0)
    before = memory.get("generation_tokens")
    if busy > 0 and tokens is not None and before is not None and tokens <= before:
        since = memory.get("tokens_stuck_since") or memory.get("checked_at") or ts
        data["tokens_stuck_since"] = since
        return CheckResult(False, f"vLLM is hung: {int(running or 0)} running and {int(waiting or 0)} "
                                  f"waiting requests, generation tokens stuck at {int(tokens)} since "
                                  f"{time.strftime('%H:%M:%S', time.localtime(since))}", data)
    if running is None and tokens is None:
        return CheckResult(True, "vLLM healthy (no metrics to check for a hang)", data)
    return CheckResult(True, f"vLLM healthy: {int(running or 0)} running, {int(waiting or 0)} waiting", data)


# -- state and decisions -------------------------------------------------------------


#: The status of a service that is not found on this host and was not declared.
NOT_CONFIGURED = "not_configured"
#: In a service's memory: it has answered at least once on this host.
SEEN_UP = "seen_up"
#: Each status as the app and the CLI say it.
STATUS_WORDS = {"up": "up", "down": "down", "restarting": "restarting", "gave_up": "gave up",
                NOT_CONFIGURED: "not configured", "unknown": "not checked yet"}


def status_words(status: str) -> str:
    return STATUS_WORDS.get(status, status.replace("_", " "))


def serving_healthy(state: ServiceState | None) -> bool:
    """For the GPU zombie rule: is the model server healthy (or not there to judge)?"""
    return state is None or state.status in ("up", NOT_CONFIGURED)


@dataclass
class ServiceState:
    """What ``ops_services`` remembers about one service on one host."""

    name: str
    status: str = "unknown"  # up | down | restarting | gave_up | not_configured | unknown
    since: int = 0
    checked_at: int | None = None
    consecutive_failures: int = 0
    restarts: list[int] = field(default_factory=list)
    last_restart_at: int | None = None
    gave_up_at: int | None = None
    detail: str = ""
    memory: dict[str, Any] = field(default_factory=dict)
    stored: bool = False


@dataclass
class Decision:
    """What a watchdog pass does about one service."""

    state: ServiceState
    alert: tuple[str, str, str] | None = None  # (level, title, message)
    restart: bool = False
    gave_up: bool = False  # this pass gave up restarting


def assess(spec: ServiceSpec, result: CheckResult, state: ServiceState, *, now: int) -> Decision:
    """Turn one check into the service's new state and what to do (no I/O).

    A service the operator did not declare (a default of the seed's stack) that has
    never been seen up on this host is ``not_configured``: not found here, so it is
    neither down nor alerted on, and it is watched as any other from its first
    success on."""
    new = ServiceState(**{**state.__dict__})
    new.checked_at, new.detail = now, result.detail
    new.memory = {**state.memory, **result.data}
    window = spec.restart_window_minutes * 60
    new.restarts = [t for t in state.restarts if now - t < window]
    if not result.ok and not spec.declared and not state.memory.get(SEEN_UP):
        if new.status != NOT_CONFIGURED:
            new.status, new.since = NOT_CONFIGURED, now
        new.consecutive_failures = 0
        new.detail = f"not found on this host ({result.detail})"
        return Decision(new)
    if result.ok:
        was_down = state.status in ("down", "gave_up", "restarting") and state.stored
        new.memory[SEEN_UP] = True
        if new.status != "up":
            new.status, new.since = "up", now
        new.consecutive_failures, new.gave_up_at = 0, None
        if "tokens_stuck_since" not in result.data:
            new.memory.pop("tokens_stuck_since", None)
        if was_down:
            return Decision(new, ("recovery", f"{spec.name} is back",
                                  f"{spec.name} is up again: {result.detail}"))
        return Decision(new)

    if state.last_restart_at is not None and now - state.last_restart_at < spec.start_grace_seconds:
        new.status = "restarting"
        return Decision(new)  # still starting: not counted
    new.consecutive_failures = state.consecutive_failures + 1
    if new.status not in ("down", "gave_up"):
        new.status, new.since = "down", now
    if new.status == "gave_up" or new.consecutive_failures < spec.failures_before_restart:
        return Decision(new)
    message = f"{spec.name} is down ({new.consecutive_failures} failed checks): {result.detail}"
    if not spec.restart_argv:
        return Decision(new, ("error", f"{spec.name} is down", message + "; no restart_argv configured"))
    if len(new.restarts) >= spec.restart_limit:
        new.status, new.gave_up_at = "gave_up", now
        return Decision(new, ("error", f"{spec.name}: gave up restarting",
                              f"{message}; {len(new.restarts)} restarts in the last "
                              f"{spec.restart_window_minutes:g} min, the limit; not restarting it "
                              "again until it is seen up"), gave_up=True)
    new.restarts.append(now)
    new.last_restart_at, new.status, new.consecutive_failures = now, "restarting", 0
    return Decision(new, ("error", f"{spec.name} is down; restarting it",
                          f"{message}; restart {len(new.restarts)} of {spec.restart_limit} "
                          f"allowed in {spec.restart_window_minutes:g} min"), restart=True)


def load_states(ops: Database, host: str) -> dict[str, ServiceState]:
    with ops.read() as conn:
        rows = conn.execute(select(ops_services).where(ops_services.c.host == host)).all()
    return {r.name: ServiceState(
        name=r.name, status=r.status, since=r.since, checked_at=r.checked_at,
        consecutive_failures=r.consecutive_failures, restarts=json.loads(r.restarts or "[]"),
        last_restart_at=r.last_restart_at, gave_up_at=r.gave_up_at, detail=r.detail or "",
        memory=json.loads(r.state or "{}"), stored=True) for r in rows}


def save_state(ops: Database, host: str, state: ServiceState) -> None:
    values = {"status": state.status, "since": state.since or (state.checked_at or 0),
              "checked_at": state.checked_at, "consecutive_failures": state.consecutive_failures,
              "restarts": json.dumps(state.restarts), "last_restart_at": state.last_restart_at,
              "gave_up_at": state.gave_up_at, "detail": state.detail[:2000],
              "state": json.dumps(state.memory, default=str)}
    with ops.write() as conn:
        done = conn.execute(update(ops_services).where(ops_services.c.host == host,
                                                       ops_services.c.name == state.name)
                            .values(**values)).rowcount
        if not done:
            conn.execute(insert(ops_services).values(host=host, name=state.name, **values))


def restart(spec: ServiceSpec, settings: Settings) -> subprocess.Popen:
    """Start ``restart_argv`` (never a shell) in its own session, its output
    appended to ``<log roots[0]>/services/NAME.log``; does not wait for it."""
    log_dir = Path(settings["disk.log_roots"][0]) / "services"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"{spec.name}.log"
    procs.rotate_log(log_file, max_bytes=settings["runner.log_max_bytes"], backups=settings["runner.log_backups"])
    with open(log_file, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} restart: {list(spec.restart_argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(list(spec.restart_argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                cwd=settings.base_dir, env=child_environment())
    log.warning("restarting %s: %s (pid %d)", spec.name, list(spec.restart_argv), proc.pid)
    return proc

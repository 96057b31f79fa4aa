"""Process identity: is the process that ran a task still that process?

A pid alone is not an identity: pids are reused. SparkOps records, for every run,
the host, the boot id and, for each process it started, the pid and the process
start time (``psutil.Process.create_time()``). A recorded process is alive only if
this is the same host and boot, the pid exists, it started at the recorded time,
and it is not a zombie. A process that fails that test is never signalled, so a
stranger that inherited a dead worker's pid is left alone.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import psutil

log = logging.getLogger(__name__)

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
#: create_time() is a float computed from boot time and clock ticks; two readings
#: of the same process agree to well under this many seconds.
START_TOLERANCE = 0.05


def host_name(configured: str = "") -> str:
    return configured or socket.gethostname()


def boot_id() -> str:
    """This boot's id (Linux), else the boot time: changes whenever the machine reboots."""
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return f"boot-{int(psutil.boot_time())}"


@dataclass(frozen=True)
class Proc:
    """One recorded process: pid, start time and process group."""

    pid: int
    start: float
    pgid: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Proc | None":
        if not data or "pid" not in data or "start" not in data:
            return None
        return cls(pid=int(data["pid"]), start=float(data["start"]),
                   pgid=int(data.get("pgid") or data["pid"]))


@dataclass(frozen=True)
class RunIdentity:
    """Where a run's processes live: the host and boot, the worker shim and the agent.

    Stored as ``task_runs.metadata["process"]``."""

    host: str
    boot_id: str
    shim: Proc | None = None
    agent: Proc | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "boot_id": self.boot_id,
                "shim": self.shim.as_dict() if self.shim else None,
                "agent": self.agent.as_dict() if self.agent else None}

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> "RunIdentity | None":
        data = (metadata or {}).get("process")
        if not isinstance(data, dict) or not data.get("host"):
            return None
        return cls(host=str(data["host"]), boot_id=str(data.get("boot_id") or ""),
                   shim=Proc.from_dict(data.get("shim")), agent=Proc.from_dict(data.get("agent")))


def describe(pid: int) -> Proc | None:
    """The identity of a running process, or None if it is gone."""
    try:
        proc = psutil.Process(pid)
        return Proc(pid=pid, start=proc.create_time(), pgid=os.getpgid(pid))
    except (psutil.Error, ProcessLookupError):
        return None


def is_alive(recorded: Proc | None) -> bool:
    """True only for the very process that was recorded, still running (not a zombie)."""
    if recorded is None:
        return False
    try:
        proc = psutil.Process(recorded.pid)
        if abs(proc.create_time() - recorded.start) > START_TOLERANCE:
            return False  # the pid now belongs to another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_alive(recorded: Proc | None) -> bool:
    """Is any process still in the recorded process group?

    Linux does not reuse a number while it is some group's id, so members found
    under the recorded pgid are ours, unless the group leader's pid now belongs to
    a process with another start time: then our group had emptied and the number
    was handed to a new process (and its group), which is not ours."""
    if recorded is None:
        return False
    if recorded.pgid == recorded.pid:
        try:
            leader_start = psutil.Process(recorded.pgid).create_time()
            if abs(leader_start - recorded.start) > START_TOLERANCE:
                return False
        except psutil.Error:
            pass  # the leader is gone; members may remain
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.info["pid"]) == recorded.pgid:
                return True
        except (psutil.Error, ProcessLookupError):
            continue
    return False


def terminate_group(recorded: Proc | None, *, grace: float,
                    sleep: Callable[[float], None] = time.sleep) -> str:
    """SIGTERM the recorded process's group, wait up to ``grace`` seconds, then
    SIGKILL what is left. Signals nothing unless the recorded leader is still the
    recorded process or members of its group remain. Returns what happened."""
    if recorded is None:
        return "no process recorded"
    if not is_alive(recorded) and not group_alive(recorded):
        return f"pid {recorded.pid} already gone"
    _signal_group(recorded, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not group_alive(recorded):
            return f"process group {recorded.pgid} ended after SIGTERM"
        sleep(0.05)
    _signal_group(recorded, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and group_alive(recorded):
        sleep(0.05)
    return f"process group {recorded.pgid} killed (SIGKILL after {grace:g}s)"


def _signal_group(recorded: Proc, sig: signal.Signals) -> None:
    try:
        os.killpg(recorded.pgid, sig)
        log.info("sent %s to process group %d", sig.name, recorded.pgid)
    except ProcessLookupError:
        pass
    except PermissionError:
        log.warning("not allowed to signal process group %d", recorded.pgid)


def exit_description(returncode: int) -> str:
    """``subprocess`` return code in words: ``exit 3`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"

"""Process identity: is the process that ran a task still that process?

A pid alone is not an identity: pids are reused. SparkOps records, for every run,
the host, the boot id and, for each process it started, the pid and the process
start time (:func:`start_of`, seconds after boot). A recorded process is alive only if
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
#: Two readings of one process's start time agree to well under this many seconds.
START_TOLERANCE = 0.05
#: A recorded start above this is from a record made before start times were
#: counted from boot (psutil's create_time, seconds since the epoch).
EPOCH_START = 10 ** 9
_PROC = Path("/proc")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Linux's largest possible pid (pid_max can be set up to 2**22).
PID_MAX = 2 ** 22


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
    """One recorded process: pid, start time, process group and session. The
    session is None when it was not recorded (records from before sessions were)
    or cannot be seen: a process whose session leader lives outside this pid
    namespace (a container or sandbox that started it without a session of its
    own) reads session 0. Without a session only the process itself, never its
    group, can be shown to be ours. The shims start a session of their own, so
    their agents' groups can."""

    pid: int
    start: float
    pgid: int
    sid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Proc | None:
        """A recorded process, or None when ``data`` is not a well-formed record."""
        if not isinstance(data, dict) or "pid" not in data or "start" not in data:
            return None
        pid, pgid = pid_of(data["pid"]), pid_of(data.get("pgid") or data["pid"])
        sid = pid_of(data["sid"]) if data.get("sid") else None  # 0: not seen, see above
        try:
            start = float(data["start"])
        except (TypeError, ValueError):
            return None
        if pid is None or pgid is None or (data.get("sid") and sid is None) or start != start:
            return None
        return cls(pid=pid, start=start, pgid=pgid, sid=sid)


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
    def from_metadata(cls, metadata: dict[str, Any] | None) -> RunIdentity | None:
        data = (metadata or {}).get("process")
        if not isinstance(data, dict) or not data.get("host"):
            return None
        return cls(host=str(data["host"]), boot_id=str(data.get("boot_id") or ""),
                   shim=Proc.from_dict(data.get("shim")), agent=Proc.from_dict(data.get("agent")))


@dataclass(frozen=True)
class Stat:
    """What ``/proc/PID/stat`` says of a process: its state letter (``Z`` a zombie,
    ``X`` dead), process group, session and start (seconds after boot), and whether
    threads of a zombie's are still ending."""

    state: str
    pgid: int
    sid: int
    start: float
    threads_ending: bool = False

    @property
    def ended(self) -> bool:
        """Gone but for its exit status: a killed process's main thread shows as a
        zombie while its other threads are still ending, and its parent can reap it
        only after them, so until then it has not ended."""
        return self.state in ("Z", "X", "x") and not self.threads_ending


def stat_of(pid: int) -> Stat | None:
    """One read of ``/proc/PID/stat``; None once the process is gone.

    The liveness checks read the kernel's own line rather than going through
    psutil: one read gives the start, the state, the group and the session of
    the same instant, and a dispatcher tick looks at every worker this way."""
    try:
        data = (_PROC / str(int(pid)) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:  # no /proc (not Linux)
        return _stat_by_psutil(pid)
    fields = data[data.rindex(b")") + 2:].split()  # the name may hold spaces and parentheses
    state = fields[0].decode("ascii", "replace")
    return Stat(state=state, pgid=int(fields[2]), sid=int(fields[3]), start=int(fields[19]) / _CLOCK_TICKS,
                threads_ending=state == "Z" and _threads(pid) > 1)


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(_PROC / str(int(pid)) / "task"))
    except OSError:
        return 0


def _stat_by_psutil(pid: int) -> Stat | None:
    try:
        proc = psutil.Process(pid)
        zombie = proc.status() == psutil.STATUS_ZOMBIE
        return Stat(state="Z" if zombie else "R", pgid=os.getpgid(pid), sid=os.getsid(pid),
                    start=proc.create_time() - psutil.boot_time())
    except (psutil.Error, ProcessLookupError):
        return None


def start_of(pid: int) -> float:
    """When ``pid`` started, in seconds after boot: the start time in clock ticks
    from ``/proc/PID/stat``. Unlike psutil's ``create_time()`` (boot time taken from
    the wall clock, plus those ticks), a step of the wall clock (NTP at boot, an
    operator's ``date -s``) does not move it, so a process recorded before a step
    is still recognised after it. Raises ``psutil.NoSuchProcess`` once it is gone."""
    stat = stat_of(pid)
    if stat is None:
        raise psutil.NoSuchProcess(pid)
    return stat.start


def _same_start(pid: int, stat: Stat, recorded_start: float) -> bool:
    if recorded_start > EPOCH_START:  # psutil's create_time, in records from before
        try:
            return abs(psutil.Process(pid).create_time() - recorded_start) <= START_TOLERANCE
        except psutil.Error:
            return False
    return abs(stat.start - recorded_start) <= START_TOLERANCE


def started_as(pid: int, recorded_start: float) -> bool:
    """Did ``pid`` start at ``recorded_start`` (as :func:`start_of` gives it, or
    psutil's create_time in records from before)? Raises ``psutil.NoSuchProcess``."""
    stat = stat_of(pid)
    if stat is None:
        raise psutil.NoSuchProcess(pid)
    return _same_start(pid, stat, recorded_start)


def describe(pid: int) -> Proc | None:
    """The identity of a running process, or None if it is gone. A group or
    session led from outside this pid namespace reads 0: the session is then
    unknown (see :class:`Proc`), and the group is taken to be the process's own
    (it is only ever signalled through a known session)."""
    stat = stat_of(pid)
    if stat is None:
        return None
    return Proc(pid=pid, start=stat.start, pgid=stat.pgid or pid, sid=stat.sid or None)


def is_alive(recorded: Proc | None) -> bool:
    """True only for the very process that was recorded, still running (not a zombie)."""
    if recorded is None:
        return False
    stat = stat_of(recorded.pid)
    # a pid that now belongs to another process has another start
    return stat is not None and not stat.ended and _same_start(recorded.pid, stat, recorded.start)


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir(_PROC) if name.isdigit()]
    except OSError:  # no /proc (not Linux)
        return psutil.pids()


def group_members(recorded: Proc | None) -> list[int]:
    """The live processes of the recorded process group that are provably ours.

    A group is ours only if its members are in the recorded session (the shim's:
    agents run in their own group inside it). Linux keeps a group inside one
    session and does not reuse a number while it is some group's or session's id,
    so members found under the recorded pgid *and* sid are the recorded group's
    own. A group whose number now belongs to another session (a stranger given the
    number after ours emptied, or a row that names someone else's group) is not
    ours, nor is a group whose leader's pid now belongs to a process with another
    start time. Without a recorded session, only the recorded process itself (pid
    and start time) can be shown to be ours."""
    if recorded is None:
        return []
    if recorded.sid is None:
        return [recorded.pid] if is_alive(recorded) else []
    if recorded.pgid == recorded.pid:
        leader = stat_of(recorded.pid)
        if leader is not None and not _same_start(recorded.pid, leader, recorded.start):
            return []  # the leader's pid is another process now; members may remain if it is gone
    members = []
    for pid in _pids():
        stat = stat_of(pid)
        if stat is None or stat.ended or stat.pgid != recorded.pgid:
            continue
        if stat.sid != recorded.sid:
            return []  # the number is another session's group now
        members.append(pid)
    return members


def group_alive(recorded: Proc | None) -> bool:
    """Is any provably-ours process of the recorded group still running?"""
    return bool(group_members(recorded))


def terminate_group(recorded: Proc | None, *, grace: float,
                    sleep: Callable[[float], None] = time.sleep) -> str:
    """SIGTERM the recorded process's group, wait up to ``grace`` seconds, then
    SIGKILL what is left. Signals only what :func:`group_members` shows to be ours,
    checked again before each signal. Returns what happened."""
    if recorded is None:
        return "no process recorded"
    if not group_alive(recorded):
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
    """``sig`` to the recorded group if it is still provably ours; to the recorded
    process alone when no session was recorded."""
    try:
        if recorded.sid is None:
            if is_alive(recorded):
                psutil.Process(recorded.pid).send_signal(sig)  # psutil refuses a reused pid
                log.info("sent %s to pid %d", sig.name, recorded.pid)
            return
        if group_members(recorded):
            os.killpg(recorded.pgid, sig)
            log.info("sent %s to process group %d", sig.name, recorded.pgid)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass
    except (PermissionError, psutil.AccessDenied):
        log.warning("not allowed to signal process group %d", recorded.pgid)


def pid_of(value: Any) -> int | None:
    """A pid read from a row, or None unless it is a plausible one (a positive
    integer below Linux's highest pid): a number from another writer is data."""
    if isinstance(value, bool):
        return None
    try:
        pid = int(value)
    except (TypeError, ValueError):
        return None
    return pid if 0 < pid <= PID_MAX else None


def worker_of(pid: int, task_id: str, *, not_before: float) -> Proc | None:
    """The identity of ``pid`` if it is shown to be ``task_id``'s worker (a pid from
    a row, not recorded by SparkOps): its environment names the task (Hermes' and
    SparkOps' workers get HERMES_KANBAN_TASK / SPARKOPS_TASK_ID), it started after
    the run did (``not_before``), and it leads its own process group, so that the
    group is its own. None otherwise: such a pid is never signalled."""
    try:
        proc = psutil.Process(pid)
        env = proc.environ()
        created = proc.create_time()
        recorded = Proc(pid=pid, start=start_of(pid), pgid=os.getpgid(pid), sid=os.getsid(pid) or None)
    except (psutil.Error, ProcessLookupError):
        return None
    if task_id not in (env.get("HERMES_KANBAN_TASK"), env.get("SPARKOPS_TASK_ID")):
        return None
    if created + 1 < not_before or recorded.pgid != pid:
        return None
    return recorded


def rotate_log(path: Path, *, max_bytes: int, backups: int) -> None:
    """Before a child's output is appended to ``path``: once it has grown past
    ``max_bytes``, it becomes ``path.1`` (``path.1`` becomes ``path.2`` ... up to
    ``backups``, the oldest dropped), as the runner's own log rotates."""
    try:
        if path.stat().st_size <= max_bytes:
            return
    except FileNotFoundError:
        return
    for n in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    if backups > 0:
        path.replace(path.with_name(f"{path.name}.1"))
    else:
        path.unlink()


def exit_description(returncode: int) -> str:
    """``subprocess`` return code in words: ``exit 3`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"

"""The zombie rule: GPU processes that hold memory they should not, and their kill.

:func:`find_zombies` names them from a GPU snapshot (:mod:`sparkops.meters.gpu`);
:func:`kill_zombies` signals only those whose command line matches
``gpu.kill_patterns`` and that are not SparkOps itself, its ancestors or its
session, checking each process's start time so a reused pid is never signalled.
:func:`explain` is the dry run. The serving tree that rule (b) spares is the
watched service's own (its port), never any matching command line.

Only the standard library and psutil are imported at module level, as in
:mod:`sparkops.meters.gpu`, so ``scripts/gpu_check.py`` runs with just
nvidia-ml-py and psutil.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from sparkops.core import procs
from sparkops.core.errors import ConfigError
from sparkops.core.procs import START_TOLERANCE
from sparkops.meters.gpu import MEMINFO, GpuProcess, GpuSnapshot, snapshot

log = logging.getLogger(__name__)

#: SIGKILLed processes normally vanish at once; one in uninterruptible sleep may not.
KILL_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class Zombie:
    """A GPU process that holds memory it should not. ``killable`` only when its
    command line matches ``gpu.kill_patterns`` and it is not SparkOps' own;
    ``leave_reason`` says why not otherwise."""

    pid: int
    device_index: int
    used_memory_mb: float | None
    command_line: str | None
    reason: str
    killable: bool
    start_time: float | None = None
    leave_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_zombies(snap: GpuSnapshot, settings: Mapping[str, Any] | Any, *, serving_healthy: bool,
                 health_failures: int, watched_port: int | None = None) -> list[Zombie]:
    """The zombie rule, on a snapshot. ``settings`` is a :class:`Settings` (or any
    mapping with the ``gpu.*`` keys); ``watched_port`` is the watched model
    server's port (from its service URL).

    A *live server* is a process tree whose command lines match
    ``gpu.serving_patterns`` and which holds a listening TCP socket; the *watched
    server* is the live tree listening on ``watched_port`` (:func:`serving_trees`).

    (a) A GPU process holding more than ``gpu.zombie_threshold_gb`` that is in no
    live server's tree is a zombie (the engine a crashed server left behind is one).
    (b) When the watched server is unhealthy and its health check has failed
    ``gpu.health_failures_before_kill`` times in a row, the GPU processes of its
    tree, and those of dead servers (matching, in no live tree), are zombies.
    Another live server, on another port, is never one. A process on several GPUs
    is one zombie (its memory summed).
    """
    if not snap.available or not snap.processes:
        return []
    serving = compile_patterns(settings["gpu.serving_patterns"], "gpu.serving_patterns")
    kill = compile_patterns(settings["gpu.kill_patterns"], "gpu.kill_patterns")
    threshold_gb = float(settings["gpu.zombie_threshold_gb"])
    limit = int(settings["gpu.health_failures_before_kill"])
    unhealthy = not serving_healthy and health_failures >= limit
    trees = serving_trees(serving, watched_port)
    own = _Own.now()

    zombies: list[Zombie] = []
    for pid, entries in _by_pid(snap.processes).items():
        first = entries[0]
        known = [e.used_memory_mb for e in entries if e.used_memory_mb is not None]
        used = sum(known) if known else None
        command = next((e.command_line for e in entries if e.command_line), None)
        start = next((e.start_time for e in entries if e.start_time is not None), None)
        watched = pid in trees.watched
        debris = (pid in trees.matching or matches(serving, command)) and pid not in trees.live
        if unhealthy and (watched or debris):
            reason = (f"model server unhealthy for {health_failures} checks "
                      f"(gpu.health_failures_before_kill = {limit})"
                      + ("" if watched else "; left by a server that no longer listens"))
        elif pid not in trees.live and used is not None and used > threshold_gb * 1024:
            reason = (f"holds {_gb(used)} of GPU memory (more than gpu.zombie_threshold_gb "
                      f"= {threshold_gb:g}) and is not part of a live model server's process tree")
        else:
            continue
        leave = _why_not_killable(pid, command, start, kill, own)
        zombies.append(Zombie(pid=pid, device_index=first.device_index, used_memory_mb=used,
                              command_line=command, reason=reason, killable=leave is None,
                              start_time=start, leave_reason=leave))
    return zombies


def _gb(mb: float) -> str:
    gb = mb / 1024
    return f"{gb:.1f} GB" if gb >= 1 else f"{gb:.2f} GB"


def compile_patterns(patterns: Iterable[str], key: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(f"{key}: {pattern!r} is not a regular expression ({exc}); "
                              "fix it in sparkops.toml") from None
    return compiled


def matches(patterns: list[re.Pattern[str]], command_line: str | None) -> bool:
    return bool(command_line) and any(p.search(command_line) for p in patterns)


@dataclass(frozen=True)
class ServingTrees:
    """Model servers' process trees on this host (pids)."""

    matching: frozenset[int]  # trees of processes whose command line matches the serving patterns
    live: frozenset[int]      # those trees that hold a listening TCP socket: live servers
    watched: frozenset[int]   # the tree listening on the watched port


def serving_trees(patterns: list[re.Pattern[str]], watched_port: int | None) -> ServingTrees:
    """Group the host's processes into model servers' trees. A tree starts at a
    matching process whose parent does not match and holds its descendants. A tree
    is live when one of its processes listens on a TCP port, and the watched one
    when that port is ``watched_port``. When listening sockets cannot be read (no
    permission), every matching tree counts as live and none as watched: nothing is
    a zombie for being outside a server it cannot see."""
    children: dict[int, list[int]] = {}
    parent: dict[int, int] = {}
    matching_pids: set[int] = set()
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        parent[info["pid"]] = info["ppid"] or 0
        children.setdefault(info["ppid"] or 0, []).append(info["pid"])
        if patterns and matches(patterns, " ".join(info["cmdline"] or [])):
            matching_pids.add(info["pid"])

    def tree(root: int) -> set[int]:
        found: set[int] = set()
        stack = [root]
        while stack:
            pid = stack.pop()
            if pid not in found:
                found.add(pid)
                stack.extend(children.get(pid, []))
        return found

    def top(pid: int) -> int:
        """The highest matching ancestor of ``pid`` in an unbroken matching chain."""
        seen = {pid}
        while parent.get(pid) in matching_pids and parent[pid] not in seen:
            pid = parent[pid]
            seen.add(pid)
        return pid

    trees = [tree(root) for root in matching_pids if parent.get(root) not in matching_pids]
    matching = set().union(*trees) if trees else set()
    listening = _listening()
    if listening is None:
        return ServingTrees(frozenset(matching), frozenset(matching), frozenset())
    live = set().union(*[t for t in trees if t & set(listening)]) if trees else set()
    watched: set[int] = set()
    for pid, ports in listening.items():
        if watched_port is not None and watched_port in ports:
            watched |= tree(top(pid))
    return ServingTrees(frozenset(matching), frozenset(live | watched), frozenset(watched))


def _listening() -> dict[int, set[int]] | None:
    """pid -> the TCP ports it listens on; None when the table cannot be read."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError):
        return None
    found: dict[int, set[int]] = {}
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.pid and conn.laddr:
            found.setdefault(conn.pid, set()).add(conn.laddr.port)
    return found


def watched_port(spec: Any) -> int | None:
    """The port of a service check's URL (or its ``port``), for the zombie rule."""
    if spec is None:
        return None
    url = getattr(spec, "url", "") or ""
    if url:
        try:
            parts = urlsplit(url)
            return parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        except ValueError:
            return None
    return getattr(spec, "port", None) or None


def _by_pid(processes: list[GpuProcess]) -> dict[int, list[GpuProcess]]:
    grouped: dict[int, list[GpuProcess]] = {}
    for process in processes:
        grouped.setdefault(process.pid, []).append(process)
    return grouped


@dataclass(frozen=True)
class _Own:
    """This process, its ancestors and its session: never signalled."""

    pid: int
    ancestors: frozenset[int]
    sid: int

    @classmethod
    def now(cls) -> _Own:
        try:
            ancestors = frozenset(p.pid for p in psutil.Process().parents())
        except psutil.Error:
            ancestors = frozenset()
        return cls(pid=os.getpid(), ancestors=ancestors | {os.getppid()}, sid=os.getsid(0))


def _why_not_killable(pid: int, command: str | None, start: float | None,
                      kill: list[re.Pattern[str]], own: _Own) -> str | None:
    if pid == own.pid:
        return "it is this SparkOps process"
    if pid in own.ancestors:
        return "it is an ancestor of this SparkOps process"
    try:
        if os.getsid(pid) == own.sid:
            return (f"it is in SparkOps' own session {own.sid} (the runner, the UI and what "
                    "they started)")
    except OSError:
        return "it is gone"
    if start is None or command is None:
        return "its command line could not be read"
    if not matches(kill, command):
        return "not matching gpu.kill_patterns"
    return None


def explain(zombies: Iterable[Zombie]) -> list[str]:
    """The dry run: what :func:`kill_zombies` would do, one line per zombie."""
    lines = []
    for z in zombies:
        if z.killable:
            lines.append(f"would kill pid {z.pid} ({_short(z.command_line)}): {z.reason}")
        else:
            lines.append(f"would leave pid {z.pid} alone: {z.leave_reason or 'not killable'} "
                         f"({_short(z.command_line)}; zombie because it {_lower_first(z.reason)})")
    return lines


def _short(command: str | None, width: int = 120) -> str:
    if not command:
        return "command line unknown"
    return command if len(command) <= width else command[: width - 3] + "..."


def _lower_first(text: str) -> str:
    return text if text.startswith(("holds", "model")) else text[:1].lower() + text[1:]


# -- killing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Killed:
    """A zombie that was signalled; ``ended`` False if it outlived SIGKILL."""

    pid: int
    command_line: str | None
    how: str
    ended: bool


@dataclass(frozen=True)
class Skipped:
    pid: int
    command_line: str | None
    why: str


@dataclass
class KillReport:
    """What :func:`kill_zombies` did. ``memory_released``: True when no killed pid
    is listed as a GPU process any more, False when some still were at the
    timeout, None when nothing was killed or NVML could not be read."""

    killed: list[Killed] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    memory_released: bool | None = None
    still_listed: list[int] = field(default_factory=list)
    waited_seconds: float = 0.0
    memory_note: str = ""

    def lines(self) -> list[str]:
        out = [f"killed pid {k.pid} ({_short(k.command_line)}): {k.how}" for k in self.killed]
        out += [f"left pid {s.pid} alone ({_short(s.command_line)}): {s.why}" for s in self.skipped]
        if self.memory_note:
            out.append(self.memory_note)
        return out

    def summary(self) -> str:
        if not self.killed:
            return f"killed no GPU process ({len(self.skipped)} left alone)"
        ended = sum(k.ended for k in self.killed)
        return (f"killed {ended} GPU zombie(s) of {len(self.killed)} signalled, "
                f"{len(self.skipped)} left alone; {self.memory_note}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kill_zombies(zombies: Iterable[Zombie], settings: Mapping[str, Any] | Any, *, nvml: Any = None,
                 meminfo_path: Path = MEMINFO, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, poll_seconds: float = 0.5) -> KillReport:
    """SIGTERM the killable zombies, SIGKILL what is left after
    ``gpu.kill_grace_seconds``, then wait (at most ``gpu.memory_release_timeout_seconds``)
    until NVML no longer lists them. A process is signalled only if it is still
    the process the snapshot saw (same pid and start time), still matches
    ``gpu.kill_patterns`` and is not SparkOps' own."""
    kill = compile_patterns(settings["gpu.kill_patterns"], "gpu.kill_patterns")
    grace = float(settings["gpu.kill_grace_seconds"])
    own = _Own.now()
    report = KillReport()
    targets: dict[int, tuple[Zombie, psutil.Process]] = {}
    for z in zombies:
        if z.pid in targets or any(s.pid == z.pid for s in report.skipped):
            continue
        why = None if z.killable else (z.leave_reason or "not killable")
        proc = None
        if why is None:
            proc, why = _same_process(z)
        if why is None:
            why = _why_not_killable(z.pid, z.command_line, z.start_time, kill, own)
        if why is not None or proc is None:
            report.skipped.append(Skipped(z.pid, z.command_line, why or "it is gone"))
            continue
        targets[z.pid] = (z, proc)

    hows: dict[int, str] = {}
    for pid, (z, proc) in list(targets.items()):
        try:
            proc.send_signal(signal.SIGTERM)  # psutil refuses if the pid was reused since
            log.warning("GPU zombie pid %d (%s): SIGTERM (%s)", pid, _short(z.command_line), z.reason)
        except psutil.NoSuchProcess:
            hows[pid] = "ended before it was signalled"
        except psutil.AccessDenied:
            report.skipped.append(Skipped(pid, z.command_line,
                                          "not allowed to signal it (it runs as another user)"))
            del targets[pid]
    _wait_until_ended([p for _, p in targets.values()], grace, sleep, clock)
    for pid, (_zombie, proc) in targets.items():
        if pid in hows or not _running(proc):
            hows.setdefault(pid, "ended after SIGTERM")
            continue
        try:
            proc.send_signal(signal.SIGKILL)
            log.warning("GPU zombie pid %d outlived SIGTERM by %gs: SIGKILL", pid, grace)
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            hows[pid] = "not allowed to SIGKILL it"
            continue
        hows[pid] = f"SIGKILL after {grace:g}s"
    _wait_until_ended([p for _, p in targets.values()], KILL_WAIT_SECONDS, sleep, clock)
    for pid, (z, proc) in targets.items():
        ended = not _running(proc)
        how = hows[pid] if ended else hows[pid] + "; still running"
        report.killed.append(Killed(pid, z.command_line, how, ended))

    if report.killed:
        released, listed, waited, note = wait_for_memory_release(
            {z.pid: z.start_time for z, _ in targets.values()}, nvml=nvml, meminfo_path=meminfo_path,
            timeout=float(settings["gpu.memory_release_timeout_seconds"]), sleep=sleep, clock=clock,
            poll_seconds=poll_seconds)
        report.memory_released, report.still_listed = released, listed
        report.waited_seconds, report.memory_note = waited, note
    return report


def _same_process(z: Zombie) -> tuple[psutil.Process | None, str | None]:
    """The live process the zombie names, or why it cannot be signalled."""
    if z.start_time is None:
        return None, "its start time is unknown, so its identity cannot be checked"
    try:
        proc = psutil.Process(z.pid)
        if not procs.started_as(z.pid, z.start_time):
            return None, (f"pid {z.pid} now belongs to another process (start time differs); "
                          "not signalled")
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None, "it has already exited"
        return proc, None
    except psutil.NoSuchProcess:
        return None, "it is gone"
    except psutil.AccessDenied:
        return None, "not allowed to inspect it"


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until_ended(processes: list[psutil.Process], seconds: float, sleep: Callable[[float], None],
                      clock: Callable[[], float]) -> None:
    deadline = clock() + seconds
    while any(_running(p) for p in processes) and clock() < deadline:
        sleep(0.05)


def wait_for_memory_release(killed: Mapping[int, float | None], *, nvml: Any = None,
                            meminfo_path: Path = MEMINFO, timeout: float,
                            sleep: Callable[[float], None] = time.sleep,
                            clock: Callable[[], float] = time.monotonic,
                            poll_seconds: float = 0.5) -> tuple[bool | None, list[int], float, str]:
    """Poll NVML until none of ``killed`` (pid -> start time) is listed as a GPU
    process, at most ``timeout`` seconds. Returns (released, pids still listed,
    seconds waited, a line for people); released is None when NVML cannot be read."""
    started = clock()
    while True:
        snap = snapshot(nvml, meminfo_path)
        waited = clock() - started
        if not snap.available:
            return None, [], waited, f"cannot tell whether GPU memory was released: {snap.reason}"
        listed = sorted({p.pid for p in snap.processes if p.pid in killed and (
            p.start_time is None or killed[p.pid] is None
            or abs(p.start_time - killed[p.pid]) <= START_TOLERANCE)})
        if not listed:
            return True, [], waited, f"GPU memory released after {waited:.1f}s"
        if waited >= timeout:
            return False, listed, waited, (
                f"GPU memory not released after {timeout:g}s (gpu.memory_release_timeout_seconds): "
                f"pid(s) {', '.join(map(str, listed))} still listed")
        sleep(poll_seconds)

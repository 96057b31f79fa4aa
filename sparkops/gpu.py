"""The GPU through NVML: devices, per-process memory, the gpu-sample job and the
zombie rule.

This is the only module that imports ``pynvml`` (package ``nvidia-ml-py``). Every
function that reads the GPU takes ``nvml``, the pynvml module, so tests hand in a
fake with the same functions; ``None`` means "import pynvml now".

Reading never raises: no library, no driver, or a query the device does not
support gives ``None`` for that value and a note, or a snapshot with
``available=False`` and the reason, for the GPU page to show.

GB10 (DGX Spark) has unified memory: ``nvmlDeviceGetMemoryInfo`` answers "Not
Supported". Then the totals come from ``/proc/meminfo`` (MemTotal, MemAvailable),
"used" is the sum of the GPU processes' memory, and the device says ``unified``.

The zombie rule (:func:`find_zombies`) names GPU processes that hold memory they
should not; :func:`kill_zombies` signals only those whose command line matches
``gpu.kill_patterns`` and that are not SparkOps itself, its ancestors or its
session, checking each process's start time so a reused pid is never signalled.
:func:`explain` is the dry run.

Only the standard library and psutil are imported at module level, so
``scripts/gpu_check.py`` runs on a machine with just nvidia-ml-py and psutil.
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
from typing import TYPE_CHECKING, Any

import psutil

from sparkops.errors import ConfigError
from sparkops.procs import START_TOLERANCE

if TYPE_CHECKING:
    from sparkops.db import Database
    from sparkops.jobs import JobContext, JobReport

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
MIB = 1024 * 1024
#: NVML_VALUE_NOT_AVAILABLE for an unsigned long long (pynvml maps it to None in
#: recent versions; older ones hand it through).
NOT_AVAILABLE = 2**64 - 1
UNIFIED_NOTE = "unified memory: totals from /proc/meminfo, used = the GPU processes' memory"
NO_PYNVML = "nvidia-ml-py is not installed (pip install nvidia-ml-py), so there is no GPU data"
NO_LIBRARY = "NVML library not found (no NVIDIA driver on this machine)"
#: SIGKILLed processes normally vanish at once; one in uninterruptible sleep may not.
KILL_WAIT_SECONDS = 5.0

# -- data ------------------------------------------------------------------------------


@dataclass
class GpuDevice:
    """One GPU. Memory in MiB; a value the device would not give is None (see notes)."""

    index: int
    name: str | None = None
    uuid: str | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    memory_total_mb: float | None = None
    memory_used_mb: float | None = None
    memory_free_mb: float | None = None
    unified: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GpuProcess:
    """A process using a GPU. ``start_time`` (psutil's create_time) is its identity:
    with the pid it tells this process from a later one that got the same pid."""

    pid: int
    device_index: int
    used_memory_mb: float | None
    command_line: str | None = None
    name: str | None = None
    start_time: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GpuSnapshot:
    """What NVML said at ``taken_at``. ``available`` is False (and ``reason`` says
    why) when there is no library, no driver or no answer."""

    available: bool
    reason: str
    driver_version: str | None = None
    devices: list[GpuDevice] = field(default_factory=list)
    processes: list[GpuProcess] = field(default_factory=list)
    taken_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason,
                "driver_version": self.driver_version,
                "devices": [d.as_dict() for d in self.devices],
                "processes": [p.as_dict() for p in self.processes],
                "taken_at": self.taken_at}

    def processes_on(self, index: int) -> list[GpuProcess]:
        return [p for p in self.processes if p.device_index == index]


def summary(snap: GpuSnapshot) -> dict[str, Any]:
    """A short description of this host's GPUs, for the fleet view."""
    return {"available": snap.available, "reason": snap.reason, "driver_version": snap.driver_version,
            "devices": [{"index": d.index, "name": d.name, "memory_total_mb": d.memory_total_mb,
                         "memory_used_mb": d.memory_used_mb, "utilization_pct": d.utilization_pct,
                         "unified": d.unified} for d in snap.devices]}


# -- reading NVML ----------------------------------------------------------------------


def snapshot(nvml: Any = None, meminfo_path: Path = MEMINFO, now: float | None = None) -> GpuSnapshot:
    """Read every GPU and its processes. Never raises."""
    taken_at = time.time() if now is None else float(now)
    if nvml is None:
        try:
            import pynvml as nvml  # the one place SparkOps imports NVML
        except ImportError:
            return GpuSnapshot(False, NO_PYNVML, taken_at=taken_at)
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError, or OSError from a broken library
        return GpuSnapshot(False, _init_failure(nvml, exc), taken_at=taken_at)
    try:
        return _read(nvml, Path(meminfo_path), taken_at)
    except Exception as exc:
        log.warning("reading the GPU through NVML failed: %s", _error_text(exc), exc_info=True)
        return GpuSnapshot(False, f"reading the GPU through NVML failed: {_error_text(exc)}",
                           taken_at=taken_at)
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001
            log.debug("nvmlShutdown: %s", exc)


def _init_failure(nvml: Any, exc: Exception) -> str:
    value = getattr(exc, "value", None)
    if value is not None and value == getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", 12):
        return NO_LIBRARY
    if value is not None and value == getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", 9):
        return "the NVIDIA driver is not loaded (NVML: Driver Not Loaded); is the kernel module in?"
    if value is not None and value == getattr(nvml, "NVML_ERROR_NO_PERMISSION", 4):
        return "NVML refused access (insufficient permissions on /dev/nvidia*)"
    return f"NVML did not start: {_error_text(exc)}"


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


def _read(nvml: Any, meminfo_path: Path, taken_at: float) -> GpuSnapshot:
    top_notes: list[str] = []
    driver = _text(_query(nvml, top_notes, "driver version", nvml.nvmlSystemGetDriverVersion))
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        return GpuSnapshot(False, f"NVML could not count the GPUs: {_error_text(exc)}",
                           driver_version=driver, taken_at=taken_at)
    devices: list[GpuDevice] = []
    processes: list[GpuProcess] = []
    for index in range(count):
        device, device_processes = _read_device(nvml, index, meminfo_path)
        devices.append(device)
        processes.extend(device_processes)
    reason = f"{count} GPU(s)" if count else "NVML sees no GPU"
    if top_notes:
        reason += "; " + "; ".join(top_notes)
    return GpuSnapshot(True, reason, driver_version=driver, devices=devices, processes=processes,
                       taken_at=taken_at)


def _query(nvml: Any, notes: list[str], what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """One NVML call; an NVMLError becomes None and a note."""
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        notes.append(f"{what}: {_error_text(exc)}")
        return None


def _is_not_supported(nvml: Any, exc: BaseException) -> bool:
    return getattr(exc, "value", None) == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3)


def _read_device(nvml: Any, index: int, meminfo_path: Path) -> tuple[GpuDevice, list[GpuProcess]]:
    device = GpuDevice(index=index)
    notes = device.notes
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        notes.append(f"cannot open device {index}: {_error_text(exc)}")
        return device, []
    device.name = _text(_query(nvml, notes, "name", nvml.nvmlDeviceGetName, handle))
    device.uuid = _text(_query(nvml, notes, "uuid", nvml.nvmlDeviceGetUUID, handle))
    util = _query(nvml, notes, "utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
    device.utilization_pct = None if util is None else float(util.gpu)
    temp = _query(nvml, notes, "temperature", nvml.nvmlDeviceGetTemperature, handle,
                  nvml.NVML_TEMPERATURE_GPU)
    device.temperature_c = None if temp is None else float(temp)
    power_mw = _query(nvml, notes, "power", nvml.nvmlDeviceGetPowerUsage, handle)
    device.power_w = None if power_mw is None else power_mw / 1000.0

    processes = _read_processes(nvml, handle, index, notes)

    memory, memory_error = None, None
    try:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError as exc:
        memory_error = exc
    if (memory_error is not None and _is_not_supported(nvml, memory_error)) or (
            memory is not None and not memory.total):
        _unified_memory(device, processes, meminfo_path)
    elif memory_error is not None:
        notes.append(f"memory: {_error_text(memory_error)}")
    else:
        device.memory_total_mb = memory.total / MIB
        device.memory_used_mb = memory.used / MIB
        device.memory_free_mb = memory.free / MIB
    return device, processes


def _unified_memory(device: GpuDevice, processes: list[GpuProcess], meminfo_path: Path) -> None:
    device.unified = True
    device.notes.append(UNIFIED_NOTE)
    try:
        info = read_meminfo(meminfo_path)
    except (OSError, ValueError) as exc:
        device.notes.append(f"cannot read {meminfo_path}: {exc}")
        info = {}
    unified_totals(device, processes, info)


def unified_totals(device: GpuDevice, processes: list[GpuProcess], info: Mapping[str, float]) -> None:
    """A unified-memory device's totals from meminfo values (MiB): total and free from
    MemTotal and MemAvailable, used from its processes (or MemTotal - MemAvailable)."""
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    device.memory_total_mb = total
    device.memory_free_mb = available
    known = [p.used_memory_mb for p in processes if p.used_memory_mb is not None]
    if known:
        device.memory_used_mb = sum(known)
    elif total is not None and available is not None:
        device.memory_used_mb = total - available
        device.notes.append("no per-process GPU memory known: used = MemTotal - MemAvailable")


def read_meminfo(path: Path = MEMINFO) -> dict[str, float]:
    """``/proc/meminfo`` in MiB (the file says kB, which is KiB)."""
    values: dict[str, float] = {}
    for line in Path(path).read_text().splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and parts:
            values[key.strip()] = float(parts[0]) / 1024
    return values


def _read_processes(nvml: Any, handle: Any, index: int, notes: list[str]) -> list[GpuProcess]:
    """Compute and graphics processes of one device, one entry per pid."""
    used_by_pid: dict[int, float | None] = {}
    for kind, fn_name in (("compute", "nvmlDeviceGetComputeRunningProcesses"),
                          ("graphics", "nvmlDeviceGetGraphicsRunningProcesses")):
        fn = getattr(nvml, fn_name, None)
        if fn is None:
            continue
        listed = _query(nvml, notes, f"{kind} processes", fn, handle) or []
        for info in listed:
            pid = int(info.pid)
            used = _used_mb(getattr(info, "usedGpuMemory", None))
            before = used_by_pid.get(pid)
            used_by_pid[pid] = used if before is None else max(before, used or 0.0)
    return [_inspect(pid, index, used) for pid, used in used_by_pid.items()]


def _used_mb(used: Any) -> float | None:
    if used is None:
        return None
    used = int(used)
    if used < 0 or used >= NOT_AVAILABLE:
        return None
    return used / MIB


def _inspect(pid: int, index: int, used_mb: float | None) -> GpuProcess:
    """Command line, name and start time from psutil; a process that is gone (or a
    zombie) by now keeps None there."""
    process = GpuProcess(pid=pid, device_index=index, used_memory_mb=used_mb)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            process.start_time = proc.create_time()
            process.name = proc.name()
            process.command_line = " ".join(proc.cmdline()) or None
    except psutil.NoSuchProcess:  # ZombieProcess too
        pass
    except psutil.AccessDenied:
        log.debug("cannot read the command line of GPU process %d", pid)
    return process


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# -- the gpu-sample job ----------------------------------------------------------------


def sample(ctx: JobContext, *, now: float | None = None, nvml: Any = None,
           meminfo_path: Path = MEMINFO) -> JobReport:
    """The ``gpu-sample`` job: one row per device in ``ops_gpu_samples``, and rows
    older than ``gpu.sample_retention_days`` deleted (every host's)."""
    # Imported here: the rest of this module needs only psutil (scripts/gpu_check.py).
    from sqlalchemy import delete, insert

    from sparkops.clock import epoch
    from sparkops.jobs import JobReport
    from sparkops.schema import ops_gpu_samples

    taken = epoch(now)
    snap = snapshot(nvml, meminfo_path, now=taken)
    cutoff = taken - float(ctx.settings["gpu.sample_retention_days"]) * 86400
    rows = [{
        "created_at": taken, "host": ctx.host, "device": d.index, "name": d.name,
        "utilization_pct": d.utilization_pct, "memory_used_mb": d.memory_used_mb,
        "memory_total_mb": d.memory_total_mb, "temperature_c": d.temperature_c,
        "power_w": d.power_w, "unified": int(d.unified), "processes": len(snap.processes_on(d.index)),
    } for d in snap.devices] if snap.available else []
    with ctx.store.ops.write() as conn:
        if rows:
            conn.execute(insert(ops_gpu_samples), rows)
        pruned = conn.execute(delete(ops_gpu_samples).where(ops_gpu_samples.c.created_at < cutoff)).rowcount
    pruned_text = f"; deleted {pruned} sample(s) older than the retention" if pruned else ""
    details = {"devices": len(rows), "pruned": pruned, "reason": snap.reason}
    if not snap.available:
        return JobReport(f"no GPU sample: {snap.reason}{pruned_text}", acted=bool(pruned), details=details)
    # Routine: the samples themselves are the record, so the run is not booked in
    # ops_job_runs (one every 30 s would be 2,880 rows a day of the same thing).
    return JobReport(f"stored a sample of {len(rows)} GPU(s){pruned_text}", acted=bool(pruned),
                     details=details)


def history(ops_db: Database, *, since: float, host: str | None = None) -> list[dict[str, Any]]:
    """Stored samples from ``since`` on (epoch seconds), oldest first, as plain dicts."""
    from sqlalchemy import select

    from sparkops.schema import ops_gpu_samples

    table = ops_gpu_samples
    query = select(table).where(table.c.created_at >= int(since))
    if host is not None:
        query = query.where(table.c.host == host)
    query = query.order_by(table.c.created_at, table.c.host, table.c.device, table.c.id)
    with ops_db.read() as conn:
        rows = [dict(row._mapping) for row in conn.execute(query)]
    for row in rows:
        row["unified"] = bool(row["unified"])
    return rows


# -- the zombie rule -------------------------------------------------------------------


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
                 health_failures: int) -> list[Zombie]:
    """The zombie rule, on a snapshot. ``settings`` is a :class:`Settings` (or any
    mapping with the ``gpu.*`` keys).

    (a) A GPU process holding more than ``gpu.zombie_threshold_gb`` that is not in
    the model server's process tree (processes whose command line matches
    ``gpu.serving_patterns``, and all their descendants) is a zombie.
    (b) When the server is unhealthy and its health check has failed
    ``gpu.health_failures_before_kill`` times in a row, every GPU process in that
    tree is a zombie. A process on several GPUs is one zombie (its memory summed).
    """
    if not snap.available or not snap.processes:
        return []
    serving = compile_patterns(settings["gpu.serving_patterns"], "gpu.serving_patterns")
    kill = compile_patterns(settings["gpu.kill_patterns"], "gpu.kill_patterns")
    threshold_gb = float(settings["gpu.zombie_threshold_gb"])
    limit = int(settings["gpu.health_failures_before_kill"])
    unhealthy = not serving_healthy and health_failures >= limit
    tree = serving_tree(serving)
    own = _Own.now()

    zombies: list[Zombie] = []
    for pid, entries in _by_pid(snap.processes).items():
        first = entries[0]
        known = [e.used_memory_mb for e in entries if e.used_memory_mb is not None]
        used = sum(known) if known else None
        command = next((e.command_line for e in entries if e.command_line), None)
        start = next((e.start_time for e in entries if e.start_time is not None), None)
        in_tree = pid in tree or matches(serving, command)
        if in_tree and unhealthy:
            reason = (f"model server unhealthy for {health_failures} checks "
                      f"(gpu.health_failures_before_kill = {limit})")
        elif not in_tree and used is not None and used > threshold_gb * 1024:
            reason = (f"holds {_gb(used)} of GPU memory (more than gpu.zombie_threshold_gb "
                      f"= {threshold_gb:g}) and is not part of the model server's process tree")
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


def serving_tree(patterns: list[re.Pattern[str]]) -> set[int]:
    """Pids of the live processes whose command line matches ``patterns``, and of
    all their descendants."""
    if not patterns:
        return set()
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE:
            continue
        children.setdefault(info["ppid"] or 0, []).append(info["pid"])
        if matches(patterns, " ".join(info["cmdline"] or [])):
            roots.append(info["pid"])
    tree: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in tree:
            tree.add(pid)
            stack.extend(children.get(pid, []))
    return tree


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
        if abs(proc.create_time() - z.start_time) > START_TOLERANCE:
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


def _wait_until_ended(procs: list[psutil.Process], seconds: float, sleep: Callable[[float], None],
                      clock: Callable[[], float]) -> None:
    deadline = clock() + seconds
    while any(_running(p) for p in procs) and clock() < deadline:
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

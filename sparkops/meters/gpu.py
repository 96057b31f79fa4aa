"""The GPU through NVML: devices, per-process memory and the gpu-sample job.

This is the only module that imports ``pynvml`` (package ``nvidia-ml-py``). Every
function that reads the GPU takes ``nvml``, the pynvml module, so tests hand in a
fake with the same functions; ``None`` means "import pynvml now" (or, under
``up --demo``, the simulated GB10 of :mod:`sparkops.meters.nvml_fake`).

Reading never raises: no library, no driver, or a query the device does not
support gives ``None`` for that value and a note, or a snapshot with
``available=False`` and the reason, for the GPU page to show.

GB10 (DGX Spark) has unified memory: ``nvmlDeviceGetMemoryInfo`` answers "Not
Supported". Then the totals come from ``/proc/meminfo`` (MemTotal, MemAvailable),
"used" is the sum of the GPU processes' memory, and the device says ``unified``.

The zombie rule is :mod:`sparkops.watch.zombie_rule`.

Only the standard library and psutil are imported at module level, so
``scripts/gpu_check.py`` runs on a machine with just nvidia-ml-py and psutil.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from sparkops.core import procs
from sparkops.meters.nvml_fake import DEMO_GPU_ENV

if TYPE_CHECKING:
    from sparkops.jobs.framework import JobContext, JobReport
    from sparkops.storage.db import Database

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
MIB = 1024 * 1024
#: NVML_VALUE_NOT_AVAILABLE for an unsigned long long (pynvml maps it to None in
#: recent versions; older ones hand it through).
NOT_AVAILABLE = 2**64 - 1
UNIFIED_NOTE = "unified memory: totals from /proc/meminfo, used = the GPU processes' memory"
NO_PYNVML = "nvidia-ml-py is not installed (pip install nvidia-ml-py), so there is no GPU data"
NO_LIBRARY = "NVML library not found (no NVIDIA driver on this machine)"

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
    #: the device's energy counter since the driver loaded (NVML's total energy
    #: consumption), in joules; None where the device does not count it
    energy_j: float | None = None
    memory_total_mb: float | None = None
    memory_used_mb: float | None = None
    memory_free_mb: float | None = None
    unified: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GpuProcess:
    """A process using a GPU. ``start_time`` (seconds after boot, ``procs.start_of``)
    is its identity: with the pid it tells this process from a later one that got
    the same pid."""

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
    if nvml is None and os.environ.get(DEMO_GPU_ENV):
        from sparkops.meters import nvml_fake  # `up --demo`: a simulated GB10, said so in its name

        nvml, meminfo_path = nvml_fake.demo_gb10(), Path(os.environ[DEMO_GPU_ENV])
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
    device.energy_j = _energy_j(nvml, handle, notes)

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


def _energy_j(nvml: Any, handle: Any, notes: list[str]) -> float | None:
    """The total energy counter in joules; silent where the device has none (many
    do not count it, and that is no news at every look)."""
    try:
        millijoules = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except AttributeError:  # a pynvml without the call
        return None
    except nvml.NVMLError as exc:
        if not _is_not_supported(nvml, exc):
            notes.append(f"energy: {_error_text(exc)}")
        return None
    return None if millijoules is None or millijoules >= NOT_AVAILABLE else millijoules / 1000.0


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
    return parse_meminfo(Path(path).read_text())


def parse_meminfo(text: str) -> dict[str, float]:
    """The sizes in a ``/proc/meminfo`` text (this host's, or another's over SSH), in
    MiB (the file says kB, which is KiB). Lines without a kB size (HugePages_Total,
    garbage) are left out."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or len(parts) != 2 or parts[1] != "kB":
            continue
        try:
            values[key.strip()] = float(parts[0]) / 1024
        except ValueError:
            continue
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
            process.start_time = procs.start_of(pid)
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

    from sparkops.core.clock import epoch
    from sparkops.jobs.framework import JobReport
    from sparkops.storage.schema import ops_gpu_samples

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

    from sparkops.storage.schema import ops_gpu_samples

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

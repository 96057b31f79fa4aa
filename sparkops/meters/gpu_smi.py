"""Another host's GPUs from ``nvidia-smi`` output: the pure parsing part (no SSH).

Over SSH SparkOps runs two queries on the other host, :func:`gpu_argv` and
:func:`apps_argv` (``--query-gpu`` and ``--query-compute-apps`` with
``--format=csv,noheader,nounits``), reads its ``/proc/meminfo`` too, and hands the
three texts to :func:`parse`. The result is the same :class:`~sparkops.meters.gpu.GpuSnapshot`
the local NVML adapter (:mod:`sparkops.meters.gpu`) makes, so the GPU page and the fleet
view show both alike.

The output is one line per GPU (or per GPU process), values separated by ``", "``,
never quoted. ``[N/A]``, ``[Not Supported]``, ``[Unknown Error]``,
``[Insufficient Permissions]`` and an empty value mean "unknown": None, not 0.
Numbers are floats: memory in MiB, power in W, temperature in C, utilization in %.

GB10 (DGX Spark) has unified memory: nvidia-smi prints ``[N/A]`` for
memory.total, memory.used and memory.free. Then, as the local adapter does, the
device is ``unified``, its totals come from the *remote* ``/proc/meminfo``
(MemTotal, MemAvailable) and "used" is the sum of its processes' memory (or
MemTotal - MemAvailable when no process says how much it uses).

Parsing never raises: output that is not what was asked for (the driver failure
message, a line with the wrong number of values) gives a snapshot with
``available=False`` and a reason that quotes it. A remote process has no start
time here, so its identity is unknown and nothing may signal it on that basis.
"""

from __future__ import annotations

import csv
import posixpath
from dataclasses import dataclass, field

from sparkops.meters.gpu import UNIFIED_NOTE, GpuDevice, GpuProcess, GpuSnapshot, parse_meminfo, unified_totals

#: The ``--query-gpu`` fields, in the order :func:`parse` reads them.
GPU_FIELDS: tuple[str, ...] = (
    "index", "name", "uuid", "utilization.gpu", "temperature.gpu", "power.draw",
    "memory.total", "memory.used", "memory.free", "driver_version",
)
#: The ``--query-compute-apps`` fields, in the order :func:`parse` reads them.
APP_FIELDS: tuple[str, ...] = ("gpu_uuid", "pid", "process_name", "used_memory")
FORMAT = "--format=csv,noheader,nounits"

#: Values nvidia-smi prints for "no value". ``NA_VALUES`` means "this device does
#: not have it" (GB10's memory); ``ERROR_VALUES`` are failures worth a note.
NA_VALUES = frozenset({"", "[N/A]", "N/A", "[Not Supported]"})
ERROR_VALUES = frozenset({"[Unknown Error]", "[Insufficient Permissions]"})
NO_GPU = "nvidia-smi lists no GPU"
#: What nvidia-smi prints for the compute-apps query on some versions when there are none.
NO_PROCESSES = "No running processes found"
QUOTE_WIDTH = 200


def gpu_argv(binary: str = "nvidia-smi") -> list[str]:
    """The command that lists the GPUs, for :func:`parse`'s ``gpu_csv``."""
    return [binary, "--query-gpu=" + ",".join(GPU_FIELDS), FORMAT]


def apps_argv(binary: str = "nvidia-smi") -> list[str]:
    """The command that lists the GPU processes, for :func:`parse`'s ``apps_csv``."""
    return [binary, "--query-compute-apps=" + ",".join(APP_FIELDS), FORMAT]


#: The ``--query-gpu`` fields of a usage sample (:func:`energy_argv`): each GPU's total
#: energy counter (mJ since the driver loaded) and its utilization now.
ENERGY_FIELDS: tuple[str, ...] = ("index", "total_energy_consumption", "utilization.gpu")


def energy_argv(binary: str = "nvidia-smi") -> list[str]:
    """The command that reads the GPUs' energy counters, for :func:`parse_energy`."""
    return [binary, "--query-gpu=" + ",".join(ENERGY_FIELDS), FORMAT]


def parse_energy(energy_csv: str, *, taken_at: float, host: str = "") -> GpuSnapshot:
    """The devices' energy counters (``energy_j``) and utilization from the output of
    :func:`energy_argv`; a device without the counter has None. Never raises."""
    where = _Where(host)
    devices: list[GpuDevice] = []
    try:
        for line, row in _rows(energy_csv, len(ENERGY_FIELDS), 0, _expected("--query-gpu", ENERGY_FIELDS)):
            values = dict(zip(ENERGY_FIELDS, row, strict=True))
            try:
                device = GpuDevice(index=int(values["index"]))
            except ValueError:
                raise _Garbage(line, "a GPU index (an integer) as the first value") from None
            millijoules = _number(values, "total_energy_consumption", device.notes)
            device.energy_j = None if millijoules is None else millijoules / 1000.0
            device.utilization_pct = _number(values, "utilization.gpu", device.notes)
            devices.append(device)
    except _Garbage as exc:
        return failed(exc.reason(where.label), taken_at)
    if not devices:
        return GpuSnapshot(True, NO_GPU, taken_at=taken_at)
    return GpuSnapshot(True, _with_notes(f"{len(devices)} GPU(s)", where.notes), devices=devices,
                       taken_at=taken_at)


def failed(reason: str, taken_at: float) -> GpuSnapshot:
    """A snapshot saying the GPUs could not be read, and why."""
    return GpuSnapshot(False, reason, taken_at=taken_at)


# -- parsing ---------------------------------------------------------------------------


class _Garbage(ValueError):
    """A line of nvidia-smi output that is not what was asked for."""

    def __init__(self, line: str, expected: str) -> None:
        super().__init__(line, expected)
        self.line, self.expected = line, expected

    def reason(self, label: str) -> str:
        return f"{label} printed {_quote(self.line)}; expected {self.expected}"


@dataclass
class _Where:
    """Who printed the output, and the notes for the snapshot's reason."""

    host: str
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"nvidia-smi on {self.host}" if self.host else "nvidia-smi"


def parse(gpu_csv: str, apps_csv: str, meminfo: str | None, *, taken_at: float,
          host: str = "") -> GpuSnapshot:
    """The snapshot that the output of :func:`gpu_argv` (``gpu_csv``), of
    :func:`apps_argv` (``apps_csv``) and the other host's ``/proc/meminfo`` text
    (``meminfo``, None if it could not be read) describe. Never raises."""
    where = _Where(host)
    devices: list[GpuDevice] = []
    drivers: list[str | None] = []
    try:
        for line, row in _rows(gpu_csv, len(GPU_FIELDS), 1, _expected("--query-gpu", GPU_FIELDS)):
            device, driver = _device(line, row)
            devices.append(device)
            drivers.append(driver)
    except _Garbage as exc:
        return failed(exc.reason(where.label), taken_at)
    if not devices:
        return GpuSnapshot(True, _with_notes(NO_GPU, where.notes), taken_at=taken_at)
    processes = _processes(apps_csv, devices, where)
    for device in devices:
        if device.unified:
            _unified_memory(device, [p for p in processes if p.device_index == device.index],
                            meminfo, where.host)
    return GpuSnapshot(True, _with_notes(f"{len(devices)} GPU(s)", where.notes),
                       driver_version=drivers[0], devices=devices, processes=processes,
                       taken_at=taken_at)


def _expected(query: str, fields: tuple[str, ...]) -> str:
    return f"{len(fields)} comma-separated values per line for {query}: {', '.join(fields)}"


def _with_notes(reason: str, notes: list[str]) -> str:
    return "; ".join([reason, *notes])


def _quote(line: str) -> str:
    line = line.strip()
    if len(line) > QUOTE_WIDTH:
        line = line[: QUOTE_WIDTH - 3] + "..."
    return repr(line)


def _rows(text: str, width: int, free_text: int, expected: str) -> list[tuple[str, list[str]]]:
    """The non-blank lines of ``text``, each with its ``width`` values. The value at
    ``free_text`` (a name) may itself contain ", ": extra values are joined back
    into it. Fewer values than ``width``, or a csv error, is :class:`_Garbage`."""
    rows: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            values = next(csv.reader([line], skipinitialspace=True, quoting=csv.QUOTE_NONE))
        except (csv.Error, StopIteration):
            raise _Garbage(line, expected) from None
        if len(values) < width:
            raise _Garbage(line, expected)
        name_end = free_text + len(values) - width + 1
        values[free_text:name_end] = [", ".join(values[free_text:name_end])]
        rows.append((line, [v.strip() for v in values]))
    return rows


def _device(line: str, row: list[str]) -> tuple[GpuDevice, str | None]:
    """One ``--query-gpu`` row: the device and the driver version it names."""
    values = dict(zip(GPU_FIELDS, row, strict=True))
    try:
        index = int(values["index"])
    except ValueError:
        raise _Garbage(line, "a GPU index (an integer) as the first value") from None
    device = GpuDevice(index=index, name=_text(values["name"]), uuid=_text(values["uuid"]))
    device.utilization_pct = _number(values, "utilization.gpu", device.notes)
    device.temperature_c = _number(values, "temperature.gpu", device.notes)
    device.power_w = _number(values, "power.draw", device.notes)
    total = values["memory.total"]
    if total in NA_VALUES or _is_zero(total):
        device.unified = True  # the totals follow in _unified_memory, once the processes are known
    else:
        device.memory_total_mb = _number(values, "memory.total", device.notes)
        device.memory_used_mb = _number(values, "memory.used", device.notes)
        device.memory_free_mb = _number(values, "memory.free", device.notes)
    return device, _text(values["driver_version"])


def _number(values: dict[str, str], key: str, notes: list[str]) -> float | None:
    """The value of ``key`` as a float; None (and a note unless it is plain N/A)
    when nvidia-smi gave none."""
    raw = values[key]
    if raw in NA_VALUES:
        return None
    if raw in ERROR_VALUES:
        notes.append(f"{key}: {raw}")
        return None
    try:
        return float(raw)
    except ValueError:
        notes.append(f"{key}: not a number: {_quote(raw)}")
        return None


def _is_zero(raw: str) -> bool:
    try:
        return float(raw) == 0
    except ValueError:
        return False


def _text(raw: str) -> str | None:
    return None if raw in NA_VALUES or raw in ERROR_VALUES else raw


def _processes(apps_csv: str, devices: list[GpuDevice], where: _Where) -> list[GpuProcess]:
    """The ``--query-compute-apps`` rows, each on the device with its GPU uuid. A
    row for a uuid no device has, or output that does not parse, is left out with
    a note: the devices themselves are still right."""
    if apps_csv.strip() == NO_PROCESSES:
        return []
    try:
        rows = _rows(apps_csv, len(APP_FIELDS), 2, _expected("--query-compute-apps", APP_FIELDS))
    except _Garbage as exc:
        where.notes.append(f"GPU processes unknown: {exc.reason(where.label)}")
        return []
    by_uuid = {d.uuid: d.index for d in devices if d.uuid}
    processes: list[GpuProcess] = []
    unknown: list[str] = []
    for line, row in rows:
        values = dict(zip(APP_FIELDS, row, strict=True))
        if values["gpu_uuid"] not in by_uuid:
            unknown.append(values["gpu_uuid"])
            continue
        try:
            pid = int(values["pid"])
        except ValueError:
            where.notes.append(f"skipped a GPU process without a pid: {_quote(line)}")
            continue
        processes.append(_process(values, pid, by_uuid[values["gpu_uuid"]]))
    if unknown:
        where.notes.append(f"skipped {len(unknown)} GPU process(es) on a GPU {where.label} did not "
                           f"list ({', '.join(sorted(set(unknown)))})")
    return processes


def _process(values: dict[str, str], pid: int, index: int) -> GpuProcess:
    command = _text(values["process_name"])
    return GpuProcess(pid=pid, device_index=index,
                      used_memory_mb=_number(values, "used_memory", notes=[]),  # a process has no notes
                      command_line=command,
                      name=posixpath.basename(command) if command else None)


def _unified_memory(device: GpuDevice, processes: list[GpuProcess], meminfo: str | None,
                    host: str) -> None:
    """Like :func:`sparkops.meters.gpu._unified_memory`, with the other host's meminfo text."""
    device.notes.append(UNIFIED_NOTE)
    unified_totals(device, processes, _remote_meminfo(meminfo, host or "the other host", device.notes))


def _remote_meminfo(meminfo: str | None, host: str, notes: list[str]) -> dict[str, float]:
    if meminfo is None:
        notes.append(f"/proc/meminfo of {host} could not be read: memory totals unknown")
        return {}
    info = parse_meminfo(meminfo)
    missing = [key for key in ("MemTotal", "MemAvailable") if key not in info]
    if missing:
        first = meminfo.strip().partition("\n")[0]
        notes.append(f"/proc/meminfo of {host} has no {' or '.join(missing)} in kB "
                     f"(it starts {_quote(first)})")
    return info

"""A fake NVML: exactly the pynvml functions and constants ``sparkops.meters.gpu`` calls.

NVML is the one edge with no local stand-in (no GPU on a laptop, a CI machine or
this VM), so this is the only fake of it: the GPU tests build devices from it, and
``up --demo`` shows a simulated GB10 through it (:func:`demo_gb10`, switched on by
the ``SPARKOPS_DEMO_GPU`` environment variable that ``up --demo`` sets for its
children). The processes listed through it are real processes.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, ClassVar

GIB = 1024**3
MIB = 1024**2
NOT_SUPPORTED = 3
LIBRARY_NOT_FOUND = 12
NOT_AVAILABLE = ctypes.c_ulonglong(-1).value  # what older pynvml hands through


class FakeNVMLError(Exception):
    NAMES: ClassVar[dict[int, str]] = {NOT_SUPPORTED: "Not Supported",
                                       LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
                                       9: "Driver Not Loaded", 999: "Unknown Error"}

    def __init__(self, value: int):
        self.value = value
        super().__init__(self.NAMES.get(value, f"error {value}"))


@dataclasses.dataclass
class Fail:
    """A query answer that raises NVMLError(code)."""

    code: int = NOT_SUPPORTED


#: A device's process list: (pid, used bytes or None) pairs, or a function giving them.
ProcList = list[tuple[int, Any]] | Callable[[], list[tuple[int, Any]]] | Fail


@dataclasses.dataclass
class FakeDevice:
    name: Any = "NVIDIA H100 80GB HBM3"
    uuid: Any = "GPU-5f1d3a2c-0000-0000-0000-000000000001"
    util: Any = 37
    temp: Any = 61
    power_mw: Any = 312_500
    memory: Any = (80 * GIB, 20 * GIB, 60 * GIB)  # total, used, free; or Fail
    energy_mj: Any = dataclasses.field(default_factory=Fail)  # the total energy counter, mJ
    compute: ProcList = dataclasses.field(default_factory=list)
    graphics: ProcList = dataclasses.field(default_factory=list)


class FakeNvml:
    """The pynvml functions sparkops.meters.gpu calls, over FakeDevice objects."""

    NVMLError = FakeNVMLError
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    NVML_ERROR_LIBRARY_NOT_FOUND = LIBRARY_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, *devices: FakeDevice, init_error: int | None = None, driver: str = "580.95.05"):
        self.devices = list(devices)
        self.init_error = init_error
        self.driver = driver
        self.inits = 0
        self.shutdowns = 0

    @staticmethod
    def _answer(value: Any) -> Any:
        if isinstance(value, Fail):
            raise FakeNVMLError(value.code)
        return value() if callable(value) else value

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str:
        return self._answer(handle.name)

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        return self._answer(handle.uuid)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._answer(handle.util), memory=0)

    def nvmlDeviceGetTemperature(self, handle: FakeDevice, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._answer(handle.temp)

    def nvmlDeviceGetPowerUsage(self, handle: FakeDevice) -> int:
        return self._answer(handle.power_mw)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeDevice) -> int:
        return self._answer(handle.energy_mj)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        total, used, free = self._answer(handle.memory)
        return SimpleNamespace(total=total, used=used, free=free)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeDevice) -> list[SimpleNamespace]:
        return self._procs(handle.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeDevice) -> list[SimpleNamespace]:
        return self._procs(handle.graphics)

    def _procs(self, listed: ProcList) -> list[SimpleNamespace]:
        pairs = self._answer(listed)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in pairs]


# -- the demo's GB10 -------------------------------------------------------------------

#: ``up --demo`` sets this to the path of the demo's meminfo file (the GB10's 128 GB).
DEMO_GPU_ENV = "SPARKOPS_DEMO_GPU"
#: What the simulated vLLM holds, and each working demo agent's context on it.
DEMO_VLLM_BYTES = 71 * GIB
DEMO_AGENT_BYTES = 3 * GIB // 2
#: The demo GB10's energy counter grows at this steady rate, read from the clock so
#: that every process (the GPU page, each run's shim) reads the same counter.
DEMO_ENERGY_WATTS = 45.0
#: The demo's unified memory (a GB10 shows 128 GB of LPDDR5x, about 120 GiB usable).
DEMO_MEMINFO = "MemTotal:       125829120 kB\nMemAvailable:    50331648 kB\n"


#: One look at the process table serves a snapshot's several questions (and the
#: metrics of the demo vLLM) for this long.
_SCAN_SECONDS = 1.0
_scanned: dict[str, tuple[float, tuple[list[int], list[int]]]] = {}


def demo_processes(root: str | None = None) -> tuple[list[int], list[int]]:
    """The pids of the demo's vLLM and of its working agents: real processes, this
    demo's only (working under ``root``, the directory ``up --demo`` runs in; by
    default this process's). Read at most once a second."""
    import os
    import time

    root = os.path.realpath(root or os.getcwd())
    at, found = _scanned.get(root, (float("-inf"), ([], [])))
    if time.monotonic() - at < _SCAN_SECONDS:
        return found
    found = _scan(root)
    _scanned[root] = (time.monotonic(), found)
    return found


def _scan(root: str) -> tuple[list[int], list[int]]:
    import os

    import psutil

    servers, agents = [], []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        argv, cwd = proc.info["cmdline"] or [], proc.info["cwd"] or ""
        if cwd != root and not cwd.startswith(root + os.sep):
            continue
        pairs = list(zip(argv, argv[1:]))
        if ("sparkops", "demo-vllm") in pairs:
            servers.append(proc.info["pid"])
        elif ("sparkops", "demo-agent") in pairs:
            agents.append(proc.info["pid"])
    return servers, agents


def demo_gb10() -> FakeNvml:
    """A GB10 for ``up --demo``: unified memory (device memory "Not Supported", as
    the real one answers), the demo vLLM holding 71 GiB and each working agent's
    requests 1.5 GiB; utilization and power follow the agents at work; the energy
    counter grows at a steady :data:`DEMO_ENERGY_WATTS`."""
    def procs() -> list[tuple[int, Any]]:
        servers, agents = demo_processes()
        return [(pid, DEMO_VLLM_BYTES) for pid in servers] + [(pid, DEMO_AGENT_BYTES) for pid in agents]

    def busy() -> int:
        servers, agents = demo_processes()
        return min(97, 8 + 22 * len(agents)) if servers else 0

    def energy_mj() -> int:
        import time
        return int(time.time() * DEMO_ENERGY_WATTS * 1000)

    device = FakeDevice(name="NVIDIA GB10 (demo)", uuid="GPU-dem00000-0000-0000-0000-00000000gb10",
                        util=busy, temp=lambda: 41 + busy() // 3, power_mw=lambda: 18_000 + 1_100 * busy(),
                        memory=Fail(NOT_SUPPORTED), energy_mj=energy_mj, compute=procs)
    return FakeNvml(device, driver="580.95.05 (demo)")



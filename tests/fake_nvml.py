"""A fake NVML: exactly the pynvml functions and constants ``sparkops.gpu`` calls.

NVML is the one edge with no local stand-in (there is no GPU here), so this is
the only fake in the GPU tests; ``tests/test_gpu.py`` and ``tests/test_watchdog.py``
use it. The processes a test lists through it are real.
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
    NAMES: ClassVar[dict[int, str]] = {NOT_SUPPORTED: "Not Supported", LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
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
    compute: ProcList = dataclasses.field(default_factory=list)
    graphics: ProcList = dataclasses.field(default_factory=list)


class FakeNvml:
    """The pynvml functions sparkops.gpu calls, over FakeDevice objects."""

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
        return value

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

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        total, used, free = self._answer(handle.memory)
        return SimpleNamespace(total=total, used=used, free=free)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeDevice) -> list[SimpleNamespace]:
        return self._procs(handle.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeDevice) -> list[SimpleNamespace]:
        return self._procs(handle.graphics)

    def _procs(self, listed: ProcList) -> list[SimpleNamespace]:
        listed = self._answer(listed)
        pairs = listed() if callable(listed) else listed
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in pairs]



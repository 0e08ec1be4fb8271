"""A fake of the `pynvml` module: the NVML calls corral's GpuMonitor makes, with pynvml's names,
error class and constants, on devices and processes a test sets up.

    nvml = FakeNvml()
    gpu = nvml.add_device(name="NVIDIA H100 80GB HBM3")
    gpu.add_process(4242, memory=512 << 20, sm=97)
    nvml.tick()                   # the driver takes a utilisation sample of every busy process
    GpuMonitor(nvml).sample()

It behaves as the real library does where corral depends on it: every call before `nvmlInit` (or
after the matching `nvmlShutdown`) fails with NVML_ERROR_UNINITIALIZED; the utilisation query returns
only samples newer than the timestamp it is given, padded with a zeroed entry (pid 0) as the driver's
buffer is, and fails with NVML_ERROR_NOT_FOUND when there are none; a process's memory can be
unavailable (None, as pynvml reports NVML_VALUE_NOT_AVAILABLE). `test_gpu.py` checks that every name
here exists in the real pynvml with the same value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# pynvml's return codes (nvml.h), the ones corral reads or the fake raises.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLLibraryMismatchError(Exception):
    """What pynvml raises (not an NVMLError) when the driver's library lacks the newest version of a
    function pynvml's unversioned name calls."""


class NVMLError(Exception):
    """pynvml's error: `.value` is the NVML return code, `str()` its message."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


@dataclass
class ProcessInfo:
    """pynvml's friendly c_nvmlProcessInfo_t: what the running-process lists return (pynvml's field
    names; usedGpuMemory None stands for NVML_VALUE_NOT_AVAILABLE)."""

    pid: int
    usedGpuMemory: int | None
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass
class ProcessUtilizationSample:
    """pynvml's c_nvmlProcessUtilizationSample_t (timeStamp: NVML's CPU clock, microseconds)."""

    pid: int
    timeStamp: int
    smUtil: int
    memUtil: int = 0
    encUtil: int = 0
    decUtil: int = 0


@dataclass
class FakeProcess:
    pid: int
    memory: int | None
    sm: int
    compute: bool = True
    graphics: bool = False


@dataclass
class Handle:
    """Opaque, like pynvml's c_nvmlDevice_t pointer."""

    index: int


@dataclass
class FakeDevice:
    index: int
    name: str
    uuid: str
    minor: int | None
    processes: dict[int, FakeProcess] = field(default_factory=dict)
    samples: list[ProcessUtilizationSample] = field(default_factory=list)
    utilization_supported: bool = True
    graphics_supported: bool = True
    lost: bool = False  # every call on the device fails with NVML_ERROR_GPU_IS_LOST

    def add_process(
        self,
        pid: int,
        *,
        memory: int | None = 256 << 20,
        sm: int = 0,
        compute: bool = True,
        graphics: bool = False,
    ) -> FakeProcess:
        """A process holding a context on this GPU; `memory` None is NVML's "not available"; `sm` is
        the SM % the driver's next samples (`FakeNvml.tick`) will record for it."""
        proc = FakeProcess(pid, memory, sm, compute, graphics)
        self.processes[pid] = proc
        return proc


class FakeNvml:
    """The fake module. Set `library_missing` or `init_error` to make `nvmlInit` fail; `before[name]`
    runs just before call `name` does anything (to change the world between two calls); `calls`
    records every call's name."""

    NVMLError = NVMLError
    NVMLLibraryMismatchError = NVMLLibraryMismatchError
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_UNKNOWN = NVML_ERROR_UNKNOWN

    def __init__(self, driver_version: str = "550.54.15") -> None:
        self.devices: list[FakeDevice] = []
        self.driver_version = driver_version
        self.library_missing = False
        # A driver older than pynvml's newest process-list functions (before R510): the unversioned
        # names raise NVMLLibraryMismatchError, the _v2 ones work.
        self.old_driver = False
        self.init_error: int | None = None
        self.utilization_error: int | None = None  # raised by every utilisation query when set
        self.before: dict[str, Callable[[], None]] = {}
        self.calls: list[str] = []
        self.refcount = 0
        self.clock_us = 1_700_000_000_000_000  # NVML stamps samples with the CPU clock, in microseconds

    # --- test set-up ----------------------------------------------------------------------------

    def add_device(
        self, name: str = "NVIDIA H100 80GB HBM3", uuid: str | None = None, minor: int | None = None
    ) -> FakeDevice:
        index = len(self.devices)
        dev = FakeDevice(
            index=index,
            name=name,
            uuid=uuid or f"GPU-{index:08x}-0000-0000-0000-000000000000",
            minor=index if minor is None else minor,
        )
        self.devices.append(dev)
        return dev

    def tick(self, us: int = 1_000_000) -> int:
        """Advance the clock by `us` and let the driver take a sample: one entry per process that used
        the SMs (the driver records no entry for an idle one). Returns the sample's timestamp."""
        self.clock_us += us
        for dev in self.devices:
            for proc in dev.processes.values():
                if proc.sm > 0:
                    dev.samples.append(ProcessUtilizationSample(proc.pid, self.clock_us, proc.sm))
        return self.clock_us

    def exit_process(self, pid: int) -> None:
        """The process ends: its contexts go, the samples already taken of it stay in the buffer."""
        for dev in self.devices:
            dev.processes.pop(pid, None)

    # --- the pynvml functions GpuMonitor calls ------------------------------------------------------

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        hook = self.before.get(name)
        if hook is not None:
            hook()
        if name != "nvmlInit" and self.refcount == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: Any) -> FakeDevice:
        if not isinstance(handle, Handle) or not 0 <= handle.index < len(self.devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        dev = self.devices[handle.index]
        if dev.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return dev

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.library_missing:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.refcount -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if self.devices[index].lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        return Handle(index)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self._enter("nvmlDeviceGetUUID")
        return self._device(handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._enter("nvmlDeviceGetName")
        return self._device(handle).name

    def nvmlDeviceGetMinorNumber(self, handle: Any) -> int:
        self._enter("nvmlDeviceGetMinorNumber")
        dev = self._device(handle)
        if dev.minor is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return dev.minor

    def _processes(self, name: str, handle: Any, graphics: bool) -> list[ProcessInfo]:
        self._enter(name)
        if self.old_driver and not name.endswith("_v2"):
            raise NVMLLibraryMismatchError(f"Unversioned function called: use {name}_v2")
        dev = self._device(handle)
        if graphics and not dev.graphics_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [
            ProcessInfo(p.pid, p.memory)
            for p in dev.processes.values()
            if (p.graphics if graphics else p.compute)
        ]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[ProcessInfo]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses", handle, graphics=False)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Any) -> list[ProcessInfo]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v2", handle, graphics=False)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[ProcessInfo]:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses", handle, graphics=True)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: Any) -> list[ProcessInfo]:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses_v2", handle, graphics=True)

    def nvmlDeviceGetProcessUtilization(self, handle: Any, timeStamp: int) -> list[ProcessUtilizationSample]:
        self._enter("nvmlDeviceGetProcessUtilization")
        dev = self._device(handle)
        if not dev.utilization_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if self.utilization_error is not None:
            raise NVMLError(self.utilization_error)
        fresh = [s for s in dev.samples if s.timeStamp > timeStamp]
        if not fresh:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return [*fresh, ProcessUtilizationSample(0, 0, 0)]

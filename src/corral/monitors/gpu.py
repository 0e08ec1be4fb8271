"""GPU use per process, read from NVML on the host.

The mining tripwire needs to know which host processes hold a GPU context and how busy they keep it.
NVML (libnvidia-ml, through NVIDIA's `pynvml` bindings from the nvidia-ml-py package) answers both,
from the driver, outside every sandbox: an agent can't hide or forge what it reports. Its pids are in
the host's pid namespace, the one the supervisor runs in, so they compare directly with the pids in a
sandbox's cgroup.

Every NVML call in corral is in `GpuMonitor`; everything above it is tested on the fake NVML module
in `tests/fakenvml.py`, which has the same function names, error class and constants.

A host without an NVIDIA driver is the normal case, not an error: `available()` is False and
`reason` says why, and `sample()` returns no processes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from corral._errors import CorralError

__all__ = ["GpuDevice", "GpuError", "GpuMonitor", "GpuProcessUsage"]


class GpuError(CorralError):
    """NVML failed while reading a GPU that it had listed (GPU lost, driver reset, permission).

    The message names the NVML call, the GPU index and NVML's error. A monitor that can no longer
    see a GPU is blind there, so this is raised rather than reported as "no processes": the
    resource sampler logs it and stops the sandboxes it was sampling, as it does when any monitor
    fails.
    """


@dataclass(frozen=True)
class GpuProcessUsage:
    """One host process's use of one GPU, as NVML reports it.

    index: NVML's index of the GPU (PCI bus order; see `GpuDevice.minor` for the /dev/nvidiaN number).
    uuid: the GPU's UUID (``GPU-...``), stable across reboots and index renumbering.
    pid: the process's pid in the host's pid namespace.
    memory_bytes: GPU memory the process holds; None when NVML can't say (some drivers and
        virtualised GPUs).
    sm_percent: share of the sampling interval in which one of the process's kernels ran on the SMs,
        since the previous `sample()`; None when NVML has no utilisation samples for this GPU in
        that interval or can't measure per-process utilisation (MIG, older GPUs).
    """

    index: int
    uuid: str
    pid: int
    memory_bytes: int | None
    sm_percent: float | None


@dataclass(frozen=True)
class GpuDevice:
    """A GPU NVML sees: its index, UUID, marketing name, and the N of its /dev/nvidiaN node (None when
    NVML can't say). A policy's ``gpu: [N]`` grants /dev/nvidiaN, which is not always index N."""

    index: int
    uuid: str
    name: str
    minor: int | None


class GpuMonitor:
    """Reads per-process GPU use from NVML.

    `nvml` is an object with pynvml's functions, constants and `NVMLError` (the `pynvml` module
    itself by default, imported on first use). NVML is initialised by the first `available()` or
    `sample()` and shut down by `close()`; the monitor is also a context manager.
    """

    def __init__(self, nvml: object | None = None) -> None:
        # pynvml ships no type information: its objects stay `Any` inside this class.
        self._nvml: Any = nvml
        self._state = "new"  # new -> ready | unavailable -> closed
        self.reason: str | None = None
        """Why NVML can't be used (no driver, no library, bindings missing); None while it can."""
        self._uuids: dict[int, str] = {}
        self._versions: dict[str, str] = {}  # pynvml function -> the version this driver has
        # NVML's CPU timestamp (microseconds) of the newest utilisation sample read, per GPU index:
        # the next query asks only for samples after it, so each `sample()` covers its own interval.
        self._last_seen: dict[int, int] = {}

    # --- lifecycle --------------------------------------------------------------------------

    def available(self) -> bool:
        """Whether NVML is loaded and initialised; when not, `reason` says why. Never raises for a
        missing driver, library or binding."""
        if self._state == "new":
            self._init()
        return self._state == "ready"

    def _init(self) -> None:
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as e:
                self._unavailable(f"the NVML bindings are not installed ({e}); install nvidia-ml-py")
                return
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            self._unavailable(_init_reason(nvml, e))
            return
        except OSError as e:  # a library that loads but can't be used (wrong architecture, broken)
            self._unavailable(f"libnvidia-ml.so.1 could not be loaded: {e}")
            return
        self._state = "ready"

    def _unavailable(self, reason: str) -> None:
        self._state = "unavailable"
        self.reason = reason

    def close(self) -> None:
        """Shut NVML down (when this monitor initialised it). Idempotent; `available()` is then False."""
        if self._state == "ready":
            nvml = self._nvml
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as e:
                # Shutting down is the last thing a monitor does; a driver that already went away
                # has nothing left to release.
                self.reason = f"closed (nvmlShutdown: {_err(e)})"
            else:
                self.reason = "closed"
        elif self.reason is None:
            self.reason = "closed"
        self._state = "closed"

    def __enter__(self) -> GpuMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- queries ------------------------------------------------------------------------------

    def driver_version(self) -> str:
        """The NVIDIA driver's version string; "" when NVML is not available."""
        if not self.available():
            return ""
        return _text(self._call("nvmlSystemGetDriverVersion", None))

    def devices(self) -> list[GpuDevice]:
        """The GPUs NVML sees, by index; [] when NVML is not available."""
        if not self.available():
            return []
        nvml = self._nvml
        found: list[GpuDevice] = []
        for index in range(self._call("nvmlDeviceGetCount", None)):
            handle = self._call("nvmlDeviceGetHandleByIndex", index, index)
            try:
                minor: int | None = int(nvml.nvmlDeviceGetMinorNumber(handle))
            except nvml.NVMLError as e:
                if e.value != nvml.NVML_ERROR_NOT_SUPPORTED:
                    raise GpuError(f"GPU {index}: nvmlDeviceGetMinorNumber failed: {_err(e)}") from None
                minor = None
            found.append(
                GpuDevice(
                    index=index,
                    uuid=self._uuid(index, handle),
                    name=_text(self._call("nvmlDeviceGetName", index, handle)),
                    minor=minor,
                )
            )
        return found

    def sample(self) -> list[GpuProcessUsage]:
        """Every process holding a context on a GPU, one entry per (GPU index, host pid), by index and
        pid; [] when NVML is not available.

        Processes come from NVML's compute and graphics process lists; utilisation from the samples
        the driver took since the previous `sample()` (the first covers the driver's whole sample
        buffer, a few seconds). A listed process the driver took no sample of, while it took samples
        of others, used no SM time: 0.0. A process on neither list (it exited before they were
        read) is left out, even if the driver sampled it. Raises GpuError when NVML fails on a GPU
        it listed.
        """
        if not self.available():
            return []
        usage: list[GpuProcessUsage] = []
        for index in range(self._call("nvmlDeviceGetCount", None)):
            handle = self._call("nvmlDeviceGetHandleByIndex", index, index)
            uuid = self._uuid(index, handle)
            memory = self._processes(index, handle)
            # Asked after the lists: a process that started in between has no entry (the next
            # sample has it); one that exited in between keeps its entry with what the driver saw.
            sm = self._utilisation(index, handle)
            for pid in sorted(memory):
                percent = None if sm is None else float(sm.get(pid, 0))
                usage.append(GpuProcessUsage(index, uuid, pid, memory[pid], percent))
        return usage

    # --- NVML, one call at a time --------------------------------------------------------------

    def _call(self, name: str, index: int | None, *args: Any) -> Any:
        nvml = self._nvml
        try:
            return getattr(nvml, name)(*args)
        except nvml.NVMLError as e:
            where = "NVML" if index is None else f"GPU {index}"
            raise GpuError(f"{where}: {name} failed: {_err(e)}") from None

    def _uuid(self, index: int, handle: Any) -> str:
        if index not in self._uuids:
            self._uuids[index] = _text(self._call("nvmlDeviceGetUUID", index, handle))
        return self._uuids[index]

    def _processes(self, index: int, handle: Any) -> dict[int, int | None]:
        """Host pid -> GPU memory (bytes, None when NVML can't say) from both process lists."""
        nvml = self._nvml
        memory: dict[int, int | None] = {}
        for listing in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            name = self._versions.get(listing, listing)
            try:
                try:
                    procs = getattr(nvml, name)(handle)
                except nvml.NVMLLibraryMismatchError:
                    # pynvml's unversioned name calls the newest version (_v3, R510 and later);
                    # older drivers have _v2, which returns the same fields.
                    name = self._versions[listing] = listing + "_v2"
                    procs = getattr(nvml, name)(handle)
            except nvml.NVMLError as e:
                if e.value == nvml.NVML_ERROR_NOT_SUPPORTED:
                    continue  # e.g. no graphics list on some compute-only boards
                raise GpuError(f"GPU {index}: {name} failed: {_err(e)}") from None
            for proc in procs:
                pid = int(proc.pid)
                used = None if proc.usedGpuMemory is None else int(proc.usedGpuMemory)
                # A process with both a compute and a graphics context appears in both lists; NVML
                # reports the process's memory on the GPU in each, so take the larger, not the sum.
                known = [m for m in (memory.get(pid), used) if m is not None]
                memory[pid] = max(known) if known else None
        return memory

    def _utilisation(self, index: int, handle: Any) -> dict[int, int] | None:
        """Host pid -> highest SM % in the driver's samples since the last query; None when there
        are no samples in that interval or the GPU can't measure them."""
        nvml = self._nvml
        since = self._last_seen.get(index, 0)
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(handle, since)
        except nvml.NVMLError as e:
            # NOT_FOUND: no sample since `since`. NOT_SUPPORTED: MIG mode, pre-Maxwell boards.
            # SUCCESS: pynvml raises it when the size query finds an empty buffer.
            if e.value in (nvml.NVML_ERROR_NOT_FOUND, nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_SUCCESS):
                return None
            raise GpuError(f"GPU {index}: nvmlDeviceGetProcessUtilization failed: {_err(e)}") from None
        sm: dict[int, int] = {}
        newest = since
        for s in samples:
            stamp = int(s.timeStamp)
            # The driver pads the buffer with zeroed entries (pid 0); older entries are filtered
            # here too, in case a driver returns its whole buffer.
            if s.pid == 0 or stamp <= since:
                continue
            newest = max(newest, stamp)
            sm[int(s.pid)] = max(sm.get(int(s.pid), 0), int(s.smUtil))
        if not sm:
            return None
        self._last_seen[index] = newest
        return sm


def _init_reason(nvml: Any, e: Any) -> str:
    if e.value == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return "libnvidia-ml.so.1 was not found: no NVIDIA driver is installed on this host"
    if e.value == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return "the NVIDIA kernel driver is not loaded (NVML: Driver Not Loaded)"
    if e.value == nvml.NVML_ERROR_NO_PERMISSION:
        return "NVML refused access to the GPUs (NVML: Insufficient Permissions)"
    return f"nvmlInit failed: {_err(e)}"


def _err(e: Any) -> str:
    """NVML's message and code, e.g. ``GPU is lost (NVML error 15)``."""
    try:
        text = str(e)
    except Exception:  # pynvml's __str__ calls into the library, which may be the broken part
        text = "NVML error"
    return f"{text} (NVML error {getattr(e, 'value', '?')})"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

"""The resource monitor: one thread samples every watched sandbox's processes on its own interval.

Per process it reads /proc/PID/stat (CPU ticks, start time) and statm (resident pages): two small
reads, so 4 samples a second of a busy sandbox cost well under a millisecond. GPU use comes from NVML
once per round for all sandboxes, and is handed to each by host pid.

Failures fail closed, like the process monitor's: when the sampler stops, NVML fails on a GPU it
listed (`GpuError`: the sandboxes granted GPUs are concerned; the others hold no GPU device) or a
sandbox's own sampling raises, each sandbox concerned is told through its `on_failure` and stops;
the failure is logged on the `corral` logger for the operator.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from corral import _procfs
from corral.monitors.gpu import GpuError, GpuMonitor, GpuProcessUsage

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    cpu_seconds: float  # user + system since start
    start_ticks: int  # clock ticks after boot: with the pid, names the process
    rss: int

    @property
    def started(self) -> float:
        """When the process started, in seconds after boot (the clock `uptime()` reads)."""
        return self.start_ticks / _procfs.CLK_TCK


def read_stat(pid: int) -> ProcStat | None:
    try:
        fields = _procfs.stat_fields(pid)
        with open(f"/proc/{pid}/statm", "rb") as f:
            pages = int(f.read().split()[1])
        if fields[_procfs.STATE] == b"Z":
            return None
        cpu = (int(fields[_procfs.UTIME]) + int(fields[_procfs.STIME])) / _procfs.CLK_TCK
        return ProcStat(pid, cpu, int(fields[_procfs.STARTTIME]), pages * _PAGE)
    except (OSError, ValueError, IndexError):
        return None


def uptime() -> float:
    """Seconds since boot, the clock /proc start times count in."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class CpuMeter:
    """Cores each process used since the previous reading (since its start, the first time)."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, int], tuple[float, float]] = {}  # (pid, start) -> (cpu s, uptime)

    def measure(self, stats: list[ProcStat], now_uptime: float) -> dict[int, float]:
        out: dict[int, float] = {}
        seen: dict[tuple[int, int], tuple[float, float]] = {}
        for s in stats:
            key = (s.pid, s.start_ticks)
            prev = self._last.get(key)
            if prev is None:
                prev = (0.0, s.started)
            dt = now_uptime - prev[1]
            out[s.pid] = max(0.0, (s.cpu_seconds - prev[0]) / dt) if dt > 0.01 else 0.0
            seen[key] = (s.cpu_seconds, now_uptime)
        self._last = seen
        return out


Callback = Callable[[dict[int, list[GpuProcessUsage]]], None]


@dataclass
class _Watch:
    interval: float
    due: float
    callback: Callback
    on_failure: Callable[[str], None] | None = None
    gpu: bool = False  # the sandbox was granted GPUs: blind on them, its tripwires are blind


class Sampler:
    """Calls each watched sandbox's callback every `interval` seconds, from one thread."""

    def __init__(self, gpu: GpuMonitor | None = None) -> None:
        self._watches: dict[object, _Watch] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu = gpu
        self._gpu_checked = gpu is not None
        self._stopping = False

    @property
    def gpu(self) -> GpuMonitor | None:
        """NVML, if this host has it (checked once, on first use)."""
        if not self._gpu_checked:
            self._gpu_checked = True
            monitor = GpuMonitor()
            self._gpu = monitor if monitor.available() else None
        return self._gpu

    def watch(
        self,
        key: object,
        interval: float,
        callback: Callback,
        on_failure: Callable[[str], None] | None = None,
        gpu: bool = False,
    ) -> None:
        """Call `callback` every `interval` seconds with the GPU processes by pid; `on_failure` when
        sampling fails for this sandbox. `gpu`: the sandbox was granted GPUs (a GPU that can no
        longer be read stops it; a sandbox without GPUs can't reach them and goes on)."""
        with self._lock:
            # Due times on a grid of the interval: sandboxes sharing an interval are sampled in
            # one round, so a thousand of them wake this thread 4 times a second, not 4,000.
            due = (math.floor(time.monotonic() / interval) + 1) * interval
            self._watches[key] = _Watch(interval, due, callback, on_failure, gpu)
            if not self._stopping and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="corral-sampler", daemon=True)
                self._thread.start()
        self._wake.set()

    def unwatch(self, key: object) -> None:
        with self._lock:
            self._watches.pop(key, None)

    def stop(self, timeout: float = 5.0) -> None:
        """End the sampling thread (its owner's sandboxes are all closed)."""
        with self._lock:
            self._stopping = True
            self._watches.clear()
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:
            # Fail closed: a sandbox whose resources nobody samples is not left running.
            log.error("resource sampling stopped", exc_info=e)
            self._fail(None, f"resource sampling stopped: {e!r}")

    def _fail(self, keys: list[object] | None, reason: str) -> None:
        """Stop watching `keys` (None: every sandbox) and tell each owner that its tripwires are
        blind, so that it stops the sandbox: a failed monitor is handled the same way wherever it
        fails."""
        with self._lock:
            if keys is None:
                keys = list(self._watches)
            watches = [w for w in (self._watches.pop(k, None) for k in keys) if w is not None]
        for w in watches:
            if w.on_failure is not None:
                w.on_failure(reason)

    def _loop(self) -> None:
        gpu = self.gpu
        while not self._stopping:
            with self._lock:
                watches = list(self._watches.items())
            now = time.monotonic()
            due = [(key, w) for key, w in watches if w.due <= now]
            if due:
                usage: dict[int, list[GpuProcessUsage]] = {}
                if gpu is not None:
                    try:
                        for u in gpu.sample():
                            usage.setdefault(u.pid, []).append(u)
                    except GpuError as e:
                        # Blind on a GPU: the GPU tripwires would see "no processes" there. Every
                        # sandbox granted GPUs sampled in this round is stopped, as when any monitor
                        # fails; the others hold no GPU device and are sampled as usual.
                        log.error("GPU sampling failed: %s", e)
                        usage = {}
                        self._fail([key for key, w in due if w.gpu], f"GPU sampling failed: {e}")
                        due = [(key, w) for key, w in due if not w.gpu]
                for key, w in due:
                    # Fixed-rate, not fixed-delay: a slow round must not stretch detection latency.
                    w.due += w.interval
                    if w.due <= now:  # a round fell behind: skip ahead, staying on the grid
                        w.due = (math.floor(now / w.interval) + 1) * w.interval
                    try:
                        w.callback(usage)
                    except Exception as e:
                        log.error("sampling a sandbox failed", exc_info=e)
                        self._fail([key], f"sampling failed: {e!r}")
            with self._lock:
                nxt = min((w.due for w in self._watches.values()), default=None)
            timeout = None if nxt is None else max(0.0, nxt - time.monotonic())
            self._wake.wait(timeout if timeout is not None else 1.0)
            self._wake.clear()

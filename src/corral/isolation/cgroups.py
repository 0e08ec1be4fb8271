"""cgroup budgets for a sandbox: memory (no swap), CPU, processes; usage and kill/freeze.

cgroup v1 and v2 are both supported and chosen in one place, `detect()`: v2 when its hierarchy has the
memory, pids and cpu controllers, otherwise v1 when each of those has a v1 hierarchy (hybrid hosts,
where systemd mounts v2 with few or no controllers, are common), otherwise HostError.

Phases: `Hierarchy.create(name, ...)` on the host before the sandbox starts (limits in place before
any agent code runs); the sandbox's intermediate child moves its init in through `SandboxCgroup.join_files`
before init unshares its cgroup namespace, so that namespace is rooted at the sandbox's own cgroup;
`SandboxCgroup.remove()` after the last process is gone.

Sandboxes are created under the supervisor's own cgroup (`<own>/corral/<id>`), so whatever budget the
supervisor itself runs under also bounds its sandboxes.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from corral._errors import HostError

_V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
_V2_REQUIRED = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpu_cores: float
    max_processes: int


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int
    oom_kills: int  # cumulative OOM kills in this cgroup
    pids_refused: int  # cumulative forks refused by the process budget


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _keyed(path: str, key: str) -> int:
    """Read `key N` from a flat-keyed cgroup file (memory.events, pids.events, cpu.stat)."""
    for line in _read(path).splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return 0


class SandboxCgroup(Protocol):
    path: str

    @property
    def join_files(self) -> list[str]: ...
    @property
    def init_join_files(self) -> list[str]:
        """Where the sandbox's init goes (the intermediate child moves it in)."""
        ...

    @property
    def commands_memory(self) -> str | None:
        """With cgroup v1: the memory group's `tasks` file, for the thread of init that starts
        commands (`init.Server`); init's leading thread then stays out of it."""
        ...

    def usage(self) -> Usage: ...
    def reset_peak(self) -> None: ...
    def pids(self) -> list[int]: ...
    def empty(self) -> bool: ...
    def freeze(self) -> None: ...
    def thaw(self) -> None: ...
    def kill(self) -> None: ...
    def remove(self, timeout: float = 5.0) -> None: ...


class Hierarchy(Protocol):
    version: int

    def create(self, name: str, limits: Limits) -> SandboxCgroup: ...
    def existing(self) -> dict[str, SandboxCgroup]:
        """Sandbox cgroups under corral's parent, by name (for sweeping what a dead supervisor left)."""
        ...


def _wait_until(done: Callable[[], bool], timeout: float = 5.0) -> None:
    """Freezing is asynchronous: the write starts it, the state file says when every task stopped."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("cgroup freeze did not complete")
        time.sleep(0.0005)


def _rmdir_when_empty(paths: list[str], timeout: float) -> None:
    # A cgroup can be removed only once its last task has been reaped, which lags SIGKILL slightly.
    deadline = time.monotonic() + timeout
    for path in paths:
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.002)


# --- cgroup v2 -------------------------------------------------------------------------------


class V2Cgroup:
    def __init__(self, path: str) -> None:
        self.path = path
        self._peak_fd: int | None = None

    @property
    def join_files(self) -> list[str]:
        return [f"{self.path}/cgroup.procs"]

    @property
    def init_join_files(self) -> list[str]:
        return self.join_files

    @property
    def commands_memory(self) -> str | None:
        return None  # v2 keeps a process's threads in one memory group

    def usage(self) -> Usage:
        peak = 0
        if self._peak_fd is not None:
            peak = int(os.pread(self._peak_fd, 64, 0))
        elif os.path.exists(f"{self.path}/memory.peak"):
            peak = int(_read(f"{self.path}/memory.peak"))
        return Usage(
            cpu_seconds=_keyed(f"{self.path}/cpu.stat", "usage_usec") / 1e6,
            memory_bytes=int(_read(f"{self.path}/memory.current")),
            memory_peak_bytes=peak,
            oom_kills=_keyed(f"{self.path}/memory.events", "oom_kill"),
            pids_refused=_keyed(f"{self.path}/pids.events", "max"),
        )

    def reset_peak(self) -> None:
        # Since Linux 6.12 a write resets memory.peak as seen through the same open file.
        try:
            if self._peak_fd is None:
                self._peak_fd = os.open(f"{self.path}/memory.peak", os.O_RDWR | os.O_CLOEXEC)
            os.write(self._peak_fd, b"reset\n")
        except OSError:
            if self._peak_fd is not None:
                os.close(self._peak_fd)
            self._peak_fd = None  # older kernel: the peak is the sandbox's, not the command's

    def pids(self) -> list[int]:
        return [int(p) for p in _read(f"{self.path}/cgroup.procs").split()]

    def empty(self) -> bool:
        return (
            not os.path.exists(f"{self.path}/cgroup.procs") or not _read(f"{self.path}/cgroup.procs").strip()
        )

    def freeze(self) -> None:
        _write(f"{self.path}/cgroup.freeze", "1")
        _wait_until(lambda: _keyed(f"{self.path}/cgroup.events", "frozen") == 1)

    def thaw(self) -> None:
        _write(f"{self.path}/cgroup.freeze", "0")

    def kill(self) -> None:
        _write(f"{self.path}/cgroup.kill", "1")

    def remove(self, timeout: float = 5.0) -> None:
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        _rmdir_when_empty([self.path], timeout)


class V2Hierarchy:
    version = 2

    def __init__(self, mount: str, own: str) -> None:
        self.parent = os.path.normpath(f"{mount}/{own}/corral")
        self._prepared = False

    def _prepare(self) -> None:
        if not self._prepared:
            os.makedirs(self.parent, exist_ok=True)
            _write(f"{self.parent}/cgroup.subtree_control", " ".join(f"+{c}" for c in _V2_REQUIRED))
            self._prepared = True

    def existing(self) -> dict[str, SandboxCgroup]:
        try:
            names = [e.name for e in os.scandir(self.parent) if e.is_dir()]
        except FileNotFoundError:
            return {}
        return {n: V2Cgroup(f"{self.parent}/{n}") for n in names}

    def create(self, name: str, limits: Limits) -> V2Cgroup:
        self._prepare()
        path = f"{self.parent}/{name}"
        os.mkdir(path)
        try:
            _write(f"{path}/memory.max", str(limits.memory_bytes))
            if os.path.exists(f"{path}/memory.swap.max"):
                _write(f"{path}/memory.swap.max", "0")
            _write(f"{path}/pids.max", str(limits.max_processes))
            _write(f"{path}/cpu.max", f"{max(1000, int(limits.cpu_cores * CPU_PERIOD_US))} {CPU_PERIOD_US}")
        except BaseException:
            os.rmdir(path)
            raise
        return V2Cgroup(path)


# --- cgroup v1 -------------------------------------------------------------------------------


class V1Cgroup:
    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths
        self.path = paths["memory"]

    @property
    def join_files(self) -> list[str]:
        # One directory per mounted hierarchy (cpu and cpuacct may share one).
        return sorted({f"{p}/cgroup.procs" for p in self.paths.values()})

    @property
    def init_join_files(self) -> list[str]:
        # Init's process joins corral's parent memory group, not the sandbox's: files the agent
        # writes to tmpfs fill the sandbox's group, and its OOM killer must find a command there,
        # never init (see `init.Server`). Its other groups are the sandbox's.
        outside = os.path.dirname(self.paths["memory"])
        return sorted(
            {f"{p}/cgroup.procs" for c, p in self.paths.items() if p != self.paths["memory"]}
            | {f"{outside}/cgroup.procs"}
        )

    @property
    def commands_memory(self) -> str | None:
        return f"{self.paths['memory']}/tasks"

    def usage(self) -> Usage:
        mem, pids, acct = self.paths["memory"], self.paths["pids"], self.paths["cpuacct"]
        return Usage(
            cpu_seconds=int(_read(f"{acct}/cpuacct.usage")) / 1e9,
            memory_bytes=int(_read(f"{mem}/memory.usage_in_bytes")),
            memory_peak_bytes=int(_read(f"{mem}/memory.max_usage_in_bytes")),
            oom_kills=_keyed(f"{mem}/memory.oom_control", "oom_kill"),
            pids_refused=_keyed(f"{pids}/pids.events", "max"),
        )

    def reset_peak(self) -> None:
        _write(f"{self.paths['memory']}/memory.max_usage_in_bytes", "0")

    def pids(self) -> list[int]:
        return [int(p) for p in _read(f"{self.paths['pids']}/cgroup.procs").split()]

    def empty(self) -> bool:
        return all(
            not os.path.exists(f"{p}/cgroup.procs") or not _read(f"{p}/cgroup.procs").strip()
            for p in self.paths.values()
        )

    def freeze(self) -> None:
        state = f"{self.paths['freezer']}/freezer.state"
        _write(state, "FROZEN")
        _wait_until(lambda: _read(state).strip() == "FROZEN")

    def thaw(self) -> None:
        _write(f"{self.paths['freezer']}/freezer.state", "THAWED")

    def kill(self) -> None:
        # v1 has no cgroup.kill: freeze first so nothing can fork while we signal the list.
        self.freeze()
        try:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            self.thaw()

    def remove(self, timeout: float = 5.0) -> None:
        _rmdir_when_empty(sorted(set(self.paths.values()), key=len, reverse=True), timeout)


class V1Hierarchy:
    version = 1

    def __init__(self, mounts: dict[str, str], own: dict[str, str]) -> None:
        self.parents = {c: os.path.normpath(f"{mounts[c]}/{own.get(c, '/')}/corral") for c in _V1_CONTROLLERS}

    def existing(self) -> dict[str, SandboxCgroup]:
        names: set[str] = set()
        for parent in self.parents.values():
            try:
                names.update(e.name for e in os.scandir(parent) if e.is_dir())
            except FileNotFoundError:
                pass
        return {n: V1Cgroup({c: f"{p}/{n}" for c, p in self.parents.items()}) for n in names}

    def create(self, name: str, limits: Limits) -> V1Cgroup:
        paths = {c: f"{p}/{name}" for c, p in self.parents.items()}
        made: list[str] = []
        try:
            for p in sorted(set(paths.values())):
                os.makedirs(p)
                made.append(p)
            mem = paths["memory"]
            _write(f"{mem}/memory.limit_in_bytes", str(limits.memory_bytes))
            # No swap: memsw (memory+swap) equal to the memory limit, where swap accounting exists.
            if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
                _write(f"{mem}/memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            _write(f"{mem}/memory.swappiness", "0")
            _write(f"{paths['pids']}/pids.max", str(limits.max_processes))
            _write(f"{paths['cpu']}/cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(f"{paths['cpu']}/cpu.cfs_quota_us", str(max(1000, int(limits.cpu_cores * CPU_PERIOD_US))))
        except BaseException:
            for p in reversed(made):
                os.rmdir(p)
            raise
        return V1Cgroup(paths)


# --- choosing --------------------------------------------------------------------------------


def _mounts(mountinfo: str) -> tuple[str | None, dict[str, str]]:
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) < 3:
            continue
        if rfields[0] == "cgroup2" and v2 is None:
            v2 = fields[4]
        elif rfields[0] == "cgroup":
            for opt in rfields[2].split(","):
                if opt in _V1_CONTROLLERS:
                    v1.setdefault(opt, fields[4])
    return v2, v1


def _own_paths(proc_cgroup: str) -> tuple[str, dict[str, str]]:
    v2 = "/"
    v1: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0":
            v2 = path
        for c in controllers.split(","):
            v1[c] = path
    return v2, v1


def detect(mountinfo: str | None = None, proc_cgroup: str | None = None) -> Hierarchy:
    """Pick the cgroup version this host can enforce budgets with. Arguments are for tests."""
    mountinfo = _read("/proc/self/mountinfo") if mountinfo is None else mountinfo
    proc_cgroup = _read("/proc/self/cgroup") if proc_cgroup is None else proc_cgroup
    v2_mount, v1_mounts = _mounts(mountinfo)
    own_v2, own_v1 = _own_paths(proc_cgroup)
    if v2_mount is not None:
        try:
            available = _read(f"{v2_mount}/cgroup.controllers").split()
        except OSError:
            available = []
        if all(c in available for c in _V2_REQUIRED):
            return V2Hierarchy(v2_mount, own_v2)
    missing = [c for c in _V1_CONTROLLERS if c not in v1_mounts]
    if not missing:
        return V1Hierarchy(v1_mounts, own_v1)
    raise HostError(
        "cgroups: no usable hierarchy: cgroup v2 lacks one of the memory, pids, cpu controllers and "
        f"cgroup v1 has no hierarchy for {', '.join(missing)}"
    )

"""The benchmark's only reach past corral's public API, kept in one function so it can be swapped for
public accessors in one place.

Every other module of the benchmark uses what `corral` exports. What is read here and why:

- `Sandbox._reaped` (a `threading.Event`): set when the background teardown after `close()` is done; the
  cold and idle rows wait for it so that a backlog of teardowns is drained, and timed, outside the rows.
- `Sandbox._cgroup.pids()`: the host pids in the sandbox's cgroup; the CPU-miner row finds its miner
  there and polls until it is gone.
- `Sandbox._cgroup.usage().memory_bytes`: the memory charged to the sandbox (idle rows' notes).
- `Sandbox._launched.init_pid`: the host pid of the sandbox's init (idle rows: its PSS, and that it is
  still alive).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral import Sandbox


@dataclass(frozen=True)
class Internals:
    """Read-only views of one sandbox's state that the public API does not offer (yet). Each reads the
    state when called: the cgroup ones only while the sandbox is open."""

    wait_torn_down: Callable[[float], bool]  # timeout in seconds -> whether the teardown finished
    pids: Callable[[], list[int]]  # host pids of the sandbox's processes
    memory_bytes: Callable[[], int]  # memory charged to the sandbox's cgroup
    init_pid: Callable[[], int]  # host pid of the sandbox's init


def internals(sb: Sandbox) -> Internals:
    """PRIVATE ACCESS: the one place the benchmark reads corral's private sandbox state."""

    def cgroup() -> Any:
        assert sb._cgroup is not None, f"sandbox {sb.id} has no cgroup (not started, or torn down)"
        return sb._cgroup

    def init_pid() -> int:
        assert sb._launched is not None, f"sandbox {sb.id} was never started"
        return sb._launched.init_pid

    return Internals(
        wait_torn_down=sb._reaped.wait,
        pids=lambda: list(cgroup().pids()),
        memory_bytes=lambda: int(cgroup().usage().memory_bytes),
        init_pid=init_pid,
    )

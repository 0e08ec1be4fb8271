"""What the benchmark reads of a sandbox beyond commands and events, in one place. All of it is public:

- `Sandbox.wait_closed(timeout)`: the background teardown after `close()` is done; the cold and idle
  rows wait for it so that a backlog of teardowns is drained, and timed, outside the rows.
- `Sandbox.pids()`: the host pids in the sandbox; the CPU-miner row finds its miner there and polls
  until it is gone.
- `Sandbox.usage().memory_bytes`: the memory charged to the sandbox (idle rows' notes).
- `Sandbox.init_pid`: the host pid of the sandbox's init (idle rows: its PSS, and that it is still
  alive).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from corral import Sandbox


@dataclass(frozen=True)
class Internals:
    """Read-only views of one sandbox's state. Each reads the state when called: `memory_bytes` only
    while the sandbox is open."""

    wait_torn_down: Callable[[float], bool]  # timeout in seconds -> whether the teardown finished
    pids: Callable[[], list[int]]  # host pids of the sandbox's processes
    memory_bytes: Callable[[], int]  # memory charged to the sandbox's cgroup
    init_pid: Callable[[], int]  # host pid of the sandbox's init


def internals(sb: Sandbox) -> Internals:
    """The views, now all read through `Sandbox`'s public read-only surface."""

    def init_pid() -> int:
        pid = sb.init_pid
        assert pid is not None, f"sandbox {sb.id} was never started"
        return pid

    return Internals(
        wait_torn_down=sb.wait_closed,
        pids=sb.pids,
        memory_bytes=lambda: sb.usage().memory_bytes,
        init_pid=init_pid,
    )

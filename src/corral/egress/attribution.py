"""Who in the sandbox made a connection or a query.

The fence looks up the socket a connection or query came from (sock_diag in the sandbox's network
namespace), then the process holding it (`FenceContext.find_process`). That is work for a worker
thread, in a lane per sandbox (`corral._lanes`): one sandbox's flood of queries or connections
queues behind itself. A connection whose socket is gone by the time of the lookup (a connect scan
resets at once) falls back on the sandbox's seccomp filter, which reported who connected to that
destination (`Reports`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from corral._lanes import Lanes
from corral.egress.rules import IPAddress
from corral.events import ProcessRef
from corral.isolation import sockdiag

T = TypeVar("T")

_CONNECTING_TTL = 10.0  # how long a reported connect waits to be paired with its connection
_CONNECTING_KEPT = 256  # reports kept per destination
_CONNECTING_KEYS = 4096  # destinations kept before expired ones are purged

# A client socket's own address and the address it connected to, which identify it in the sandbox's
# namespace.
Ends = tuple[tuple[str, int], tuple[str, int]]


def in_lane(lanes: Lanes, lane: Hashable, fn: Callable[[], T]) -> asyncio.Future[T]:
    """`fn()` in `lane` of `lanes`, as a future of the running loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if fut.done():
            return  # cancelled meanwhile
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]  # None only with an error

    def run() -> None:
        try:
            result = fn()
        except Exception as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    lanes.submit(lane, run)
    return fut


@dataclass(frozen=True)
class Connecting:
    """A connect the sandbox's seccomp filter reported (see `Reports.note`)."""

    destination: IPAddress
    port: int
    process: ProcessRef
    at: float  # monotonic


class Reports:
    """Who connected where, as the sandbox's seccomp filter reported it: kept for a while, so a
    connection whose socket is gone by the time the proxy looks for its owner is recorded with the
    process that connected to that destination, oldest first. Written on the supervisor's thread,
    read on the loop's."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[IPAddress, int], deque[Connecting]] = {}
        self._lock = threading.Lock()

    def note(self, dest: IPAddress, port: int, process: ProcessRef) -> Connecting:
        now = time.monotonic()
        entry = Connecting(dest, port, process, now)
        with self._lock:
            if len(self._waiting) > _CONNECTING_KEYS:
                for key in [k for k, v in self._waiting.items() if now - v[-1].at > _CONNECTING_TTL]:
                    del self._waiting[key]
            waiting = self._waiting.setdefault((dest, port), deque(maxlen=_CONNECTING_KEPT))
            while waiting and now - waiting[0].at > _CONNECTING_TTL:
                waiting.popleft()
            waiting.append(entry)
        return entry

    def complete(self, entry: Connecting, process: ProcessRef) -> None:
        """Name `entry`'s process more fully, if the report is still waiting to be paired."""
        with self._lock:
            waiting = self._waiting.get((entry.destination, entry.port))
            if waiting is None:
                return
            for i, held in enumerate(waiting):
                if held is entry:
                    waiting[i] = dataclasses.replace(entry, process=process)
                    return

    def owner(self, dest: IPAddress, port: int, found: ProcessRef | None) -> ProcessRef | None:
        """The owner of a connection to `dest` port `port`: `found` (from its socket), which takes
        its own report off the list, so later connections to the same destination pair with theirs;
        without one, the process of the oldest report of a connect there."""
        with self._lock:
            waiting = self._waiting.get((dest, port))
            if not waiting:
                return found
            if found is None:
                return waiting.popleft().process
            for i, entry in enumerate(waiting):
                if entry.process.pid == found.pid:
                    del waiting[i]
                    break
            return found


class Attribution:
    """Finds the process behind one sandbox's connections and queries."""

    def __init__(
        self,
        diag: socket.socket,
        find_process: Callable[[int], ProcessRef | None],
        lanes: Lanes,
        lane: Hashable,
    ) -> None:
        self._table = sockdiag.SocketTable(diag)
        self._find_process = find_process
        self._lanes = lanes
        self._lane = lane
        self.reports = Reports()

    def in_lane(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """`fn()` in this sandbox's lane of the lookup workers."""
        return in_lane(self._lanes, self._lane, fn)

    def tcp_owner(self, ends: Ends | None) -> asyncio.Future[ProcessRef | None]:
        """Who holds the client socket with `ends`, looked up in a worker while the caller goes on;
        None for a client that reset at once (a connect scan), whose ends are gone."""
        return self.in_lane(lambda: self._tcp_owner(ends))

    def _tcp_owner(self, ends: Ends | None) -> ProcessRef | None:
        inode = None if ends is None else self._table.tcp_inode(*ends)
        return None if inode is None else self._find_process(inode)

    def udp_owner(self, port: int) -> ProcessRef | None:
        """Who holds the UDP socket bound to `port` (a query's asker). Blocking: call it in a lane."""
        inode = self._table.udp_inode(port)
        return None if inode is None else self._find_process(inode)

"""The host side of the fence: one sandbox's egress (`Fence`), served on an `EgressLoop` shared by
every sandbox.

For each sandbox the fence serves the sockets created in its network namespace when it was built
(`netns.FenceSockets`): the transparent listener that every outgoing TCP connection is redirected
to and the explicit HTTP proxy (both served by `proxy`, along one path), the DNS resolver
(`resolver`), and the NFLOG socket reporting dropped packets. The other jobs have their modules:
`decision` judges, `relay` moves the bytes, `attribution` finds who connected, `connection`
records; this one ties them to a sandbox, and closes them in order.

The fence reaches its sandbox through a `FenceContext` only; the sandbox reaches the fence through
its methods: `judge_connect`, `refuse_connect`, `note_connect` and `name_connect` for a connect its
seccomp filter reported, `enter_phase` when the caller switches network phases, `settle` when a
command exits, `close` when it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import select
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from corral._lanes import Lanes
from corral.egress.attribution import Attribution, Connecting
from corral.egress.connection import Connection, Recorder
from corral.egress.decision import Decision, Refusal
from corral.egress.proxy import Proxy, report
from corral.egress.resolver import NamePool, Resolver
from corral.egress.rules import IPAddress, Rules
from corral.egress.upstream import SystemUpstream, Upstream
from corral.events import Deny, ProcessRef
from corral.isolation import netns

if TYPE_CHECKING:
    from corral.events.model import Event
    from corral.policy import Policy

__all__ = ["EgressLoop", "Fence", "FenceContext", "Refusal", "SystemUpstream", "Upstream"]

T = TypeVar("T")

_DRAIN_TIMEOUT = 2.0  # how long a closing fence waits for decisions in progress
_LOOKUP_WORKERS = 4


@dataclass(frozen=True)
class FenceContext:
    """What a fence knows of its sandbox, and all it may call back: its id, where its events go,
    the command running now, and the process holding a socket (by inode). Called from the egress
    loop's thread and the lookup workers'."""

    sandbox_id: str
    emit: Callable[[Event], None]
    current_exec: Callable[[], int | None]
    find_process: Callable[[int], ProcessRef | None]


class EgressLoop:
    """The event loop thread that serves the fences given it, and the lookup workers they share
    (who asked or connected is found in a lane per sandbox: one sandbox's flood queues behind
    itself). Whoever makes one owns it and stops it once its fences are closed."""

    def __init__(self, workers: int = _LOOKUP_WORKERS) -> None:
        self.loop = asyncio.new_event_loop()
        self.lookups = Lanes("corral-egress-lookup", workers)
        self._thread = threading.Thread(target=self.loop.run_forever, name="corral-egress", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop's thread, close the loop and stop the lookup workers; every fence on it must be
        closed first."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
        self.lookups.stop(timeout)


class Fence:
    """One sandbox's egress: its listeners, names, budgets and events.

    `loop`: the `EgressLoop` serving it, owned by whoever made it (the runtime's `Host`)."""

    def __init__(
        self,
        context: FenceContext,
        policy: Policy,
        sockets: netns.FenceSockets,
        upstream: Upstream | None = None,
        *,
        loop: EgressLoop,
    ) -> None:
        self.context = context
        self.id = context.sandbox_id
        self.rules = Rules(policy)
        self.decision = Decision(self.rules, upstream or SystemUpstream())
        self.sockets = sockets
        self._egress = loop
        self.attribution = Attribution(sockets.diag, context.find_process, self._egress.lookups, self)
        self.names = NamePool()
        self.resolver = Resolver(sockets.dns, self.rules, self.names, context, self.attribution)
        self.recorder = Recorder(context)
        self.proxy = Proxy(
            context, self.decision, self.names, self.attribution, sockets.transparent, sockets.proxy
        )
        self._closed = False
        # Not waited for: until the loop gets to it, connections wait in the listeners' backlog and
        # queries in the socket buffer, exactly as they would while the proxy is busy.
        self._started = asyncio.run_coroutine_threadsafe(self._start(), self._egress.loop)
        self._started.add_done_callback(_report_failure)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self.proxy.start(loop)
        self.resolver.start(loop)
        loop.add_reader(self.sockets.nflog.fileno(), self._dropped)

    def close(self) -> None:
        """Stop serving the sandbox. Whatever it sent before this is still recorded: connections
        waiting to be accepted, queries and drop reports in the socket buffers, and decisions in
        progress (given a moment; one still undecided is recorded as refused by the close). Call it
        once the sandbox's processes are dead, so nothing new arrives."""
        self._closed = self.proxy.closed = self.resolver.closed = True
        with contextlib.suppress(Exception):
            self._egress.run(self._stop())

    # --- network phases ------------------------------------------------------------------------

    def enter_phase(self, phase: str, timeout: float = _DRAIN_TIMEOUT) -> list[Connection]:
        """Put the rules of `phase` (one of the policy's network phases) in force, now: every new
        connection and query is judged by them from this call on, every open connection they do not
        allow is cut, and one still being decided is re-judged by them before it is relayed. Returns
        the connections cut, once each is recorded (given `timeout`): its `net.connect`, allowed, with
        a reason saying the switch cut it, and a `deny`.

        Synthetic addresses the resolver gave out stay mapped to their names: a connection to one is
        judged by the name, under the rules in force, so an address handed out in an earlier phase
        lets nothing through that the current phase refuses, and the refusal names the name."""
        return self._egress.run(self._enter_phase(phase, timeout), timeout + 1)

    async def _enter_phase(self, phase: str, timeout: float) -> list[Connection]:
        # On the loop's thread, between two of its steps: no accept, query or decision is half-way
        # through a judgement when the rules change.
        previous = self.rules.phase
        self.rules.enter(phase)
        return await self.proxy.enter_phase(previous, phase, timeout)

    # --- connects the sandbox's seccomp filter reported -----------------------------------------

    def judge_connect(self, dest: IPAddress, port: int) -> Refusal | None:
        """A connect the sandbox's seccomp filter reported, judged while the caller is parked: a
        `Refusal` when the destination alone decides against it (an address no rule allows, a name
        with no rule for the port, an address the resolver never gave out, the connection budget
        spent), None when the proxy must decide (a name to resolve, the protocol to read). Records
        nothing: the caller acts on it, and calls `refuse_connect` once it has refused."""
        return self.decision.at_connect(self.names.peek(dest), dest, port)

    def refuse_connect(self, refusal: Refusal, process: ProcessRef | None) -> None:
        """Record a connect refused on `judge_connect`'s word, as the proxy records the attempts it
        refuses (its `net.connect` and `deny` events), and count it against the connection budget as
        the proxy would have. The connection never reaches the proxy, so this is its only record."""
        self.decision.connections.take()
        record = Connection(
            self.id,
            refusal.destination,
            refusal.port,
            refusal.name,
            "transparent",
            self.context.current_exec(),
            process=process,
        )
        self.recorder.refused(record, refusal.reason)

    def note_connect(self, dest: IPAddress, port: int, process: ProcessRef) -> Connecting:
        """`process` in the sandbox is connecting to `dest` port `port` (its seccomp filter reported
        the call). Kept for a while: a connection whose socket is gone by the time the proxy looks
        for its owner (a connect scan resets at once) is recorded with the process that connected to
        that destination, oldest first. The report returned names it for `name_connect`."""
        return self.attribution.reports.note(dest, port, process)

    def name_connect(self, report: Connecting, process: ProcessRef) -> None:
        """Replace the process of `report` (from `note_connect`) with a fuller record of it, read
        once the caller had been let go; nothing when the report was paired meanwhile."""
        self.attribution.reports.complete(report, process)

    # --- commands ------------------------------------------------------------------------------

    def settle(self, exec_id: int | None = None, timeout: float = 2.0) -> None:
        """Wait (briefly) until every connection attempt made so far has been decided and recorded,
        so a command's result lists what it tried. Called when a command exits; free when the command
        made no connection."""
        if self._closed or (self._idle() and not self.proxy.relaying.get(exec_id)):
            return
        with contextlib.suppress(Exception):
            self._egress.run(self._settle(exec_id, timeout), timeout + 1)

    def _idle(self) -> bool:
        return (
            not _any_readable(self.sockets.fds()) and self.proxy.deciding == 0 and self.resolver.pending == 0
        )

    async def _settle(self, exec_id: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._idle():
            await asyncio.sleep(0.002)
        # Connections still relaying get a moment to finish, so a command's own connections are
        # usually recorded by the time it returns; long-lived ones (a server it left) don't hold it up.
        deadline = min(deadline, time.monotonic() + 0.25)
        while time.monotonic() < deadline and self.proxy.relaying.get(exec_id):
            await asyncio.sleep(0.005)

    async def _stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._started)
        loop = asyncio.get_running_loop()
        for fd in self.sockets.fds():
            loop.remove_reader(fd)
        # Read what is already queued, as the readers would have.
        self.proxy.accept_queued()
        self.resolver.read(bounded=False)
        self._dropped()
        # Relays end with the sandbox; their tasks record the connection as they finish.
        await asyncio.gather(self.proxy.drain(_DRAIN_TIMEOUT), self.resolver.drain(), return_exceptions=True)
        self.sockets.close()

    def _dropped(self) -> None:
        sock = self.sockets.nflog
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                return  # ENOBUFS under a flood: the kernel dropped log messages, not packets
            for d in netns.parse_nflog(data):
                target = f"{d.destination}" + (f" port {d.port}" if d.port is not None else "")
                self.context.emit(
                    Deny(
                        sandbox=self.id,
                        layer="egress",
                        what=f"{d.protocol} {target}",
                        exec=self.context.current_exec(),
                        detail="dropped: only TCP through corral's proxy and DNS through its resolver "
                        "leave a sandbox",
                    )
                )


def _any_readable(fds: list[int]) -> bool:
    # poll, not select: with hundreds of sandboxes a host's descriptors run past select's 1,024.
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _report_failure(done: concurrent.futures.Future[None]) -> None:
    if not done.cancelled() and (error := done.exception()) is not None:
        report(error)  # a bug: the sandbox is left with no network, and says why

"""The host side of the fence: one sandbox's egress (`Fence`), served on an `EgressLoop` shared by
every sandbox.

For each sandbox the fence serves the sockets created in its network namespace when it was built
(`netns.FenceSockets`): the transparent listener that every outgoing TCP connection is redirected
to, the explicit HTTP proxy, the DNS resolver (`resolver`), and the NFLOG socket reporting dropped
packets. Each job has its module: `decision` judges, `relay` moves the bytes, `attribution` finds
who connected, `connection` records; this one ties them to a sandbox.

A connection's life, the same from either listener: look up who opened it (`attribution`, in a
worker while the rest goes on), judge the destination before reading anything (so a scan is recorded
at its first attempt), read the first bytes to learn the protocol and judge that (SNI and Host
against the name, the rule's protocols, Stratum never), connect upstream to exactly the address that
was checked, relay the rest on two threads with the bytes-out budget taken as they pass, and record
a `net.connect` event (plus a `deny` event when refused).

The fence reaches its sandbox through a `FenceContext` only; the sandbox reaches the fence through
its methods: `judge_connect`, `refuse_connect`, `note_connect` and `name_connect` for a connect its
seccomp filter reported, `settle` when a command exits, `close` when it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from corral._lanes import Lanes
from corral._once import process_wide
from corral.egress import framing, sniff
from corral.egress.attribution import Attribution, Connecting, Ends
from corral.egress.connection import Connection, Recorder, Via
from corral.egress.decision import SYNTHETIC, Decision, Refusal
from corral.egress.relay import Relay
from corral.egress.resolver import NamePool, Resolver
from corral.egress.rules import IPAddress, Rules
from corral.egress.upstream import SystemUpstream, Upstream
from corral.events import Deny, ProcessRef
from corral.isolation import netns

if TYPE_CHECKING:
    from corral.events.model import Event
    from corral.policy import Policy

__all__ = ["EgressLoop", "Fence", "FenceContext", "Refusal", "SystemUpstream", "Upstream", "default_loop"]

log = logging.getLogger("corral")
T = TypeVar("T")

_SO_ORIGINAL_DST = 80
_SNIFF_TIMEOUT = 3.0
_CONNECT_TIMEOUT = 10.0
_DRAIN_TIMEOUT = 2.0  # how long a closing fence waits for decisions in progress
_DRAIN_MOST = 4 << 20  # what a refused client may have sent that is read and dropped before its close
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
        """Stop the loop's thread and close the loop; every fence on it must be closed first."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


# The loop of the fences made without one.
default_loop = process_wide(EgressLoop)


class _Attempt:
    """One connection from its accept until its decision. The fence counts undecided attempts, and
    `settle` and `close` wait for that count to reach zero, so every attempt is recorded."""

    __slots__ = ("_fence", "_open")

    def __init__(self, fence: Fence) -> None:
        self._fence = fence
        self._open = True
        fence._deciding += 1

    def decided(self) -> None:
        """Idempotent: the first call (decision, refusal, error or close) ends the attempt."""
        if self._open:
            self._open = False
            self._fence._deciding -= 1


class _Owner:
    """Who opened one connection: the lookup by its socket, in progress, paired once with what the
    seccomp filter reported (`Reports.owner`), into the record's `process`."""

    __slots__ = ("_lookup", "_record", "_reports", "_settled")

    def __init__(self, lookup: asyncio.Future[ProcessRef | None], record: Connection, fence: Fence) -> None:
        self._lookup = lookup
        self._record = record
        self._reports = fence.attribution.reports
        self._settled = False

    async def settle(self) -> None:
        """Wait for the lookup (by the time a connection is decided it has long finished)."""
        if not self._settled:
            self._set(await self._lookup)

    def settle_now(self) -> None:
        """With whatever the lookup found so far: for an attempt cut off before it was decided."""
        if not self._settled:
            done = self._lookup.done() and not self._lookup.cancelled()
            self._set(self._lookup.result() if done and self._lookup.exception() is None else None)

    def _set(self, found: ProcessRef | None) -> None:
        self._settled = True
        record = self._record
        record.process = self._reports.owner(record.destination, record.port, found)


_Handler = Callable[[socket.socket, _Attempt], Awaitable[None]]


class Fence:
    """One sandbox's egress: its listeners, names, budgets and events.

    `loop`: the `EgressLoop` serving it (by default one for the whole process)."""

    def __init__(
        self,
        context: FenceContext,
        policy: Policy,
        sockets: netns.FenceSockets,
        upstream: Upstream | None = None,
        loop: EgressLoop | None = None,
    ) -> None:
        self.context = context
        self.id = context.sandbox_id
        self.rules = Rules(policy)
        self.decision = Decision(self.rules, upstream or SystemUpstream())
        self.sockets = sockets
        self._egress = loop or default_loop()
        self.attribution = Attribution(sockets.diag, context.find_process, self._egress.lookups, self)
        self.names = NamePool()
        self.resolver = Resolver(sockets.dns, self.rules, self.names, context, self.attribution)
        self.recorder = Recorder(context)
        self._tasks: set[asyncio.Task[None]] = set()
        self._deciding = 0  # connection attempts not yet decided and recorded
        self._relaying: dict[int | None, int] = {}  # open relays by the command that opened them
        self._closed = False
        # Not waited for: until the loop gets to it, connections wait in the listeners' backlog and
        # queries in the socket buffer, exactly as they would while the proxy is busy.
        self._started = asyncio.run_coroutine_threadsafe(self._start(), self._egress.loop)
        self._started.add_done_callback(_report_failure)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener, handler in self._listeners():
            listener.setblocking(False)
            loop.add_reader(listener.fileno(), self._accept, listener, handler)
        self.resolver.start(loop)
        loop.add_reader(self.sockets.nflog.fileno(), self._dropped)

    def _listeners(self) -> list[tuple[socket.socket, _Handler]]:
        return [(self.sockets.transparent, self._transparent), (self.sockets.proxy, self._explicit)]

    def _accept(self, listener: socket.socket, handler: _Handler) -> None:
        """Take every connection waiting on `listener`.

        Accepting here rather than through asyncio's servers is what lets an attempt count as
        undecided from the moment it leaves the kernel's queue: asyncio runs the handler a few loop
        turns later, and in between `settle` and `drain` would see neither a queued connection nor a
        pending decision, and a command's (or a dying sandbox's) last connections would go unrecorded.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                # Out of descriptors or memory: the connections wait in the queue; try again shortly
                # instead of spinning on a listener that stays readable.
                report(e)
                loop.remove_reader(listener.fileno())
                loop.call_later(1.0, self._resume_accepting, listener, handler)
                return
            conn.setblocking(False)
            attempt = _Attempt(self)
            task = loop.create_task(self._connection(conn, handler, attempt))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume_accepting(self, listener: socket.socket, handler: _Handler) -> None:
        if not self._closed:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener, handler)

    async def _connection(self, conn: socket.socket, handler: _Handler, attempt: _Attempt) -> None:
        try:
            # Nagle off, as on the upstream side (`upstream.dial`): the relay passes on what it reads.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await handler(conn, attempt)
        finally:
            attempt.decided()
            _close(conn)

    def close(self) -> None:
        """Stop serving the sandbox. Whatever it sent before this is still recorded: connections
        waiting to be accepted, queries and drop reports in the socket buffers, and decisions in
        progress (given a moment; one still undecided is recorded as refused by the close). Call it
        once the sandbox's processes are dead, so nothing new arrives."""
        self._closed = self.resolver.closed = True
        with contextlib.suppress(Exception):
            self._egress.run(self._stop())

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
            process,
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
        if self._closed or (self._idle() and not self._relaying.get(exec_id)):
            return
        with contextlib.suppress(Exception):
            self._egress.run(self._settle(exec_id, timeout), timeout + 1)

    def _idle(self) -> bool:
        queued, _, _ = select.select(self.sockets.fds(), [], [], 0)
        return not queued and self._deciding == 0 and self.resolver.pending == 0

    async def _settle(self, exec_id: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._idle():
            await asyncio.sleep(0.002)
        # Connections still relaying get a moment to finish, so a command's own connections are
        # usually recorded by the time it returns; long-lived ones (a server it left) don't hold it up.
        deadline = min(deadline, time.monotonic() + 0.25)
        while time.monotonic() < deadline and self._relaying.get(exec_id):
            await asyncio.sleep(0.005)

    async def _stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._started)
        loop = asyncio.get_running_loop()
        for fd in self.sockets.fds():
            loop.remove_reader(fd)
        # Read what is already queued, as the readers would have.
        for listener, handler in self._listeners():
            self._accept(listener, handler)
        self.resolver.read(bounded=False)
        self._dropped()
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        while self._deciding and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        # Relays end with the sandbox; their tasks record the connection as they finish.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, self.resolver.drain(), return_exceptions=True)
        for s in (self.sockets.transparent, self.sockets.proxy, self.sockets.dns, self.sockets.nflog):
            s.close()
        self.sockets.diag.close()

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

    # --- TCP: the two listeners --------------------------------------------------------------

    async def _transparent(self, conn: socket.socket, attempt: _Attempt) -> None:
        try:
            raw = conn.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
        except OSError as e:
            report(e)  # no conntrack entry: nothing to attribute; the connection just closes
            return
        port = struct.unpack_from(">H", raw, 2)[0]
        dest = ipaddress.ip_address(raw[4:8])
        # The client's socket is connected to the address it asked for, not to this listener.
        ends = _ends(conn, (str(dest), port))
        await self._serve(conn, attempt, dest, port, None, "transparent", ends, b"")

    async def _explicit(self, conn: socket.socket, attempt: _Attempt) -> None:
        try:
            ends = _ends(conn, conn.getsockname())
        except OSError:
            ends = None
        loop = asyncio.get_running_loop()
        buf = b""
        try:
            while (parsed := sniff.parse_connect(buf)) is None:
                chunk = await asyncio.wait_for(loop.sock_recv(conn, 4096), _SNIFF_TIMEOUT)
                if not chunk or len(buf) > sniff.MAX_SNIFF:
                    raise ValueError("incomplete proxy request")
                buf += chunk
        except (ValueError, TimeoutError, OSError):
            _say(conn, b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        host, port, header_len = parsed
        reply = b""
        if header_len:  # CONNECT: the client speaks its own protocol once the destination is allowed
            reply = b"HTTP/1.1 200 Connection Established\r\n\r\n"
            first = buf[header_len:]
        else:  # a plain-HTTP request in absolute form: pass it on in origin form
            first = _origin_form(buf)
        try:
            dest: IPAddress = ipaddress.ip_address(host.strip("[]"))
            name = None
        except ValueError:
            # The name decides (and is what is dialled); the address only stands for it in the record,
            # so a spent name budget leaves the pool's own network address there.
            name = host.lower()
            dest = self.names.address(name) or SYNTHETIC.network_address
        await self._serve(conn, attempt, dest, port, name, "proxy", ends, first, reply)

    # --- TCP: one path for both --------------------------------------------------------------

    async def _serve(
        self,
        conn: socket.socket,
        attempt: _Attempt,
        dest: IPAddress,
        port: int,
        name: str | None,
        via: Via,
        ends: Ends | None,
        first: bytes,
        connect_reply: bytes = b"",
    ) -> None:
        started = time.monotonic()
        exec_id = self.context.current_exec()
        record = Connection(self.id, dest, port, name or self.names.name(dest), via, exec_id)
        name = record.name
        # Who connected is looked up in a worker thread while the decision and dial go on.
        owner = _Owner(self.attribution.tcp_owner(ends), record, self)
        upstream: socket.socket | None = None
        framer: framing.OneRequest | None = None
        relaying = False
        try:
            reason = self.decision.admit(name, dest, take=True)
            if reason is not None:
                return await self._refuse(conn, record, owner, reason)
            # The destination is judged before anything is read, so a scan that connects and hangs up
            # is recorded at its first attempt; the protocol is judged once the first bytes are in.
            verdict = await self.decision.destination(name, dest, port)
            if not verdict.allowed:
                if connect_reply:  # tell a proxy client plainly, so pip and curl say why
                    why = "".join(c if c.isprintable() else "?" for c in verdict.reason)
                    reason_header = why.encode("ascii", "replace")
                    _say(conn, b"HTTP/1.1 403 Forbidden\r\nX-Corral-Reason: " + reason_header + b"\r\n\r\n")
                return await self._refuse(conn, record, owner, verdict.reason)
            if connect_reply:
                _say(conn, connect_reply)
            # A rule that allows any protocol must not wait for the client to speak first (server-first
            # protocols would stall); its first bytes are still inspected in flight, for Stratum.
            inspect_in_flight = verdict.rule is not None and "any" in verdict.rule.protocols and not first
            if not inspect_in_flight:
                try:
                    seen, first = await self._sniff(conn, first)
                except (ConnectionError, OSError):
                    return await self._refuse(
                        conn, record, owner, "the client closed before sending anything", deny=False
                    )
                record.protocol, record.sni = seen.protocol, seen.name
                verdict = self.decision.protocol(verdict, name, dest, port, seen)
                if not verdict.allowed:
                    return await self._refuse(conn, record, owner, verdict.reason)
                if seen.protocol == "http":
                    # The Host just judged must be the only one: one request passes per connection.
                    framer = framing.OneRequest(name)
                    try:
                        first = b"".join(framer.feed(first))
                    except framing.Malformed as e:
                        return await self._refuse(conn, record, owner, e.reason)
            assert verdict.address is not None
            record.address = verdict.address
            try:
                upstream = await asyncio.wait_for(
                    self.decision.upstream.connect(verdict.address, port), _CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as e:
                return await self._refuse(
                    conn, record, owner, f"upstream {verdict.address} port {port}: {e}", deny=False
                )
            record.decision, record.reason = "allow", verdict.reason
            if not inspect_in_flight:  # otherwise the relay says when the protocol is known
                attempt.decided()
            # Who connected must be known while they still exist; by now the lookup has long finished.
            await owner.settle()
            self._relaying[exec_id] = self._relaying.get(exec_id, 0) + 1
            relaying = True
            relay = Relay(
                record,
                self.recorder,
                self.decision.bytes_out,
                framer,
                attempt.decided if inspect_in_flight else None,
            )
            await relay.run(conn, upstream, first)
        except asyncio.CancelledError:
            if record.decision is None:
                self._cut_off(record, owner, "the sandbox closed before the connection was decided")
            raise
        except Exception as e:
            report(e)  # a bug: the attempt is still recorded, refused
            if record.decision is None:
                self._cut_off(record, owner, f"corral's proxy failed: {e!r}")
        finally:
            if relaying:
                self._relaying[exec_id] -= 1
                if not self._relaying[exec_id]:
                    del self._relaying[exec_id]
            _close(conn)
            if upstream is not None:
                upstream.close()
            if record.decision == "allow":
                await owner.settle()
                self.recorder.allowed(record, time.monotonic() - started)

    async def _sniff(self, conn: socket.socket, data: bytes) -> tuple[sniff.Sniffed, bytes]:
        """Read the client's first bytes until its protocol (and the name it asks for) is known."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + _SNIFF_TIMEOUT
        seen = sniff.sniff_client(data) if data else sniff.Sniffed("unknown", complete=False)
        while not seen.complete and len(data) < sniff.MAX_SNIFF:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(conn, sniff.MAX_SNIFF - len(data)), remaining)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            seen = sniff.sniff_client(data)
        return seen, data

    async def _refuse(
        self, conn: socket.socket, record: Connection, owner: _Owner, reason: str, deny: bool = True
    ) -> None:
        await owner.settle()  # before closing: the client may exit as soon as it sees EOF
        self.recorder.refused(record, reason, deny)
        _close(conn)

    def _cut_off(self, record: Connection, owner: _Owner, reason: str) -> None:
        """Record an attempt that ended before it was decided (the fence closed under it, or
        failed): refused, as it was."""
        owner.settle_now()
        self.recorder.refused(record, reason)


def _ends(conn: socket.socket, remote: tuple[str, int]) -> Ends | None:
    """A client socket's own address and the address it connected to, which identify it in the
    sandbox's namespace; None for a client that reset at once (a connect scan), whose peer name is
    gone by now."""
    try:
        peer = conn.getpeername()
    except OSError:
        return None
    return ((peer[0], peer[1]), (remote[0], remote[1]))


def _say(conn: socket.socket, data: bytes) -> None:
    """Send a proxy client a short reply (a status line), as far as it takes it now: a client that
    went away or reads nothing costs the fence no wait."""
    with contextlib.suppress(OSError):
        conn.send(data)


def _close(conn: socket.socket) -> None:
    """Close a client's socket. What it sent that was never read (a refused client's request) is read
    and dropped first: closed with unread data, the kernel resets the connection, and the reset can
    overtake a 403 still on its way."""
    if conn.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        drained = 0
        # MSG_DONTWAIT: a relay thread may have made the descriptor blocking.
        while drained < _DRAIN_MOST and (chunk := conn.recv(65536, socket.MSG_DONTWAIT)):
            drained += len(chunk)
    conn.close()


def _origin_form(request: bytes) -> bytes:
    """Turn a proxy request (absolute URI) into what an origin server expects. It goes on as the only
    request on the connection (`framing`), or a client reusing a proxy connection could send its next
    request to another host past the check that allowed the first."""
    head, sep, body = request.partition(b"\r\n\r\n")
    line, _, headers = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) == 3 and b"://" in parts[1]:
        url = parts[1].split(b"://", 1)[1]
        path = b"/" + url.split(b"/", 1)[1] if b"/" in url else b"/"
        line = b" ".join((parts[0], path, parts[2]))
    return b"\r\n".join([line, headers] if headers else [line]) + sep + body


def _report_failure(done: concurrent.futures.Future[None]) -> None:
    if not done.cancelled() and (error := done.exception()) is not None:
        report(error)  # a bug: the sandbox is left with no network, and says why


def report(error: BaseException) -> None:
    """A failure of the fence's own (not the sandbox's doing), for the operator."""
    log.error("corral: egress: %r", error)

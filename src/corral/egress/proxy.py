"""The proxy: one sandbox's TCP connections, from either listener, along one path.

Both listeners feed `Proxy._serve`: the transparent one (every outgoing TCP connection, redirected,
its destination read from conntrack) and the explicit HTTP proxy (CONNECT, or a plain-HTTP request in
absolute form, its destination read from the request). A connection's life: look up who opened it
(`attribution`, in a worker while the rest goes on), judge the destination before reading anything
(so a scan is recorded at its first attempt), read the first bytes to learn the protocol and judge
that (`decision`), connect upstream to exactly the address that was checked, relay the rest
(`relay`), and record a `net.connect` event, plus a `deny` event when refused (`connection`).

Client sockets are read with the loop's `sock_recv`, never through a stream: what the client sends
after the bytes that were judged stays in the kernel for the relay, not in a buffer with no public
accessor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from corral.egress import framing, sniff
from corral.egress.attribution import Attribution, Ends, Reports
from corral.egress.connection import Connection, Recorder, Via
from corral.egress.decision import Decision
from corral.egress.relay import Relay
from corral.egress.resolver import NamePool
from corral.egress.rules import SYNTHETIC, IPAddress
from corral.events import ProcessRef

if TYPE_CHECKING:
    from corral.egress.service import FenceContext

log = logging.getLogger("corral")

_SO_ORIGINAL_DST = 80
_SNIFF_TIMEOUT = 3.0
_CONNECT_TIMEOUT = 10.0
_DRAIN_MOST = 4 << 20  # what a refused client may have sent that is read and dropped before its close


class _Attempt:
    """One connection from its accept until its decision. The proxy counts undecided attempts, and
    the fence's `settle` and `close` wait for that count to reach zero, so every attempt is recorded."""

    __slots__ = ("_open", "_proxy")

    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._open = True
        proxy.deciding += 1

    def decided(self) -> None:
        """Idempotent: the first call (decision, refusal, error or close) ends the attempt."""
        if self._open:
            self._open = False
            self._proxy.deciding -= 1


class _Owner:
    """Who opened one connection: the lookup by its socket, in progress, paired once with what the
    seccomp filter reported (`Reports.owner`), into the record's `process`."""

    __slots__ = ("_lookup", "_record", "_reports", "_settled")

    def __init__(
        self, lookup: asyncio.Future[ProcessRef | None], record: Connection, reports: Reports
    ) -> None:
        self._lookup = lookup
        self._record = record
        self._reports = reports
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


class _Open:
    """A connection being relayed: what a switch of network phases re-judges, and cuts when the new
    phase does not allow it. Its sockets are shut, not closed: that wakes the relay's threads out of
    their blocking reads, and they end the connection the usual way (`_serve` records it, with `cut`)."""

    __slots__ = ("_sockets", "cut", "record")

    def __init__(self, record: Connection, client: socket.socket, upstream: socket.socket) -> None:
        self.record = record
        self._sockets = (client, upstream)
        self.cut: str | None = None  # why it was cut, once it was

    def end(self, why: str) -> None:
        self.cut = why
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


_Handler = Callable[[socket.socket, _Attempt], Awaitable[None]]


class Proxy:
    """One sandbox's two TCP listeners, served on the egress loop."""

    def __init__(
        self,
        context: FenceContext,
        decision: Decision,
        names: NamePool,
        attribution: Attribution,
        transparent: socket.socket,
        proxy: socket.socket,
    ) -> None:
        self._context = context
        self._decision = decision
        self._names = names
        self._attribution = attribution
        self._recorder = Recorder(context)
        self._transparent_listener = transparent
        self._proxy_listener = proxy
        self._tasks: set[asyncio.Task[None]] = set()
        self.deciding = 0  # connection attempts not yet decided and recorded
        self.relaying: dict[int | None, int] = {}  # open relays by the command that opened them
        self._open: set[_Open] = set()  # on the loop's thread only
        self.closed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for listener, handler in self._listeners():
            listener.setblocking(False)
            loop.add_reader(listener.fileno(), self._accept, listener, handler)

    def accept_queued(self) -> None:
        """Take the connections still waiting in the listeners' queues (the fence is closing)."""
        for listener, handler in self._listeners():
            self._accept(listener, handler)

    async def drain(self, timeout: float) -> None:
        """Give decisions in progress `timeout` seconds, then end the rest: each records its
        connection as it finishes (one still undecided as refused by the close)."""
        deadline = time.monotonic() + timeout
        while self.deciding and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def enter_phase(self, previous: str | None, phase: str, timeout: float) -> list[Connection]:
        """Cut every open connection the rules now in force (those of `phase`, entered just now on the
        loop's thread) do not allow, and wait (up to `timeout`) until each is recorded. Connections still
        being decided need nothing here: `_serve` re-judges them before it relays (`Rules.switches`)."""
        cut: list[_Open] = []
        for opened in list(self._open):
            r = opened.record
            reason = self._decision.recheck(r.name, r.destination, r.address, r.port, r.protocol)
            if reason is not None:
                opened.end(
                    f"cut at the switch from phase {previous} to {phase}, which does not allow it: {reason}"
                )
                cut.append(opened)
        deadline = time.monotonic() + timeout
        while any(o in self._open for o in cut) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        return [o.record for o in cut]

    def _listeners(self) -> list[tuple[socket.socket, _Handler]]:
        return [(self._transparent_listener, self._transparent), (self._proxy_listener, self._explicit)]

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
        if not self.closed:
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

    # --- the two listeners -------------------------------------------------------------------

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
            dest = self._names.address(name) or SYNTHETIC.network_address
        await self._serve(conn, attempt, dest, port, name, "proxy", ends, first, reply)

    # --- one path for both -------------------------------------------------------------------

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
        switches = self._decision.rules.switches  # the phase it is judged in
        exec_id = self._context.current_exec()
        record = Connection(
            self._context.sandbox_id, dest, port, name or self._names.name(dest), via, exec_id
        )
        name = record.name
        # Who connected is looked up in a worker thread while the decision and dial go on.
        owner = _Owner(self._attribution.tcp_owner(ends), record, self._attribution.reports)
        upstream: socket.socket | None = None
        framer: framing.OneRequest | None = None
        relaying = False
        opened: _Open | None = None
        try:
            reason = self._decision.admit(name, dest, take=True)
            if reason is not None:
                return await self._refuse(conn, record, owner, reason)
            # The destination is judged before anything is read, so a scan that connects and hangs up
            # is recorded at its first attempt; the protocol is judged once the first bytes are in.
            verdict = await self._decision.destination(name, dest, port)
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
                verdict = self._decision.protocol(verdict, name, dest, port, seen)
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
                    self._decision.upstream.connect(verdict.address, port), _CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as e:
                return await self._refuse(
                    conn, record, owner, f"upstream {verdict.address} port {port}: {e}", deny=False
                )
            if self._decision.rules.switches != switches:
                # Judged under a phase that has ended: a phase must not let through what it was
                # deciding when the next, stricter one began. No await between this and `_open`, so a
                # switch either finds it open there or is seen here.
                later = self._decision.recheck(name, dest, verdict.address, port, record.protocol)
                if later is not None:
                    phase = self._decision.rules.phase
                    return await self._refuse(
                        conn, record, owner, f"phase {phase} began while it was decided: {later}"
                    )
            opened = _Open(record, conn, upstream)
            self._open.add(opened)
            record.decision, record.reason = "allow", verdict.reason
            # Counted as relaying before it stops counting as deciding, and until its event is
            # recorded: `Fence.settle` must never find it in neither state while it is still unrecorded.
            self.relaying[exec_id] = self.relaying.get(exec_id, 0) + 1
            relaying = True
            if not inspect_in_flight:  # otherwise the relay says when the protocol is known
                attempt.decided()
            # Who connected must be known while they still exist; by now the lookup has long finished.
            await owner.settle()
            relay = Relay(
                record,
                self._recorder,
                self._decision.bytes_out,
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
            _close(conn)
            if upstream is not None:
                upstream.close()
            try:
                if record.decision == "allow":
                    await owner.settle()
                    cut = opened.cut if opened is not None else None
                    if cut is not None:
                        record.reason = f"{record.reason}; {cut}"
                    self._recorder.allowed(record, time.monotonic() - started)
                    if cut is not None:
                        self._recorder.cut(record, cut)
            finally:
                if opened is not None:
                    self._open.discard(opened)
                if relaying:
                    self.relaying[exec_id] -= 1
                    if not self.relaying[exec_id]:
                        del self.relaying[exec_id]

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
        self._recorder.refused(record, reason, deny)
        _close(conn)

    def _cut_off(self, record: Connection, owner: _Owner, reason: str) -> None:
        """Record an attempt that ended before it was decided (the fence closed under it, or
        failed): refused, as it was."""
        owner.settle_now()
        self._recorder.refused(record, reason)


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


def report(error: BaseException) -> None:
    """A failure of the fence's own (not the sandbox's doing), for the operator."""
    log.error("egress: %r", error)

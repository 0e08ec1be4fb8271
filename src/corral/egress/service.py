"""The host side of the fence: one asyncio loop, on one thread, serves every sandbox's egress.

For each sandbox (`Fence`) it serves the sockets created in the sandbox's network namespace when it
was built (see `netns`): the transparent listener that every outgoing TCP connection is redirected
to, the explicit HTTP proxy, the DNS resolver, and the NFLOG socket reporting dropped packets.

A connection's life: look up who opened it (on the host, its socket through sock_diag, in a
worker thread while the rest goes on), judge the destination before reading anything (so a scan is
recorded at its first attempt), read the first bytes to learn the protocol and judge that (SNI and
Host against the name, the rule's protocols, Stratum never), check the rate and byte budgets,
connect upstream to exactly the address that was checked, relay the rest on two threads, and record
a `net.connect` event (plus a `deny` event when refused).

DNS answers are synthetic: an allowed name gets an address from 198.18.0.0/15 (reserved for
benchmarking, never routed) that maps back to the name when the program connects to it. The resolver
never asks anyone upstream while answering, so a denied name can't carry data out through DNS, and
the real address is looked up and checked only when a connection is made.

`Upstream` is pluggable: tests map names and ports to local servers; production uses the host's
resolver and connects directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral._lanes import Lanes
from corral._once import process_wide
from corral.egress import framing, rules, sniff
from corral.egress.rules import IPAddress, Rules, Verdict
from corral.events import Deny, DnsQuery, NetConnect, ProcessRef
from corral.isolation import netns, sockdiag

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from corral.events.model import Event
    from corral.policy import Policy

_SO_ORIGINAL_DST = 80
_SNIFF_TIMEOUT = 3.0
_CONNECT_TIMEOUT = 10.0
_SYNTHETIC = rules.SYNTHETIC
_BUFFER = 4 << 20  # how much a stream may hold while its first bytes are read and judged
# A relay thread's read buffer starts small (most connections carry little) and doubles each time a
# read fills it, so a bulk transfer moves up to 4 MiB per wake-up.
_RELAY_FIRST = 64 << 10
_RELAY_MOST = 4 << 20
_DRAIN_TIMEOUT = 2.0  # how long a closing fence waits for decisions in progress
_CONNECTING_TTL = 10.0  # how long a reported connect waits to be paired with its connection
_CONNECTING_KEPT = 256  # reports kept per destination
_CONNECTING_KEYS = 4096  # destinations kept before expired ones are purged
# A sandbox's name budget: names holding a synthetic address at once. Past it, the name used least
# recently gives its address back once it has been idle for _NAME_IDLE (far beyond the 5 s TTL the
# answers carry, so a program that cached an address past its TTL is still unlikely to see it reused
# for another name); when none has, the query is refused and recorded. An agent's ordinary work
# (package indexes, CDN shards) stays far below it.
_NAMES_KEPT = 4096
_NAME_IDLE = 300.0
# Queries a sandbox may have waiting for their asker to be found; past it the resolver stops reading
# that sandbox's socket until they are answered, so a flood waits in its own socket buffer (where the
# kernel drops the excess) instead of in the loop every sandbox shares.
_DNS_WAITING = 64
_LOOKUP_WORKERS = 4


class Upstream(Protocol):
    """How the fence reaches the world: name resolution and connections from the host."""

    async def resolve(self, name: str) -> list[IPAddress]: ...
    async def connect(
        self, address: IPAddress, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


class SystemUpstream:
    """The host's resolver and direct connections."""

    async def resolve(self, name: str) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return []
        return [ipaddress.ip_address(info[4][0]) for info in infos]

    async def connect(
        self, address: IPAddress, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(str(address), port, limit=_BUFFER)


class _Loop:
    """The event loop thread, started on first use."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="corral-egress", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_loop = process_wide(_Loop)
# Who asked or connected is found in a worker (sock_diag, then a bounded descriptor scan), in a lane
# per sandbox: one sandbox's flood of queries or connections queues behind itself.
_lookups = process_wide(lambda: Lanes("corral-egress-lookup", _LOOKUP_WORKERS))


def _in_lane(lane: object, fn: Callable[[], Any]) -> asyncio.Future[Any]:
    """`fn()` in `lane` of the lookup workers, as a future of the running loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return  # cancelled meanwhile
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result = fn()
        except Exception as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    _lookups().submit(lane, run)
    return fut


@dataclass
class Connecting:
    """A connect the sandbox's seccomp filter reported (see `Fence.note_connect`)."""

    process: ProcessRef
    at: float  # monotonic


@dataclass(frozen=True)
class Refusal:
    """A reported connect that the destination alone refuses (see `Fence.judge_connect`): refused at
    connect(), before the connection opens, instead of looking open and then closing."""

    destination: IPAddress
    port: int
    name: str | None  # the name a synthetic address stands for
    reason: str


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


_Ends = tuple[tuple[str, int], tuple[str, int]]
_Refusal = tuple[str, str]  # a refused query's deny: what, detail
_Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, _Attempt], Awaitable[None]]


class _Budget:
    """A sliding one-minute window, taken from several threads (the loop, relays, the supervisor)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0
        self._lock = threading.Lock()

    def take(self, amount: int = 1) -> bool:
        with self._lock:
            if not self._fits(amount):
                return False
            self.events.append((time.monotonic(), amount))
            self.total += amount
            return True

    def spent(self) -> bool:
        """Whether the next `take(1)` would fail, without taking."""
        with self._lock:
            return not self._fits(1)

    def _fits(self, amount: int) -> bool:
        now = time.monotonic()
        while self.events and now - self.events[0][0] > 60:
            self.total -= self.events.popleft()[1]
        return self.total + amount <= self.limit


class _NamePool:
    """Synthetic addresses for one sandbox's names: a bounded map both ways, least recently used
    first. Without a bound, 131,071 distinct names under one wildcard rule used up 198.18.0.0/15 and
    the next query raised IndexError in the loop that serves every sandbox."""

    def __init__(self, kept: int = _NAMES_KEPT, idle: float = _NAME_IDLE) -> None:
        self.kept, self.idle = kept, idle
        self._names: OrderedDict[str, tuple[IPAddress, float]] = OrderedDict()  # oldest use first
        self._addresses: dict[IPAddress, str] = {}
        self._free: list[IPAddress] = []
        self._next = 1  # .0 is the network's own address; never given out

    def __len__(self) -> int:
        return len(self._names)

    def address(self, name: str) -> IPAddress | None:
        """`name`'s address, given out now if it has none; None when the budget is spent."""
        now = time.monotonic()
        if name in self._names:
            addr = self._names[name][0]
            self._names[name] = (addr, now)
            self._names.move_to_end(name)
            return addr
        if len(self._names) >= self.kept:
            oldest, (old_addr, used) = next(iter(self._names.items()))
            if now - used < self.idle:
                return None
            del self._names[oldest]
            del self._addresses[old_addr]
            self._free.append(old_addr)
        if self._free:
            addr = self._free.pop()
        elif self._next < _SYNTHETIC.num_addresses - 1:  # the last one is the broadcast address
            addr = _SYNTHETIC[self._next]
            self._next += 1
        else:
            return None
        self._names[name] = (addr, now)
        self._addresses[addr] = name
        return addr

    def peek(self, address: IPAddress) -> str | None:
        """The name `address` stands for, without counting a use: safe from another thread than the
        egress loop's (a single dict read), which is where a parked connect is judged."""
        return self._addresses.get(address)

    def name(self, address: IPAddress) -> str | None:
        """The name `address` stands for; a connection to it counts as a use of the name."""
        name = self._addresses.get(address)
        if name is not None:
            self._names[name] = (address, time.monotonic())
            self._names.move_to_end(name)
        return name


class Fence:
    """One sandbox's egress: its listeners, names, budgets and events."""

    def __init__(
        self,
        sandbox_id: str,
        policy: Policy,
        fds: list[int],
        emit: Callable[[Event], None],
        find_process: Callable[[int], ProcessRef | None],
        current_exec: Callable[[], int | None],
        upstream: Upstream | None = None,
    ) -> None:
        self.id = sandbox_id
        self.rules = Rules(policy)
        self.emit = emit
        self.find_process = find_process
        self.current_exec = current_exec
        self.upstream = upstream or SystemUpstream()
        self.sockets = [socket.socket(fileno=fd) for fd in fds]
        self._table = sockdiag.SocketTable(self.sockets[4])
        self.names = _NamePool(_NAMES_KEPT, _NAME_IDLE)
        self.connections = _Budget(self.rules.limits.connections_per_minute)
        self.bytes_out = _Budget(self.rules.limits.bytes_out_per_minute)
        self._tasks: set[asyncio.Task[None]] = set()
        self._deciding = 0  # attempts (connections, queries) not yet decided and recorded
        self._dns_records: set[asyncio.Future[None]] = set()
        self._dns_paused = False  # reading stopped: _DNS_WAITING queries wait for their asker
        self._relaying: dict[int | None, int] = {}  # open relays by the command that opened them
        # Who connected where, as the sandbox's seccomp filter reported it (see `note_connect`).
        self._connecting: dict[tuple[IPAddress, int], deque[Connecting]] = {}
        self._connecting_lock = threading.Lock()
        self._closed = False
        self._loop = _loop()
        # Not waited for: until the loop gets to it, connections wait in the listeners' backlog and
        # queries in the socket buffer, exactly as they would while the proxy is busy.
        self._started = asyncio.run_coroutine_threadsafe(self._start(), self._loop.loop)
        self._started.add_done_callback(_report_failure)

    async def _start(self) -> None:
        resolver, nflog = self.sockets[2:4]
        loop = asyncio.get_running_loop()
        for listener, handler in self._listeners():
            listener.setblocking(False)
            loop.add_reader(listener.fileno(), self._accept, listener, handler)
        loop.add_reader(resolver.fileno(), self._dns, resolver)
        loop.add_reader(nflog.fileno(), self._dropped, nflog)

    def _listeners(self) -> list[tuple[socket.socket, _Handler]]:
        return [(self.sockets[0], self._transparent), (self.sockets[1], self._explicit)]

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
            try:
                reader, writer = await asyncio.open_connection(sock=conn, limit=_BUFFER)
            except BaseException:
                conn.close()
                raise
            await handler(reader, writer, attempt)
        finally:
            attempt.decided()

    def close(self) -> None:
        """Stop serving the sandbox. Whatever it sent before this is still recorded: connections
        waiting to be accepted, queries and drop reports in the socket buffers, and decisions in
        progress (given a moment; one still undecided is recorded as refused by the close). Call it
        once the sandbox's processes are dead, so nothing new arrives."""
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.run(self._stop())

    def note_connect(self, dest: IPAddress, port: int, process: ProcessRef) -> Connecting:
        """`process` in the sandbox is connecting to `dest` port `port` (its seccomp filter reported
        the call). Kept for a while: a connection whose socket is gone by the time the proxy looks
        for its owner (a connect scan resets at once) is recorded with the process that connected to
        that destination, oldest first. The caller may replace the entry's `process` with a fuller
        record later."""
        now = time.monotonic()
        entry = Connecting(process, now)
        with self._connecting_lock:
            if len(self._connecting) > _CONNECTING_KEYS:
                for key in [k for k, v in self._connecting.items() if now - v[-1].at > _CONNECTING_TTL]:
                    del self._connecting[key]
            waiting = self._connecting.setdefault((dest, port), deque(maxlen=_CONNECTING_KEPT))
            while waiting and now - waiting[0].at > _CONNECTING_TTL:
                waiting.popleft()
            waiting.append(entry)
        return entry

    def judge_connect(self, dest: IPAddress, port: int) -> Refusal | None:
        """A connect the sandbox's seccomp filter reported, judged while the caller is parked: a
        `Refusal` when the destination alone decides against it (an address no rule allows, a name
        with no rule for the port, an address the resolver never gave out, the connection budget
        spent), None when the proxy must decide (a name to resolve, the protocol to read). Records
        nothing: the caller acts on it, and calls `refuse_connect` once it has refused."""
        name = self.names.peek(dest)
        if self.connections.spent():
            reason = f"over {self.connections.limit} connections per minute"  # the proxy's first check
        elif name is None and dest in _SYNTHETIC:
            reason = f"{dest} is not an address corral's resolver gave out"
        elif name is None:
            verdict = self.rules.check_address(dest, port)
            if verdict.allowed:
                return None
            reason = verdict.reason
        elif name in self.rules.hosts or self.rules.rule_for_name(name, port) is None:
            # Decided without asking any resolver, as `_destination` would.
            verdict = self.rules.check_name(name, port, [])
            if verdict.allowed:
                return None
            reason = verdict.reason
        else:
            return None
        return Refusal(dest, port, name, reason)

    def refuse_connect(self, refusal: Refusal, process: ProcessRef | None) -> None:
        """Record a connect refused on `judge_connect`'s word, as the proxy records the attempts it
        refuses (its `net.connect` and `deny` events), and count it against the connection budget as
        the proxy would have. The connection never reaches the proxy, so this is its only record."""
        self.connections.take()
        record: dict[str, Any] = {
            "sandbox": self.id,
            "destination": str(refusal.destination),
            "port": refusal.port,
            "name": refusal.name,
            "via": "transparent",
            "exec": self.current_exec(),
            "process": process,
            "protocol": "unknown",
        }
        self._record_refusal(record, refusal.reason)

    def _reported(self, record: dict[str, Any], found: ProcessRef | None) -> Connecting | None:
        """With no owner `found` for a connection's socket, the oldest report of a connect to its
        destination. A found owner takes its own report off the list instead, so later connections
        to the same destination pair with theirs."""
        key = (ipaddress.ip_address(record["destination"]), record["port"])
        with self._connecting_lock:
            waiting = self._connecting.get(key)
            if not waiting:
                return None
            if found is None:
                return waiting.popleft()
            for i, entry in enumerate(waiting):
                if entry.process.pid == found.pid:
                    del waiting[i]
                    break
            return None

    def settle(self, exec_id: int | None = None, timeout: float = 2.0) -> None:
        """Wait (briefly) until every connection attempt made so far has been decided and recorded,
        so a command's result lists what it tried. Called when a command exits; free when the command
        made no connection."""
        if self._closed or (self._idle() and not self._relaying.get(exec_id)):
            return
        with contextlib.suppress(Exception):
            self._loop.run(self._settle(exec_id, timeout), timeout + 1)

    def _idle(self) -> bool:
        queued, _, _ = select.select([s.fileno() for s in self.sockets], [], [], 0)
        return not queued and self._deciding == 0

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
        for s in self.sockets:
            loop.remove_reader(s.fileno())
        # Read what is already queued, as the readers would have.
        for listener, handler in self._listeners():
            self._accept(listener, handler)
        self._dns(self.sockets[2], bounded=False)
        self._dropped(self.sockets[3])
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        while self._deciding and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        # Relays end with the sandbox; their tasks record the connection as they finish.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._dns_records, return_exceptions=True)
        for s in self.sockets:
            s.close()

    # --- DNS -----------------------------------------------------------------------------------

    def _dns(self, sock: socket.socket, bounded: bool = True) -> None:
        while True:
            if bounded and len(self._dns_records) >= _DNS_WAITING:
                asyncio.get_running_loop().remove_reader(sock.fileno())
                self._dns_paused = True
                return
            try:
                data, peer = sock.recvfrom(4096)
            except BlockingIOError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue  # not DNS: the resolver answers nothing, like any resolver would
            response = dns.message.make_response(query)
            seen: list[tuple[str, str, _Refusal | None, list[str]]] = []
            for q in query.question:
                name = q.name.to_text(omit_final_dot=True).lower()
                qtype = dns.rdatatype.to_text(q.rdtype)
                refusal: _Refusal | None = None
                answer: list[str] = []
                if not self.rules.name_allowed(name):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                    refusal = (name, f"{qtype} query for a name no egress rule allows; answered NXDOMAIN")
                elif q.rdtype == dns.rdatatype.A:
                    given = self.names.address(name)
                    if given is None:
                        response.set_rcode(dns.rcode.REFUSED)
                        refusal = (
                            "names",
                            f"{name}: over the sandbox's budget of {self.names.kept} names with an address "
                            f"(none idle for {self.names.idle:g}s to reclaim); answered REFUSED",
                        )
                    else:
                        answer.append(str(given))
                        response.answer.append(
                            dns.rrset.from_text(q.name, 5, dns.rdataclass.IN, dns.rdatatype.A, str(given))
                        )
                seen.append((name, qtype, refusal, answer))
            # Who asked is found (its socket, then the process holding it, in a worker thread) before
            # the answer goes out, while the asker still waits with its socket open: answered first,
            # most queries had exited by the time of the lookup and went unattributed.
            self._deciding += 1
            answer_dns = functools.partial(
                self._answer_dns, sock, response.to_wire(), peer, seen, self.current_exec()
            )
            record = _in_lane(self, answer_dns)
            self._dns_records.add(record)
            record.add_done_callback(self._dns_recorded)  # on this loop's thread, like the += above

    def _dns_recorded(self, record: asyncio.Future[None]) -> None:
        self._dns_records.discard(record)
        self._deciding -= 1
        if self._dns_paused and not self._closed and len(self._dns_records) < _DNS_WAITING // 2:
            self._dns_paused = False
            resolver = self.sockets[2]
            asyncio.get_running_loop().add_reader(resolver.fileno(), self._dns, resolver)

    def _answer_dns(
        self,
        sock: socket.socket,
        wire: bytes,
        peer: tuple[str, int],
        seen: list[tuple[str, str, _Refusal | None, list[str]]],
        exec_id: int | None,
    ) -> None:
        try:
            inode = self._table.udp_inode(peer[1])
            process = None if inode is None else self.find_process(inode)
        finally:
            with contextlib.suppress(OSError):
                sock.sendto(wire, peer)
        for name, qtype, refusal, answer in seen:
            decision: Literal["allow", "deny"] = "allow" if refusal is None else "deny"
            self.emit(
                DnsQuery(
                    sandbox=self.id,
                    name=name,
                    qtype=qtype,
                    decision=decision,
                    answer=answer,
                    exec=exec_id,
                    process=process,
                )
            )
            if refusal is not None:
                self.emit(
                    Deny(
                        sandbox=self.id,
                        layer="dns",
                        what=refusal[0],
                        exec=exec_id,
                        process=process,
                        detail=refusal[1],
                    )
                )

    def _dropped(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                return  # ENOBUFS under a flood: the kernel dropped log messages, not packets
            for d in netns.parse_nflog(data):
                target = f"{d.destination}" + (f" port {d.port}" if d.port is not None else "")
                self.emit(
                    Deny(
                        sandbox=self.id,
                        layer="egress",
                        what=f"{d.protocol} {target}",
                        exec=self.current_exec(),
                        detail="dropped: only TCP through corral's proxy and DNS through its resolver "
                        "leave a sandbox",
                    )
                )

    # --- TCP -----------------------------------------------------------------------------------

    async def _transparent(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, attempt: _Attempt
    ) -> None:
        sock = writer.get_extra_info("socket")
        try:
            raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
        except OSError as e:
            report(e)  # no conntrack entry: nothing to attribute; the connection just closes
            writer.close()
            return
        port = struct.unpack_from(">H", raw, 2)[0]
        dest = ipaddress.ip_address(raw[4:8])
        # The client's socket is connected to the address it asked for, not to this listener.
        ends = _ends(writer, (str(dest), port))
        await self._serve(reader, writer, attempt, dest, port, None, "transparent", ends, b"")

    async def _explicit(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, attempt: _Attempt
    ) -> None:
        ends = _ends(writer, writer.get_extra_info("sockname"))
        buf = b""
        try:
            while (parsed := sniff.parse_connect(buf)) is None:
                chunk = await asyncio.wait_for(reader.read(4096), _SNIFF_TIMEOUT)
                if not chunk or len(buf) > sniff.MAX_SNIFF:
                    raise ValueError("incomplete proxy request")
                buf += chunk
        except (ValueError, TimeoutError):
            writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            writer.close()
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
            dest = self.names.address(name) or _SYNTHETIC.network_address
        await self._serve(reader, writer, attempt, dest, port, name, "proxy", ends, first, reply)

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        attempt: _Attempt,
        dest: IPAddress,
        port: int,
        name: str | None,
        via: str,
        ends: _Ends | None,
        first: bytes,
        connect_reply: bytes = b"",
    ) -> None:
        started = time.monotonic()
        # Who connected is looked up in a worker thread while the decision and dial go on.
        process = _in_lane(self, functools.partial(self._tcp_owner, ends))
        exec_id = self.current_exec()
        name = name or self.names.name(dest)
        record: dict[str, Any] = {
            "sandbox": self.id,
            "destination": str(dest),
            "port": port,
            "name": name,
            "via": via,
            "exec": exec_id,
            "process": process,
            "protocol": "unknown",
        }
        up_writer: asyncio.StreamWriter | None = None
        framer: framing.OneRequest | None = None
        relaying = False
        try:
            if not self.connections.take():
                return await self._refuse(
                    writer, record, f"over {self.connections.limit} connections per minute"
                )
            if name is None and dest in _SYNTHETIC:
                return await self._refuse(
                    writer, record, f"{dest} is not an address corral's resolver gave out"
                )
            # The destination is judged before anything is read, so a scan that connects and hangs up
            # is recorded at its first attempt; the protocol is judged once the first bytes are in.
            verdict = await self._destination(name, dest, port)
            if not verdict.allowed:
                if connect_reply:  # tell a proxy client plainly, so pip and curl say why
                    why = "".join(c if c.isprintable() else "?" for c in verdict.reason)
                    reason = why.encode("ascii", "replace")
                    writer.write(b"HTTP/1.1 403 Forbidden\r\nX-Corral-Reason: " + reason + b"\r\n\r\n")
                return await self._refuse(writer, record, verdict.reason)
            writer.write(connect_reply)
            # A rule that allows any protocol must not wait for the client to speak first (server-first
            # protocols would stall); its first bytes are still inspected in flight, for Stratum.
            inspect_in_flight = verdict.rule is not None and "any" in verdict.rule.protocols and not first
            if not inspect_in_flight:
                try:
                    seen, first = await self._sniff(reader, first)
                except (ConnectionError, OSError):
                    return await self._refuse(
                        writer, record, "the client closed before sending anything", deny=False
                    )
                record["protocol"], record["sni"] = seen.protocol, seen.name
                verdict = self._protocol(verdict, name, dest, port, seen)
                if not verdict.allowed:
                    return await self._refuse(writer, record, verdict.reason)
                if seen.protocol == "http":
                    # The Host just judged must be the only one: one request passes per connection.
                    framer = framing.OneRequest(name)
                    try:
                        first = b"".join(framer.feed(first))
                    except framing.Malformed as e:
                        return await self._refuse(writer, record, e.reason)
            assert verdict.address is not None
            record["address"] = str(verdict.address)
            try:
                up_reader, upw = await asyncio.wait_for(
                    self.upstream.connect(verdict.address, port), _CONNECT_TIMEOUT
                )
                up_writer = upw
            except (OSError, TimeoutError) as e:
                return await self._refuse(
                    writer, record, f"upstream {verdict.address} port {port}: {e}", deny=False
                )
            record["decision"], record["reason"] = "allow", verdict.reason
            if not inspect_in_flight:  # otherwise _pump says when the protocol is known
                attempt.decided()
            # Who connected must be known while they still exist; by now the lookup has long finished.
            # From here on record["process"] is a ProcessRef.
            await self._settle_process(record)
            if not self.bytes_out.take(len(first)):
                self._over_budget(record)
                return await self._refuse(writer, record, "over the bytes-out budget", deny=False)
            self._relaying[exec_id] = self._relaying.get(exec_id, 0) + 1
            relaying = True
            record["bytes_out"] = len(first)
            client_sock = writer.get_extra_info("socket")
            upstream_sock = upw.get_extra_info("socket")
            if inspect_in_flight or client_sock is None or upstream_sock is None:
                if framer is not None:  # not reached with the fence's own sockets
                    return await self._refuse(writer, record, "an HTTP connection the relay can't frame")
                upw.write(first)
                await asyncio.gather(
                    self._pump(reader, upw, record, "bytes_out", attempt if inspect_in_flight else None),
                    self._pump(up_reader, writer, record, "bytes_in"),
                )
            else:
                client_transport = cast(asyncio.Transport, writer.transport)
                client_transport.pause_reading()
                cast(asyncio.Transport, upw.transport).pause_reading()
                # Whatever the client sent after the bytes we judged is still in the stream's buffer
                # (asyncio has no public accessor for it); it goes out first.
                extra = bytes(getattr(reader, "_buffer", b""))
                if extra and not self.bytes_out.take(len(extra)):
                    self._over_budget(record)
                    return await self._refuse(writer, record, "over the bytes-out budget", deny=False)
                if framer is not None:
                    try:
                        extra = b"".join(framer.feed(extra))
                    except framing.Malformed as e:
                        return await self._refuse(writer, record, e.reason)
                first += extra
                # Likewise what the server already sent (an SSH banner arrives right after connect).
                answer = bytes(getattr(up_reader, "_buffer", b""))
                await self._relay(client_sock, upstream_sock, first, answer, record, framer)
        except asyncio.CancelledError:
            if "decision" not in record:
                self._cut_off(record, "the sandbox closed before the connection was decided")
            raise
        except Exception as e:
            report(e)  # a bug: the attempt is still recorded, refused
            if "decision" not in record:
                self._cut_off(record, f"corral's proxy failed: {e!r}")
        finally:
            if relaying:
                self._relaying[exec_id] -= 1
                if not self._relaying[exec_id]:
                    del self._relaying[exec_id]
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            if "decision" in record and record["decision"] == "allow":
                await self._settle_process(record)
                self.emit(NetConnect(duration=time.monotonic() - started, **record))

    async def _relay(
        self,
        client: Any,
        upstream: Any,
        first: bytes,
        answer: bytes,
        record: dict[str, Any],
        framer: framing.OneRequest | None,
    ) -> None:
        """Relay a decided connection on two threads, one per direction, in blocking reads and writes.
        With `framer`, the client's direction passes one HTTP request and the server's is watched for
        a switch of protocols.

        The threads copy, where splice(2) would move pages: measured on 2 cores, copying ran about a
        third faster. Spliced pages stay referenced until the far reader has copied them, so the
        sender keeps writing into pages that have left its cache; a copy frees each page at once."""
        loop = asyncio.get_running_loop()
        a, b = os.dup(client.fileno()), os.dup(upstream.fileno())
        done: list[asyncio.Future[int]] = []
        for src, dst, outbound, head in ((a, b, True, first), (b, a, False, answer)):
            fut: asyncio.Future[int] = loop.create_future()
            done.append(fut)
            threading.Thread(
                target=self._relay_one,
                args=(src, dst, outbound, head, loop, fut, record, framer),
                name="corral-relay",
                daemon=True,
            ).start()
        try:
            await asyncio.wait(done)  # not gather: a cancel must not cancel the threads' futures
        except asyncio.CancelledError:
            # The fence is closing. A close does not wake a thread blocked in a read; a shutdown
            # does, and the descriptors stay open until the threads are out of their calls.
            for fd in (a, b):
                with contextlib.suppress(OSError):
                    _shutdown(fd, socket.SHUT_RDWR)
            await asyncio.wait(done, timeout=1.0)
            raise
        finally:
            # A thread still stuck after that keeps its descriptors: leaked, never closed under it.
            if all(f.done() for f in done):
                record["bytes_out"], record["bytes_in"] = (f.result() for f in done)
                os.close(a)
                os.close(b)

    def _relay_one(
        self,
        src: int,
        dst: int,
        outbound: bool,
        head: bytes,
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[int],
        record: dict[str, Any],
        framer: framing.OneRequest | None,
    ) -> None:
        total = 0
        cut = False
        request = framer if outbound else None  # `head` is framed already, by `_serve`
        watch = framer.response if framer is not None and framer.upgrade and not outbound else None
        try:
            for fd in (src, dst):
                os.set_blocking(fd, True)
            if watch is not None and not watch(head):
                watch = None
            _write_all(dst, head)
            total += len(head)
            buf = bytearray(_RELAY_FIRST)
            view = memoryview(buf)
            while not (request is not None and request.after) and (n := os.readv(src, [buf])):
                if outbound and not self.bytes_out.take(n):
                    self._over_budget(record)
                    cut = True
                    break
                if watch is not None and not watch(view[:n]):
                    watch = None
                if request is None:
                    _write_all(dst, view[:n])
                else:
                    for piece in request.feed(view[:n]):
                        _write_all(dst, piece)
                total += n
                if n == len(buf) and n < _RELAY_MOST:
                    buf = bytearray(2 * n)
                    view = memoryview(buf)
        except framing.Malformed as e:
            self._record_refusal(record, e.reason)
            cut = True
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                # Normally the other side sees EOF, as it would without corral; a cut connection is
                # closed both ways, so no answer to the truncated request comes back either.
                _shutdown(dst, socket.SHUT_RDWR if cut else socket.SHUT_WR)
            if request is not None and request.after:
                self._refuse_later(src, request, record)
            loop.call_soon_threadsafe(fut.set_result, total)

    def _refuse_later(self, client: int, request: framing.OneRequest, record: dict[str, Any]) -> None:
        """The client sent more after its one request, and the server's side has been shut. Record
        what that was (read on to its Host, when it is a request), then swallow the rest: the answer
        to the request that passed still reaches the client, and ends when the server closes."""
        with contextlib.suppress(OSError):
            while (
                len(request.after) < sniff.MAX_SNIFF and not sniff.sniff_client(bytes(request.after)).complete
            ):
                more = os.read(client, sniff.MAX_SNIFF - len(request.after))
                if not more:
                    break
                request.after += more
        reason, refused = request.refusal()
        if refused:
            self._record_refusal(record, reason)
        else:
            # Not the policy's business: the request that passed was allowed, and the client asks
            # again on a new connection. A deny here would read as a refused destination to rules.
            record["reason"] = f"{record['reason']}; {reason}"
        with contextlib.suppress(OSError):
            while os.read(client, _RELAY_FIRST):
                pass

    def _tcp_owner(self, ends: _Ends | None) -> ProcessRef | None:
        inode = None if ends is None else self._table.tcp_inode(*ends)
        return None if inode is None else self.find_process(inode)

    async def _sniff(self, reader: asyncio.StreamReader, data: bytes) -> tuple[sniff.Sniffed, bytes]:
        deadline = time.monotonic() + _SNIFF_TIMEOUT
        seen = sniff.sniff_client(data) if data else sniff.Sniffed("unknown", complete=False)
        while not seen.complete and len(data) < sniff.MAX_SNIFF:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(sniff.MAX_SNIFF - len(data)), remaining)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            seen = sniff.sniff_client(data)
        return seen, data

    async def _destination(self, name: str | None, dest: IPAddress, port: int) -> Verdict:
        if name is not None:
            if self.rules.rule_for_name(name, port) is None and name not in self.rules.hosts:
                return self.rules.check_name(name, port, [])  # refused without asking anyone
            resolved = [] if name in self.rules.hosts else await self.upstream.resolve(name)
            return self.rules.check_name(name, port, resolved)
        return self.rules.check_address(dest, port)

    def _protocol(
        self, verdict: Verdict, name: str | None, dest: IPAddress, port: int, seen: sniff.Sniffed
    ) -> Verdict:
        if verdict.rule is None:
            return verdict
        allowed = verdict.rule.protocols
        where = name or str(dest)
        if seen.protocol == "stratum":
            return Verdict(False, f"mining protocol (Stratum) to {where}", verdict.rule)
        if "any" not in allowed and seen.protocol not in allowed:
            listed = ", ".join(allowed)
            return Verdict(
                False,
                f"{seen.protocol} to {where} port {port} is not allowed (allowed: {listed})",
                verdict.rule,
            )
        if name is not None and seen.protocol in ("tls", "http") and seen.name != name:
            what = "TLS server name" if seen.protocol == "tls" else "HTTP Host"
            return Verdict(
                False, f"{what} {seen.name!r} does not match the name connected to, {name}", verdict.rule
            )
        return verdict

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        record: dict[str, Any],
        counter: str,
        attempt: _Attempt | None = None,
    ) -> None:
        """Relay one direction through Python. With `attempt`, the first bytes are also inspected in
        flight, and the attempt is decided once the protocol is known."""
        seen = b""
        cut = False
        inspect = attempt is not None
        try:
            while chunk := await src.read(1 << 20):
                if inspect:
                    seen += chunk[: sniff.MAX_SNIFF - len(seen)]
                    found = sniff.sniff_client(seen)
                    record["protocol"], record["sni"] = found.protocol, found.name
                    if found.protocol == "stratum":
                        self._record_refusal(record, "mining protocol (Stratum) seen in flight")
                        cut = True
                        break
                    inspect = not found.complete and len(seen) < sniff.MAX_SNIFF
                    if not inspect and attempt is not None:
                        attempt.decided()
                if counter == "bytes_out" and not self.bytes_out.take(len(chunk)):
                    self._over_budget(record)
                    cut = True
                    break
                record[counter] = record.get(counter, 0) + len(chunk)
                dst.write(chunk)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if attempt is not None:
                attempt.decided()
            if cut:  # refused mid-stream: nothing more either way, not even an answer
                dst.transport.abort()
            # A half-close passes on as one, and only that: the other direction keeps flowing until
            # its own end (a server that answers after the client's EOF, nc </dev/null). Closing the
            # upstream here cut off whatever the server had not sent yet. `_serve` closes both ends
            # once both directions are done.
            with contextlib.suppress(Exception):
                if cut:
                    pass
                elif dst.can_write_eof():
                    dst.write_eof()
                elif counter == "bytes_out":
                    dst.close()  # a transport that can't half-close (TLS) can only end

    def _over_budget(self, record: dict[str, Any]) -> None:
        detail = f"bytes-out budget of {self.bytes_out.limit} per minute reached; connection cut"
        self.emit(
            Deny(
                sandbox=self.id,
                layer="egress",
                what="bytes_out",
                exec=record["exec"],
                process=record["process"],  # settled before any bytes are relayed
                detail=detail,
            )
        )

    async def _refuse(
        self, writer: asyncio.StreamWriter, record: dict[str, Any], reason: str, deny: bool = True
    ) -> None:
        await self._settle_process(record)  # before closing: the client may exit as soon as it sees EOF
        self._record_refusal(record, reason, deny)
        writer.close()

    async def _settle_process(self, record: dict[str, Any]) -> None:
        if isinstance(record["process"], asyncio.Future):
            found = await record["process"]
            reported = self._reported(record, found)
            record["process"] = found if reported is None else reported.process

    def _cut_off(self, record: dict[str, Any], reason: str) -> None:
        """Record an attempt that ended before it was decided (the fence closed under it, or
        failed): refused, as it was."""
        process = record["process"]
        if isinstance(process, asyncio.Future):
            found = process.result() if process.done() and not process.exception() else None
            reported = self._reported(record, found)
            record["process"] = found if reported is None else reported.process
        self._record_refusal(record, reason)

    def _record_refusal(self, record: dict[str, Any], reason: str, deny: bool = True) -> None:
        """The `net.connect` event of a refused connection, and (`deny`) its `deny` event; a failure
        that is no decision of the policy's (an unreachable upstream) is not a deny."""
        record["decision"], record["reason"] = "deny", reason
        self.emit(NetConnect(**record))
        if deny:
            self.emit(
                Deny(
                    sandbox=self.id,
                    layer="egress",
                    what=f"{record['name'] or record['destination']} port {record['port']}",
                    exec=record["exec"],
                    process=record["process"],
                    detail=reason,
                )
            )


def _ends(writer: asyncio.StreamWriter, remote: tuple[str, int]) -> _Ends | None:
    """A client socket's own address and the address it connected to, which identify it in the
    sandbox's namespace; None for a client that reset at once (a connect scan), whose peer name is
    gone by now."""
    peer = writer.get_extra_info("peername")
    return None if peer is None else ((peer[0], peer[1]), (remote[0], remote[1]))


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _shutdown(fd: int, how: int) -> None:
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.shutdown(how)
    finally:
        s.close()


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
    log.error("egress: %r", error, exc_info=error)

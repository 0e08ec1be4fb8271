"""The sandbox's DNS resolver: synthetic answers, one name budget per sandbox.

An allowed name gets an address from 198.18.0.0/15 (`rules.SYNTHETIC`: reserved for benchmarking,
never routed) that maps back to the name when the program connects to it. The resolver never asks
anyone upstream while answering, so a denied name can't carry data out through DNS, and the real
address is looked up and checked only when a connection is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Literal

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.egress.rules import SYNTHETIC, IPAddress, Rules
from corral.events import Deny, DnsQuery

if TYPE_CHECKING:
    from corral.egress.attribution import Attribution
    from corral.egress.service import FenceContext

# A sandbox's name budget: names holding a synthetic address at once. Past it, the name used least
# recently gives its address back once it has been idle for NAME_IDLE (far beyond the 5 s TTL the
# answers carry, so a program that cached an address past its TTL is still unlikely to see it reused
# for another name); when none has, the query is refused and recorded. An agent's ordinary work
# (package indexes, CDN shards) stays far below it.
NAMES_KEPT = 4096
NAME_IDLE = 300.0
# Queries a sandbox may have waiting for their asker to be found; past it the resolver stops reading
# that sandbox's socket until they are answered, so a flood waits in its own socket buffer (where the
# kernel drops the excess) instead of in the loop every sandbox shares.
DNS_WAITING = 64
_TTL = 5

_Refusal = tuple[str, str]  # a refused query's deny: what, detail
_Seen = tuple[str, str, _Refusal | None, list[str]]  # name, type, refusal, answer


class NamePool:
    """Synthetic addresses for one sandbox's names: a bounded map both ways, least recently used
    first. Without a bound, 131,071 distinct names under one wildcard rule used up 198.18.0.0/15 and
    the next query raised IndexError in the loop that serves every sandbox."""

    def __init__(self, kept: int | None = None, idle: float | None = None) -> None:
        self.kept = NAMES_KEPT if kept is None else kept
        self.idle = NAME_IDLE if idle is None else idle
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
        elif self._next < SYNTHETIC.num_addresses - 1:  # the last one is the broadcast address
            addr = SYNTHETIC[self._next]
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


class Resolver:
    """Serves one sandbox's DNS socket on the egress loop. Who asked is found (its socket, then the
    process holding it, in the sandbox's lookup lane) before the answer goes out, while the asker
    still waits with its socket open: answered first, most queries had exited by the time of the
    lookup and went unattributed."""

    def __init__(
        self,
        sock: socket.socket,
        rules: Rules,
        names: NamePool,
        context: FenceContext,
        attribution: Attribution,
    ) -> None:
        self.sock = sock
        self.rules = rules
        self.names = names
        self._context = context
        self._attribution = attribution
        self._answering: set[asyncio.Future[None]] = set()
        self._paused = False  # reading stopped: DNS_WAITING queries wait for their asker
        self.closed = False

    @property
    def pending(self) -> int:
        """Queries read but not yet answered and recorded."""
        return len(self._answering)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.sock.fileno(), self.read)

    async def drain(self) -> None:
        """Wait for every query being answered to be recorded."""
        await asyncio.gather(*self._answering, return_exceptions=True)

    def read(self, bounded: bool = True) -> None:
        """Answer every query waiting in the socket (`bounded`: up to DNS_WAITING at once)."""
        while True:
            if bounded and len(self._answering) >= DNS_WAITING:
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
                self._paused = True
                return
            try:
                data, peer = self.sock.recvfrom(4096)
            except BlockingIOError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue  # not DNS: the resolver answers nothing, like any resolver would
            response, seen = self._answer(query)
            answer = functools.partial(
                self._send, response.to_wire(), peer, seen, self._context.current_exec()
            )
            answering = self._attribution.in_lane(answer)
            self._answering.add(answering)
            answering.add_done_callback(self._answered)  # on this loop's thread, like the add above

    def _answer(self, query: dns.message.Message) -> tuple[dns.message.Message, list[_Seen]]:
        response = dns.message.make_response(query)
        seen: list[_Seen] = []
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
                        dns.rrset.from_text(q.name, _TTL, dns.rdataclass.IN, dns.rdatatype.A, str(given))
                    )
            seen.append((name, qtype, refusal, answer))
        return response, seen

    def _answered(self, answering: asyncio.Future[None]) -> None:
        self._answering.discard(answering)
        if self._paused and not self.closed and len(self._answering) < DNS_WAITING // 2:
            self._paused = False
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self.read)

    def _send(self, wire: bytes, peer: tuple[str, int], seen: list[_Seen], exec_id: int | None) -> None:
        """In the lookup lane: find the asker, answer, record."""
        try:
            process = self._attribution.udp_owner(peer[1])
        finally:
            with contextlib.suppress(OSError):
                self.sock.sendto(wire, peer)
        sandbox = self._context.sandbox_id
        for name, qtype, refusal, answer in seen:
            decision: Literal["allow", "deny"] = "allow" if refusal is None else "deny"
            self._context.emit(
                DnsQuery(
                    sandbox=sandbox,
                    name=name,
                    qtype=qtype,
                    decision=decision,
                    answer=answer,
                    exec=exec_id,
                    process=process,
                )
            )
            if refusal is not None:
                self._context.emit(
                    Deny(
                        sandbox=sandbox,
                        layer="dns",
                        what=refusal[0],
                        exec=exec_id,
                        process=process,
                        detail=refusal[1],
                    )
                )

"""The fence through its seams, without a sandbox: a `Fence` on loopback sockets, its own
`EgressLoop`, and a `FenceContext` that records what the fence reports. Only the explicit proxy is
reachable this way (the transparent listener needs the sandbox's redirect), and it goes through the
same decision and relay as the transparent one; `test_egress.py` covers both inside real sandboxes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest

from corral import Deny
from corral.egress.connection import Connection
from corral.egress.service import EgressLoop, Fence, FenceContext
from corral.events import DnsQuery, NetConnect, ProcessRef
from corral.events.model import Event
from corral.isolation import netns, sockdiag
from helpers import policy, wait_until
from servers import LocalUpstream, http_server

WEB = "web.example.internal"
ME = ProcessRef(pid=os.getpid(), exe="/usr/bin/test-client", cmdline=["test-client"])


@dataclass
class Seen:
    """A sandbox as a fence sees it: what it was told, and what it asked."""

    exec_id: int | None = 7
    events: list[Event] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)  # inodes find_process was asked about
    owner: ProcessRef | None = ME
    lock: threading.Lock = field(default_factory=threading.Lock)

    def context(self) -> FenceContext:
        return FenceContext("sb-test", self.emit, lambda: self.exec_id, self.find_process)

    def emit(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)

    def find_process(self, inode: int) -> ProcessRef | None:
        self.asked.append(inode)
        return self.owner

    def of(self, kind: type[Any]) -> list[Any]:
        with self.lock:
            return [e for e in self.events if isinstance(e, kind)]


def _sockets() -> netns.FenceSockets:
    def listener() -> socket.socket:
        s = socket.create_server(("127.0.0.1", 0))
        return s

    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", 0))
    dns.setblocking(False)
    nflog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never readable: nothing is dropped here
    nflog.setblocking(False)
    return netns.FenceSockets(listener(), listener(), dns, nflog, sockdiag.open_socket())


@contextlib.contextmanager
def fence(
    seen: Seen, egress: list[dict[str, Any]], port: int, loop: EgressLoop | None = None, **limits: Any
) -> Iterator[Fence]:
    """A fence on its own loop (`loop`, or a new one), stopped with it."""
    network: dict[str, Any] = {"egress": egress, "hosts": {WEB: "127.0.0.1"}}
    if limits:
        network["limits"] = limits
    p = policy(network=network, tripwires={"enabled": False})
    loop = loop or EgressLoop(workers=1)
    f = Fence(seen.context(), p, _sockets(), LocalUpstream({port: port}), loop=loop)
    try:
        yield f
    finally:
        f.close()
        loop.stop()


def _request(port: int, path: str = "/", body: bytes | None = None) -> bytes:
    """A plain-HTTP proxy request for WEB."""
    method, length = ("GET", "") if body is None else ("POST", f"Content-Length: {len(body)}\r\n")
    head = f"{method} http://{WEB}:{port}{path} HTTP/1.1\r\nHost: {WEB}:{port}\r\n{length}\r\n"
    return head.encode() + (body or b"")


def _proxy(f: Fence, request: bytes) -> bytes:
    with socket.create_connection(f.sockets.proxy.getsockname(), timeout=5) as c:
        c.sendall(request)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
        return got


def test_a_connection_record_makes_its_event_only_once_decided() -> None:
    record = Connection("sb", ipaddress.ip_address("198.18.0.1"), 443, "a.example", "proxy", 3)
    with pytest.raises(AssertionError):
        record.event()
    record.decision, record.reason, record.address = "allow", "rule 1", ipaddress.ip_address("192.0.2.1")
    record.process, record.bytes_out = ME, 10
    event = record.event(duration=1.5)
    assert isinstance(event, NetConnect)
    assert (event.destination, event.address, event.name, event.exec, event.process) == (
        "198.18.0.1",
        "192.0.2.1",
        "a.example",
        3,
        ME,
    )
    assert (event.decision, event.bytes_out, event.bytes_in, event.duration) == ("allow", 10, 0, 1.5)
    deny = record.deny("bytes_out", "cut")
    assert (deny.layer, deny.what, deny.exec, deny.process) == ("egress", "bytes_out", 3, ME)


def test_the_fence_reports_through_its_context_on_the_loop_it_was_given() -> None:
    seen = Seen()
    loop = EgressLoop(workers=1)
    with http_server() as web, fence(seen, [{"host": WEB, "ports": [web.port]}], web.port, loop) as f:
        got = _proxy(f, _request(web.port, "/host"))
        assert got.endswith(f"{WEB}:{web.port}".encode()), got
        refused = _proxy(f, b"CONNECT denied.example:443 HTTP/1.1\r\nHost: denied.example:443\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 403 Forbidden\r\nX-Corral-Reason: "), refused
        f.settle()
        assert wait_until(lambda: len(seen.of(NetConnect)) == 2)
    allowed, denied = sorted(seen.of(NetConnect), key=lambda e: e.decision)
    assert (allowed.sandbox, allowed.via, allowed.decision, allowed.name, allowed.exec) == (
        "sb-test",
        "proxy",
        "allow",
        WEB,
        7,
    )
    assert allowed.bytes_out > 0 and allowed.bytes_in > 0
    assert (denied.decision, denied.name, denied.sandbox) == ("deny", "denied.example", "sb-test")
    # The owner was found from the client's socket, through the context.
    assert allowed.process == ME and denied.process == ME and len(seen.asked) == 2
    [deny] = seen.of(Deny)
    assert deny.what == "denied.example port 443" and deny.exec == 7
    assert loop.loop.is_closed()  # stopped by its owner, once the fence was closed


def test_a_reported_connect_names_its_connection_when_its_socket_cannot() -> None:
    # The sandbox hands its fuller record of a process through the fence's method; the fence pairs it
    # with the connection whose socket had no owner to find (a client that already exited).
    seen = Seen(owner=None)
    with http_server() as web, fence(seen, [{"host": WEB, "ports": [web.port]}], web.port) as f:
        dest = f.names.address(WEB)
        assert dest is not None
        brief = ProcessRef(pid=os.getpid(), exe="/usr/bin/test-client")
        report = f.note_connect(dest, web.port, brief)
        f.name_connect(report, ME)
        _proxy(f, _request(web.port))
        assert wait_until(lambda: len(seen.of(NetConnect)) == 1)
    [event] = seen.of(NetConnect)
    assert event.process == ME


def test_a_parked_connect_and_the_proxy_draw_on_one_connection_budget() -> None:
    # Abuse: connects refused while parked (the seccomp path) and connections the proxy judges are
    # counted against the same budget, so alternating paths gains an agent nothing.
    seen = Seen()
    with (
        http_server() as web,
        fence(seen, [{"host": WEB, "ports": [web.port]}], web.port, connections_per_minute=2) as f,
    ):
        refusal = f.judge_connect(ipaddress.ip_address("10.0.0.1"), 22)
        assert refusal is not None
        f.refuse_connect(refusal, ME)  # one
        get = _request(web.port)
        assert _proxy(f, get).startswith(b"HTTP/1.1 200")  # two
        assert _proxy(f, get) == b""  # three: over the budget
        # And a parked connect sees the budget spent by the proxy, before any destination check.
        dest = f.names.address(WEB)
        assert dest is not None
        spent = f.judge_connect(dest, web.port)
        assert spent is not None and spent.reason == "over 2 connections per minute"
        assert wait_until(lambda: len(seen.of(NetConnect)) == 3)
    assert [e.detail for e in seen.of(Deny)][-1] == "over 2 connections per minute"


def test_what_was_read_while_judging_counts_once_against_the_bytes_out_budget() -> None:
    # Abuse: the bytes the proxy read to judge a request count against the budget once (not again
    # when the relay sends them on), and the budget is one for every connection of the sandbox: the
    # second upload that would pass it is refused before any of it reaches the server.
    seen = Seen()
    with (
        http_server() as web,
        fence(seen, [{"host": WEB, "ports": [web.port]}], web.port, bytes_out_per_minute="1KiB") as f,
    ):

        def post(size: int) -> bytes:
            return _proxy(f, _request(web.port, body=b"x" * size))

        assert post(600).startswith(b"HTTP/1.1 200")  # about 700 bytes: under 1 KiB once, over twice
        assert post(600) == b""
        assert wait_until(lambda: len(seen.of(NetConnect)) == 2)
    assert [len(r.body) for r in web.requests] == [600]
    assert [d.what for d in seen.of(Deny)] == ["bytes_out"]
    first, second = seen.of(NetConnect)
    assert first.decision == "allow" and 600 < first.bytes_out < 1024
    assert (second.decision, second.reason) == ("deny", "over the bytes-out budget")


def test_the_resolver_answers_and_names_the_asker_through_the_context() -> None:
    seen = Seen()
    with http_server() as web, fence(seen, [{"host": WEB, "ports": [web.port]}], web.port) as f:
        server = f.sockets.dns.getsockname()
        allowed = dns.query.udp(dns.message.make_query(WEB, "A"), server[0], timeout=5, port=server[1])
        denied = dns.query.udp(dns.message.make_query("x.example", "A"), server[0], timeout=5, port=server[1])
        f.settle()
        address = f.names.address(WEB)
    [answer] = allowed.answer
    assert [r.address for r in answer] == [str(address)]
    assert denied.rcode() == dns.rcode.NXDOMAIN
    queries = seen.of(DnsQuery)
    assert [(q.name, q.decision, q.exec, q.process) for q in queries] == [
        (WEB, "allow", 7, ME),
        ("x.example", "deny", 7, ME),
    ]
    assert [(d.layer, d.what) for d in seen.of(Deny)] == [("dns", "x.example")]


def test_a_refused_client_that_sent_more_still_reads_its_403() -> None:
    # What the client sent past its request was never read: closed with it unread, the socket would
    # be reset, and a reset can overtake the 403 on its way. The fence drops it first, then closes.
    seen = Seen()
    with fence(seen, [], 443) as f:
        request = b"CONNECT denied.example:443 HTTP/1.1\r\nHost: denied.example:443\r\n\r\n"
        got = _proxy(f, request + b"\x16\x03\x01" + b"x" * (64 << 10))
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n"), got

"""One request per HTTP connection: framing on bytes as clients write them, split at every place a
read can split them, and the smuggling shapes that must be refused rather than guessed."""

from __future__ import annotations

import itertools

import pytest

from corral.egress.framing import Malformed, OneRequest
from corral.egress.sniff import MAX_SNIFF

NAME = "web.example.internal"
GET = f"GET /a HTTP/1.1\r\nHost: {NAME}\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n".encode()
CLOSED = f"GET /a HTTP/1.1\r\nHost: {NAME}\r\nUser-Agent: curl/8\r\nAccept: */*\r\nConnection: close\r\n\r\n"
EVIL = b"GET /b HTTP/1.1\r\nHost: evil.example\r\n\r\n"
CHUNKED = (
    f"POST /up HTTP/1.1\r\nHost: {NAME}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    + b"5;ext=1\r\nhello\r\n1A\r\n"
    + b"x" * 26
    + b"\r\n0\r\nX-Sum: 1\r\n\r\n"
)


def run(data: bytes, cuts: list[int] | None = None, name: str | None = NAME) -> tuple[bytes, OneRequest]:
    """Feed `data` split at `cuts` (every byte by default); what passed, and the framer."""
    framer = OneRequest(name)
    points = [0, *(cuts if cuts is not None else range(1, len(data))), len(data)]
    passed = b"".join(bytes(piece) for a, b in itertools.pairwise(points) for piece in framer.feed(data[a:b]))
    return passed, framer


@pytest.mark.parametrize("cuts", [None, []], ids=["byte by byte", "whole"])
def test_a_request_passes_once_with_connection_close_and_nothing_after_it(cuts: list[int] | None) -> None:
    hop = b"Connection: keep-alive\r\nKeep-Alive: 5\r\n"
    keep_alive = GET.replace(b"Accept: */*\r\n", b"Accept: */*\r\n" + hop)
    passed, framer = run(keep_alive + EVIL, cuts)
    assert passed == CLOSED.encode()
    assert bytes(framer.after) == EVIL and framer.host == NAME
    reason, deny = framer.refusal()
    assert deny and f"HTTP Host 'evil.example' does not match the name connected to, {NAME}" in reason


@pytest.mark.parametrize("after", [GET, b"\r\n", b"\r\n" + GET], ids=["request", "line end", "both"])
def test_a_second_request_for_the_same_host_is_held_back_without_a_policy_denial(after: bytes) -> None:
    passed, framer = run(GET + after, [])
    assert passed == CLOSED.encode()
    reason, deny = framer.refusal()
    assert not deny and "the client must reconnect" in reason


def test_anything_but_http_after_the_request_is_a_policy_denial() -> None:
    _, framer = run(GET + b"SSH-2.0-OpenSSH_9.2\r\n", [])
    reason, deny = framer.refusal()
    assert deny and "ssh data after the request" in reason


@pytest.mark.parametrize("cuts", [None, [], [len(CHUNKED) - 3]], ids=["byte by byte", "whole", "late"])
def test_bodies_are_framed_by_length_and_by_chunks(cuts: list[int] | None) -> None:
    body = b"k=v&" * 100
    post = f"POST /f HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    passed, framer = run(post + EVIL, cuts)
    assert passed.endswith(b"Connection: close\r\n\r\n" + body) and bytes(framer.after) == EVIL
    passed, framer = run(CHUNKED + EVIL, cuts)
    head, _, chunks = CHUNKED.partition(b"\r\n\r\n")
    assert passed == head + b"\r\nConnection: close\r\n\r\n" + chunks
    assert bytes(framer.after) == EVIL


def test_a_large_body_passes_as_views_of_what_was_read() -> None:
    framer = OneRequest(NAME)
    framer.feed(f"PUT /big HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: {3 << 20}\r\n\r\n".encode())
    chunk = memoryview(bytes(1 << 20))
    for _ in range(3):
        [piece] = framer.feed(chunk)
        assert piece.obj is chunk.obj  # type: ignore[union-attr]
    assert framer.feed(b"G") == [] and bytes(framer.after) == b"G"


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "request smuggling"),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", "request smuggling"),
        (b"Transfer-Encoding: gzip, chunked\r\n\r\n", "only chunked"),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n", "only chunked"),
        (b"Transfer-Encoding: xchunked\r\n\r\n", "only chunked"),
        (b"Transfer-Encoding : chunked\r\n\r\n", "bad header line"),
        (b"Content-Length: 5, 6\r\n\r\n", "not one number"),
        (b"Content-Length: +5\r\n\r\n", "not one number"),
        (b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", "not one number"),
        (b"X-A: 1\r\n folded\r\n\r\n", "folding"),
        (b"Host: other.example\r\n\r\n", "more than one Host"),
        (b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", "bad chunk size"),
        (b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n", "CRLF"),
        (b"Transfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n", "bad chunk size"),
        (b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n", "longer than its size"),
        (b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 5000, "longer than 4096"),
        (b"X-Big: " + b"a" * MAX_SNIFF + b"\r\n\r\n", f"longer than {MAX_SNIFF}"),
        (b"X-Bare: lf\n\r\n", "bare LF"),
    ],
)
def test_requests_that_could_be_framed_two_ways_are_refused(request_bytes: bytes, why: str) -> None:
    data = f"POST /x HTTP/1.1\r\nHost: {NAME}\r\n".encode() + request_bytes
    for cuts in (None, []):
        with pytest.raises(Malformed, match=why):
            run(data + EVIL, cuts)


def test_chunked_coding_in_http_1_0_and_connect_inside_a_connection_are_refused() -> None:
    with pytest.raises(Malformed, match=r"HTTP/1\.0"):
        run(f"POST / HTTP/1.0\r\nHost: {NAME}\r\nTransfer-Encoding: chunked\r\n\r\n".encode(), [])
    with pytest.raises(Malformed, match="CONNECT"):
        run(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", [])


def test_a_websocket_handshake_goes_on_unchanged_and_frames_pass_only_after_101() -> None:
    handshake = (
        f"GET /ws HTTP/1.1\r\nHost: {NAME}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
    for status, passes in ((b"HTTP/1.1 101 Switching Protocols\r\n", True), (b"HTTP/1.1 200 OK\r\n", False)):
        framer = OneRequest(NAME)
        assert b"".join(bytes(p) for p in framer.feed(handshake)) == handshake
        assert framer.upgrade
        assert framer.response(status[:5]) and not framer.response(status[5:])
        assert (b"".join(bytes(p) for p in framer.feed(frame)) == frame) is passes
        assert bytes(framer.after) == (b"" if passes else frame)


def test_without_a_name_the_second_host_is_compared_with_the_first() -> None:
    _, framer = run(GET + EVIL, [], name=None)
    reason, deny = framer.refusal()
    assert deny and "does not match the name connected to, web.example.internal" in reason

"""One HTTP/1.x request per connection: where a plaintext request ends, and nothing after it passes.

The fence judges an HTTP connection by its first request's Host. A client could follow that request
with others on the same connection (keep-alive, or pipelined in the same write) naming any Host it
likes, and they would reach the allowed address unchecked. `OneRequest` frames the first request
(its head, then its body by Content-Length or chunked coding) and passes nothing after it: the bytes
that follow are kept (up to `MAX_SNIFF`) for the record, never forwarded.

Why one request rather than checking each: a proxy that frames every request of a connection must
agree with the server on every boundary, and each disagreement is a smuggled request; framing one and
stopping leaves a single boundary to get right, and fails closed past it. The cost is small: the head
is sent on with `Connection: close`, so a server ends the connection after its answer and the client
opens a new one (as HTTP lets a server do at any time), and a client that reuses the connection anyway
sees it end without an answer, which clients treat as a cue to retry on a new one.

Framing is strict where servers could differ (RFC 9112 6.3, 7.1): a request with both Content-Length
and Transfer-Encoding, a transfer coding other than chunked, a Content-Length that is not one number,
a chunk line that is not hex digits with optional extensions, or a line not ending in CRLF is
refused, not guessed. Each byte is passed on only once the bytes before it are known to be part of
the one request, so a refusal never leaves the server a complete message the fence did not frame.

A request that asks to switch protocols (a WebSocket handshake) goes on unchanged; once the server's
answer starts with status 101 the connection is no longer HTTP and the rest passes (`response`).
"""

from __future__ import annotations

import re
from typing import Literal

from corral.egress.sniff import MAX_SNIFF, _printable, _read_head, _target_host, sniff_client

__all__ = ["Malformed", "OneRequest"]

_LINE_MAX = 4096  # a chunk-size or trailer line; real ones are a few bytes
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(;[\x20-\x7e\t]*)?")
_DIGITS = re.compile(r"[0-9]{1,19}")
_HOP = (b"connection:", b"keep-alive:", b"proxy-connection:")
_SWITCHED = re.compile(rb"HTTP/1\.[01] 101[ \r]")

_State = Literal["head", "length", "size", "data", "data-end", "trailers", "done", "opaque"]


class Malformed(ValueError):
    """The one request can't be framed without guessing; `reason` says why, for the record."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OneRequest:
    """Frames the first request on a client's connection. Fed on one thread (the client's direction);
    `response` on the other (the server's), which only ever sets `_switched`."""

    def __init__(self, name: str | None) -> None:
        self.name = name  # what the connection was allowed for; None for a bare address
        self.host: str | None = None  # the one request's Host
        self.upgrade = False  # it asks to switch protocols
        self.after = bytearray()  # what followed the request: never passed on
        self._state: _State = "head"
        self._line = bytearray()  # a head or line not yet whole
        self._left = 0  # body or chunk bytes still to pass
        self._switched = False
        self._status = bytearray()

    def feed(self, data: bytes | memoryview) -> list[bytes | memoryview]:
        """What of `data`, sent by the client, goes on to the server, in order. Whatever follows the
        request is kept in `after` instead. Raises `Malformed` when the request can't be framed."""
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        while view:
            state = self._state
            if state == "opaque":
                out.append(view)
                break
            if state == "done":
                if self._switched:
                    self._state = "opaque"
                    continue
                self.after += view[: MAX_SNIFF - len(self.after)]
                break
            if state in ("length", "data"):
                n = min(self._left, len(view))
                out.append(view[:n])
                view = view[n:]
                self._left -= n
                if not self._left:
                    self._state = "done" if state == "length" else "data-end"
                continue
            if state == "head":
                view = self._head_bytes(view, out)
                continue
            # A chunk-size, chunk-end or trailer line: collect it whole, then judge it.
            room = _LINE_MAX + 1 - len(self._line)
            end = bytes(view[:room]).find(b"\n")
            if end < 0:
                self._line += view[:room]
                if len(self._line) > _LINE_MAX:
                    raise Malformed(f"HTTP chunk or trailer line longer than {_LINE_MAX} bytes")
                break
            self._line += view[: end + 1]
            view = view[end + 1 :]
            out.append(self._line_done())
        return out

    def _head_bytes(self, view: memoryview, out: list[bytes | memoryview]) -> memoryview:
        """Collect the request head; once it is whole, pass it on (rewritten) and return the rest."""
        start = max(0, len(self._line) - 3)
        taken = min(len(view), MAX_SNIFF + 1 - len(self._line))
        self._line += view[:taken]
        ends = [
            i + n for blank, n in ((b"\n\r\n", 3), (b"\n\n", 2)) if (i := self._line.find(blank, start)) >= 0
        ]
        if not ends:
            if len(self._line) > MAX_SNIFF:
                raise Malformed(f"HTTP request head longer than {MAX_SNIFF} bytes")
            return view[taken:]
        end = min(ends)
        rest = len(self._line) - end  # bytes of `view` past the head
        raw = bytes(self._line[:end])
        self._line.clear()
        out.append(self._head(raw))
        return view[taken - rest :]

    def _line_done(self) -> bytes:
        """A whole chunk-size, chunk-end or trailer line: checked, and passed on as it is."""
        line = bytes(self._line)
        self._line.clear()
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            raise Malformed("a chunked body line does not end in CRLF")
        body = line[:-2]
        if self._state == "data-end":
            if body:
                raise Malformed("chunk data longer than its size")
            self._state = "size"
        elif self._state == "size":
            match = _CHUNK_LINE.fullmatch(body)
            if not match:
                raise Malformed(f"bad chunk size line '{_printable(body)}'")
            self._left = int(match[1], 16)
            self._state = "data" if self._left else "trailers"
        elif not body:  # the blank line after the trailers ends the request
            self._state = "done"
        elif b":" not in body or body[:1] in (b" ", b"\t"):
            raise Malformed(f"bad trailer line '{_printable(body)}'")
        return line

    def _head(self, raw: bytes) -> bytes:
        try:
            head = _read_head(raw, strict=True)
            if head is None or head.end != len(raw):
                raise ValueError("no request line")
            host, _ = _target_host(head)
        except ValueError as e:
            raise Malformed(f"malformed HTTP request: {e}") from None
        if head.method == "CONNECT":
            raise Malformed("CONNECT inside an HTTP connection")
        self.host = host
        fields: dict[str, list[str]] = {}
        for field, value in head.headers:
            fields.setdefault(field, []).extend(v.strip(" \t").lower() for v in value.split(","))
        codings = fields.get("transfer-encoding")
        lengths = fields.get("content-length")
        if codings is not None and lengths is not None:
            raise Malformed(
                "both Content-Length and Transfer-Encoding: the fence and the server could end the "
                "body in different places (request smuggling)"
            )
        if codings is not None:
            if codings != ["chunked"]:
                raise Malformed(f"Transfer-Encoding '{_printable(', '.join(codings))}' (only chunked)")
            if raw.split(b"\r\n", 1)[0].endswith(b"HTTP/1.0"):
                raise Malformed("Transfer-Encoding in an HTTP/1.0 request")  # RFC 9112 6.1
            self._state = "size"
        elif lengths is not None:
            if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0]):
                raise Malformed(f"Content-Length '{_printable(', '.join(lengths))}' is not one number")
            self._left = int(lengths[0])
            self._state = "length" if self._left else "done"
        else:
            self._state = "done"  # RFC 9112 6.3: a request with neither has no body
        self.upgrade = "upgrade" in fields and "upgrade" in fields.get("connection", [])
        if self.upgrade:
            return raw  # its Connection header is the handshake
        lines = [line for line in raw[:-4].split(b"\r\n") if not line.lower().startswith(_HOP)]
        return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"

    def response(self, data: bytes | memoryview) -> bool:
        """The server's first bytes, as they pass: watches for the 101 that switches protocols.
        Returns whether it still needs to see more. Call it before passing `data` on, so the switch is
        known before the client can act on it."""
        self._status += data[: 16 - len(self._status)]
        if b"\n" in self._status or len(self._status) >= 16:
            self._switched = bool(_SWITCHED.match(self._status))
            return False
        return True

    def refusal(self) -> tuple[str, bool]:
        """Why what followed the request was held back, and whether that is the policy's refusal (a
        request for another host, or something other than HTTP) rather than a client that reused
        its connection (or ended its request with a stray line end, as old clients did)."""
        after = bytes(self.after).lstrip(b"\r\n")
        seen = sniff_client(after)
        host = seen.name if seen.protocol == "http" else None
        what = "a second HTTP request on the connection was not passed on (one request per connection)"
        expected = self.name or self.host
        if host is not None and host != expected:
            return f"{what}: HTTP Host {host!r} does not match the name connected to, {expected}", True
        if after and seen.protocol != "http":
            return f"{what}: {seen.protocol} data after the request ({seen.detail})", True
        return f"{what}; the client must reconnect", False

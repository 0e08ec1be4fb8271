"""Protocol sniffing: what a sandboxed client speaks, judged from the first bytes of a TCP connection.

The egress proxy buffers what a client sends (at most `MAX_SNIFF` bytes), calls `sniff_client` after each
read, and decides once the answer is `complete`. A `complete=False` answer is a provisional guess: the
protocol so far, with fields that may still change as more bytes arrive. Some clients wait for the server
to speak first (SSH clients may, stratum pools answer before miners say much), so `sniff_server` reads the
server's first bytes the same way. `parse_connect` serves the explicit-proxy side: it reads an HTTP proxy
request (CONNECT, or a plain request with an absolute URI) and says where to connect.

Everything here is pure and bounded: no I/O, no state, never more than `MAX_SNIFF` bytes looked at, and
hostile input (the agent controls every byte) yields "unknown" with a reason, never an exception (except
`parse_connect`, whose contract is to raise ValueError on a malformed request).

Names are validated before they are returned: a name that policy matching or the audit log would see
differently from the server (a NUL byte, spaces, a second Host header, a Host that disagrees with the
request target) makes the connection "unknown" instead, so the proxy fails closed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["MAX_SNIFF", "Protocol", "Sniffed", "parse_connect", "sniff_client", "sniff_server"]

Protocol = Literal["tls", "http", "ssh", "stratum", "unknown"]

MAX_SNIFF = 16384
"""The proxy never buffers more than this before deciding; every function here ignores bytes past it."""


@dataclass(frozen=True)
class Sniffed:
    protocol: Protocol
    name: str | None = None
    """TLS SNI, HTTP Host or CONNECT target host: lower-cased, port stripped, IPv6 without brackets."""
    detail: str = ""
    """Printable evidence for the audit log: "GET /simple/", the SSH banner, the stratum method, or why a
    connection is "unknown"."""
    complete: bool = True
    """False while more bytes could change the answer (and the buffer is still under MAX_SNIFF)."""


_DETAIL_MAX = 200  # details end up in every net.connect event; a 16 KiB URL is evidence enough at 200 chars


def _printable(raw: bytes | str) -> str:
    """Escape everything but printable ASCII: details reach logs and the dashboard, where raw control
    bytes (terminal escapes, NULs) from the agent must not."""
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    if text.isascii() and text.isprintable():
        return _clip(text)  # the usual case, without building a new string
    return _clip("".join(ch if " " <= ch <= "~" else ascii(ch)[1:-1] for ch in text))


def _clip(text: str) -> str:
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def _unknown(why: str) -> Sniffed:
    return Sniffed("unknown", None, _clip(why))


def _undecided(why: str) -> Sniffed:
    return Sniffed("unknown", None, why, complete=False)


def _prefix_state(data: bytes, prefixes: tuple[bytes, ...]) -> Literal["match", "partial", "no"]:
    """Whether data starts with one of prefixes, or is too short to tell yet."""
    if data.startswith(prefixes):
        return "match"
    if any(len(data) < len(p) and p.startswith(data) for p in prefixes):
        return "partial"
    return "no"


# --- names ------------------------------------------------------------------------------------------------

# Letters, digits, '-', '_' and dots between labels. Anything else (NUL, '%', spaces, UTF-8) is something a
# resolver, a certificate check and an allowlist could each read differently, so it is refused outright.
_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def _valid_name(name: str) -> str:
    name = name.lower()
    if len(name) > 255 or not _NAME.fullmatch(name):
        raise ValueError(f"invalid host name '{_printable(name)}'")
    return name


def _parse_authority(authority: str) -> tuple[str, int | None]:
    """host[:port] or [v6]:port -> (host without brackets, port or None). Raises ValueError."""
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise ValueError(f"unclosed IPv6 literal in '{_printable(authority)}'")
        literal, rest = authority[1:close], authority[close + 1 :]
        if "%" in literal:  # zone ids only make sense for link-local, which no sandbox may reach anyway
            raise ValueError(f"IPv6 zone id in '{_printable(authority)}'")
        try:
            host = str(ipaddress.IPv6Address(literal))  # canonical form, so [0:0::1] and [::1] match alike
        except ValueError:
            raise ValueError(f"invalid IPv6 literal '{_printable(literal)}'") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after IPv6 literal in '{_printable(authority)}'")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_or_empty = authority.partition(":")
        if ":" in port_text_or_empty:
            raise ValueError(f"IPv6 literal without brackets: '{_printable(authority)}'")
        host = _valid_name(host)
        port_text = port_text_or_empty if colon else None
    if port_text is None:
        return host, None
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid port '{_printable(port_text)}'")
    return host, int(port_text)


# --- TLS --------------------------------------------------------------------------------------------------

_TLS_HANDSHAKE = 0x16
_TLS_MAX_RECORD = 1 << 14  # RFC 8446 5.1 (and RFC 5246 6.2.1): a plaintext fragment is at most 2^14 bytes
_HS_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_EXT_ECH = 0xFE0D
_SNI_HOST_NAME = 0
_TLS_VERSIONS = {0x0301: "TLS1.0", 0x0302: "TLS1.1", 0x0303: "TLS1.2", 0x0304: "TLS1.3"}


class _Malformed(ValueError):
    pass


class _Reader:
    """A bounds-checked cursor over one TLS structure: every read past the end raises _Malformed."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes) -> None:
        self._buf = buf
        self._pos = 0

    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining():
            raise _Malformed(f"truncated {what}")
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def vec8(self, what: str) -> bytes:
        return self.take(self.u8(what), what)

    def vec16(self, what: str) -> bytes:
        return self.take(self.u16(what), what)


def _record_header_problem(header: bytes, first: bool) -> str | None:
    """Checks as much of a 5-byte record header as has arrived; None if nothing is wrong (yet)."""
    if header[0] != _TLS_HANDSHAKE:
        # RFC 8446 5.1: handshake messages must not be interleaved with other record types.
        return "not a TLS handshake record" if first else "TLS record of another type inside the ClientHello"
    if len(header) >= 2 and header[1] != 3:
        return f"not a TLS record (version byte 0x{header[1]:02x})"
    if len(header) >= 3 and not 1 <= header[2] <= 4:
        return f"unsupported TLS record version 3.{header[2]}"
    if len(header) >= 5:
        length = int.from_bytes(header[3:5], "big")
        if length == 0:  # RFC 8446 5.1: zero-length handshake fragments are forbidden
            return "empty TLS handshake record"
        if length > _TLS_MAX_RECORD:
            return f"TLS record of {length} bytes exceeds 2^14"
    return None


def _sniff_tls(data: bytes) -> Sniffed:
    # The ClientHello may span several records (large post-quantum key shares, deliberate fragmentation to
    # dodge naive SNI filters): reassemble the handshake stream first, then parse it as one message.
    handshake = bytearray()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 5]
        problem = _record_header_problem(header, first=pos == 0)
        if problem:
            return _unknown(problem)
        if len(header) < 5:
            break
        length = int.from_bytes(header[3:5], "big")
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        # Stop at the end of the hello: what follows (ChangeCipherSpec, 0-RTT data) is not ours to judge.
        if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
            break

    if handshake and handshake[0] != _HS_CLIENT_HELLO:
        return _unknown(f"TLS handshake message type {handshake[0]} is not a ClientHello")
    if len(handshake) >= 4:
        need = 4 + int.from_bytes(handshake[1:4], "big")
        if len(handshake) >= need:
            try:
                return _parse_client_hello(bytes(handshake[4:need]))
            except _Malformed as e:
                return _unknown(f"malformed TLS ClientHello: {e}")
        if need + 5 > MAX_SNIFF:
            # Can never fit: decide now rather than after 16 KiB. TLS it is, but with no name to check.
            return Sniffed("tls", None, f"ClientHello of {need} bytes is too large to inspect")
    if len(data) >= MAX_SNIFF:
        return Sniffed("tls", None, "ClientHello did not fit in the sniff limit")
    return Sniffed("tls", None, "partial ClientHello", complete=False)


def _parse_client_hello(body: bytes) -> Sniffed:
    r = _Reader(body)
    legacy_version = r.u16("client version")
    if legacy_version >> 8 != 3:
        raise _Malformed(f"client version 0x{legacy_version:04x}")
    r.take(32, "random")
    if len(r.vec8("session id")) > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites = r.vec16("cipher suites")
    if not suites or len(suites) % 2:
        raise _Malformed("cipher suite list is empty or odd-sized")
    if not r.vec8("compression methods"):
        raise _Malformed("no compression methods")

    name: str | None = None
    alpn: list[str] = []
    versions: list[int] = []
    ech = False
    if r.remaining():  # a TLS 1.2 hello may legitimately end here, with no extension block at all
        exts = _Reader(r.vec16("extensions"))
        if r.remaining():
            raise _Malformed("bytes after the extensions")
        seen: set[int] = set()
        while exts.remaining():
            ext_type = exts.u16("extension type")
            ext_data = exts.vec16("extension")
            if ext_type in seen:
                # RFC 8446 4.2: at most one of each. Two server_names would let the proxy and the server
                # each pick a different one.
                raise _Malformed(f"duplicate extension {ext_type}")
            seen.add(ext_type)
            if ext_type == _EXT_SERVER_NAME:
                name = _parse_server_name(ext_data)
            elif ext_type == _EXT_ALPN:
                alpn = _parse_alpn(ext_data)
            elif ext_type == _EXT_SUPPORTED_VERSIONS:
                versions = _parse_supported_versions(ext_data)
            elif ext_type == _EXT_ECH:
                ech = True  # the real SNI is encrypted; server_name then holds only the public name

    known = [v for v in versions if v in _TLS_VERSIONS]  # drops GREASE values
    best = max(known) if known else legacy_version
    parts = ["ClientHello", _TLS_VERSIONS.get(best, f"0x{best:04x}")]
    if alpn:
        parts.append("alpn=" + ",".join(alpn))
    if ech:
        parts.append("ech")
    return Sniffed("tls", name, _printable(" ".join(parts)))


def _parse_server_name(ext_data: bytes) -> str | None:
    r = _Reader(ext_data)
    names = _Reader(r.vec16("server name list"))
    if r.remaining():
        raise _Malformed("bytes after the server name list")
    if not names.remaining():
        raise _Malformed("empty server name list")
    host: str | None = None
    while names.remaining():
        name_type = names.u8("server name type")
        value = names.vec16("server name")
        if name_type != _SNI_HOST_NAME:
            continue  # RFC 6066 reserves other types; they name nothing we can check
        if host is not None:
            raise _Malformed("more than one host_name")  # RFC 6066 3
        try:
            host = _valid_name(value.decode("ascii"))
        except ValueError:
            raise _Malformed(f"invalid server name '{_printable(value)}'") from None
    return host


def _parse_alpn(ext_data: bytes) -> list[str]:
    r = _Reader(ext_data)
    protocols = _Reader(r.vec16("ALPN list"))
    if r.remaining() or not protocols.remaining():
        raise _Malformed("bad ALPN list")
    found = []
    while protocols.remaining():
        proto = protocols.vec8("ALPN protocol")
        if not proto:
            raise _Malformed("empty ALPN protocol name")
        found.append(_printable(proto))
    return found


def _parse_supported_versions(ext_data: bytes) -> list[int]:
    r = _Reader(ext_data)
    raw = r.vec8("supported versions")
    if r.remaining() or not raw or len(raw) % 2:
        raise _Malformed("bad supported_versions list")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


# --- HTTP -------------------------------------------------------------------------------------------------

_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE"})
_METHOD_PREFIXES = tuple(sorted(m.encode() + b" " for m in _METHODS))
_REQUEST_LINE = re.compile(rb"([A-Z]+) ([\x21-\x7e]+) HTTP/1\.[0-9]")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2: a header field name
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(.*)")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class _Head:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]  # (lower-cased name, value) for every header line received whole
    end: int | None  # offset just past the blank line that ends the head; None until it has arrived


def _read_head(data: bytes, *, strict: bool) -> _Head | None:
    """Parses an HTTP/1.x request head, as far as it has arrived; None until the request line is whole.

    strict (for the proxy, which forwards these bytes): lines end in CRLF and nothing else, because a
    server that splits lines differently from the proxy is how requests get smuggled past it. Not strict
    (for sniffing): a bare LF ends a line too, as RFC 9112 2.2 lets recipients accept.
    """
    lines: list[bytes] = []
    end: int | None = None
    pos = 0
    while (newline := data.find(b"\n", pos)) >= 0:
        line = data[pos:newline]
        pos = newline + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        elif strict:
            raise ValueError("line ends in a bare LF")
        if strict and b"\r" in line:
            raise ValueError("stray CR inside a line")
        if not line and lines:
            end = pos
            break
        lines.append(line)
    if not lines:
        return None
    match = _REQUEST_LINE.fullmatch(lines[0])
    if not match or match[1].decode() not in _METHODS:
        raise ValueError(f"bad request line '{_printable(lines[0])}'")
    headers = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise ValueError("obsolete header line folding")  # RFC 9112 5.2: reject, don't guess
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ValueError(f"bad header line '{_printable(line)}'")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return _Head(match[1].decode(), match[2].decode("ascii"), tuple(headers), end)


def _single_host_header(head: _Head) -> str | None:
    hosts = [value for name, value in head.headers if name == "host"]
    if len(hosts) > 1:
        # RFC 9112 3.2: a request with more than one Host is rejected; the proxy and the server could
        # each believe a different one.
        raise ValueError("more than one Host header")
    return hosts[0] if hosts else None


def _parse_absolute(target: str) -> tuple[str, str, int] | None:
    """http://host[:port]/path -> (scheme, host, port); None if target is not in absolute form."""
    match = _ABSOLUTE.fullmatch(target)
    if not match:
        return None
    scheme, authority = match[1].lower(), match[2]
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"unsupported URI scheme {scheme!r}")
    if "@" in authority:
        # http://allowed.example@other.example/ reads as either host depending on who parses it.
        raise ValueError("user info in the request URI")
    host, port = _parse_authority(authority)
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def _target_host(head: _Head) -> tuple[str | None, int | None]:
    """Where the request is going: the CONNECT target, an absolute URI's authority (checked against the
    Host header), or the Host header. Raises ValueError on anything ambiguous."""
    host_header = _single_host_header(head)
    if head.method == "CONNECT":
        host, port = _parse_authority(head.target)
        if port is None:
            raise ValueError("CONNECT target has no port")
        return host, port
    absolute = _parse_absolute(head.target)
    if absolute is not None:
        scheme, host, port = absolute
        if host_header:
            # RFC 9112 3.2.2 says a proxy replaces Host with the URI's authority. The proxy forwards bytes
            # as they are instead, so a Host naming somewhere else (domain fronting) must not get through.
            h_host, h_port = _parse_authority(host_header)
            if (h_host, h_port if h_port is not None else _DEFAULT_PORTS[scheme]) != (host, port):
                raise ValueError("Host header does not match the request URI")
        return host, port
    if not host_header:
        return None, None  # HTTP/1.0 without Host, or an empty Host: no name to report
    return _parse_authority(host_header)


def _sniff_http(data: bytes) -> Sniffed:
    try:
        head = _read_head(data, strict=False)
    except ValueError as e:
        return _unknown(f"malformed HTTP request: {e}")
    at_limit = len(data) >= MAX_SNIFF
    if head is None:
        if at_limit:
            return _unknown("HTTP request line longer than the sniff limit")
        return Sniffed("http", None, data.split(b" ", 1)[0].decode("ascii"), complete=False)
    detail = _printable(f"{head.method} {head.target}")
    try:
        # Only whole lines are judged, so a failure here is final: more bytes can't repair it.
        host, _ = _target_host(head)
    except ValueError as e:
        return _unknown(f"malformed HTTP request: {e}")
    return Sniffed("http", host, detail, complete=head.end is not None or at_limit)


def parse_connect(data: bytes) -> tuple[str, int, int] | None:
    """Reads an explicit-proxy request from the start of data.

    CONNECT host:port -> (host, port, header_length): the tunnel starts at data[header_length:].
    An absolute-URI request (GET http://host[:port]/path HTTP/1.1) -> (host, port or 80, 0): 0 means forward
    data as it is, from its first byte. IPv6 literals come back without brackets.
    None while the head is incomplete (no CRLF CRLF yet); ValueError as soon as the request is malformed,
    is not a proxy request (origin-form, https:// URIs, which go through CONNECT), or its head would not fit
    in MAX_SNIFF bytes.
    """
    data = data[:MAX_SNIFF]
    if data and _prefix_state(data, _METHOD_PREFIXES) == "no":
        raise ValueError(f"not an HTTP proxy request: '{_printable(data[:32])}'")
    head = _read_head(data, strict=True)
    if head is not None:
        # The request line is whole, so its target is final: refuse a bad one without waiting for headers.
        if head.method != "CONNECT":
            absolute = _parse_absolute(head.target)
            if absolute is None:
                raise ValueError(f"request target '{_printable(head.target)}' is not an absolute URI")
            if absolute[0] != "http":
                raise ValueError("https:// requests must use CONNECT")  # the proxy does not speak TLS itself
        elif _parse_authority(head.target)[1] is None:
            raise ValueError("CONNECT target has no port")
    if head is None or head.end is None:
        if len(data) >= MAX_SNIFF:
            raise ValueError(f"request head longer than {MAX_SNIFF} bytes")
        return None
    host, port = _target_host(head)
    if host is None or port is None:  # not reachable: both forms checked above always name host and port
        raise ValueError("request names no host and port")
    return host, port, head.end if head.method == "CONNECT" else 0


# --- SSH --------------------------------------------------------------------------------------------------

_SSH_PREFIXES = (b"SSH-2.0-", b"SSH-1.99-")  # 1.99: a server that also speaks SSH-1, still SSH-2 capable
_SSH_MAX_LINE = 255  # RFC 4253 4.2: the identification line, CR LF included, is at most 255 characters
_SSH_MAX_PREAMBLE_LINES = 16


def _sniff_ssh(data: bytes) -> Sniffed:
    """data starts with an SSH identification string; detail is its line, without CR LF."""
    newline = data.find(b"\n", 0, _SSH_MAX_LINE)
    if newline >= 0:
        return Sniffed("ssh", None, _printable(data[:newline].rstrip(b"\r")))
    if len(data) < _SSH_MAX_LINE:
        return Sniffed("ssh", None, _printable(data), complete=False)
    # Over-long: not conforming, but still unmistakably an SSH peer; report it as such.
    return Sniffed("ssh", None, _printable(data[:_SSH_MAX_LINE]))


def _ssh_after_preamble(data: bytes) -> int | None:
    """RFC 4253 4.2 lets a server send text lines before its identification string; the offset of that
    string if it follows such lines within data."""
    if data.startswith(b"HTTP/"):
        return None  # a web page that happens to contain an "SSH-2.0-" line is not an SSH server
    pos = 0
    for _ in range(_SSH_MAX_PREAMBLE_LINES):
        newline = data.find(b"\n", pos)
        if newline < 0:
            return None
        if b"\x00" in data[pos:newline]:
            return None  # binary: not a text preamble
        pos = newline + 1
        if data.startswith(_SSH_PREFIXES, pos):
            return pos
    return None


# --- Stratum ----------------------------------------------------------------------------------------------

_STRATUM_CLIENT_METHODS = frozenset(
    {
        "mining.subscribe",
        "mining.authorize",
        "mining.submit",
        "mining.extranonce.subscribe",
        "mining.configure",
        "eth_submitLogin",
        "eth_getWork",
    }
)
_STRATUM_SERVER_METHODS = frozenset({"mining.notify", "mining.set_difficulty", "job"})
_SUBSCRIPTION_NAMES = frozenset({"mining.notify", "mining.set_difficulty"})
_BATCH_MAX = 16  # JSON-RPC batches: look at this many members, enough for any miner
_NOT_JSON = object()


def _load_json(line: bytes) -> object:
    try:
        return json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        return _NOT_JSON


def _messages(value: object) -> list[dict[str, object]]:
    """The JSON-RPC messages in one decoded line: the object itself, or the objects of a batch."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return [m for m in value[:_BATCH_MAX] if isinstance(m, dict)]
    return []


def _client_stratum(message: dict[str, object]) -> str | None:
    method = message.get("method")
    if not isinstance(method, str):
        return None
    if method in _STRATUM_CLIENT_METHODS:
        return method
    params = message.get("params")
    if method == "login" and isinstance(params, dict) and ("pass" in params or "agent" in params):
        # XMRig-style pools: {"method": "login", "params": {"login": wallet, "pass": "x", "agent": ...}}
        agent = params.get("agent")
        return f"login agent={_printable(agent)}" if isinstance(agent, str) else "login"
    return None


def _server_stratum(message: dict[str, object]) -> str | None:
    method = message.get("method")
    if isinstance(method, str) and method in _STRATUM_SERVER_METHODS:
        return method
    if "result" in message and "jsonrpc" in message:
        return "jsonrpc result"  # XMRig-style pools answer login with a JSON-RPC 2.0 result and a job
    if "result" in message and _names_subscription(message["result"], depth=3):
        # Classic stratum answers mining.subscribe (JSON-RPC 1.0, no "jsonrpc" key) with
        # [[["mining.set_difficulty", id], ["mining.notify", id]], extranonce1, extranonce2_size].
        return "mining.subscribe result"
    return None


def _names_subscription(value: object, depth: int) -> bool:
    if isinstance(value, str):
        return value in _SUBSCRIPTION_NAMES
    if isinstance(value, list) and depth > 0:
        return any(_names_subscription(v, depth - 1) for v in value[:_BATCH_MAX])
    return False


def _sniff_json_lines(data: bytes, classify: Callable[[dict[str, object]], str | None]) -> Sniffed:
    """Line-delimited JSON: stratum if any whole line so far is a stratum message."""
    pos = 0
    saw_line = False
    while (newline := data.find(b"\n", pos)) >= 0:
        line = data[pos:newline].strip()
        pos = newline + 1
        if not line:
            continue
        value = _load_json(line)
        if value is _NOT_JSON:
            return _unknown("not line-delimited JSON")
        for message in _messages(value):
            detail = classify(message)
            if detail is not None:
                return Sniffed("stratum", None, _printable(detail))
        saw_line = True
    if saw_line:
        return _unknown("JSON lines, not stratum")
    if len(data) >= MAX_SNIFF:
        return _unknown("JSON line longer than the sniff limit")
    return _undecided("partial JSON line")


def _looks_like_json(data: bytes) -> bool:
    return data.lstrip(b" \t\r\n")[:1] in (b"{", b"[")


# --- entry points -----------------------------------------------------------------------------------------


def _decided_at_limit(data: bytes, result: Sniffed) -> Sniffed:
    # The proxy buffers no more than MAX_SNIFF bytes, so an answer at the limit must be final whatever
    # the sniffer thought; the sniffers handle this themselves with better details, this is the backstop.
    return replace(result, complete=True) if not result.complete and len(data) >= MAX_SNIFF else result


def sniff_client(data: bytes) -> Sniffed:
    """What protocol the first bytes a client sent speak (TLS, HTTP, SSH, stratum, or unknown)."""
    data = data[:MAX_SNIFF]
    return _decided_at_limit(data, _sniff_client(data))


def _sniff_client(data: bytes) -> Sniffed:
    if not data:
        return _undecided("no data yet")
    if data[0] == _TLS_HANDSHAKE:
        return _sniff_tls(data)
    ssh = _prefix_state(data, _SSH_PREFIXES)
    if ssh == "match":
        return _sniff_ssh(data)
    http = _prefix_state(data, _METHOD_PREFIXES)
    if http == "match":
        return _sniff_http(data)
    if _looks_like_json(data):
        return _sniff_json_lines(data, _client_stratum)
    if ssh == "partial" or http == "partial" or not data.strip():
        return _undecided("too few bytes to tell")
    return _unknown(f"unrecognised: {_printable(data[:32])}")


def sniff_server(data: bytes) -> Sniffed:
    """What protocol a server's first bytes speak: an SSH identification string (possibly after preamble
    lines) or stratum pool messages; anything else is unknown."""
    data = data[:MAX_SNIFF]
    return _decided_at_limit(data, _sniff_server(data))


def _sniff_server(data: bytes) -> Sniffed:
    if not data:
        return _undecided("no data yet")
    ssh = _prefix_state(data, _SSH_PREFIXES)
    if ssh == "match":
        return _sniff_ssh(data)
    if _looks_like_json(data):
        return _sniff_json_lines(data, _server_stratum)
    if ssh == "partial" or not data.strip():
        return _undecided("too few bytes to tell")
    banner_at = _ssh_after_preamble(data)
    if banner_at is not None:
        return _sniff_ssh(data[banner_at:])
    return _unknown(f"unrecognised: {_printable(data[:32])}")

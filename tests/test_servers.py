"""The local stand-ins for "the world" (tests/servers.py) talk to real clients and stop without leaks."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

from helpers import wait_until
from servers import (
    DNS_ANSWER,
    EXTRANONCE1,
    EXTRANONCE2_SIZE,
    XMRIG_JOB_ID,
    build_dns_query,
    client_env,
    dns_upstream_spy,
    http_server,
    package_index,
    parse_dns_answers,
    ssh_server,
    stratum_pool,
    tcp_listener,
    tls_server,
    udp_sink,
)

SYSTEM_PYTHON = "/usr/bin/python3"
CURL = ["curl", "--silent", "--show-error", "--fail", "--noproxy", "*", "--max-time", "10"]


def run(
    argv: list[str], input: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=input,
        cwd=cwd,
        env=client_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _alive(pid: int) -> bool:
    """Running, not a zombie (orphaned sshd children are reaped by init, whenever it gets to them)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_http_server_serves_body_and_echoes_host() -> None:
    with http_server(body=b"the body\n") as web:
        name = f"web.example.internal:{web.port}"
        resolve = ["--resolve", f"{name}:127.0.0.1"]
        body = run([*CURL, *resolve, f"http://{name}/"])
        host = run([*CURL, *resolve, f"http://{name}/host"])
        missing = run([*CURL, web.url + "nothing-here"])
        assert body.returncode == 0, body.stderr
        assert body.stdout == "the body\n"
        assert host.stdout == name
        assert missing.returncode == 22  # --fail: HTTP 404
        assert [(r.method, r.path, r.host) for r in web.requests] == [
            ("GET", "/", name),
            ("GET", "/host", name),
            ("GET", "/nothing-here", f"127.0.0.1:{web.port}"),
        ]
        assert web.errors == []


def test_tls_server_presents_its_certificate_and_records_sni() -> None:
    with tls_server() as site:
        assert site.hostname == "files.example.internal"
        resolve = ["--resolve", f"{site.hostname}:{site.port}:127.0.0.1"]
        # a client that connects and never says hello holds up nobody
        with socket.create_connection((site.host, site.port)):
            trusted = run([*CURL, "--cacert", str(site.cafile), *resolve, site.url + "host"])
        untrusted = run([*CURL, *resolve, site.url])
        assert trusted.returncode == 0, trusted.stderr
        assert trusted.stdout == f"{site.hostname}:{site.port}"
        assert untrusted.returncode == 60  # peer certificate cannot be authenticated
        assert site.sni == [site.hostname, site.hostname]
        assert [(r.path, r.host) for r in site.requests] == [("/host", f"{site.hostname}:{site.port}")]
        assert "BEGIN CERTIFICATE" in site.cafile.read_text()
        assert site.errors == []


def test_package_index_installs_with_pip(tmp_path: Path) -> None:
    target = tmp_path / "site"
    with package_index(tmp_path / "index") as index:
        has_pip = run([SYSTEM_PYTHON, "-m", "pip", "--version"]).returncode == 0
        python = SYSTEM_PYTHON if has_pip else sys.executable  # without pip there, the venv's
        pip_install = [python, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check"]
        pip = run(
            [*pip_install, "--no-input", "--index-url", index.url, "--target", str(target), index.project],
            cwd=tmp_path,
        )
        assert pip.returncode == 0, pip.stdout + pip.stderr
        paths = [r.path for r in index.requests]
        assert f"/simple/{index.project}/" in paths
        assert f"/files/{index.wheel.name}" in paths
        assert index.errors == []
    probe = [python, "-c", "import corral_probe; print(corral_probe.VALUE)"]
    assert run(probe, cwd=tmp_path).returncode != 0  # not importable from anywhere but the target
    imported = run(probe, cwd=tmp_path, env={"PYTHONPATH": str(target)})
    assert imported.stdout.strip() == str(index.value) == "42", imported.stderr


def test_ssh_server_accepts_the_client_key_and_forwards_tcp(tmp_path: Path) -> None:
    with ssh_server(tmp_path) as sshd, tcp_listener() as catcher:
        login = run(
            [
                *["ssh", "-F", "/dev/null", "-i", str(sshd.client_key), "-o", "BatchMode=yes"],
                *["-o", f"UserKnownHostsFile={sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes"],
                *["-p", str(sshd.port), f"{sshd.user}@127.0.0.1", "echo", "logged-in"],
            ]
        )
        assert login.returncode == 0, login.stderr + "\n".join(sshd.log)
        assert login.stdout == "logged-in\n"
        # stdio forwarding (direct-tcpip): what the tunnel tests build on
        forwarded = run(
            sshd.ssh_command(options=["-W", f"127.0.0.1:{catcher.port}"]), input="through the tunnel"
        )
        assert forwarded.returncode == 0, forwarded.stderr
        assert wait_until(lambda: catcher.received == b"through the tunnel")
        assert any(line.startswith(f"Accepted publickey for {sshd.user}") for line in sshd.log)


def _read_messages(stream: io.BufferedIOBase, count: int) -> list[dict[str, Any]]:
    return [json.loads(stream.readline()) for _ in range(count)]


def test_stratum_pool_speaks_stratum_and_xmrig_login() -> None:
    with stratum_pool() as pool:
        with socket.create_connection((pool.host, pool.port), timeout=5) as sock, sock.makefile("rwb") as f:
            f.write(b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n')
            f.write(b'{"id": 2, "method": "mining.authorize", "params": ["wallet.worker", "x"]}\n')
            f.flush()
            subscribed, authorized, difficulty, notify = _read_messages(f, 4)
        assert subscribed["id"] == 1
        assert subscribed["result"][1:] == [EXTRANONCE1, EXTRANONCE2_SIZE]
        assert authorized == {"id": 2, "result": True, "error": None}
        assert difficulty["method"] == "mining.set_difficulty"
        assert notify["method"] == "mining.notify"
        assert len(notify["params"]) == 9

        with socket.create_connection((pool.host, pool.port), timeout=5) as sock, sock.makefile("rwb") as f:
            login = {"id": 1, "jsonrpc": "2.0", "method": "login", "params": {"login": "w", "pass": "x"}}
            f.write(json.dumps(login).encode() + b"\n")
            f.flush()
            (reply,) = _read_messages(f, 1)
        assert reply["result"]["job"]["job_id"] == XMRIG_JOB_ID
        assert pool.methods == ["mining.subscribe", "mining.authorize", "login"]
        assert pool.connections == 2
        assert pool.errors == []


def test_tcp_listener_and_udp_sink_record_what_arrives() -> None:
    with tcp_listener(greeting=b"id\n") as catcher, udp_sink() as sink:
        with socket.create_connection((catcher.host, catcher.port), timeout=5) as sock:
            assert sock.recv(16) == b"id\n"
            sock.sendall(b"uid=0(root)\n")
        assert wait_until(lambda: len(catcher.connections) == 1 and catcher.connections[0].closed)
        assert catcher.received == b"uid=0(root)\n"
        assert catcher.connections[0].peer[0] == "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for i in range(3):
                udp.sendto(b"beacon %d" % i, (sink.host, sink.port))
        assert wait_until(lambda: sink.count == 3)
        assert [data for data, _ in sink.datagrams] == [b"beacon 0", b"beacon 1", b"beacon 2"]


def test_dns_upstream_spy_answers_and_records_every_name() -> None:
    with dns_upstream_spy() as spy, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(build_dns_query("Pool.Example.Internal.", msg_id=7), (spy.host, spy.port))
        msg_id, rcode, addresses = parse_dns_answers(sock.recv(512))
        assert (msg_id, rcode, addresses) == (7, 0, [DNS_ANSWER])
        sock.sendto(build_dns_query("files.example.internal", qtype=28, msg_id=8), (spy.host, spy.port))
        assert parse_dns_answers(sock.recv(512)) == (8, 0, [])  # AAAA: no data
        sock.sendto(b"\x00\x09junk", (spy.host, spy.port))
        assert sock.recv(512)[:2] == b"\x00\x09"  # FORMERR, id echoed
        assert spy.names == ["pool.example.internal", "files.example.internal"]
        assert [q.qtype for q in spy.queries] == [1, 28]
        assert spy.errors == []


def test_stand_ins_stop_cleanly_with_clients_still_connected(tmp_path: Path) -> None:
    threads_before, fds_before = threading.active_count(), _fds()
    clients: list[socket.socket] = []
    try:
        with (
            http_server() as web,
            tls_server() as site,
            stratum_pool() as pool,
            tcp_listener() as catcher,
            udp_sink(),
            dns_upstream_spy(),
            ssh_server(tmp_path / "ssh") as sshd,
        ):
            for server in (web, site, pool, catcher, sshd):
                clients.append(socket.create_connection((server.host, server.port), timeout=5))
            clients[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: the server waits for more
            assert clients[0].recv(4096).startswith(b"HTTP/1.1 200")
            assert clients[-1].recv(64).startswith(b"SSH-2.0-")  # a per-connection sshd is running
            assert wait_until(lambda: len(catcher.connections) == 1)
            sshd_processes = [sshd.pid, *(p.pid for p in psutil.Process(sshd.pid).children(recursive=True))]
            assert len(sshd_processes) >= 2
    finally:
        for client in clients:
            client.close()
    assert threading.active_count() == threads_before
    assert _fds() <= fds_before
    assert not any(_alive(pid) for pid in sshd_processes)

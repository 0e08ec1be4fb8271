"""Local stand-ins for "the world", for the egress-fence tests.

The test suite runs in a network namespace with only loopback, so every server here binds 127.0.0.1 on an
ephemeral port. Each stand-in is a context manager that yields an object exposing `host` and `port` plus
what the tests need (what the server received, certificate or key paths). Leaving the `with` block stops the
server and joins every thread and process it started: nothing leaks, not even an open file descriptor.

    with http_server() as web:
        urllib.request.urlopen(web.url)
        assert web.requests[0].path == "/"

Real software where it matters: `ssh_server` runs OpenSSH's sshd, `tls_server` uses a certificate made with
the openssl command line, `package_index` serves a real wheel that pip installs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import ipaddress
import json
import os
import socket
import socketserver
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from corral.egress.rules import IPAddress
from corral.egress.upstream import dial
from helpers import wait_until

HOST = "127.0.0.1"
_LOCAL = ipaddress.ip_address(HOST)
_POLL = 0.05  # serve_forever poll interval: how quickly a server notices it must stop
_CONNECTION_TIMEOUT = 30.0  # a silent client never holds a handler thread longer than this


# --------------------------------------------------------------------------------------------------
# Plumbing shared by the TCP and UDP servers


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Threaded TCP server on 127.0.0.1:0 whose handler threads are all joined by `server_close`.

    Connections still open when the server stops are shut down (both directions) so their handler threads
    see end-of-file and return instead of holding `server_close` up. Handler exceptions are kept in `errors`
    instead of being printed.
    """

    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._active: set[socket.socket] = set()
        self._closing = False
        super().__init__((HOST, 0), handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @contextlib.contextmanager
    def track(self, sock: socket.socket) -> Iterator[bool]:
        """Register an open connection while its handler runs; yields False when the server is stopping."""
        with self._lock:
            if self._closing:
                yield False
                return
            self._active.add(sock)
        try:
            yield True
        finally:
            with self._lock:
                self._active.discard(sock)

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.track(request) as running:
            if running:
                super().finish_request(request, client_address)

    def close_connections(self) -> None:
        with self._lock:
            self._closing = True
            active = list(self._active)
        for sock in active:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(traceback.format_exc())


class _UdpServer(socketserver.UDPServer):
    """UDP server on 127.0.0.1:0; datagrams are handled one at a time on the serving thread."""

    max_packet_size = 65535

    def __init__(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.errors: list[str] = []
        super().__init__((HOST, 0), handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(traceback.format_exc())


@contextlib.contextmanager
def _serving(server: _TcpServer | _UdpServer, name: str) -> Iterator[None]:
    """Run `server` on a thread for the duration of the block; stop it, close it and join everything."""
    thread = threading.Thread(target=server.serve_forever, args=(_POLL,), name=f"{name}:{server.port}")
    try:
        thread.start()
        yield
    finally:
        if thread.is_alive():
            server.shutdown()  # returns once serve_forever has stopped accepting
            thread.join()
        if isinstance(server, _TcpServer):
            server.close_connections()
        server.server_close()  # closes the listening socket and joins the handler threads


def client_env(**extra: str) -> dict[str, str]:
    """The environment for a client of the stand-ins: this one without proxy settings or pip configuration
    (PIP_* variables, config files, which may point at other indexes or wheel directories), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, **extra}


# --------------------------------------------------------------------------------------------------
# HTTP and HTTPS

DEFAULT_BODY = b"hello from the corral test server\n"


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    host: str | None  # the Host header as sent, None when absent
    body: bytes = b""


class _HttpServer(_TcpServer):
    """`_TcpServer` that skips HTTPServer's reverse lookup of its own address (no resolver in tests)."""

    def __init__(
        self, handler: type[socketserver.BaseRequestHandler], routes: dict[str, tuple[str, bytes]]
    ) -> None:
        self.requests: list[HttpRequest] = []
        # path -> (content type, body); "/host" is answered dynamically
        self.routes = routes
        self.ignore_close = False
        super().__init__(handler)
        self.server_name = HOST
        self.server_port = self.port


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "corral-test-http/1"
    timeout = _CONNECTION_TIMEOUT
    server: _HttpServer

    def _respond(self, status: int, content_type: str, body: bytes, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _handle(self, head: bool = False) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        host = self.headers.get("Host")
        self.server.requests.append(HttpRequest(self.command, self.path, host, body))
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path == "/host":
            self._respond(200, "text/plain", (host or "").encode(), head)
        elif path in self.server.routes:
            content_type, payload = self.server.routes[path]
            self._respond(200, content_type, payload, head)
        else:
            self._respond(404, "text/plain", b"not found\n", head)
        if self.server.ignore_close:
            self.close_connection = False  # as some servers do: keeps serving until the client's EOF

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in server.requests instead


@dataclass
class HttpServer:
    """A running HTTP/1.1 server: `/` answers `body`, `/host` echoes the request's Host header."""

    port: int
    body: bytes
    requests: list[HttpRequest]  # every request, in arrival order
    errors: list[str]  # tracebacks of handler failures (expected empty)
    host: str = HOST

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"


@contextlib.contextmanager
def http_server(body: bytes = DEFAULT_BODY, ignore_close: bool = False) -> Iterator[HttpServer]:
    """`ignore_close`: answer further requests on a connection whatever its `Connection: close`."""
    server = _HttpServer(_HttpHandler, {"/": ("text/plain", body)})
    server.ignore_close = ignore_close
    with _serving(server, "http"):
        yield HttpServer(port=server.port, body=body, requests=server.requests, errors=server.errors)


class _TlsServer(_HttpServer):
    """HTTPS: the TLS handshake happens on the connection's own thread, so a client that never sends a
    ClientHello (a raw TCP probe) holds up only itself, never the accept loop."""

    def __init__(
        self, handler: type[socketserver.BaseRequestHandler], routes: dict[str, tuple[str, bytes]]
    ) -> None:
        self.context: ssl.SSLContext | None = None
        super().__init__(handler, routes)

    def finish_request(self, request: Any, client_address: Any) -> None:
        assert self.context is not None
        request.settimeout(_CONNECTION_TIMEOUT)
        # wrap_socket detaches `request` (it becomes fd -1; closing it later is harmless) and returns a new
        # socket on the same fd; no I/O happens before the handshake below, which is tracked
        tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        with tls, self.track(tls) as running:
            if not running:
                return
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError):
                return  # the client gave up (or did not speak TLS): nothing to serve
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]  # typeshed: Self


@dataclass
class TlsServer(HttpServer):
    """A running HTTPS server with a self-signed certificate for `hostname` (trust it with `cafile`)."""

    hostname: str = ""
    cafile: Path = Path()
    sni: list[str | None] = field(default_factory=list)  # server name each handshake presented

    @property
    def url(self) -> str:
        return f"https://{self.hostname}:{self.port}/"


def make_certificate(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for `hostname`, made by the openssl command line: (cert, key)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
            *["-nodes", "-days", "1"],
            *["-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname}"],
            *["-keyout", str(key), "-out", str(cert)],
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


@contextlib.contextmanager
def tls_server(hostname: str = "files.example.internal", body: bytes = DEFAULT_BODY) -> Iterator[TlsServer]:
    sni: list[str | None] = []

    def record_sni(sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext) -> None:
        sni.append(server_name)

    with tempfile.TemporaryDirectory(prefix="corral-tls-") as tmp:
        cert, key = make_certificate(Path(tmp), hostname)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.sni_callback = record_sni
        server = _TlsServer(_HttpHandler, {"/": ("text/plain", body)})
        server.context = context
        with _serving(server, "https"):
            yield TlsServer(
                port=server.port,
                body=body,
                requests=server.requests,
                errors=server.errors,
                hostname=hostname,
                cafile=cert,
                sni=sni,
            )


# --------------------------------------------------------------------------------------------------
# PEP 503 package index

PROBE_PROJECT = "corral-probe"
PROBE_VERSION = "1.0"
PROBE_VALUE = 42


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_probe_wheel(directory: Path) -> Path:
    """Write the pure-Python wheel `corral_probe-1.0-py3-none-any.whl` (module `corral_probe`, VALUE = 42)."""
    dist_info = f"corral_probe-{PROBE_VERSION}.dist-info"
    files = {
        "corral_probe/__init__.py": f'"""Installed by the tests."""\n\nVALUE = {PROBE_VALUE}\n'.encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {PROBE_PROJECT}\nVersion: {PROBE_VERSION}\n"
            "Summary: Probe package served by corral's test package index\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: corral-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    wheel = directory / f"corral_probe-{PROBE_VERSION}-py3-none-any.whl"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    wheel.write_bytes(buffer.getvalue())
    return wheel


@dataclass
class PackageIndex(HttpServer):
    """A running PEP 503 simple index holding one project, `corral-probe` 1.0 (pure Python wheel)."""

    wheel: Path = Path()
    project: str = PROBE_PROJECT
    version: str = PROBE_VERSION
    value: int = PROBE_VALUE  # corral_probe.VALUE once installed

    @property
    def url(self) -> str:
        """The index URL, for `pip install --index-url`."""
        return f"http://{self.host}:{self.port}/simple/"


@contextlib.contextmanager
def package_index(directory: Path) -> Iterator[PackageIndex]:
    """Serve `/simple/`, `/simple/corral-probe/` and `/files/<wheel>`; the wheel is built in `directory`.

    Links are relative, so the index works under any host name a test maps to it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    wheel = build_probe_wheel(directory)
    data = wheel.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    html = "text/html"
    project_link = f'<a href="{PROBE_PROJECT}/">{PROBE_PROJECT}</a>'
    routes = {
        "/simple/": (
            html,
            f"<!DOCTYPE html>\n<html><body>{project_link}</body></html>\n".encode(),
        ),
        f"/simple/{PROBE_PROJECT}/": (
            html,
            (
                "<!DOCTYPE html>\n<html><body>"
                f'<a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a>'
                "</body></html>\n"
            ).encode(),
        ),
        f"/files/{wheel.name}": ("application/octet-stream", data),
    }
    server = _HttpServer(_HttpHandler, routes)
    with _serving(server, "index"):
        yield PackageIndex(
            port=server.port, body=b"", requests=server.requests, errors=server.errors, wheel=wheel
        )


# --------------------------------------------------------------------------------------------------
# OpenSSH server

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
HOST_KEY_ALIAS = "corral-test-sshd"


@dataclass
class SshServer:
    """A running OpenSSH sshd on 127.0.0.1 accepting `client_key` for `user` (the current user)."""

    port: int
    user: str
    client_key: Path
    known_hosts: Path  # trusts the host key as [127.0.0.1]:port and as HOST_KEY_ALIAS
    host_public_key: str  # "ssh-ed25519 AAAA..."
    config: Path
    log: list[str]  # sshd's log lines (-e: to stderr), e.g. "Accepted publickey for root ..."
    pid: int
    host: str = HOST

    def ssh_command(
        self, *command: str, options: Sequence[str] = (), destination: str | None = None
    ) -> list[str]:
        """argv for a non-interactive ssh to this server that trusts only its host key: `options` (say
        `["-N", "-R", "9000:127.0.0.1:80"]` or `["-W", "127.0.0.1:80"]`) go before the destination
        (default `user@127.0.0.1`), `command` after it."""
        return [
            *["ssh", "-F", "/dev/null", "-i", str(self.client_key), "-o", "IdentitiesOnly=yes"],
            *["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}"],
            *["-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes"],
            *["-o", "ConnectTimeout=10", "-p", str(self.port)],
            *options,
            destination or f"{self.user}@{self.host}",
            *command,
        ]


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "corral-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return Path(f"{path}.pub").read_text().strip()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class _Sshd:
    """One sshd process and the thread that reads its log; `stop` ends every process it started."""

    def __init__(self, config: Path, port: int) -> None:
        self.log: list[str] = []
        self.listening = threading.Event()
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(config), "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_log, name=f"sshd-log:{port}")
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.log.append(line)
            if line.startswith("Server listening on"):
                self.listening.set()

    def wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.listening.wait(0.02):
                return True
            if self.proc.poll() is not None:
                self._reader.join(2)
                return self.listening.is_set()
        return False

    def stop(self) -> None:
        """Stop the listener, then kill every per-connection sshd and session it forked (they call setsid, so
        a process group kill would miss them), then join the log reader."""
        procs: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for p in list(procs):
            with contextlib.suppress(psutil.Error):
                procs.extend(c for c in p.children(recursive=True) if c not in procs)
        for p in procs:  # test sessions need no graceful end; a pre-auth sshd takes seconds to honour SIGTERM
            with contextlib.suppress(psutil.Error):
                p.kill()
        # Orphans are reaped by init, not by us: a zombie counts as gone.
        wait_until(lambda: not any(_alive(p) for p in procs), timeout=5)
        self._reader.join(5)  # ends at EOF, once every holder of the log pipe is gone
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@contextlib.contextmanager
def ssh_server(directory: Path) -> Iterator[SshServer]:
    """Run OpenSSH's sshd on 127.0.0.1 with keys made in `directory`; public-key login only, TCP forwarding
    allowed (tests open tunnels through it). Creates sshd's privilege separation directory if missing."""
    directory.mkdir(parents=True, exist_ok=True)
    user = psutil.Process().username()
    host_key, client_key = directory / "ssh_host_ed25519_key", directory / "client_key"
    host_public_key = _keygen(host_key)
    authorized_keys = directory / "authorized_keys"
    authorized_keys.write_text(_keygen(client_key) + "\n")
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"ListenAddress {HOST}",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized_keys}",
                "PidFile none",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "PermitTunnel no",
                "X11Forwarding no",
                "AllowAgentForwarding no",
                "PrintMotd no",
                "LogLevel INFO",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True, timeout=30)
    sshd: _Sshd | None = None
    port = 0
    for _attempt in range(5):  # the free port can be taken between probing and sshd's bind
        port = _free_port()
        sshd = _Sshd(config, port)
        if sshd.wait_listening(10):
            break
        sshd.stop()
        if not any("Address already in use" in line for line in sshd.log):
            raise RuntimeError("sshd did not start:\n" + "\n".join(sshd.log))
        sshd = None
    if sshd is None:
        raise RuntimeError("sshd found no free port")
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[{HOST}]:{port},{HOST_KEY_ALIAS} {host_public_key}\n")
    try:
        yield SshServer(
            port=port,
            user=user,
            client_key=client_key,
            known_hosts=known_hosts,
            host_public_key=host_public_key,
            config=config,
            log=sshd.log,
            pid=sshd.proc.pid,
        )
    finally:
        sshd.stop()


# --------------------------------------------------------------------------------------------------
# Stratum mining pool

EXTRANONCE1 = "08000002"
EXTRANONCE2_SIZE = 4
POOL_DIFFICULTY = 16384
BITCOIN_JOB_ID = "corral-job-1"
XMRIG_JOB_ID = "corral-xmr-job-1"
XMRIG_WORKER_ID = "corral-worker-1"


def _bitcoin_notify() -> dict[str, Any]:
    return {
        "id": None,
        "method": "mining.notify",
        "params": [
            BITCOIN_JOB_ID,
            "4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000",  # previous block hash
            "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020862062f503253482f04b8864e5008",  # coinb1 # noqa: E501
            "072f736c7573682f000000000100f2052a010000001976a914d23fcdf86f7e756a64a7a9688ef9903327048ed988ac00000000",  # coinb2 # noqa: E501
            [],  # merkle branch
            "00000002",  # version
            "1c2ac4af",  # nbits
            "504e86b9",  # ntime
            True,  # clean jobs
        ],
    }


def _xmrig_job() -> dict[str, Any]:
    return {
        "blob": "0e0e" + "ab" * 37 + "00000000" + "cd" * 33,  # 76-byte hashing blob, nonce at offset 39
        "job_id": XMRIG_JOB_ID,
        "target": "b88d0600",
        "algo": "rx/0",
        "height": 3000000,
        "seed_hash": "ef" * 32,
    }


class _StratumServer(_TcpServer):
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.connections = 0
        self.count_lock = threading.Lock()
        super().__init__(_StratumHandler)


class _StratumHandler(socketserver.StreamRequestHandler):
    """Stratum v1 (line-delimited JSON-RPC) as a pool speaks it, plus XMRig's `login`/`submit`."""

    timeout = _CONNECTION_TIMEOUT
    server: _StratumServer

    def _send(self, message: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def handle(self) -> None:
        with self.server.count_lock:
            self.server.connections += 1
        for raw in self.rfile:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.server.lines.append(line)
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                method, msg_id = request.get("method"), request.get("id")
            except (ValueError, AttributeError):
                self._send({"id": None, "result": None, "error": [20, "Parse error", None]})
                continue
            self._answer(method, msg_id)

    def _answer(self, method: object, msg_id: object) -> None:
        reply: dict[str, Any]
        if method == "mining.subscribe":
            subscriptions = [["mining.set_difficulty", "corral-sub-1"], ["mining.notify", "corral-sub-1"]]
            reply = {"id": msg_id, "result": [subscriptions, EXTRANONCE1, EXTRANONCE2_SIZE], "error": None}
            self._send(reply)
        elif method == "mining.authorize":
            self._send({"id": msg_id, "result": True, "error": None})
            self._send({"id": None, "method": "mining.set_difficulty", "params": [POOL_DIFFICULTY]})
            self._send(_bitcoin_notify())
        elif method in ("mining.submit", "mining.extranonce.subscribe", "mining.suggest_difficulty"):
            self._send({"id": msg_id, "result": True, "error": None})
        elif method == "mining.configure":
            self._send({"id": msg_id, "result": {}, "error": None})
        elif method == "login":
            result = {
                "id": XMRIG_WORKER_ID,
                "job": _xmrig_job(),
                "extensions": ["algo", "nicehash", "connect", "keepalive"],
                "status": "OK",
            }
            self._send({"id": msg_id, "jsonrpc": "2.0", "error": None, "result": result})
        elif method == "submit":
            self._send({"id": msg_id, "jsonrpc": "2.0", "error": None, "result": {"status": "OK"}})
        elif method == "keepalived":
            self._send({"id": msg_id, "jsonrpc": "2.0", "error": None, "result": {"status": "KEEPALIVED"}})
        else:
            self._send({"id": msg_id, "result": None, "error": [20, "Unsupported method", None]})


@dataclass
class StratumPool:
    """A running Stratum v1 pool. `lines`: every line received, in order (across connections)."""

    port: int
    lines: list[str]
    errors: list[str]
    _server: _StratumServer
    host: str = HOST

    @property
    def connections(self) -> int:
        return self._server.connections

    @property
    def methods(self) -> list[str]:
        """The JSON-RPC method of every parsable line received."""
        found: list[str] = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError, AttributeError):
                method = json.loads(line).get("method")
                if isinstance(method, str):
                    found.append(method)
        return found


@contextlib.contextmanager
def stratum_pool() -> Iterator[StratumPool]:
    server = _StratumServer()
    with _serving(server, "stratum"):
        yield StratumPool(port=server.port, lines=server.lines, errors=server.errors, _server=server)


# --------------------------------------------------------------------------------------------------
# A download that never ends


class _TrickleServer(_TcpServer):
    def __init__(self, chunk: int, interval: float) -> None:
        self.chunk = chunk
        self.interval = interval
        self.sent: list[int] = []  # bytes of body sent, one entry per connection
        self.ended: list[str] = []  # how each connection ended, once it did
        super().__init__(_TrickleHandler)


class _TrickleHandler(socketserver.StreamRequestHandler):
    server: _TrickleServer
    timeout = _CONNECTION_TIMEOUT

    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # the request's head; the answer is the same whatever was asked
        index = len(self.server.sent)
        self.server.sent.append(0)
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
            while not self.server._closing:
                self.wfile.write(b"x" * self.server.chunk)
                self.wfile.flush()
                self.server.sent[index] += self.server.chunk
                time.sleep(self.server.interval)
            self.server.ended.append("server stopped")
        except OSError as e:
            self.server.ended.append(f"client went away: {e.__class__.__name__}")


@dataclass
class TrickleServer:
    """A running HTTP server whose every answer is a 1 GB body sent a chunk at a time, forever: a
    long download, for what happens to a connection that outlives a phase of its sandbox."""

    port: int
    sent: list[int]  # body bytes sent, per connection
    ended: list[str]  # how each connection ended
    host: str = HOST


@contextlib.contextmanager
def trickle_server(chunk: int = 1024, interval: float = 0.02) -> Iterator[TrickleServer]:
    server = _TrickleServer(chunk, interval)
    with _serving(server, "trickle"):
        yield TrickleServer(port=server.port, sent=server.sent, ended=server.ended)


# --------------------------------------------------------------------------------------------------
# Raw TCP listener and UDP sink


@dataclass
class TcpConnection:
    peer: tuple[str, int]
    data: bytearray = field(default_factory=bytearray)
    closed: bool = False  # the client closed its side (or the listener stopped)


class _ListenerServer(_TcpServer):
    def __init__(self, greeting: bytes, answer_at_eof: bool, eof_after_greeting: bool) -> None:
        self.greeting = greeting
        self.answer_at_eof = answer_at_eof
        self.eof_after_greeting = eof_after_greeting
        self.connections: list[TcpConnection] = []
        super().__init__(_ListenerHandler)


class _ListenerHandler(socketserver.BaseRequestHandler):
    server: _ListenerServer

    def handle(self) -> None:
        conn = TcpConnection(peer=(self.client_address[0], self.client_address[1]))
        self.server.connections.append(conn)
        try:
            if self.server.greeting:
                self.request.sendall(self.server.greeting)
            if self.server.eof_after_greeting:
                self.request.shutdown(socket.SHUT_WR)  # and goes on reading
            while chunk := self.request.recv(65536):
                conn.data += chunk
            if self.server.answer_at_eof:
                # Only after the client's half-close: what a relay that drops one direction at the
                # other's end would lose.
                self.request.sendall(b"got:" + bytes(conn.data))
        except OSError:
            pass
        finally:
            conn.closed = True


@dataclass
class TcpListener:
    """A running TCP catcher ("attacker", reverse-shell listener): accepts anything and records the bytes."""

    port: int
    connections: list[TcpConnection]  # one per accepted connection, in order
    host: str = HOST

    @property
    def received(self) -> bytes:
        """All bytes received, over every connection, in connection order."""
        return b"".join(bytes(c.data) for c in list(self.connections))


@contextlib.contextmanager
def tcp_listener(
    greeting: bytes = b"", answer_at_eof: bool = False, eof_after_greeting: bool = False
) -> Iterator[TcpListener]:
    """`greeting` is sent to each client on accept (e.g. a command for a reverse shell to run);
    `answer_at_eof` sends back b"got:" and everything received once the client has shut down its
    sending side, then closes; `eof_after_greeting` shuts the server's sending side after the
    greeting, and goes on receiving."""
    server = _ListenerServer(greeting, answer_at_eof, eof_after_greeting)
    with _serving(server, "tcp-listener"):
        yield TcpListener(port=server.port, connections=server.connections)


class _TlsListenerServer(_ListenerServer):
    """The TCP catcher behind TLS (a reverse shell's `openssl s_client` or `ncat --ssl` end)."""

    def __init__(self, greeting: bytes, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__(greeting, answer_at_eof=False, eof_after_greeting=False)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(_CONNECTION_TIMEOUT)
        tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        with tls, self.track(tls) as running:
            if not running:
                return
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError):
                return
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]  # typeshed: Self


@contextlib.contextmanager
def tls_listener(hostname: str, greeting: bytes = b"") -> Iterator[TcpListener]:
    """`tcp_listener` behind TLS, with a self-signed certificate for `hostname`."""
    with tempfile.TemporaryDirectory(prefix="corral-tls-") as tmp:
        cert, key = make_certificate(Path(tmp), hostname)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server = _TlsListenerServer(greeting, context)
        with _serving(server, "tls-listener"):
            yield TcpListener(port=server.port, connections=server.connections)


class _SinkServer(_UdpServer):
    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, tuple[str, int]]] = []
        super().__init__(_SinkHandler)


class _SinkHandler(socketserver.BaseRequestHandler):
    server: _SinkServer

    def handle(self) -> None:
        data, _sock = self.request
        self.server.datagrams.append((data, (self.client_address[0], self.client_address[1])))


@dataclass
class UdpSink:
    """A running UDP socket that swallows datagrams and records them with their sender."""

    port: int
    datagrams: list[tuple[bytes, tuple[str, int]]]
    host: str = HOST

    @property
    def count(self) -> int:
        return len(self.datagrams)


@contextlib.contextmanager
def udp_sink() -> Iterator[UdpSink]:
    server = _SinkServer()
    with _serving(server, "udp-sink"):
        yield UdpSink(port=server.port, datagrams=server.datagrams)


# --------------------------------------------------------------------------------------------------
# DNS upstream spy (hand-built DNS: dnspython is not installed in the venv)

DNS_ANSWER = "192.0.2.1"
QTYPE_A = 1
QTYPE_AAAA = 28
QCLASS_IN = 1


@dataclass(frozen=True)
class DnsQuery:
    name: str  # lower case, no trailing dot
    qtype: int  # 1 = A, 28 = AAAA, ...
    peer: tuple[str, int]


def _parse_question(message: bytes) -> tuple[int, int, str, int, int, int]:
    """(id, flags, name, qtype, qclass, end of the question) of a DNS message; ValueError if malformed."""
    if len(message) < 12:
        raise ValueError("short header")
    msg_id, flags, qdcount = struct.unpack("!HHH", message[:6])
    if qdcount != 1:
        raise ValueError("expected one question")
    labels: list[str] = []
    offset = 12
    while True:
        if offset >= len(message):
            raise ValueError("truncated name")
        length = message[offset]
        offset += 1
        if length == 0:
            break
        if length > 63:
            raise ValueError("compressed or invalid label in a question")
        labels.append(message[offset : offset + length].decode("ascii", errors="replace"))
        offset += length
    if offset + 4 > len(message):
        raise ValueError("truncated question")
    qtype, qclass = struct.unpack("!HH", message[offset : offset + 4])
    return msg_id, flags, ".".join(labels).lower(), qtype, qclass, offset + 4


def build_dns_query(name: str, qtype: int = QTYPE_A, msg_id: int = 0x1234) -> bytes:
    """A recursion-desired DNS query for `name` (for tests that talk to a resolver over a plain socket)."""
    question = b"".join(
        bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".") if label
    )
    return (
        struct.pack("!HHHHHH", msg_id, 0x0100, 1, 0, 0, 0) + question + b"\x00" + struct.pack("!HH", qtype, 1)
    )


def parse_dns_answers(response: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, IPv4 addresses of the A answers) of a DNS response whose answers point back at the
    question name (as the spy's do)."""
    msg_id, flags, _name, _qtype, _qclass, offset = _parse_question(response)
    ancount = struct.unpack("!H", response[6:8])[0]
    addresses: list[str] = []
    for _ in range(ancount):
        if response[offset] & 0xC0 == 0xC0:
            offset += 2
        else:
            while response[offset] != 0:
                offset += response[offset] + 1
            offset += 1
        rtype, _rclass, _ttl, rdlength = struct.unpack("!HHIH", response[offset : offset + 10])
        offset += 10
        if rtype == QTYPE_A and rdlength == 4:
            addresses.append(socket.inet_ntoa(response[offset : offset + 4]))
        offset += rdlength
    return msg_id, flags & 0x000F, addresses


class _DnsServer(_UdpServer):
    def __init__(self, answer: str) -> None:
        self.answer = socket.inet_aton(answer)
        self.queries: list[DnsQuery] = []
        super().__init__(_DnsHandler)


class _DnsHandler(socketserver.BaseRequestHandler):
    server: _DnsServer

    def handle(self) -> None:
        message, sock = self.request
        try:
            msg_id, flags, name, qtype, qclass, end = _parse_question(message)
        except ValueError:
            if len(message) >= 2:  # FORMERR, echoing the id
                sock.sendto(message[:2] + struct.pack("!HHHHH", 0x8001, 0, 0, 0, 0), self.client_address)
            return
        if flags & 0x8000:
            return  # a response, not a query
        self.server.queries.append(DnsQuery(name, qtype, (self.client_address[0], self.client_address[1])))
        answer = qtype == QTYPE_A and qclass == QCLASS_IN
        # QR, opcode copied, AA, RD copied, RA; rcode NOERROR (no A record for other types: NODATA)
        reply_flags = 0x8000 | (flags & 0x7800) | 0x0400 | (flags & 0x0100) | 0x0080
        header = struct.pack("!HHHHHH", msg_id, reply_flags, 1, 1 if answer else 0, 0, 0)
        reply = header + message[12:end]
        if answer:  # name: pointer to the question (offset 12); type A, class IN, TTL 60, 4 bytes
            reply += struct.pack("!HHHIH", 0xC00C, QTYPE_A, QCLASS_IN, 60, 4) + self.server.answer
        sock.sendto(reply, self.client_address)


@dataclass
class DnsSpy:
    """A running UDP DNS server answering every A query with `answer` and recording every question."""

    port: int
    answer: str
    queries: list[DnsQuery]
    errors: list[str]
    host: str = HOST

    @property
    def names(self) -> list[str]:
        """Every name asked about, in order (lower case, no trailing dot)."""
        return [q.name for q in list(self.queries)]


@contextlib.contextmanager
def dns_upstream_spy(answer: str = DNS_ANSWER) -> Iterator[DnsSpy]:
    server = _DnsServer(answer)
    with _serving(server, "dns-spy"):
        yield DnsSpy(port=server.port, answer=answer, queries=server.queries, errors=server.errors)


__all__ = [
    "DNS_ANSWER",
    "HOST",
    "HOST_KEY_ALIAS",
    "DnsQuery",
    "DnsSpy",
    "HttpRequest",
    "HttpServer",
    "LocalUpstream",
    "PackageIndex",
    "SshServer",
    "StratumPool",
    "TcpConnection",
    "TcpListener",
    "TlsServer",
    "UdpSink",
    "build_dns_query",
    "build_probe_wheel",
    "client_env",
    "dns_upstream_spy",
    "http_server",
    "make_certificate",
    "package_index",
    "parse_dns_answers",
    "ssh_server",
    "stratum_pool",
    "tcp_listener",
    "tls_listener",
    "tls_server",
    "udp_sink",
]


# --------------------------------------------------------------------------------------------------
# The egress proxy's view of the world


class LocalUpstream:
    """Maps (address, port) to local servers and names to chosen addresses; records what it was asked."""

    def __init__(self, ports: dict[int, int], names: dict[str, str] | None = None) -> None:
        self.ports = ports
        self.names = {k: [ipaddress.ip_address(v)] for k, v in (names or {}).items()}
        self.resolved: list[str] = []
        self.dialed: list[tuple[str, int]] = []

    async def resolve(self, name: str) -> list[IPAddress]:
        self.resolved.append(name)
        return self.names.get(name, [])

    async def connect(self, address: IPAddress, port: int) -> socket.socket:
        self.dialed.append((str(address), port))
        if address != _LOCAL or port not in self.ports:
            raise ConnectionRefusedError(f"test upstream has nothing at {address} port {port}")
        return await dial(_LOCAL, self.ports[port])

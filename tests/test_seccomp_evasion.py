"""Ways around the seccomp filter and the fence that are not TCP or UDP, each refused by the real
kernel and recorded: socket families no program needs (AF_VSOCK reaches the hypervisor and ignores
network namespaces), kernel refusals the agent could otherwise hide (SOCK_PACKET, ping sockets), a
seccomp filter of the agent's own, and host services' UNIX sockets the read-only view still shows."""

from __future__ import annotations

import errno
import os
import platform
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from corral import Alert, Deny, ExecResult, ExecStart, Policy, PolicyError, ProcSeccomp, Sandbox
from corral.detect import rules
from corral.isolation import seccomp
from corral.policy._schema import Filesystem
from helpers import show

pytestmark = pytest.mark.root

PYTHON = "/usr/bin/python3"
PYTHON_EXE = os.path.realpath(PYTHON)
SYS = {
    "x86_64": {"socket": 41, "seccomp": 317, "mount": 165},
    "aarch64": {"socket": 198, "seccomp": 277, "mount": 40},
}[platform.machine()]


def seccomp_denials(r: ExecResult, what: str) -> list[Deny]:
    return [d for d in r.denials if d.layer == "seccomp" and d.what == what]


# --- socket families -----------------------------------------------------------------------------

FAMILY = """
import socket, sys
call = socket.socketpair if sys.argv[1] == "pair" else socket.socket
try:
    call(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    print("created")
except OSError as e:
    print(e.errno)
"""


@pytest.mark.parametrize(
    ("call", "family", "kind"),
    [
        ("socket", socket.AF_VSOCK, socket.SOCK_STREAM),
        ("socket", socket.AF_VSOCK, socket.SOCK_DGRAM),
        ("socket", socket.AF_ALG, socket.SOCK_SEQPACKET),
        ("socket", socket.AF_CAN, socket.SOCK_RAW),
        ("socket", socket.AF_TIPC, socket.SOCK_RDM),
        ("socket", 100, socket.SOCK_STREAM),  # no such family: the kernel would refuse it, unrecorded
        ("pair", socket.AF_VSOCK, socket.SOCK_STREAM),
    ],
    ids=["vsock-stream", "vsock-dgram", "alg", "can", "tipc", "unknown", "vsock-pair"],
)
def test_families_no_program_needs_are_refused_and_recorded(
    sb: Sandbox, call: str, family: int, kind: int
) -> None:
    r = sb.exec([PYTHON, "-c", FAMILY, call, str(int(family)), str(int(kind)), "0"], text=True)
    assert str(r.stdout).strip() == "1", show(r)  # EPERM
    denials = seccomp_denials(r, "socket" if call == "socket" else "socketpair")
    assert denials and denials[0].process is not None and denials[0].process.exe == PYTHON_EXE, show(r)
    assert seccomp.family_name(family) in denials[0].detail, denials[0]


def test_vsock_with_high_bits_in_the_family_is_still_refused(sb: Sandbox) -> None:
    # The kernel reads the family as an int: garbage in the upper half of the register must not
    # carry AF_VSOCK past a comparison of all 64 bits.
    script = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
        f"print(libc.syscall(ctypes.c_long({SYS['socket']}), ctypes.c_long(0x100000000 | 40), "
        "ctypes.c_long(1), ctypes.c_long(0)), ctypes.get_errno())"
    )
    r = sb.exec([PYTHON, "-c", script], text=True)
    assert str(r.stdout).split() == ["-1", "1"], show(r)
    assert seccomp_denials(r, "socket"), show(r)


def test_the_families_programs_need_still_work(sb: Sandbox) -> None:
    script = (
        "import socket\n"
        "for f, t in [(socket.AF_UNIX, socket.SOCK_STREAM), (socket.AF_INET, socket.SOCK_DGRAM),"
        " (socket.AF_INET6, socket.SOCK_STREAM), (socket.AF_NETLINK, socket.SOCK_RAW)]:\n"
        "    socket.socket(f, t).close()\n"
        "a, b = socket.socketpair(); a.sendall(b'x'); print(b.recv(1).decode())\n"
        "print(len(socket.getaddrinfo('localhost', 80)) > 0)\n"
    )
    r = sb.exec([PYTHON, "-c", script], text=True)
    assert r.exit_code == 0 and r.stdout == "x\nTrue\n" and r.denials == [], show(r)
    r = sb.exec("ip -o addr && ss -ltn", text=True)
    assert r.exit_code == 0 and r.denials == [], show(r)


# --- refusals the kernel would make, unrecorded ----------------------------------------------------


@pytest.mark.parametrize(
    ("family", "kind", "proto"),
    [
        (socket.AF_INET, 10, 0x0300),  # SOCK_PACKET, ETH_P_ALL: AF_PACKET under its old name
        (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),  # a ping socket
        (socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, socket.IPPROTO_ICMPV6),
    ],
    ids=["sock-packet", "ping", "ping6"],
)
def test_sockets_the_kernel_refuses_for_want_of_privilege_are_recorded(
    sb: Sandbox, family: int, kind: int, proto: int
) -> None:
    r = sb.exec([PYTHON, "-c", FAMILY, "socket", str(int(family)), str(kind), str(proto)], text=True)
    assert str(r.stdout).strip() == "1", show(r)
    assert seccomp_denials(r, "socket"), show(r)


def test_refused_calls_and_the_alert_rule_agree() -> None:
    # One list in seccomp.py, two in the rule files: every refused call alerts or is a known probe.
    lists = rules.load().lists
    alerted, probed = set(lists["privileged_syscalls"]), set(lists["probed_syscalls"])
    refused = {rule.syscall for rule in seccomp.default_rules()}
    assert alerted.isdisjoint(probed), alerted & probed
    assert alerted | probed == refused, (
        f"refused but in neither list of detect/rules/00-lists.yaml: {sorted(refused - alerted - probed)}; "
        f"listed but not refused: {sorted((alerted | probed) - refused)}"
    )


CALL = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
print(libc.syscall(ctypes.c_long(int(sys.argv[1])), 0, 0, 0, 0, 0), ctypes.get_errno())
"""


@pytest.mark.parametrize(
    ("call", "alerted"),
    [("kcmp", True), ("userfaultfd", True), ("lookup_dcookie", True), ("io_uring_setup", False)],
)
def test_a_refused_call_is_recorded_and_alerts_unless_programs_probe_it(
    sb: Sandbox, call: str, alerted: bool
) -> None:
    # The lists above, in a real sandbox: the filter refuses the call and the supervisor records it;
    # the rule alerts on it, except on io_uring, which libuv (behind Node) probes and then goes without.
    [nr] = [nr for nr, name in seccomp.syscall_numbers([call]).items() if name == call]
    r = sb.exec([PYTHON, "-c", CALL, str(nr)], text=True)
    assert str(r.stdout).split() == ["-1", str(errno.EPERM)], show(r)
    [d] = seccomp_denials(r, call)
    assert d.process is not None and d.process.exe == PYTHON_EXE, d
    fired = [a for a in sb.alerts() if a.rule == "refused privileged call"]
    if alerted:
        [a] = fired
        assert a.message.startswith(f"refused {call} by {PYTHON} -c"), a.message
        assert (a.category, a.severity, a.action) == ("privilege", "high", "alert")
    else:
        assert fired == [], fired


# --- a seccomp filter of the agent's own ---------------------------------------------------------

# A filter answering mount() with USER_NOTIF, which outranks corral's own answer; without a listener
# the kernel fails the call with ENOSYS, and corral never hears of it. argv: how (seccomp, prctl or
# listener), then the result of the install and of mount() are printed.
OWN_FILTER = f"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Insn))]
insns = (Insn * 4)(Insn(0x20, 0, 0, 0), Insn(0x15, 0, 1, {SYS["mount"]}), Insn(0x06, 0, 0, 0x7FC00000),
                   Insn(0x06, 0, 0, 0x7FFF0000))
prog = Prog(4, insns)
how = sys.argv[1]
if how == "prctl":
    rc = libc.prctl(22, 2, ctypes.byref(prog), 0, 0)
else:
    flags = 8 if how == "listener" else 0
    rc = libc.syscall(ctypes.c_long({SYS["seccomp"]}), ctypes.c_long(1), ctypes.c_long(flags),
                      ctypes.byref(prog))
print("install", -1 if rc < 0 else 0, ctypes.get_errno() if rc < 0 else 0)
ctypes.set_errno(0)
rc = libc.syscall(ctypes.c_long({SYS["mount"]}), 0, 0, 0, 0, 0)
print("mount", rc, ctypes.get_errno())
"""


@pytest.mark.parametrize("how", ["seccomp", "prctl"])
def test_installing_a_filter_is_recorded(sb: Sandbox, how: str) -> None:
    r = sb.exec([PYTHON, "-c", OWN_FILTER, how], text=True)
    assert str(r.stdout).splitlines() == ["install 0 0", "mount -1 38"], show(r)  # ENOSYS
    # The hidden refusal of mount is not a denial; the install that hid it is on the record.
    assert r.denials == [], show(r)
    installs = [e for e in sb.events() if isinstance(e, ProcSeccomp)]
    assert len(installs) == 1, sb.events()
    assert installs[0].process is not None and installs[0].process.exe == PYTHON_EXE, installs
    assert installs[0].how == ("prctl" if how == "prctl" else "flags 0x0"), installs
    assert installs[0].exec == [e for e in sb.events() if isinstance(e, ExecStart)][-1].exec, installs


def test_a_filter_with_a_listener_is_refused_and_recorded(sb: Sandbox) -> None:
    # A listener of its own would see first, and could let through unrecorded, every call corral's
    # filter watches or refuses.
    r = sb.exec([PYTHON, "-c", OWN_FILTER, "listener"], text=True)
    assert str(r.stdout).splitlines()[0] == "install -1 1", show(r)
    denials = seccomp_denials(r, "seccomp")
    assert denials and denials[0].process is not None and denials[0].process.exe == PYTHON_EXE, show(r)
    # With no filter of its own installed, mount reaches corral's and is refused and recorded.
    assert str(r.stdout).splitlines()[1] == "mount -1 1" and seccomp_denials(r, "mount"), show(r)


# --- host services' UNIX sockets -----------------------------------------------------------------


class UnixServer:
    """A host service listening on a world-writable UNIX socket in a fresh directory under /var/tmp
    (outside the sandbox's own storage, and outside /run and /tmp, which the sandbox never sees)."""

    def __init__(self, kind: int = socket.SOCK_STREAM) -> None:
        self.dir = tempfile.mkdtemp(prefix="corral-host-", dir="/var/tmp")
        os.chmod(self.dir, 0o755)
        self.path = f"{self.dir}/service.sock"
        self.sock = socket.socket(socket.AF_UNIX, kind)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o777)
        self.reached: list[bytes] = []
        self.kind = kind
        if kind == socket.SOCK_STREAM:
            self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                if self.kind == socket.SOCK_STREAM:
                    conn, _ = self.sock.accept()
                    with conn:
                        conn.sendall(b"host service\n")
                        self.reached.append(b"connect")
                else:
                    data = self.sock.recv(100)
                    if not data:
                        return  # shut down
                    self.reached.append(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def host_service() -> Iterator[UnixServer]:
    server = UnixServer()
    yield server
    server.close()


def visible(server: UnixServer, **network: Any) -> Policy:
    """A policy under which the sandbox sees the service's directory, whether or not the host view
    shows /var/tmp by default."""
    data: dict[str, Any] = {"version": 1, "network": network}
    if "readable" in Filesystem.model_fields:
        data["filesystem"] = {"readable": [server.dir]}
    return Policy.from_dict(data)


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print(s.recv(100).decode().strip())
except OSError as e:
    print(e.errno)
"""


def unix_denials(r: ExecResult) -> list[Deny]:
    return [d for d in r.denials if d.layer == "unix"]


def test_a_host_service_socket_is_unreachable_and_recorded(host_service: UnixServer) -> None:
    with Sandbox(visible(host_service), keep_workspace=False) as sb:
        assert sb.exec(["test", "-S", host_service.path]).exit_code == 0, "the test needs the socket visible"
        r = sb.exec([PYTHON, "-c", CONNECT, host_service.path], text=True)
        assert str(r.stdout).strip() == "13", show(r)  # EACCES
        denials = unix_denials(r)
        assert [d.what for d in denials] == [host_service.path], show(r)
        assert denials[0].process is not None and denials[0].process.exe == PYTHON_EXE, denials
        assert "connect" in denials[0].detail, denials
        alerts = [e for e in sb.events() if isinstance(e, Alert) and e.rule == "host socket"]
        assert alerts and host_service.path in alerts[0].message, sb.events()
        # A real tool, through a relative path and a symlink in the sandbox's own /tmp.
        r = sb.exec(
            f"cd {host_service.dir} && socat -u UNIX-CONNECT:service.sock - ; "
            f"ln -s {host_service.path} /tmp/link && socat -u UNIX-CONNECT:/tmp/link -",
            text=True,
        )
        assert "host service" not in str(r.stdout), show(r)
        assert [d.what for d in unix_denials(r)] == [host_service.path] * 2, show(r)
    assert host_service.reached == []


def test_a_host_socket_through_a_proc_fd_link_is_refused(host_service: UnixServer) -> None:
    # /proc/self/fd/N of an O_PATH descriptor reaches the socket itself, whatever path it came from;
    # the host can't follow it as the caller's kernel will, so it is refused.
    script = (
        "import os, socket, sys\nfd = os.open(sys.argv[1], os.O_PATH)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(f'/proc/self/fd/{fd}'); print(s.recv(100).decode().strip())\n"
        "except OSError as e:\n    print(e.errno)\n"
    )
    with Sandbox(visible(host_service), keep_workspace=False) as sb:
        r = sb.exec([PYTHON, "-c", script, host_service.path], text=True)
        assert str(r.stdout).strip() == "13", show(r)
        assert [d.detail for d in unix_denials(r)] == [
            "connect to a UNIX socket through /proc, not in network.unix_sockets"
        ], show(r)
    assert host_service.reached == []


def test_a_datagram_to_a_host_socket_is_refused() -> None:
    server = UnixServer(socket.SOCK_DGRAM)
    script = (
        "import socket, sys\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "try:\n    s.sendto(b'forged log line', sys.argv[1]); print('sent')\n"
        "except OSError as e:\n    print(e.errno)\n"
    )
    try:
        with Sandbox(visible(server), keep_workspace=False) as sb:
            r = sb.exec([PYTHON, "-c", script, server.path], text=True)
            assert str(r.stdout).strip() == "13", show(r)
            assert [d.what for d in unix_denials(r)] == [server.path], show(r)
            assert "sendto" in unix_denials(r)[0].detail, show(r)
    finally:
        server.close()
    assert server.reached == []


def test_a_socket_the_policy_names_is_reachable(host_service: UnixServer) -> None:
    with Sandbox(visible(host_service, unix_sockets=[host_service.path]), keep_workspace=False) as sb:
        r = sb.exec([PYTHON, "-c", CONNECT, host_service.path], text=True)
        assert str(r.stdout).strip() == "host service" and r.denials == [], show(r)
    assert host_service.reached == [b"connect"]


def test_sockets_the_sandbox_makes_itself_work(sb: Sandbox) -> None:
    script = (
        "import os, socket, threading\n"
        "for path in ['/tmp/own.sock', 'rel.sock', '/dev/shm/shm.sock']:\n"
        "    srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen(1)\n"
        "    t = threading.Thread(target=lambda: srv.accept()[0].sendall(b'ok')); t.start()\n"
        "    c = socket.socket(socket.AF_UNIX); c.connect(path); print(c.recv(2).decode()); t.join()\n"
        "d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); d.bind('/tmp/dgram.sock')\n"
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'ok', '/tmp/dgram.sock')\n"
        "print(d.recv(2).decode())\n"
        "a = socket.socket(socket.AF_UNIX); a.bind('\\0corral-abstract'); a.listen(1)\n"
        "socket.socket(socket.AF_UNIX).connect('\\0corral-abstract'); print('abstract')\n"
    )
    r = sb.exec([PYTHON, "-c", script], text=True)
    assert r.stdout == "ok\nok\nok\nok\nabstract\n" and r.denials == [], show(r)
    # socat as a relay is a tripwire of its own; here only the socket check is under test.
    with Sandbox(
        Policy.from_dict({"version": 1, "tripwires": {"enabled": False}}), keep_workspace=False
    ) as quiet:
        r = quiet.exec(
            "socat -u UNIX-LISTEN:/workspace/s.sock - & while [ ! -S s.sock ]; do sleep 0.05; done; "
            "echo hi | socat -u - UNIX-CONNECT:s.sock; wait",
            text=True,
            timeout=30,
        )
        assert r.stdout == "hi\n" and r.denials == [], show(r)


def test_a_socket_that_is_not_there_fails_as_before_unrecorded(sb: Sandbox) -> None:
    # glibc asks nscd at /var/run/nscd/socket on every user lookup; where nothing listens that must
    # stay a quiet ENOENT, not a denial per `ls -l`.
    r = sb.exec([PYTHON, "-c", CONNECT, "/var/run/nscd/socket"], text=True)
    assert str(r.stdout).strip() == "2" and r.denials == [], show(r)
    r = sb.exec("id && ls -l / >/dev/null", text=True)
    assert r.exit_code == 0 and r.denials == [], show(r)


def test_unix_sockets_policy_key_is_validated() -> None:
    with pytest.raises(
        PolicyError, match=r"network\.unix_sockets\[0\]: \"run/x.sock\" is not an absolute path"
    ):
        Policy.from_dict({"version": 1, "network": {"unix_sockets": ["run/x.sock"]}})


def test_the_socket_check_reads_what_the_kernel_reads() -> None:
    # Lengths: every pathname socket's (3 to 110 bytes, the kernel reads up to 128) but the two IP
    # ones, whatever the upper half of the register holds.
    for length in (3, 12, 17, 27, 29, 110, 128, 0x1_0000_0020):
        assert seccomp.address_of("connect", (3, 0x1000, length, 0, 0, 0)) == (0x1000, length & 0xFFFFFFFF)
        assert seccomp.address_of("sendto", (3, 0, 0, 0, 0x1000, length)) == (0x1000, length & 0xFFFFFFFF)
    for length in (0, 2, 16, 28, 129, 0x1_0000_0010):
        assert seccomp.address_of("connect", (3, 0x1000, length, 0, 0, 0)) is None


def test_without_notification_the_families_and_listeners_are_still_refused() -> None:
    # Degraded, nothing is recorded, and corral holds no listener, so the kernel would grant the
    # agent one: the filter itself must refuse it.
    policy = Policy.from_dict({"version": 1, "degrade": ["seccomp_notify"]})
    with Sandbox(policy, keep_workspace=False) as sb:
        r = sb.exec([PYTHON, "-c", FAMILY, "socket", str(int(socket.AF_VSOCK)), "1", "0"], text=True)
        assert str(r.stdout).strip() == "1" and r.denials == [], show(r)
        r = sb.exec([PYTHON, "-c", OWN_FILTER, "listener"], text=True)
        assert str(r.stdout).splitlines()[0] == "install -1 1", show(r)

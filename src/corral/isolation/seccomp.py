"""The seccomp filter: refuse what no agent needs, and report each refusal with its process.

Built with libseccomp (through ctypes; the PyPI bindings are unmaintained and lack user
notification). Refused calls use SECCOMP_RET_USER_NOTIF: the kernel parks the calling thread and tells
the supervisor, which records a `deny` event naming the syscall, pid and executable (read on the host,
where the agent can't forge it) and answers EPERM. If the supervisor is gone the kernel answers ENOSYS
itself, so a refused call can never succeed. Without user notification (policy `degrade:
[seccomp_notify]`) the same calls get EPERM directly and are not reported.

Phases: `default_rules()` + `compile_program()` build the BPF program once per kind (in the zygote);
`load_program()` installs it in the child after privileges are dropped (no_new_privs is set), and
`load()` does both at once. On the host, `receive()` reads notifications from the listener fd the
child hands over, and `respond_error()` / `respond_continue()` answer them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from corral._errors import HostError
from corral.isolation import _linux

# Calls no agent workload needs and every container escape or host attack wants.
DENIED: tuple[str, ...] = (
    # filesystem and namespace manipulation
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "setns",
    "unshare",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "open_by_handle_at",
    "name_to_handle_at",
    # other processes' memory and fds
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    # kernel attack surface
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "iopl",
    "ioperm",
    "uselib",
    "lookup_dcookie",
    "quotactl",
    "quotactl_fd",
    "nfsservctl",
    # host-wide state
    "swapon",
    "swapoff",
    "reboot",
    "syslog",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "vhangup",
    "sethostname",
    "setdomainname",
)

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_NOTIFY = 0x7FC00000
SCMP_ACT_KILL_PROCESS = 0x80000000


def SCMP_ACT_ERRNO(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


_SCMP_CMP_MASKED_EQ = 7
_SCMP_FLTATR_CTL_NNP = 3
_SCMP_FLTATR_ACT_BADARCH = 2

_AF_INET = 2
_AF_INET6 = 10
_SOCK_DGRAM = 2
_SOCK_RAW = 3
_SOCK_PACKET = 10
_IPPROTO_ICMP = 1
_IPPROTO_ICMPV6 = 58
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_U32 = 0xFFFFFFFF
_TIOCSTI = 0x5412  # push bytes into a terminal's input queue: the classic sandbox-to-host escape
_TIOCLINUX = 0x541C


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


@functools.cache
def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise HostError(
            f"seccomp: libseccomp is not installed ({e}); install the libseccomp2 package"
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_notify_fd.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


@dataclass(frozen=True)
class Rule:
    syscall: str
    args: tuple[tuple[int, int, int, int], ...] = ()  # (arg index, op, a, b), all must match

    def describe(self) -> str:
        return self.syscall if not self.args else f"{self.syscall}({', '.join(_fmt(a) for a in self.args)})"


def _fmt(cmp: tuple[int, int, int, int]) -> str:
    idx, op, a, b = cmp
    return f"arg{idx} & {a:#x} == {b:#x}" if op == _SCMP_CMP_MASKED_EQ else f"arg{idx} == {a:#x}"


# Address families programs need: local IPC, IPv4 and IPv6 (which the fence catches) and netlink
# (glibc's getaddrinfo and getifaddrs, `ip` and `ss` ask the kernel about the sandbox's own network
# namespace). socket() and socketpair() with any other family are refused: AF_VSOCK reaches the
# hypervisor and other VMs and no network namespace confines it, AF_PACKET sees and forges raw
# frames, and the rest (Bluetooth, CAN, TIPC, RDS, ALG, XDP...) are kernel attack surface.
ALLOWED_FAMILIES: tuple[int, ...] = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK)


def family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"family {family}"


def _blocks(lo: int, hi: int, skip: Sequence[int]) -> list[tuple[int, int]]:
    """(mask, value) pairs such that `x & mask == value` holds for exactly the 32-bit x in [lo, hi)
    outside `skip`. A filter compares all 64 bits of an argument while the kernel reads an int
    argument's low 32, so each pair masks off the high half: garbage there can't dodge a rule."""
    out: list[tuple[int, int]] = []

    def cover(start: int, size: int) -> None:
        end = start + size
        if end <= lo or start >= hi:
            return
        if lo <= start and end <= hi and not any(start <= v < end for v in skip):
            out.append((_U32 & ~(size - 1), start))
        elif size > 1:
            cover(start, size // 2)
            cover(start + size // 2, size // 2)

    cover(0, 1 << 32)
    return out


def _masked(index: int, mask: int, value: int) -> tuple[int, int, int, int]:
    return (index, _SCMP_CMP_MASKED_EQ, mask, value)


def default_rules() -> list[Rule]:
    rules = [Rule(name) for name in DENIED]
    # Namespace creation through clone(2) is refused by flag; plain fork/threads stay allowed.
    rules += [Rule("clone", ((0, _SCMP_CMP_MASKED_EQ, flag, flag),)) for flag in _linux.NAMESPACE_FLAGS]
    # Every family outside the allowed ones, up to the whole int range: families the kernel doesn't
    # know fail there anyway, but then unrecorded.
    rules += [
        Rule(call, (_masked(0, mask, value),))
        for call in ("socket", "socketpair")
        for mask, value in _blocks(0, 1 << 32, ALLOWED_FAMILIES)
    ]
    # Raw IP sockets (ping sweeps, packet forging); raw netlink sockets are how `ip` and `ss` talk to
    # the kernel about the sandbox's own network namespace, and stay allowed.
    rules += [
        Rule("socket", (_masked(0, _U32, family), _masked(1, 0xF, _SOCK_RAW)))
        for family in (_AF_INET, _AF_INET6)
    ]
    # The kernel refuses these for want of a privilege the sandbox never has (SOCK_PACKET is the old
    # spelling of AF_PACKET; ICMP datagram "ping sockets" need a group in ping_group_range, empty in a
    # new network namespace); refused here first so the attempt is recorded.
    rules.append(Rule("socket", (_masked(1, 0xF, _SOCK_PACKET),)))
    rules += [
        Rule("socket", (_masked(0, _U32, family), _masked(1, 0xF, _SOCK_DGRAM), _masked(2, _U32, proto)))
        for family, proto in ((_AF_INET, _IPPROTO_ICMP), (_AF_INET6, _IPPROTO_ICMPV6))
    ]
    # A filter of the agent's own with a listener would see (and could let through, unrecorded)
    # every call ours watches, since the newest filter's notification wins; no workload needs one.
    # Beside corral's listener the kernel refuses a second one (EBUSY, unrecorded); without it
    # (degraded) nothing else would.
    rules.append(
        Rule(
            "seccomp",
            (
                _masked(0, _U32, _SECCOMP_SET_MODE_FILTER),
                _masked(1, _SECCOMP_FILTER_FLAG_NEW_LISTENER, _SECCOMP_FILTER_FLAG_NEW_LISTENER),
            ),
        )
    )
    # ioctl's request is an int; compare the low 32 bits so high garbage can't slip past.
    rules.append(Rule("ioctl", ((1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, _TIOCSTI),)))
    rules.append(Rule("ioctl", ((1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, _TIOCLINUX),)))
    return rules


def syscall_numbers(names: list[str] | None = None) -> dict[int, str]:
    """Native syscall number -> name for the names libseccomp knows on this architecture."""
    lib = _lib()
    out: dict[int, str] = {}
    for name in names or [*DENIED, *WATCHED, *_ARG_RULED]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            out[nr] = name
    return out


# Calls refused or watched only for some arguments.
_ARG_RULED = ("connect", "sendto", "clone", "clone3", "socket", "socketpair", "ioctl", "seccomp", "prctl")

# Reported, then let through: the process monitor sees every program start, with its arguments, while
# the caller is parked, before the new program runs a single instruction.
WATCHED: tuple[str, ...] = ("execve", "execveat")
# Reported, then let through: every IPv4 connect (an address length of a sockaddr_in), so the egress
# fence knows which process made a connection even when its socket is gone by the time the proxy
# takes it (a connect scan resets at once). A longer address length, which the kernel accepts, is
# caught by WATCHED_ADDRESS below and named the same, except an IPv6 address's length (28): evading
# it that way loses only that name; the fence still decides the connection.
_SOCKADDR_IN_LEN = 16
WATCHED_CONNECT = Rule("connect", ((2, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, _SOCKADDR_IN_LEN),))

# Decided by the supervisor, which reads the address from the parked caller: connect() and sendto()
# with any address length a pathname UNIX socket can have (the kernel reads up to 128 bytes; 3 is
# the shortest path). Only the two IP lengths stay out, so ordinary IP traffic (and send(), which is
# sendto() with no address) never waits for the supervisor. Lengths are ints: the high half is masked off.
_SOCKADDR_IN6_LEN = 28
_ADDRESS_ARG = {"connect": 2, "sendto": 5}
UNIX_ADDRESS_LENGTHS = (3, 129)
WATCHED_ADDRESS = tuple(
    Rule(call, (_masked(index, mask, value),))
    for call, index in _ADDRESS_ARG.items()
    for mask, value in _blocks(*UNIX_ADDRESS_LENGTHS, (_SOCKADDR_IN_LEN, _SOCKADDR_IN6_LEN))
)


def address_of(syscall: str, args: Sequence[int]) -> tuple[int, int] | None:
    """(pointer, length) of the socket address a watched connect or sendto passes, if it may be a
    pathname UNIX socket's."""
    index = _ADDRESS_ARG.get(syscall)
    if index is None:
        return None
    length = args[index] & _U32
    if not UNIX_ADDRESS_LENGTHS[0] <= length < UNIX_ADDRESS_LENGTHS[1] or length in (
        _SOCKADDR_IN_LEN,
        _SOCKADDR_IN6_LEN,
    ):
        return None
    return args[index - 1], length


# Recorded, then let through (or refused, with a listener; see default_rules): a filter of the
# agent's own outranks ours where it returns an error, so the calls it refuses never reach the
# supervisor. Programs do sandbox themselves (file(1), sshd, browsers), so the install itself is
# the record.
WATCHED_FILTER_INSTALL = (
    Rule("seccomp", (_masked(0, _U32, _SECCOMP_SET_MODE_FILTER),)),
    Rule("prctl", (_masked(0, _U32, _PR_SET_SECCOMP), _masked(1, _U32, _SECCOMP_MODE_FILTER))),
)


def filter_install(syscall: str, args: Sequence[int]) -> str | None:
    """How a watched seccomp()/prctl() call installs a filter ("listener" when it asks for one),
    or None when it is not an install."""
    if syscall == "seccomp" and args[0] & _U32 == _SECCOMP_SET_MODE_FILTER:
        return "listener" if args[1] & _SECCOMP_FILTER_FLAG_NEW_LISTENER else f"flags {args[1] & _U32:#x}"
    if syscall == "prctl" and args[0] & _U32 == _PR_SET_SECCOMP and args[1] & _U32 == _SECCOMP_MODE_FILTER:
        return "prctl"
    return None


def load(rules: list[Rule], *, notify: bool, watch: Sequence[Rule] = ()) -> int | None:
    """Install the filter on the calling thread (and its future children). Returns the listener fd.

    `watch` are calls the supervisor is told about and answers with "continue" (only with
    `notify`: without a listener they would fail).

    Everything not refused is allowed: the filter is a deny list of calls workloads never need,
    layered over namespaces, dropped privileges and Landlock. Foreign architectures (32-bit syscalls
    on x86_64, x32) are killed outright, since the deny list is written for the native table.
    """
    return load_program(compile_program(rules, notify=notify, watch=watch), notify=notify)


def load_program(program: bytes, *, notify: bool) -> int | None:
    """Install a program `compile_program` made (the caller has set no_new_privs). Returns the
    listener fd when `notify`."""
    fd = _linux.seccomp_set_filter(program, _linux.SECCOMP_FILTER_FLAG_NEW_LISTENER if notify else 0)
    return fd if notify else None


def compile_program(rules: list[Rule], *, notify: bool, watch: Sequence[Rule] = ()) -> bytes:
    """The filter `load` installs, as the BPF program the kernel takes. libseccomp takes about 5 ms
    of CPU to build one on a small VM, most of it the same for every sandbox: the zygote builds each
    kind once and every sandbox's init only installs it."""
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        lib.seccomp_attr_set(ctx, _SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS)
        action = SCMP_ACT_NOTIFY if notify else SCMP_ACT_ERRNO(errno.EPERM)
        for rule_action, rule in [(action, r) for r in rules] + [
            (SCMP_ACT_NOTIFY, r) for r in watch if notify
        ]:
            nr = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
            if nr < 0:
                continue  # not a syscall on this architecture
            arr = (_ArgCmp * max(1, len(rule.args)))(*[_ArgCmp(*a) for a in rule.args])
            rc = lib.seccomp_rule_add_array(ctx, rule_action, nr, len(rule.args), arr)
            if rc < 0:
                raise OSError(-rc, f"seccomp_rule_add {rule.describe()}: {os.strerror(-rc)}")
        # clone3 passes its flags in memory, where a filter can't look: make libc fall back to clone.
        nr = lib.seccomp_syscall_resolve_name(b"clone3")
        if nr >= 0:
            lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO(errno.ENOSYS), nr, 0, None)
        out = os.memfd_create("corral-seccomp", os.MFD_CLOEXEC)
        try:
            rc = lib.seccomp_export_bpf(ctx, out)
            if rc < 0:
                raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
            program = os.pread(out, os.fstat(out).st_size, 0)
        finally:
            os.close(out)
        if not program or len(program) % 8:
            raise OSError(errno.EINVAL, f"seccomp_export_bpf: a program of {len(program)} bytes")
        return program
    finally:
        lib.seccomp_release(ctx)


# --- the host side of user notification ---------------------------------------------------

# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data { i32 nr; u32 arch;
#   u64 instruction_pointer; u64 args[6]; } }  and  struct seccomp_notif_resp { u64 id; s64 val;
#   s32 error; u32 flags; }
_NOTIF = struct.Struct("=QIIiIQ6Q")
_RESP = struct.Struct("=QqiI")
_IOC_RECV = 0xC0000000 | (_NOTIF.size << 16) | (ord("!") << 8) | 0
_IOC_SEND = 0xC0000000 | (_RESP.size << 16) | (ord("!") << 8) | 1


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int  # in the receiver's PID namespace: the host pid
    syscall_nr: int
    args: tuple[int, ...]


def receive(fd: int) -> Notification | None:
    """Read one pending notification; None if the target died before we got to it."""
    buf = bytearray(_NOTIF.size)
    try:
        fcntl.ioctl(fd, _IOC_RECV, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
            return None
        raise
    nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
    return Notification(nid, pid, nr, tuple(args))


_FLAG_CONTINUE = 1  # SECCOMP_USER_NOTIF_FLAG_CONTINUE


def respond_continue(fd: int, notification_id: int) -> None:
    """Let a watched call proceed as if it had not been stopped. Only for observation: the kernel runs
    the call with whatever its memory holds by then, so nothing may be decided from what was read."""
    buf = bytearray(_RESP.pack(notification_id, 0, 0, _FLAG_CONTINUE))
    try:
        fcntl.ioctl(fd, _IOC_SEND, buf, True)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def respond_error(fd: int, notification_id: int, err: int = errno.EPERM) -> None:
    buf = bytearray(_RESP.pack(notification_id, 0, -err, 0))
    try:
        fcntl.ioctl(fd, _IOC_SEND, buf, True)
    except OSError as e:
        if e.errno != errno.ENOENT:  # the caller was killed while we decided: nothing to answer
            raise

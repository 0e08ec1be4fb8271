"""The seccomp filter: refuse what no agent needs, and report each refusal with its process.

Built with libseccomp (through ctypes; the PyPI bindings are unmaintained and lack user
notification). Refused calls use SECCOMP_RET_USER_NOTIF: the kernel parks the calling thread and tells
the supervisor, which records a `deny` event naming the syscall, pid and executable (read on the host,
where the agent can't forge it) and answers EPERM. If the supervisor is gone the kernel answers ENOSYS
itself, so a refused call can never succeed. Without user notification (policy `degrade:
[seccomp_notify]`) the same calls get EPERM directly and are not reported.

Phases: `build_filter()` + `load()` in the child after privileges are dropped (no_new_privs is set);
`Listener` on the host reads notifications from the fd the child hands over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from corral._errors import HostError

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


_SCMP_CMP_EQ = 4
_SCMP_CMP_MASKED_EQ = 7
_SCMP_FLTATR_CTL_NNP = 3
_SCMP_FLTATR_ACT_BADARCH = 2

_AF_INET = 2
_AF_INET6 = 10
_AF_PACKET = 17
_SOCK_RAW = 3
_TIOCSTI = 0x5412  # push bytes into a terminal's input queue: the classic sandbox-to-host escape
_TIOCLINUX = 0x541C
_NAMESPACE_CLONE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


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


def default_rules() -> list[Rule]:
    rules = [Rule(name) for name in DENIED]
    # Namespace creation through clone(2) is refused by flag; plain fork/threads stay allowed.
    rules += [Rule("clone", ((0, _SCMP_CMP_MASKED_EQ, flag, flag),)) for flag in _NAMESPACE_CLONE_FLAGS]
    rules.append(Rule("socket", ((0, _SCMP_CMP_EQ, _AF_PACKET, 0),)))
    # Raw IP sockets (ping sweeps, packet forging); raw netlink sockets are how `ip` and `ss` talk to
    # the kernel about the sandbox's own network namespace, and stay allowed.
    rules += [
        Rule("socket", ((0, _SCMP_CMP_EQ, family, 0), (1, _SCMP_CMP_MASKED_EQ, 0xF, _SOCK_RAW)))
        for family in (_AF_INET, _AF_INET6)
    ]
    # ioctl's request is an int; compare the low 32 bits so high garbage can't slip past.
    rules.append(Rule("ioctl", ((1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, _TIOCSTI),)))
    rules.append(Rule("ioctl", ((1, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, _TIOCLINUX),)))
    return rules


def syscall_numbers(names: list[str] | None = None) -> dict[int, str]:
    """Native syscall number -> name for the names libseccomp knows on this architecture."""
    lib = _lib()
    out: dict[int, str] = {}
    for name in names or [*DENIED, *WATCHED, "connect", "clone", "clone3", "socket", "ioctl"]:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:
            out[nr] = name
    return out


# Reported, then let through: the process monitor sees every program start, with its arguments, while
# the caller is parked, before the new program runs a single instruction.
WATCHED: tuple[str, ...] = ("execve", "execveat")
# Reported, then let through: every IPv4 connect (an address length of a sockaddr_in), so the egress
# fence knows which process made a connection even when its socket is gone by the time the proxy
# takes it (a connect scan resets at once). Evading it (a longer address length, which the kernel
# accepts) loses only that name: the fence still decides the connection.
_SOCKADDR_IN_LEN = 16
WATCHED_CONNECT = Rule("connect", ((2, _SCMP_CMP_MASKED_EQ, 0xFFFFFFFF, _SOCKADDR_IN_LEN),))


def load(rules: list[Rule], *, notify: bool, watch: Sequence[Rule] = ()) -> int | None:
    """Install the filter on the calling thread (and its future children). Returns the listener fd.

    `watch` are calls the supervisor is told about and answers with "continue" (only with
    `notify`: without a listener they would fail).

    Everything not refused is allowed: the filter is a deny list of calls workloads never need,
    layered over namespaces, dropped privileges and Landlock. Foreign architectures (32-bit syscalls
    on x86_64, x32) are killed outright, since the deny list is written for the native table.
    """
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
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
        if not notify:
            return None
        fd = lib.seccomp_notify_fd(ctx)
        if fd < 0:
            raise OSError(-fd, "seccomp_notify_fd failed")
        return int(fd)
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

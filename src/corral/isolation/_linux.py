"""ctypes shims for the Linux system calls Python's standard library lacks.

This is one of the few files that talk to the kernel directly; everything above it takes plain
Python values. Each wrapper raises OSError with errno and a message naming the call and its target,
so a failed setup step says which mount or which syscall went wrong (like bubblewrap's
``Can't mount proc on /newroot/proc``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_module
import os
import platform
import threading
from collections.abc import Callable
from typing import TypeVar

from corral import _procfs

_T = TypeVar("_T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

_MACHINE = platform.machine()
# New system calls share one number on every architecture since Linux 5.1; the older ones differ.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(_MACHINE)
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(_MACHINE)
SYS_MOUNT_SETATTR = 442
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
SYS_PIDFD_GETFD = 438

# clone(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# Every namespace a process can make: seccomp refuses each in clone/unshare, by this list.
NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# mount_setattr(2)
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
AT_RECURSIVE = 0x8000

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        f"mount {fstype or source} on {target}",
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    if _SYS_PIVOT_ROOT is None:
        raise OSError(0, f"pivot_root: unsupported architecture {_MACHINE}")
    _check(_libc.syscall(_SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), f"pivot_root {new_root}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr_recursive(path: str, attr_set: int) -> None:
    """Set mount attributes on `path` and every mount below it, in one atomic call (Linux 5.12+)."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    _check(
        _libc.syscall(
            SYS_MOUNT_SETATTR,
            ctypes.c_int(-100),  # AT_FDCWD
            path.encode(),
            ctypes.c_uint(AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        f"mount_setattr {path}",
    )


# The new mount API (Linux 5.2+; idmapped mounts 5.12+). The numbers are the same on every
# architecture: they were allocated after the syscall tables were unified.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_EMPTY_PATH = 0x1000
MOUNT_ATTR_IDMAP = 0x100000


def idmapped_clone(path: str, userns_fd: int, attr_set: int) -> int:
    """A detached copy of the mount at `path` (not the mounts below it) whose files are seen with
    the ownership `userns_fd`'s uid and gid maps give them, with `attr_set` too; its descriptor,
    to be attached with `move_mount_fd` (Linux 5.12+, and a filesystem that allows idmapping)."""
    fd = _check(
        _libc.syscall(
            SYS_OPEN_TREE,
            ctypes.c_int(-100),  # AT_FDCWD
            path.encode(),
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
        ),
        f"open_tree {path}",
    )
    try:
        attr = _MountAttr(attr_set | MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        _check(
            _libc.syscall(
                SYS_MOUNT_SETATTR,
                ctypes.c_int(fd),
                b"",
                ctypes.c_uint(AT_EMPTY_PATH),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            f"mount_setattr (idmap) {path}",
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def move_mount_fd(fd: int, target: str) -> None:
    """Attach the detached mount `fd` (from `idmapped_clone`) at `target`."""
    _check(
        _libc.syscall(
            SYS_MOVE_MOUNT,
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(-100),  # AT_FDCWD
            target.encode(),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        f"move_mount {target}",
    )


SYS_CLOSE_RANGE = 436
CLOSE_RANGE_CLOEXEC = 1 << 2


def cloexec_from(first: int) -> None:
    """Mark every descriptor from `first` up close-on-exec, in one call (Linux 5.11+)."""
    _check(
        _libc.syscall(
            SYS_CLOSE_RANGE,
            ctypes.c_uint(first),
            ctypes.c_uint(0xFFFFFFFF),
            ctypes.c_uint(CLOSE_RANGE_CLOEXEC),
        ),
        "close_range",
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        f"prctl({option})",
    )


def last_cap() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_capability_bounding_set() -> None:
    """Empty the bounding and ambient sets so no later execve can regain a capability."""
    for cap in range(last_cap() + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def syscall(number: int, *args: object) -> int:
    """Raw syscall(2) for the Landlock calls; arguments must already be ctypes values."""
    return int(_libc.syscall(number, *args))


def errno() -> int:
    return ctypes.get_errno()


PIDFD_THREAD = os.O_EXCL  # Linux 6.9: a pidfd for a thread that doesn't lead its group


def pidfd_getfd(tid: int, fd: int) -> int:
    """A duplicate, in this process, of descriptor `fd` of thread `tid` (Linux 5.6), from that
    thread's own descriptor table. Before Linux 6.9 only a thread-group leader can be named."""
    try:
        pidfd = os.pidfd_open(tid, PIDFD_THREAD)
    except OSError as e:
        if e.errno != errno_module.EINVAL:
            raise
        pidfd = os.pidfd_open(tid)
    try:
        got = int(_libc.syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(fd), ctypes.c_uint(0)))
    finally:
        os.close(pidfd)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd {tid} fd {fd}: {os.strerror(err)}")
    return got


def set_cmdline(text: str) -> None:
    """Overwrite this process's argv in place (as setproctitle does), so the sandbox's init does not
    show the supervisor's command line, which may carry paths or tokens, to the agent. prctl(PR_SET_MM)
    would be tidier but needs CAP_SYS_RESOURCE, which hosts often withhold even from root."""
    fields = _procfs.stat_fields("self")
    arg_start, arg_end = int(fields[_procfs.ARG_START]), int(fields[_procfs.ARG_END])
    size = arg_end - arg_start
    data = text.encode()[: max(size - 1, 0)]
    ctypes.memmove(arg_start, data + b"\0" * (size - len(data)), size)


def made_in_network_namespace(namespace: str, make: Callable[[], _T]) -> _T:
    """`make()` run with the network namespace at `namespace` (/proc/PID/ns/net): a socket it makes
    keeps that namespace. The setns happens on a thread that then exits, so the caller's threads stay
    where they are."""
    result: list[_T | BaseException] = []

    def opener() -> None:
        try:
            with open(namespace, "rb") as f:
                setns(f.fileno(), CLONE_NEWNET)
            result.append(make())
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=opener, name="corral-netns-open")
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3


def seccomp_set_filter(program: bytes, flags: int) -> int:
    """Install a classic-BPF seccomp filter (an array of 8-byte `struct sock_filter`) on the calling
    thread; returns what seccomp(2) returns (the listener fd with NEW_LISTENER)."""
    if _SYS_SECCOMP is None:
        raise OSError(0, f"seccomp: unsupported architecture {_MACHINE}")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    return _check(
        _libc.syscall(
            _SYS_SECCOMP, ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(flags), ctypes.byref(prog)
        ),
        "seccomp(SECCOMP_SET_MODE_FILTER)",
    )

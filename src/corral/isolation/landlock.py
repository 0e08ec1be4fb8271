"""Landlock: the second wall. Writes are allowed only beneath the sandbox's writable paths and /dev.

The mounts already make the host read-only; Landlock enforces the same from inside the process's own
credentials, so a mount mistake (or a future writable bind) does not become a write path. Every
access right the running kernel's ABI knows is handled; reads and execution stay allowed everywhere
the mount namespace shows. ABI 6 scopes also confine signals and abstract UNIX sockets to the sandbox.

Phase: `apply_in_child(writable)` after privileges are dropped, before seccomp.
"""

from __future__ import annotations

import ctypes
import os

from corral.isolation import _linux as L

_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI, or 0 when Landlock is missing or disabled."""
    rc = L.syscall(
        L.SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION)
    )
    return max(rc, 0)


def handled_fs(abi: int) -> int:
    return _FS_BY_ABI.get(abi, _FS_BY_ABI[5]) if abi > 0 else 0


def apply_in_child(writable: list[str], abi: int) -> None:
    handled = handled_fs(abi)
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = _RulesetAttr(handled, 0, scoped)
    # Older ABIs reject the trailing fields they don't know, so pass only the size they understand.
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    fd = L.syscall(
        L.SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    if fd < 0:
        err = L.errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        read_only = EXECUTE | READ_FILE | READ_DIR
        device_rw = READ_FILE | WRITE_FILE | READ_DIR | (TRUNCATE | IOCTL_DEV) & handled
        # /dev/shm is where POSIX shared memory and semaphores live (multiprocessing needs it).
        rules = [("/", read_only), ("/dev", device_rw), ("/dev/shm", handled)]
        rules += [(p, handled) for p in writable]
        for path, access in rules:
            _allow(fd, path, access & handled)
        rc = L.syscall(L.SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0))
        if rc < 0:
            err = L.errno()
            raise OSError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(fd)


def _allow(ruleset_fd: int, path: str, access: int) -> None:
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = _PathBeneath(access, pfd)
        rc = L.syscall(
            L.SYS_LANDLOCK_ADD_RULE,
            ctypes.c_int(ruleset_fd),
            ctypes.c_int(_RULE_PATH_BENEATH),
            ctypes.byref(rule),
            ctypes.c_uint32(0),
        )
        if rc < 0:
            err = L.errno()
            raise OSError(err, f"landlock_add_rule {path}: {os.strerror(err)}")
    finally:
        os.close(pfd)

"""The process monitor: every program started in a sandbox, its lineage and its end, read on the host.

Three sources, each covering what the others can't:
- execve/execveat are reported by the sandbox's seccomp filter (`seccomp.WATCHED`): the caller is
  parked while the supervisor reads the new program's path and arguments from its memory, so even a
  process that lives a millisecond is seen, and a miner can be killed before its first instruction.
- the kernel's process-event connector (netlink) reports every fork and exit on the host as it
  happens; forks give each process the command it was born in, whatever it later reparents to, and
  exits give the status. It lives in the host's initial network namespace only, so a supervisor
  running elsewhere (a test's namespace) opens its socket there first.
- the resource sampler's sweep of the cgroup catches anything the other two missed (a connector
  overrun, a host without it): `ProcessTable.adopt`.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from corral import _procfs
from corral.isolation import _linux
from corral.monitors import _execpath

log = logging.getLogger(__name__)

# What a proc.exec event records of a command line; the rules judge all of it.
RECORDED_ARGS = 4096
RECORDED_ARG_BYTES = 256 * 1024
# The kernel's limits on what execve copies: one argument up to 32 pages with its NUL, and all of
# them with their pointers within 3/4 of the largest stack it allows (6 MiB); beyond, it says E2BIG.
_MAX_ARG_STRLEN = 32 * 4096
_MAX_ARGV_BYTES = 6 << 20


@dataclass
class ProcInfo:
    """What the monitor knows about one process (host pid)."""

    pid: int
    ppid: int
    exec_id: int | None
    exe: str | None = None
    argv: list[str] = field(default_factory=list)
    cwd: str | None = None
    ns_pid: int | None = None
    started: float = field(default_factory=time.time)  # epoch seconds
    stdio: list[str] = field(default_factory=list)
    execed: bool = False  # seen at execve (not only forked)
    exited: bool = False
    exit_code: int | None = None


class ProcessTable:
    """One sandbox's processes. Thread-safe: the supervisor, the connector and the sampler all write."""

    def __init__(self, init_pid: int, current_exec: Callable[[], int | None]) -> None:
        self.init_pid = init_pid
        self._current_exec = current_exec
        self._lock = threading.Lock()
        self._procs: dict[int, ProcInfo] = {}
        # Called if the host-wide process events stop: a sandbox must not run on unwatched.
        self.on_monitor_failure: Callable[[str], None] | None = None
        # Called with each process the connector reports ended.
        self.on_exit_reported: Callable[[ProcInfo], None] | None = None

    def get(self, pid: int) -> ProcInfo | None:
        with self._lock:
            return self._procs.get(pid)

    def alive(self) -> list[ProcInfo]:
        with self._lock:
            return [p for p in self._procs.values() if not p.exited]

    def on_fork(self, ppid: int, pid: int) -> None:
        with self._lock:
            if pid in self._procs:
                return  # the execve was handled first; it already placed the process
            parent = self._procs.get(ppid)
            if ppid == self.init_pid:
                exec_id = self._current_exec()  # init forks only to run the current command
            elif parent is not None:
                exec_id = parent.exec_id
            else:
                return  # not ours
            self._procs[pid] = ProcInfo(
                pid=pid,
                ppid=ppid,
                exec_id=exec_id,
                exe=parent.exe if parent else None,
                argv=list(parent.argv) if parent else [],
                cwd=parent.cwd if parent else None,
            )

    def on_exec(self, info: ProcInfo) -> ProcInfo:
        """Record a program start; the command it belongs to comes from its fork, else its lineage."""
        with self._lock:
            known = self._procs.get(info.pid)
            if known is not None:
                info.exec_id = known.exec_id
                info.started = known.started
            elif info.ppid == self.init_pid:
                info.exec_id = self._current_exec()
            else:
                info.exec_id = self._lineage_exec(info.ppid)
            info.execed = True
            self._procs[info.pid] = info
            return info

    def _lineage_exec(self, ppid: int) -> int | None:
        seen = 0
        pid = ppid
        while seen < 64:
            p = self._procs.get(pid)
            if p is not None:
                return p.exec_id
            parent = _ppid(pid)
            if parent is None or parent == pid or parent <= 1:
                break
            if parent == self.init_pid:
                return self._current_exec()
            pid = parent
            seen += 1
        return self._current_exec()

    def on_exit(self, pid: int, code: int | None) -> ProcInfo | None:
        with self._lock:
            p = self._procs.pop(pid, None)
            if p is None:
                return None
            p.exited = True
            p.exit_code = code
            return p

    def adopt(self, pid: int) -> ProcInfo | None:
        """A process the sweep found that neither the filter nor the connector reported."""
        with self._lock:
            if pid in self._procs or pid == self.init_pid:
                return None
        ppid = _ppid(pid)
        if ppid is None:
            return None
        info = ProcInfo(pid=pid, ppid=ppid, exec_id=None, started=_start_time(pid) or time.time())
        info.argv = cmdline(pid)
        info.exe = exe(pid)
        with self._lock:
            if pid in self._procs:
                return None
            parent = self._procs.get(ppid)
            info.exec_id = parent.exec_id if parent is not None else self._lineage_exec(ppid)
            self._procs[pid] = info
        return info

    def ancestors(self, pid: int) -> list[ProcInfo]:
        """The process's parents inside the sandbox, nearest first (init excluded)."""
        out: list[ProcInfo] = []
        with self._lock:
            p = self._procs.get(pid)
            while p is not None and len(out) < 32 and p.ppid != self.init_pid:
                p = self._procs.get(p.ppid)
                if p is not None:
                    out.append(p)
        return out

    def descendants(self, pid: int) -> list[ProcInfo]:
        with self._lock:
            children: dict[int, list[ProcInfo]] = {}
            for p in self._procs.values():
                children.setdefault(p.ppid, []).append(p)
        out: list[ProcInfo] = []
        todo = [pid]
        while todo and len(out) < 4096:
            for c in children.get(todo.pop(), []):
                out.append(c)
                todo.append(c.pid)
        return out

    def of_exec(self, exec_id: int) -> list[ProcInfo]:
        with self._lock:
            return [p for p in self._procs.values() if p.exec_id == exec_id]


# --- reading a process on the host ---------------------------------------------------------------


def _ppid(pid: int) -> int | None:
    try:
        return int(_procfs.stat_fields(pid)[_procfs.PPID])
    except (OSError, ValueError, IndexError):
        return None


def _start_time(pid: int) -> float | None:
    try:
        ticks = int(_procfs.stat_fields(pid)[_procfs.STARTTIME])
    except (OSError, ValueError, IndexError):
        return None
    return _boot_time() + ticks / _procfs.CLK_TCK


_boot: float | None = None


def _boot_time() -> float:
    global _boot
    if _boot is None:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    _boot = float(line.split()[1])
                    break
            else:
                _boot = time.time() - time.monotonic()
    return _boot


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in data.split(b"\0")[:-1]]


def exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _status(pid: int) -> bytes | None:
    """/proc/PID/status in one read; None when the process is gone."""
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 8192)
    except OSError:
        return None
    finally:
        os.close(fd)


def status_ids(pid: int) -> tuple[int | None, int | None]:
    """(parent's host pid, pid inside the sandbox), from one read of /proc/PID/status."""
    data = _status(pid)
    if data is None:
        return None, None
    try:
        ppid = int(data[data.index(b"\nPPid:") + 6 :].split(None, 1)[0])
        line = data[data.index(b"\nNSpid:") + 7 :].split(b"\n", 1)[0]
        return ppid, int(line.split()[-1])
    except (ValueError, IndexError):
        return None, None


def killed(pid: int) -> bool:
    """Whether a SIGKILL is pending for the process: it is dying, though it may not yet have run
    to act on it (its own or its thread group's pending signals, from /proc/PID/status)."""
    data = _status(pid)
    if data is None:
        return False
    sigkill = 1 << (9 - 1)
    for key in (b"\nSigPnd:", b"\nShdPnd:"):
        at = data.find(key)
        if at >= 0 and int(data[at + len(key) :].split(None, 1)[0], 16) & sigkill:
            return True
    return False


def _read_string(mem: int, addr: int, limit: int) -> bytes:
    """The NUL-terminated string at `addr`, or its first `limit` bytes when it is that long."""
    out = bytearray()
    size = 512  # most strings are short; a long one is read a page at a time
    while len(out) < limit:
        chunk = os.pread(mem, min(size, limit - len(out)), addr + len(out))
        if not chunk:
            break
        nul = chunk.find(b"\0")
        if nul >= 0:
            out += chunk[:nul]
            return bytes(out)
        out += chunk
        size = 4096
    return bytes(out)


def read_exec_call(pid: int, syscall: str, args: tuple[int, ...]) -> tuple[bytes, list[str], int | None, int]:
    """The path and argv an execve/execveat caller passed, read from its memory while it is parked.

    Returns (path, argv, dirfd, flags): dirfd None for AT_FDCWD (and execve), flags execveat's. The
    path stays bytes, exactly as the kernel will read it; PATH_MAX bytes or more means ENAMETOOLONG.
    Another thread of the caller can still rewrite the buffer after this read (see README, limits).
    Raises OSError: E2BIG for an argv past the kernel's limits, EFAULT (or EIO) for unreadable memory.
    """
    if syscall == "execveat":
        path_ptr, argv_ptr = args[1], args[2]
        # int arguments: the kernel reads the low 32 bits, whatever the register's upper half holds.
        low = args[0] & 0xFFFFFFFF
        dirfd: int | None = low - (1 << 32) if low >= 1 << 31 else low
        dirfd = None if dirfd == _execpath.AT_FDCWD else dirfd
        flags = args[4] & 0xFFFFFFFF
    else:
        path_ptr, argv_ptr, dirfd, flags = args[0], args[1], None, 0
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # An unreadable path (a bad pointer) raises here: the caller gets EFAULT, as from the kernel.
        path = _read_string(fd, path_ptr, _execpath.PATH_MAX) if path_ptr else b""
        argv: list[str] = []
        total = 0
        if argv_ptr:
            # All of it: a flag hidden after thousands of filler arguments is still judged.
            ptrs = b""
            while True:
                if not ptrs:
                    ptrs = os.pread(fd, 8 * 64, argv_ptr + 8 * len(argv))
                    ptrs = ptrs[: len(ptrs) - len(ptrs) % 8]
                    if not ptrs:
                        raise OSError(errno.EFAULT, "argv is not readable")
                (p,) = struct.unpack_from("=Q", ptrs)
                ptrs = ptrs[8:]
                if p == 0:
                    break
                s = _read_string(fd, p, _MAX_ARG_STRLEN)
                total += len(s) + 1 + 8
                if len(s) >= _MAX_ARG_STRLEN or total > _MAX_ARGV_BYTES:
                    raise OSError(errno.E2BIG, "argument list too long")
                argv.append(s.decode(errors="replace"))
    finally:
        os.close(fd)
    return path, argv, dirfd, flags


def recorded_argv(argv: list[str]) -> list[str]:
    """The command line as events keep it: bounded, so that one exec can't fill the host's memory."""
    if len(argv) <= RECORDED_ARGS and sum(len(a) for a in argv) <= RECORDED_ARG_BYTES:
        return argv
    out: list[str] = []
    total = 0
    for a in argv[:RECORDED_ARGS]:
        total += len(a) + 1
        if total > RECORDED_ARG_BYTES:
            break
        out.append(a)
    return out


def read_ipv4_sockaddr(pid: int, addr: int) -> tuple[ipaddress.IPv4Address, int] | None:
    """The address and port of the sockaddr_in at `addr` in process `pid`'s memory (a parked
    connect's), or None when it is not AF_INET."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, 8, addr)
    finally:
        os.close(fd)
    if len(raw) < 8:
        return None
    family, port = struct.unpack_from("=HH", raw)
    if family != socket.AF_INET:
        return None
    return ipaddress.IPv4Address(raw[4:8]), socket.ntohs(port)


def is_tcp_socket(pid: int, fd: int) -> bool:
    """Whether descriptor `fd` of process `pid` is an IPv4 TCP socket (a parked connect's): only those
    reach the proxy, so only those may be refused for it (a UDP connect sends nothing)."""
    with socket.socket(fileno=_linux.pidfd_getfd(pid, fd)) as sock:  # reads family, type, protocol
        return (sock.family, sock.type, sock.proto) == (
            socket.AF_INET,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
        )


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """Up to `size` bytes at `addr` in process `pid`'s memory (a parked caller's argument)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, size, addr)
    finally:
        os.close(fd)


class Unfollowable(Exception):
    """A path the host can't resolve the way the kernel will for the sandboxed caller."""


def socket_path(pid: int, path: str) -> str | None:
    """The pathname UNIX socket `path` names for process `pid` (relative to its working directory,
    symlinks resolved inside its root), or None when nothing is there (the kernel then fails the
    call itself). Raises Unfollowable for paths through the sandbox's /proc, whose magic links
    (/proc/self/fd/N, /dev/fd/N) reach whatever file the caller holds open and read differently from
    the host, and for relative paths from a deleted working directory."""
    if not path.startswith("/"):
        cwd = os.readlink(f"/proc/{pid}/cwd")
        if not cwd.startswith("/") or cwd.endswith(" (deleted)"):
            raise Unfollowable(f"relative to a working directory the host can't follow: {cwd}")
        path = os.path.join(cwd, path)
    canonical = in_root_realpath(f"/proc/{pid}/root", path, stop="/proc")
    if canonical == "/proc":
        raise Unfollowable("through /proc")
    return canonical


def in_root_realpath(root: str, path: str, stop: str | None = None) -> str | None:
    """`path` with every symlink resolved as the sandbox sees it: absolute targets start again at the
    sandbox's root, not the host's (the kernel resolves them against the reader's root when walking
    through /proc/PID/root, so the host can't be asked to do it). With `stop`, the walk ends at the
    first step that reaches that directory, and returns that step."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/" + "/".join([*done, part])
        if stop is not None and candidate == stop:
            return candidate
        try:
            st = os.lstat(root + candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                return None  # ELOOP, as the kernel would say
            try:
                target = os.readlink(root + candidate)
            except OSError:
                return None
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(part)
    return "/" + "/".join(done)


def _stdio_links(pid: int) -> Iterator[tuple[int, str | None]]:
    """fds 0-2 of `pid` and what each links to in /proc (None: closed, or the process is gone)."""
    for fd in (0, 1, 2):
        try:
            yield fd, os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            yield fd, None


def stdio_kinds(pid: int) -> tuple[list[str], list[int]]:
    """What fds 0-2 are (socket, pipe, tty, file, null, other, closed), and the pipes' inodes of 0/1."""
    kinds: list[str] = []
    pipes: list[int] = []
    for fd, target in _stdio_links(pid):
        if target is None:
            kinds.append("closed")
        elif target.startswith("socket:["):
            kinds.append("socket" if _is_inet_socket(pid, int(target[8:-1])) else "unix")
        elif target.startswith("pipe:["):
            kinds.append("pipe")
            if fd < 2:
                pipes.append(int(target[6:-1]))
        elif target.startswith(("/dev/pts/", "/dev/tty", "/dev/console")) or target == "/dev/ptmx":
            kinds.append("tty")
        elif target == "/dev/null":
            kinds.append("null")
        elif target.startswith("/"):
            kinds.append("file")
        else:
            kinds.append("other")
    return kinds, pipes


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the TCP and UDP sockets in the network namespace `pid` lives in."""
    out: set[int] = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) > 9:
                        out.add(int(parts[9]))
        except (OSError, ValueError):
            continue
    return out


def _is_inet_socket(pid: int, inode: int) -> bool:
    return inode in _socket_inodes(pid)


# Descriptors one scan reads (a readlink each, about 1-2 us), over all the processes it looks at.
# Unbounded, 60 processes holding 19,000 descriptors each made every exec in their sandbox read 1.1
# million links. Ordinary work stays far below it (128 processes at the default 1,024-descriptor limit
# hold at most 131,072, and rarely a tenth of that).
FD_SCAN_MOST = 65536


class FdScan:
    """A budget of descriptor reads shared by one scan's processes."""

    def __init__(self, most: int = FD_SCAN_MOST) -> None:
        self.left = most
        self.complete = True  # False once a process had descriptors the budget left unread

    def links(self, pid: int) -> list[str]:
        """What `pid`'s descriptors point to, as many as the budget still allows."""
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return []
        if len(fds) > self.left:
            self.complete = False
            fds = fds[: self.left]
        self.left -= len(fds)
        out = []
        for fd in fds:
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
        return out


def pipe_peer_has_socket(pid: int, pipes: list[int], candidates: list[int]) -> bool:
    """Does another process holding one of `pipes` also hold a TCP/UDP socket? True as well when the
    scan's budget ran out first: a shell's relay must not hide behind thousands of descriptors."""
    if not pipes:
        return False
    wanted = {f"pipe:[{i}]" for i in pipes}
    inet = _socket_inodes(pid)
    scan = FdScan()
    for other in candidates:
        if other == pid:
            continue
        holds_pipe = False
        sockets: list[int] = []
        for target in scan.links(other):
            if target in wanted:
                holds_pipe = True
            elif target.startswith("socket:["):
                sockets.append(int(target[8:-1]))
        if holds_pipe and any(s in inet for s in sockets):
            return True
    return not scan.complete


# What the wiring check reads in one sample round of one sandbox: at most WIRING_FDS fds of each
# process (in fd order), and no new process once WIRING_ROUND_FDS have been read. A relay that opens
# more than WIRING_FDS before its socket or its end of the shell's pipe is read only that far; a
# sandbox with more fds open than a round reads is read in turns, each round going on where the last
# stopped (a relay is reached a few rounds late, not never). The bound keeps a sandbox's fd tables
# from buying it the sampler's time.
WIRING_FDS = 512
WIRING_ROUND_FDS = 1024
_O_ACCMODE = 0o3
# Protocol names sockfs reports (the system.sockprotoname attribute) for sockets that reach a network.
_NETWORK_PROTOCOLS = frozenset(
    p + v for p in ("TCP", "UDP", "UDPLITE", "MPTCP", "SCTP", "RAW", "PING") for v in ("", "v6")
)


class Wiring:
    """Where the stdio of a sandbox's processes leads, now: to a network socket directly, or through
    a pipe, fifo or AF_UNIX socketpair to another process of the sandbox that holds one. Read on the
    host, for one sample round; the sandbox's fd tables are read once, on the first question that
    needs them (a process reading its program from stdin through a pipe).
    """

    def __init__(
        self,
        pids: Callable[[], list[int]],
        unix_peer: Callable[[int], int | None] | None = None,
        start: int = 0,
    ) -> None:
        # The sandbox's processes, asked for only if the fd tables are read (not on every execve).
        self._list_pids = pids
        # Node's child_process (libuv) gives a child socketpairs, not pipes, for stdio: the other
        # half has its own inode, which only sock_diag can name.
        self._unix_peer = unix_peer
        self._start = start
        self.resume_at = start  # where the next round's scan should begin, when this one was cut short
        # identity of a pipe, fifo or unix socket -> (pid, fd) of each end held by a process that
        # also holds a network socket
        self._held: dict[tuple[int, ...], list[tuple[int, int]]] | None = None

    def stdio(self, pid: int) -> list[str]:
        """What fds 0-2 are now: socket (a network socket), unix, pipe, fifo, other or closed."""
        kinds = []
        for fd, target in _stdio_links(pid):
            if target is None:
                kinds.append("closed")
                continue
            key = _link_identity(pid, fd, target)
            if key is None:
                kinds.append("other")
            elif key[0] == _SOCKET:
                kinds.append("socket" if _network_socket(pid, fd) else "unix")
            else:
                kinds.append("pipe" if key[0] == _PIPE else "fifo")
        return kinds

    def stdin(self, pid: int) -> str:
        """ "socket", "relay" (a pipe, fifo or unix socket whose other end another process holding a
        network socket writes into) or "none"."""
        return self._lead(pid, 0, want_writer=True)

    def stdout(self, pid: int) -> str:
        """As `stdin`, for fd 1: "relay" when another socket-holding process reads the other end."""
        return self._lead(pid, 1, want_writer=False)

    def _lead(self, pid: int, fd: int, want_writer: bool) -> str:
        key = _fd_identity(pid, fd)
        if key is None:
            return "none"
        if key[0] == _SOCKET:
            if _network_socket(pid, fd):
                return "socket"
            holders = self._holders()
            if not holders or self._unix_peer is None:
                return "none"
            try:
                peer = self._unix_peer(key[1])
            except OSError:
                return "none"
            held = holders.get((_SOCKET, peer), []) if peer is not None else []
            # A stream socket carries both ways: whoever holds the other half feeds and reads it.
            return "relay" if any(other != pid for other, _ in held) else "none"
        for other, ofd in self._holders().get(key, []):
            if other == pid:
                continue
            mode = _access_mode(other, ofd)
            if mode == os.O_RDWR or mode == (os.O_WRONLY if want_writer else os.O_RDONLY):
                return "relay"
        return "none"

    def _holders(self) -> dict[tuple[int, ...], list[tuple[int, int]]]:
        if self._held is not None:
            return self._held
        self._held = {}
        budget = WIRING_ROUND_FDS
        pids = sorted(self._list_pids())
        n = len(pids)
        first = self._start % n if n else 0
        for i in range(n):
            pid = pids[(first + i) % n]
            if budget <= 0:
                self.resume_at = (first + i) % n
                break
            try:
                fds = sorted(os.listdir(f"/proc/{pid}/fd"), key=_fd_number)[:WIRING_FDS]
            except OSError:
                continue
            budget -= len(fds)
            links: list[tuple[int, str]] = []
            networked = False
            for name in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{name}")
                except OSError:
                    continue
                if target.startswith("socket:[") and not networked and _network_socket(pid, int(name)):
                    networked = True
                    continue
                links.append((int(name), target))
            if not networked:
                continue  # pipes held by a process without a network socket lead nowhere
            for fd, target in links:
                key = _link_identity(pid, fd, target)
                if key is not None:
                    self._held.setdefault(key, []).append((pid, fd))
        else:
            self.resume_at = 0
        return self._held


def _network_socket(pid: int, fd: int) -> bool:
    """Whether the fd is a TCP/UDP (or other IP) socket: sockfs names a socket's protocol in an
    attribute of the socket's inode, one call, whatever network namespace the socket lives in."""
    try:
        name = os.getxattr(f"/proc/{pid}/fd/{fd}", "system.sockprotoname")
    except OSError:
        return False
    return name.rstrip(b"\0").decode(errors="replace") in _NETWORK_PROTOCOLS


_SOCKET, _PIPE, _FIFO = 0, 1, 2


def _fd_number(name: str) -> int:
    return int(name) if name.isdigit() else 1 << 31


def _fd_identity(pid: int, fd: int) -> tuple[int, ...] | None:
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return _link_identity(pid, fd, target)


def _link_identity(pid: int, fd: int, target: str) -> tuple[int, ...] | None:
    """(_SOCKET, inode), (_PIPE, inode) or (_FIFO, dev, inode) for what an fd is, else None. A fifo
    shows as its path, not as pipe:[N], so it is told by the file's type and named by dev and inode
    (another process may reach the same fifo by another path)."""
    if target.startswith("socket:["):
        return (_SOCKET, int(target[8:-1]))
    if target.startswith("pipe:["):
        return (_PIPE, int(target[6:-1]))
    if not target.startswith("/"):
        return None
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return (_FIFO, st.st_dev, st.st_ino) if stat.S_ISFIFO(st.st_mode) else None


def _access_mode(pid: int, fd: int) -> int | None:
    """O_RDONLY, O_WRONLY or O_RDWR: which way a process holds its end of a pipe or fifo."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            data = f.read(4096)
        at = data.index(b"flags:")
        return int(data[at + 6 :].split(None, 1)[0], 8) & _O_ACCMODE
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ContentRef:
    """The bytes of a program and of the script it runs, read on demand and identified by file
    identity, so that a rule's verdict on /usr/bin/cc1 is computed once, not at every compile."""

    paths: tuple[str, ...]  # host paths (through /proc/PID/root)
    identity: tuple[tuple[int, int, int, int], ...]
    follow: tuple[bool, ...] = ()  # per path: a magic link (an fd) to follow, not a name

    LIMIT = 32 << 20

    def read(self) -> bytes:
        parts = []
        for i, p in enumerate(self.paths):
            # A program run from its fd is read through that fd's magic link, which must be
            # followed; any other path is canonical already, so a symlink there is a swap.
            follow = i < len(self.follow) and self.follow[i]
            nofollow = 0 if follow else os.O_NOFOLLOW
            try:
                fd = os.open(p, os.O_RDONLY | nofollow | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if not _is_regular(fd):
                    continue
                with os.fdopen(fd, "rb", closefd=False) as f:
                    parts.append(f.read(self.LIMIT))
            finally:
                os.close(fd)
        return b"\0".join(parts)


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


# Programs whose first file argument is code they run: its bytes are the program as much as theirs.
INTERPRETERS = frozenset(
    {"sh", "bash", "dash", "zsh", "ksh", "mksh", "busybox", "perl", "ruby", "php", "node", "nodejs", "lua"}
    | {"python", "python2", "python3", "tclsh", "awk", "gawk", "mawk", "Rscript", "julia"}
)


def content_ref(
    pid: int, target: _execpath.ExecTarget, argv: list[str], also: Sequence[_execpath.ExecTarget] = ()
) -> ContentRef | None:
    """The program (`target`, from `_execpath.resolve`), plus, for an interpreter, the first argument
    that names a regular file (the script it runs), resolved as the parked caller `pid` would; plus
    `also` (a `#!` script's interpreter)."""
    targets = [target, *also]
    name = os.path.basename(target.exe)
    if name in INTERPRETERS or name.startswith("python"):
        for a in argv[1:4]:
            if a.startswith("-") or not a:
                continue
            try:
                script = _execpath.resolve(pid, os.fsencode(a), None, executable=False)
            except _execpath.ExecUnresolved:
                script = None
            if isinstance(script, _execpath.ExecTarget):
                targets.append(script)
            break
    return ContentRef(
        tuple(t.host_path for t in targets),
        tuple(t.identity for t in targets),
        tuple(t.follow for t in targets),
    )


# --- the kernel's process events -----------------------------------------------------------------

_NETLINK_CONNECTOR = 11
_CN_IDX_PROC = 1
_CN_VAL_PROC = 1
_PROC_CN_MCAST_LISTEN = 1
_PROC_EVENT_FORK = 0x00000001
_PROC_EVENT_EXIT = 0x80000000
_NLMSG_HDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HDR = struct.Struct("=IIQ")  # what, cpu, timestamp_ns


class Connector:
    """Host-wide fork/exit events, dispatched to the process table that owns the parent (fork) or
    the process (exit). One thread and one socket for every sandbox in this supervisor."""

    def __init__(self) -> None:
        self._owners: dict[int, ProcessTable] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.error: str | None = None

    def start(self) -> bool:
        """Open the socket (once). False, with `error` set, if this host can't give process events."""
        with self._lock:
            if self._sock is not None:
                return True
            if self.error is not None:
                return False
            try:
                self._sock = _open_connector()
            except OSError as e:
                self.error = f"process-event connector unavailable ({e.strerror or e})"
                return False
            self._thread = threading.Thread(target=self._run, name="corral-proc-events", daemon=True)
            self._thread.start()
            return True

    def watch(self, pid: int, table: ProcessTable) -> None:
        with self._lock:
            self._owners[pid] = table

    def forget(self, table: ProcessTable) -> None:
        with self._lock:
            for pid in [p for p, t in self._owners.items() if t is table]:
                del self._owners[pid]

    def stop(self) -> None:
        """Close the socket (its owner's sandboxes are all closed). The thread, blocked in a receive,
        ends at the next event on the host, which it no longer reports."""
        with self._lock:
            sock, self._sock = self._sock, None
            self.error = "stopped"
            self._owners.clear()
        if sock is not None:
            sock.close()

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(1 << 16)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue  # overrun: the sampler's sweep adopts what was lost
                if self._sock is not None:
                    self._failed(f"process events stopped: {e}")
                return
            off = 0
            while off + _NLMSG_HDR.size <= len(data):
                length = _NLMSG_HDR.unpack_from(data, off)[0]
                if length < _NLMSG_HDR.size:
                    break
                self._handle(data, off + _NLMSG_HDR.size + _CN_MSG.size)
                off += (length + 3) & ~3

    def _failed(self, reason: str) -> None:
        """Fail closed: every sandbox this connector watched is told (and stopped by its owner)."""
        log.error("%s", reason)
        with self._lock:
            self.error = reason
            tables = {id(t): t for t in self._owners.values()}.values()
            self._owners.clear()
        for t in tables:
            if t.on_monitor_failure is not None:
                t.on_monitor_failure(reason)

    def _handle(self, data: bytes, off: int) -> None:
        if off + _EVENT_HDR.size > len(data):
            return
        what = _EVENT_HDR.unpack_from(data, off)[0]
        body = off + _EVENT_HDR.size
        if what == _PROC_EVENT_FORK:
            _, ptgid, cpid, ctgid = struct.unpack_from("=iiii", data, body)
            if cpid != ctgid:
                return  # a new thread, not a process
            with self._lock:
                table = self._owners.get(ptgid)
                if table is not None:
                    self._owners[ctgid] = table
            if table is not None:
                table.on_fork(ptgid, ctgid)
        elif what == _PROC_EVENT_EXIT:
            pid, tgid, code, _sig = struct.unpack_from("=iiII", data, body)
            if pid != tgid:
                return
            with self._lock:
                table = self._owners.pop(tgid, None)
            if table is not None:
                info = table.on_exit(tgid, _exit_code(code))
                if info is not None and table.on_exit_reported is not None:
                    table.on_exit_reported(info)


def _exit_code(status: int) -> int:
    if status & 0x7F:
        return 128 + (status & 0x7F)
    return (status >> 8) & 0xFF


def _open_connector() -> socket.socket:
    """The connector socket. The kernel serves process events only in the host's initial network
    namespace; a supervisor running in another one (the test suite's loopback-only namespace) opens
    its socket in the namespace of the nearest ancestor where the connector answers."""
    try:
        return _subscribe()
    except OSError as first:
        if first.errno not in (errno.ECONNREFUSED, errno.EPROTONOSUPPORT):
            raise
        error: OSError = first
    own = os.stat("/proc/self/ns/net").st_ino
    pid = os.getppid()
    tried: set[int] = {own}
    while pid > 1:
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            ino = None
        if ino is not None and ino not in tried:
            tried.add(ino)
            try:
                return _subscribe_in(f"/proc/{pid}/ns/net")
            except OSError as e:
                error = e
        parent = _ppid(pid)
        if parent is None or parent == pid:
            break
        pid = parent
    raise error


def _subscribe_in(namespace: str) -> socket.socket:
    return _linux.made_in_network_namespace(namespace, _subscribe)


def _subscribe() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_CONNECTOR)
    try:
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: bursts of forks
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((0, _CN_IDX_PROC))
        op = struct.pack("=I", _PROC_CN_MCAST_LISTEN)
        cn = _CN_MSG.pack(_CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(op), 0) + op
        s.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(cn), 3, 0, 0, 0) + cn)  # NLMSG_DONE
        return s
    except BaseException:
        s.close()
        raise


def started_at(info: ProcInfo) -> datetime:
    return datetime.fromtimestamp(info.started, UTC)

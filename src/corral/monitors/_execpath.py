"""Which file an execve/execveat runs, worked out on the host while its caller is parked.

The answer must be the kernel's, or the exec must not happen: a program named wrongly is a program
judged wrongly. The path is walked one component at a time under /proc/PID/root, each symlink
resolved as the sandbox sees it (absolute targets start again at the sandbox's root). The sandbox's
procfs needs more: /proc/self and /proc/thread-self name whoever reads them, and the supervisor reads
from another pid namespace, so they are replaced by the caller's own ids; the magic links (root, cwd,
exe, fd/N) point at open files, not names, so the host follows them itself and, to go on walking
below one, checks that the name it reads back is that very directory.

`resolve` has three answers: an `ExecTarget` (judge it, then let the kernel run it), an errno (the
call is bound to fail: the supervisor gives the kernel's own answer, so a wrong "no such file" can
never let a program run, and a PATH probe stays cheap), or `ExecUnresolved` (refused, with a reason).

A program started through the dynamic loader (`ld.so PROGRAM`) is judged as PROGRAM: `is_loader`
and `loaded_program` find it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from dataclasses import dataclass

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
AT_EXECVE_CHECK = 0x10000  # Linux 6.14: check the file could be executed, without executing it
_KNOWN_FLAGS = AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | AT_EXECVE_CHECK
PATH_MAX = 4096  # bytes with the terminating NUL, as getname() counts
_NAME_MAX = 255
_MAX_HOPS = 40  # symlinks followed in one lookup before ELOOP, as the kernel counts

# Links under /proc/<pid>/ (and task/<tid>/) that point at an open file rather than a name.
_MAGIC = re.compile(rb"^\d+/(?:task/\d+/)?(root|cwd|exe|fd/\d+)$")

Identity = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size
_CACHE_MAX = 4096  # file versions remembered per cache (loader or not, `#!` line)


class ExecUnresolved(Exception):
    """The monitor cannot say with certainty which file the exec would run."""


@dataclass(frozen=True)
class ExecTarget:
    exe: str  # the program as the sandbox names it (for an fd: what the fd is, e.g. /memfd:x (deleted))
    host_path: str  # where the host reads its bytes
    follow: bool  # host_path is a magic link (an fd, a process's exe) that reading must follow
    identity: Identity


def _ident(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _split(path: bytes) -> list[bytes]:
    return [p for p in path.split(b"/") if p]


class _Caller:
    """The parked caller: its host tid, and (read only when a path needs them) its ids in the sandbox."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.root = f"/proc/{pid}/root".encode()
        self._ns: tuple[bytes, bytes] | None = None

    def ns_ids(self) -> tuple[bytes, bytes]:
        """(thread group id, thread id) in the sandbox's pid namespace: what /proc/self and
        /proc/thread-self mean to the caller."""
        if self._ns is None:
            try:
                with open(f"/proc/{self.pid}/status", "rb") as f:
                    data = f.read(8192)
                tgid = data[data.index(b"\nNStgid:") + 8 :].split(b"\n", 1)[0].split()[-1]
                tid = data[data.index(b"\nNSpid:") + 7 :].split(b"\n", 1)[0].split()[-1]
            except (OSError, ValueError, IndexError) as e:
                raise ExecUnresolved(f"cannot read the caller's ids in the sandbox ({e})") from None
            self._ns = (tgid, tid)
        return self._ns


def resolve(
    pid: int, path: bytes, dirfd: int | None, flags: int = 0, *, executable: bool = True
) -> ExecTarget | int:
    """The file that execveat(dirfd, path, ..., flags) by host thread `pid` would run (dirfd None:
    AT_FDCWD, as for execve), or the errno the kernel would fail it with. `executable=False` for a
    file opened rather than executed (a program the dynamic loader maps: no execute bit needed)."""
    if flags & ~_KNOWN_FLAGS:
        return errno.EINVAL
    if len(path) >= PATH_MAX:
        return errno.ENAMETOOLONG
    caller = _Caller(pid)
    if not path:
        if not flags & AT_EMPTY_PATH:
            return errno.ENOENT
        if dirfd is None:
            return errno.EACCES  # the working directory itself: not a regular file
        if dirfd < 0:
            return errno.EBADF
        return _final_magic(f"/proc/{pid}/fd/{dirfd}".encode(), executable)
    if path.startswith(b"/"):
        done: list[bytes] = []
    elif dirfd is None:
        done = _anchor(caller, f"/proc/{pid}/cwd".encode(), "the working directory")
    elif dirfd < 0:
        return errno.EBADF
    else:
        anchored = _anchor_fd(caller, dirfd)
        if isinstance(anchored, int):
            return anchored
        done = anchored
    return _walk(caller, done, _split(path), path.endswith(b"/"), flags, executable)


def _anchor(caller: _Caller, link: bytes, what: str) -> list[bytes]:
    """The sandbox's name for the directory a magic link points at, checked to be that directory:
    the name read back can be stale (" (deleted)") or a name another file now has."""
    try:
        st = os.stat(link)
        text = os.readlink(link)
    except OSError as e:
        raise ExecUnresolved(f"cannot read {what} ({e.strerror})") from None
    if text.startswith(b"/"):
        try:
            named = os.stat(caller.root + text, follow_symlinks=False)
        except OSError:
            named = None
        if named is not None and (named.st_dev, named.st_ino) == (st.st_dev, st.st_ino):
            return _split(text)
    raise ExecUnresolved(f"{what} ({text.decode(errors='replace')!r}) has no name in the sandbox")


def _anchor_fd(caller: _Caller, dirfd: int) -> list[bytes] | int:
    link = f"/proc/{caller.pid}/fd/{dirfd}".encode()
    try:
        st = os.stat(link)
    except FileNotFoundError:
        return errno.EBADF
    except OSError as e:
        raise ExecUnresolved(f"cannot read file descriptor {dirfd} ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        return errno.ENOTDIR
    return _anchor(caller, link, f"file descriptor {dirfd}")


def _walk(
    caller: _Caller, done: list[bytes], parts: list[bytes], trailing: bool, flags: int, executable: bool
) -> ExecTarget | int:
    root = caller.root
    hops = 0
    last: os.stat_result | None = None
    while parts:
        part = parts.pop(0)
        if len(part) > _NAME_MAX:
            return errno.ENAMETOOLONG
        if part == b".":
            continue
        if part == b"..":
            # `done` is canonical (symlinks already resolved), so its parent is the real parent.
            if done:
                done.pop()
            last = None
            continue
        name = b"/" + b"/".join([*done, part])
        try:
            st = os.lstat(root + name)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                return e.errno
            raise ExecUnresolved(f"cannot look up {name.decode(errors='replace')} ({e.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            if not parts and not trailing and flags & AT_SYMLINK_NOFOLLOW:
                return errno.ELOOP
            hops += 1
            if hops > _MAX_HOPS:
                return errno.ELOOP
            if done[:1] == [b"proc"]:
                # Only procfs has links whose meaning depends on the reader, and corral mounts the
                # sandbox's procfs at /proc alone (the agent can't mount), so `name` is canonical here.
                step = _proc_link(caller, name, final=not parts and not trailing, executable=executable)
                if isinstance(step, ExecTarget | int):
                    return step
                new_done, prefix = step
                if new_done is not None:
                    done = new_done
                parts = prefix + parts
                last = None
                continue
            try:
                target = os.readlink(root + name)
            except OSError as e:
                raise ExecUnresolved(f"cannot read the link {name.decode(errors='replace')}") from e
            if target.startswith(b"/"):
                done = []
            parts = _split(target) + parts
            if target.endswith(b"/") and not parts:
                trailing = True
            last = None
            continue
        if not stat.S_ISDIR(st.st_mode) and (parts or trailing):
            return errno.ENOTDIR
        done.append(part)
        last = st
    canonical = b"/" + b"/".join(done)
    if last is None:  # the walk ended on "..", "." or the root: look at what it names
        try:
            last = os.lstat(root + canonical)
        except OSError as e:
            return e.errno or errno.ENOENT
    return _judgeable(
        last, canonical.decode(errors="replace"), os.fsdecode(root + canonical), False, executable
    )


def _judgeable(st: os.stat_result, exe: str, host: str, follow: bool, executable: bool) -> ExecTarget | int:
    """EACCES where the kernel refuses to execute the file (a directory, a device, no execute bit)."""
    if not stat.S_ISREG(st.st_mode) or (executable and not st.st_mode & 0o111):
        return errno.EACCES
    return ExecTarget(exe, host, follow, _ident(st))


def _final_magic(link: bytes, executable: bool) -> ExecTarget | int:
    """The file a magic link points at, as the host reaches it: the very file, deleted or not."""
    try:
        st = os.stat(link)
        text = os.readlink(link)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            return errno.ENOENT
        raise ExecUnresolved(f"cannot follow {link.decode(errors='replace')} ({e.strerror})") from None
    return _judgeable(st, text.decode(errors="replace"), os.fsdecode(link), True, executable)


def _proc_link(
    caller: _Caller, name: bytes, *, final: bool, executable: bool
) -> ExecTarget | int | tuple[list[bytes] | None, list[bytes]]:
    """One symlink in the sandbox's procfs: a file (the end of the walk), an errno, or where the walk
    goes on (a new canonical prefix, or None to stay in /proc; and components to walk first)."""
    rel = name[len(b"/proc/") :]
    if rel == b"self":
        return None, [caller.ns_ids()[0]]
    if rel == b"thread-self":
        tgid, tid = caller.ns_ids()
        return None, [tgid, b"task", tid]
    link = caller.root + name
    m = _MAGIC.match(rel)
    if m is None:
        # Plain procfs links (/proc/mounts -> self/mounts, /proc/net -> self/net) read the same to
        # anyone; other magic ones (ns/*, map_files/*) are not modelled.
        try:
            text = os.readlink(link)
        except OSError as e:
            raise ExecUnresolved(f"cannot read the link {name.decode(errors='replace')}") from e
        if text.startswith(b"/") or b":" in text:
            raise ExecUnresolved(
                f"{name.decode(errors='replace')} is a procfs link the monitor does not follow"
            )
        return None, _split(text)
    if final:
        return _final_magic(link, executable)
    # Walked through: it must be a directory, named the same by the caller and the host.
    try:
        st = os.stat(link)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):
            return errno.ENOENT
        raise ExecUnresolved(f"cannot follow {name.decode(errors='replace')} ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        return errno.ENOTDIR
    if m.group(1) == b"root":
        try:
            own = os.stat(caller.root)
        except OSError as e:
            raise ExecUnresolved(f"cannot read the caller's root ({e.strerror})") from None
        if (own.st_dev, own.st_ino) != (st.st_dev, st.st_ino):
            raise ExecUnresolved(f"{name.decode(errors='replace')} is not the caller's root")
        return [], []
    return _anchor(caller, link, name.decode(errors="replace")), []


# --- scripts --------------------------------------------------------------------------------------

_SHEBANG_CACHE: dict[Identity, tuple[bytes, bytes | None] | None] = {}
_BINPRM_BUF = 256  # how much of a file the kernel reads to find its `#!` line
MAX_SCRIPT_DEPTH = 4  # interpreters that are scripts themselves, before the kernel says ELOOP


def shebang(target: ExecTarget) -> tuple[bytes, bytes | None] | None:
    """The interpreter a `#!` script names and its one optional argument, parsed as the kernel
    does (read once per file version), or None for any other file."""
    if target.identity in _SHEBANG_CACHE:
        return _SHEBANG_CACHE[target.identity]
    found: tuple[bytes, bytes | None] | None = None
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if target.follow else os.O_NOFOLLOW)
    try:
        fd = os.open(target.host_path, flags)
    except OSError:
        fd = -1
    if fd >= 0:
        try:
            head = os.pread(fd, _BINPRM_BUF, 0)
        except OSError:
            head = b""
        finally:
            os.close(fd)
        if head.startswith(b"#!"):
            line = head[2:].split(b"\n", 1)[0].split(b"\0", 1)[0].strip(b" \t\r")
            interp, _, arg = line.replace(b"\t", b" ").partition(b" ")
            if interp:
                found = (interp, arg.strip(b" ") or None)
    if len(_SHEBANG_CACHE) >= _CACHE_MAX:
        _SHEBANG_CACHE.clear()
    _SHEBANG_CACHE[target.identity] = found
    return found


# --- the dynamic loader ----------------------------------------------------------------------------

# The loader's own names (glibc: ld-linux-x86-64.so.2, ld-linux-aarch64.so.1, ld64.so.2, ld-2.31.so;
# musl: ld-musl-x86_64.so.1, a link to its libc, which is the loader too).
_LOADER_NAME = re.compile(
    r"^(?:ld-linux[^/]*\.so[^/]*|ld-[^/]*\.so[^/]*|ld64\.so[^/]*|ld-musl[^/]*|libc\.musl[^/]*)$"
)
_LOADER_CACHE: dict[Identity, bool] = {}

# ld.so options, glibc's and musl's. Those taking a value take the next argument (musl also accepts
# --option=value); the first argument after the options is the program.
_LD_VALUE = frozenset(
    {
        "--library-path",
        "--preload",
        "--argv0",
        "--audit",
        "--inhibit-rpath",
        "--glibc-hwcaps-prepend",
        "--glibc-hwcaps-mask",
    }
)
_LD_FLAG = frozenset(
    {"--list", "--verify", "--inhibit-cache", "--list-tunables", "--list-diagnostics", "--help", "--version"}
)


def is_loader(target: ExecTarget) -> bool:
    """Whether the program is a dynamic loader, by its name or, for a renamed copy, by the SONAME an
    ELF without an interpreter of its own declares (read once per file version)."""
    if _LOADER_NAME.match(os.path.basename(target.exe)):
        return True
    known = _LOADER_CACHE.get(target.identity)
    if known is None:
        known = _soname_is_loader(target)
        if len(_LOADER_CACHE) >= _CACHE_MAX:
            _LOADER_CACHE.clear()
        _LOADER_CACHE[target.identity] = known
    return known


def _soname_is_loader(target: ExecTarget) -> bool:
    try:
        fd = os.open(
            target.host_path,
            os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if target.follow else os.O_NOFOLLOW),
        )
    except OSError:
        return False
    try:
        soname = _elf_soname(fd)
    except (OSError, struct.error):
        return False
    finally:
        os.close(fd)
    return soname is not None and _LOADER_NAME.match(soname.decode(errors="replace")) is not None


def _elf_soname(fd: int) -> bytes | None:
    """DT_SONAME of a 64-bit ELF shared object that has no PT_INTERP (a loader runs without one)."""
    head = os.pread(fd, 64, 0)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
        return None
    end = "<" if head[5] == 1 else ">"
    (e_type,) = struct.unpack_from(end + "H", head, 16)
    (e_phoff,) = struct.unpack_from(end + "Q", head, 32)
    e_phentsize, e_phnum = struct.unpack_from(end + "HH", head, 54)
    if e_type != 3 or e_phentsize < 56 or not 0 < e_phnum <= 64:
        return None
    ph = os.pread(fd, e_phentsize * e_phnum, e_phoff)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(e_phnum):
        p_type, _fl, p_offset, p_vaddr, _pa, p_filesz = struct.unpack_from(
            end + "IIQQQQ", ph, i * e_phentsize
        )
        if p_type == 3:  # PT_INTERP: an ordinary program, run by a loader
            return None
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, min(p_filesz, 1 << 16))
    if dynamic is None:
        return None
    data = os.pread(fd, dynamic[1], dynamic[0])
    strtab = soname = None
    for off in range(0, len(data) - 15, 16):
        tag, val = struct.unpack_from(end + "qQ", data, off)
        if tag == 0:
            break
        if tag == 5:
            strtab = val
        elif tag == 14:
            soname = val
    if strtab is None or soname is None:
        return None
    for vaddr, offset, size in loads:
        if vaddr <= strtab < vaddr + size:
            return os.pread(fd, 256, offset + strtab - vaddr + soname).split(b"\0", 1)[0]
    return None


@dataclass(frozen=True)
class Loaded:
    """What `ld.so [OPTIONS] PROGRAM ARGS` runs."""

    index: int  # of PROGRAM in the loader's argv
    argv: list[str]  # the program's own argv (argv[0] as --argv0 sets it)


def loaded_program(argv: list[str]) -> Loaded | None:
    """The program a loader's command line names, or None when it names none (--help, --version)."""
    i = 1
    argv0: str | None = None
    while i < len(argv):
        a = argv[i]
        if a == "--":  # musl ends its options here; glibc refuses it and runs nothing
            i += 1
            break
        option, eq, value = a.partition("=")
        if option in _LD_VALUE:
            if not eq:
                if i + 1 >= len(argv):
                    return None
                value = argv[i + 1]
                i += 1
            if option == "--argv0":
                argv0 = value
            i += 1
            continue
        if a in _LD_FLAG:
            i += 1
            continue
        break  # the program (glibc takes an unknown "-x" for one, too)
    if i >= len(argv):
        return None
    return Loaded(i, [argv0 if argv0 is not None else argv[i], *argv[i + 1 :]])

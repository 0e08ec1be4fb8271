"""Saving a sandbox's workspace to the host without ever following a link on either side.

The source is the frozen sandbox's /workspace (nothing in it can change while we copy); the
destination is a host directory that may hold anything, including symlinks a user or an earlier
sandbox left there. Every destination operation is relative to a directory fd opened with
O_NOFOLLOW, existing entries are removed rather than written through (a symlink or a hard link there
would otherwise carry root's writes outside the workspace), and only directories, regular files and
symlinks (as links) are copied, with permission bits only: no setuid, setgid or sticky bits.
"""

from __future__ import annotations

import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def mirror(src: str, dst: str) -> None:
    """Make the host directory `dst` an exact copy of `src` (deletions included)."""
    os.makedirs(dst, mode=0o755, exist_ok=True)
    dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the top is the caller's choice
    try:
        _mirror_dir(src, dfd)
    finally:
        os.close(dfd)


def _kind(name: str, dfd: int) -> int | None:
    try:
        return stat.S_IFMT(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return None


def _remove(name: str, dfd: int) -> None:
    if _kind(name, dfd) == stat.S_IFDIR:
        sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            for child in os.listdir(sub):
                _remove(child, sub)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _mirror_dir(src: str, dfd: int) -> None:
    names = set(os.listdir(src))
    for name in os.listdir(dfd):
        if name not in names:
            _remove(name, dfd)
    for name in sorted(names):
        path = os.path.join(src, name)
        st = os.lstat(path)
        kind = _kind(name, dfd)
        mode = stat.S_IMODE(st.st_mode) & 0o777
        if stat.S_ISDIR(st.st_mode):
            if kind is not None and kind != stat.S_IFDIR:
                _remove(name, dfd)
                kind = None
            if kind is None:
                os.mkdir(name, 0o700, dir_fd=dfd)
            sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            try:
                os.fchmod(sub, mode)
                _mirror_dir(path, sub)
            finally:
                os.close(sub)
            continue
        if kind is not None:
            _remove(name, dfd)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), name, dir_fd=dfd)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(path, name, dfd, mode)
        # fifos, sockets and device nodes are not copied


def _copy_file(path: str, name: str, dfd: int, mode: int) -> None:
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        out = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
        )
        try:
            while os.sendfile(out, src, None, 1 << 24):
                pass
            os.fchmod(out, mode)
        finally:
            os.close(out)
    finally:
        os.close(src)

"""Saving a sandbox's workspace to the host without ever following a link on either side.

The source is the frozen sandbox's /workspace (nothing in it can change while we copy); the
destination is a host directory that may hold anything, including symlinks a user or an earlier
sandbox left there. Every destination operation is relative to a directory fd opened with
O_NOFOLLOW, existing entries are removed rather than written through (a symlink or a hard link there
would otherwise carry root's writes outside the workspace), and only directories, regular files and
symlinks (as links) are copied, with permission bits only: no setuid, setgid or sticky bits.

What lands on the host is bounded by the sandbox's disk budget, not by what its files claim to be:
holes stay holes (only the data extents are copied, found with SEEK_DATA/SEEK_HOLE), a hard link stays
a link to the file already saved, and the data written is counted in 4 KiB blocks against `limit`. A
file that does not fit in what is left is not written at all (never half) and is listed in the
returned `Saved`; the caller records the refusal.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_BLOCK = 4096  # what a host filesystem allocates at least, per data extent


@dataclass
class Saved:
    """What `mirror` wrote: data bytes (in whole blocks), and the files it refused for the budget."""

    limit: int | None
    files: int = 0
    bytes: int = 0
    links: int = 0  # hard links made to a file already saved (no data written)
    refused: list[str] = field(default_factory=list)  # paths relative to the workspace, in copy order
    refused_bytes: int = 0

    def describe(self) -> str:
        """One line for a `deny` event: what was saved, and what was not."""
        shown = ", ".join(self.refused[:5]) + (
            f" and {len(self.refused) - 5} more" if len(self.refused) > 5 else ""
        )
        return (
            f"disk budget of {self.limit} bytes reached while saving the workspace: saved {self.files} "
            f"file(s) ({self.bytes} bytes of data) and {self.links} hard link(s); not saved, and absent "
            f"from the saved copy: {len(self.refused)} file(s) ({self.refused_bytes} bytes of data): {shown}"
        )


@dataclass
class _Copy:
    top: int  # the destination's top directory
    saved: Saved
    # (st_dev, st_ino) of a source file with several links -> its saved copy, relative to `top`
    linked: dict[tuple[int, int], str] = field(default_factory=dict)


def mirror(src: str, dst: str, *, limit: int | None = None) -> Saved:
    """Make the host directory `dst` an exact copy of `src` (deletions included), writing at most
    `limit` bytes of file data (None: no limit)."""
    os.makedirs(dst, mode=0o755, exist_ok=True)
    dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the top is the caller's choice
    copy = _Copy(dfd, Saved(limit))
    try:
        _mirror_dir(src, dfd, "", copy)
    finally:
        os.close(dfd)
    return copy.saved


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


def _mirror_dir(src: str, dfd: int, rel: str, copy: _Copy) -> None:
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
                _mirror_dir(path, sub, f"{rel}{name}/", copy)
            finally:
                os.close(sub)
            continue
        if kind is not None:
            _remove(name, dfd)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path), name, dir_fd=dfd)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in copy.linked:
                # Copied once per name, 60 links to a 4 MiB file would write 240 MiB.
                os.link(copy.linked[key], name, src_dir_fd=copy.top, dst_dir_fd=dfd, follow_symlinks=False)
                copy.saved.links += 1
            elif _copy_file(path, name, dfd, mode, f"{rel}{name}", copy.saved) and st.st_nlink > 1:
                copy.linked[key] = f"{rel}{name}"
        # fifos, sockets and device nodes are not copied


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data extent of the file open at `fd`; holes are skipped."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        offset = end


def _copy_file(path: str, name: str, dfd: int, mode: int, rel: str, saved: Saved) -> bool:
    """Copy one regular file's data extents; False (nothing written) when it does not fit the budget."""
    src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        extents = list(_extents(src, size))
        need = sum(-(-length // _BLOCK) * _BLOCK for _, length in extents)
        if saved.limit is not None and saved.bytes + need > saved.limit:
            saved.refused.append(rel)
            saved.refused_bytes += need
            return False
        out = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
        )
        try:
            for start, length in extents:
                os.lseek(out, start, os.SEEK_SET)
                done = 0
                while done < length:
                    sent = os.sendfile(out, src, start + done, min(length - done, 1 << 24))
                    if sent == 0:
                        break  # the file shrank under us: what is left is a hole
                    done += sent
            os.ftruncate(out, size)  # holes at the end, and the exact length
            os.fchmod(out, mode)
        except BaseException:
            # A failed write (the host's disk full) must not leave a file that looks saved.
            os.unlink(name, dir_fd=dfd)
            raise
        finally:
            os.close(out)
        saved.files += 1
        saved.bytes += need
        return True
    finally:
        os.close(src)

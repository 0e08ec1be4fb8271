"""The workspace's way in and out: copied into the sandbox's /workspace at its start, saved to the
host at its close."""

from __future__ import annotations

import os
import shutil

from corral.runtime import _fscopy


def copy_in(src: str, dst: str, uid: int) -> None:
    """Copy the host directory `src` to `dst` (the sandbox's /workspace, seen from the host), owned by
    the sandbox's uid."""
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    for root, dirs, files in os.walk(dst):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, uid)


def copy_out(workspace_fd: int, dst: str, limit: int) -> str | None:
    """Save /workspace to `dst`; runs with every sandbox process frozen (see `_fscopy`). What was left
    out for going over `limit`, described; None when everything was saved.

    Read through the descriptor held since the start, so a dead init doesn't lose it. At most `limit`
    bytes of data reach the host: the sandbox's own storage holds no more, and holes and hard links
    are kept as such.
    """
    saved = _fscopy.mirror(f"/proc/self/fd/{workspace_fd}", dst, limit=limit)
    return saved.describe() if saved.refused else None

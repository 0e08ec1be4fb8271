"""What corral keeps under /run/corral for the sandboxes of every supervisor on this machine: a
state directory per sandbox with its owner record, a uid claim per sandbox, and the sweep that
removes what a dead supervisor left behind."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import time
from pathlib import Path

import psutil

from corral.isolation import cgroups

STATE_ROOT = "/run/corral"
OWNER_FILE = "owner"  # in the state directory: the supervisor that created the sandbox
_UID_BASE = 1_300_000  # far above any distribution's range; one uid per sandbox
_UID_RANGE = 1_000_000


def owner_record(pid: int) -> str:
    """The supervisor process `pid` as "pid start-time": the pid alone may be reused by the time
    someone reads it."""
    return f"{pid} {psutil.Process(pid).create_time()!r}"


@functools.cache
def own_record(pid: int) -> str:
    """This supervisor's `owner_record`, read once (keyed by pid, so a forked child has its own)."""
    return owner_record(pid)


def write_owner(state_dir: str) -> None:
    Path(f"{state_dir}/{OWNER_FILE}").write_text(own_record(os.getpid()))


def owner_alive(state_dir: str) -> bool | None:
    """Whether the supervisor recorded in `state_dir` still runs; None when it recorded none."""
    try:
        recorded = Path(f"{state_dir}/{OWNER_FILE}").read_text()
        pid = int(recorded.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        return owner_record(pid) == recorded
    except psutil.NoSuchProcess:
        return False


def claim_uid(sandbox_id: str, taken: set[int]) -> int:
    """A uid no other sandbox on this host uses, from any supervisor process; `taken` holds this
    process's own claims (the caller serialises calls).

    The claim is a symlink /run/corral/uid-N -> <sandbox id>, created atomically; two supervisors
    (say, Ray workers on one node) can't both win it. Sandboxes of one uid could signal each other
    and would share per-user kernel limits.
    """
    os.makedirs(STATE_ROOT, mode=0o700, exist_ok=True)
    while True:
        uid = _UID_BASE + secrets.randbelow(_UID_RANGE)
        if uid in taken:
            continue
        try:
            os.symlink(sandbox_id, f"{STATE_ROOT}/uid-{uid}")
        except FileExistsError:
            continue
        taken.add(uid)
        return uid


def release_uid(uid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{STATE_ROOT}/uid-{uid}")


def sweep_stale(hierarchy: cgroups.Hierarchy, min_age: float = 60.0) -> None:
    """Remove what sandboxes whose supervisor died left behind: their processes, cgroups, state
    directories and uid claims.

    When its supervisor dies, a sandbox's init exits (its socket closes) and the kernel kills the
    rest, leaving empty directories. A frozen sandbox cannot notice, so its processes stay, stopped,
    until someone kills them: here, any sandbox whose recorded owner (see `owner_record`) is gone.
    One whose owner runs is never touched. One without an owner record is left alone while it is
    younger than `min_age` (another supervisor may be creating it right now) or has processes.
    """
    now = time.time()
    groups = hierarchy.existing()
    try:
        states = {n for n in os.listdir(STATE_ROOT) if not n.startswith("uid-")}
    except FileNotFoundError:
        states = set()
    owners = {n: owner_alive(f"{STATE_ROOT}/{n}") for n in states}
    orphaned = {n for n, alive in owners.items() if alive is False}
    for name in orphaned & set(groups):
        with contextlib.suppress(OSError):
            groups[name].kill()  # all first, so they die while the others are being killed
    for name in states | set(groups):
        state = f"{STATE_ROOT}/{name}"
        try:
            cg = groups.get(name)
            if owners.get(name):
                continue
            if name not in orphaned:
                if now - os.stat(state if name in states else groups[name].path).st_mtime < min_age:
                    continue
                if cg is not None and not cg.empty():
                    continue
            if cg is not None:
                cg.remove(timeout=2.0 if name in orphaned else 0)
            shutil.rmtree(state, ignore_errors=True)
        except OSError:
            continue  # in use, or removed by someone else meanwhile
    try:
        links = [n for n in os.listdir(STATE_ROOT) if n.startswith("uid-")]
    except FileNotFoundError:
        links = []
    for name in links:
        link = f"{STATE_ROOT}/{name}"
        try:
            target = os.readlink(link)
            if (target in orphaned or now - os.lstat(link).st_mtime >= min_age) and not os.path.exists(
                f"{STATE_ROOT}/{target}"
            ):
                os.unlink(link)
        except OSError:
            continue

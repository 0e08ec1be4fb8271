"""Small helpers shared by the test modules (the `sb` fixture is in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from corral import ExecResult, Host, Policy


def wait_until(done: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `done` until it is true or `timeout` seconds pass: for what happens on other threads
    (teardown in the background, servers recording on their own)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@contextlib.contextmanager
def own_host(**options: Any) -> Iterator[Host]:
    """A `Host` of the test's own (its own zygote, supervisor, monitors, and audit store unless
    `store=` says otherwise), shut down afterwards. (Its own store file: SQLite keeps a closed
    connection's descriptor open while another connection of the process has the same file open.)"""
    if "store" not in options:
        options["store"] = tempfile.mkdtemp(prefix="corral-test-store-") + "/audit.db"
    host = Host(**options)
    try:
        yield host
    finally:
        host.shutdown()


def show(r: ExecResult) -> str:
    """What a failed assertion on a command's result should print: how it ended, the end of its
    output and what was refused while it ran."""
    return (
        f"exit {r.exit_code} signal {r.signal} timed_out {r.timed_out} terminated {r.terminated}\n"
        f"stdout: {r.stdout[-2000:]!r}\nstderr: {r.stderr[-2000:]!r}\ndenials: {r.denials!r}"
    )


def policy(**sections: Any) -> Policy:
    """A policy of the current version: the defaults, with `sections` (filesystem=..., network=...)."""
    return Policy.from_dict({"version": 1, **sections})


def tripwire_policy(**tripwires: Any) -> Policy:
    """The default policy with these `tripwires` settings (enabled, responses, rules, ...)."""
    return policy(tripwires=tripwires)


def net_namespaces() -> set[int]:
    """The network namespaces (inode numbers) the machine's processes are in now: for checking that
    a test left none of its own behind."""
    found = set()
    for pid in psutil.pids():
        try:
            found.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
        except OSError:
            continue
    return found

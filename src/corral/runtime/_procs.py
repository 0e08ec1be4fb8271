"""A sandbox's processes as events name them, read on the host."""

from __future__ import annotations

from datetime import UTC, datetime

import psutil

from corral.events import ProcessRef
from corral.monitors import process as process_monitor


def live_processes(pids: list[int]) -> list[ProcessRef]:
    """ProcessRefs of those pids that are still running: not exited, not a zombie awaiting init, and
    not killed (a command killed at its timeout takes its process group with it, and under load some
    of it may not yet have run to die)."""
    refs = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE or process_monitor.killed(pid):
                continue
        except psutil.NoSuchProcess:
            continue
        ref = process_ref(pid)
        if ref.cmdline or ref.exe:
            refs.append(ref)
    return refs


def process_ref(pid: int) -> ProcessRef:
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            _, ns_pid = process_monitor.status_ids(pid)
            try:
                exe = p.exe()
            except (psutil.AccessDenied, psutil.ZombieProcess):
                exe = None
            return ProcessRef(
                pid=pid,
                ns_pid=ns_pid,
                exe=exe or None,
                cmdline=p.cmdline(),
                started=datetime.fromtimestamp(p.create_time(), UTC),
            )
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        return ProcessRef(pid=pid)

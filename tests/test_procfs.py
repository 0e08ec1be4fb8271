"""/proc/PID/stat, read once for the monitors and the launcher: the fields they take agree with psutil,
whatever the command name holds."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from corral import _procfs
from corral.monitors import process as pm
from corral.monitors.resource import read_stat, uptime


@pytest.fixture
def odd_name(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    # A command name with ") (" and spaces in it: the parser must take the last parenthesis.
    link = tmp_path / "a) b (c d"
    link.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(link), "30"])
    try:
        deadline = time.monotonic() + 5
        # Wait until sleep has exec'd and sits in nanosleep: its memory no longer changes.
        proc = psutil.Process(child.pid)
        while (proc.name(), proc.status()) != (link.name[:15], psutil.STATUS_SLEEPING):
            assert time.monotonic() < deadline, "sleep did not start"
            time.sleep(0.01)
        yield child
    finally:
        child.kill()
        child.wait()


def test_fields_agree_with_psutil_whatever_the_command_name(odd_name: subprocess.Popen[bytes]) -> None:
    fields = _procfs.stat_fields(odd_name.pid)
    assert fields[_procfs.STATE] == b"S"
    assert int(fields[_procfs.PPID]) == os.getpid() == pm._ppid(odd_name.pid)
    created = psutil.Process(odd_name.pid).create_time()
    started = pm._start_time(odd_name.pid)
    assert started is not None and abs(started - created) < 0.05
    stat = read_stat(odd_name.pid)
    assert stat is not None and stat.pid == odd_name.pid
    assert 0 <= uptime() - stat.started < 30
    assert stat.rss == psutil.Process(odd_name.pid).memory_info().rss


def test_self_and_a_process_that_is_gone() -> None:
    assert int(_procfs.stat_fields("self")[_procfs.PPID]) == os.getppid()
    child = subprocess.Popen(["/bin/true"])
    child.wait()
    with pytest.raises(OSError):
        _procfs.stat_fields(child.pid)
    assert pm._ppid(child.pid) is None and pm._start_time(child.pid) is None and read_stat(child.pid) is None

"""/proc/PID/stat, read in one place: the process and resource monitors and the sandbox's set-up use it.

psutil reads the same file, but builds an object and parses every field for each call; the process
monitor asks for a parent pid on every fork it hears of and the sampler reads each process four
times a second, so they read the fields they need here.
"""

from __future__ import annotations

import os

# Clock ticks per second: the unit of the CPU times and the start time in /proc/PID/stat.
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Indexes into `stat_fields()`, which starts at field 3 of proc(5) (fields 1 and 2 are the pid and
# the command name, which may hold spaces and parentheses).
STATE = 0
PPID = 1
UTIME = 11
STIME = 12
STARTTIME = 19  # clock ticks after boot
ARG_START = 45
ARG_END = 46


def stat_fields(pid: int | str) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name (`pid` may be "self"). Raises OSError when
    the process is gone, ValueError when the file is not what proc(5) describes."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name is in parentheses and may contain ") ": the last one closes it.
    return data[data.rindex(b")") + 2 :].split()

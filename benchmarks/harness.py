"""What every benchmark uses: its settings, timing, opening sandboxes, and host limits to raise."""

from __future__ import annotations

import gc
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import get_args

import psutil

from benchmarks.results import Result
from corral import Alert, Sandbox

MIB = 1 << 20
_START_ATTEMPTS = 3  # per idle sandbox
# The alert categories, as the event schema names them (a policy's `tripwires.responses` keys).
CATEGORIES: tuple[str, ...] = get_args(Alert.model_fields["category"].annotation)


@dataclass(frozen=True)
class Config:
    warm_runs: int
    cold_runs: int
    idle: int
    warmup: int
    settle: float  # seconds to let memory settle before sampling it
    quick: bool


BenchFn = Callable[[Config], list[Result]]


class BenchError(Exception):
    """A benchmark could not run (as opposed to: ran and missed its target)."""


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def time_ms(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Wall time of `runs` calls of `fn` in ms, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    gc.collect()
    out: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def open_sandbox(failures: list[str], what: str) -> Sandbox:
    """A new sandbox. A failed start is recorded in `failures` (shown in the row's notes) and retried,
    so one flaky start does not lose a row; the same start failing repeatedly stops the benchmark."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        try:
            return Sandbox(keep_workspace=False)
        except Exception as e:
            failures.append(f"{what}: {type(e).__name__}: {e}")
            progress(f"start failed (attempt {attempt}): {failures[-1]}")
            if attempt == _START_ATTEMPTS:
                raise BenchError(failures[-1]) from e
    raise AssertionError("unreachable")


def failure_notes(failures: list[str]) -> dict[str, float | int | str]:
    notes: dict[str, float | int | str] = {"start_failures_retried": len(failures)}
    if failures:
        notes["first_start_failure"] = failures[0]
    return notes


def check_exec(sb: Sandbox) -> None:
    r = sb.exec(["true"])
    if r.exit_code != 0:
        raise BenchError(f"`true` in a sandbox exited {r.exit_code}: {r.stderr!r}")


def wait_torn_down(sandboxes: Sequence[Sandbox], timeout: float = 60.0) -> float:
    """Wait until every sandbox's background teardown is done; seconds waited."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    for sb in sandboxes:
        if not sb.wait_closed(max(0.0, deadline - time.monotonic())):
            raise BenchError(f"sandbox {sb.id} was not torn down within {timeout:g}s of close()")
    return time.monotonic() - t0


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise BenchError("/proc/meminfo has no MemAvailable")


def bwrap_argv(command: Sequence[str]) -> list[str] | None:
    """bwrap with isolation close to a default sandbox's (all namespaces, read-only /usr), or None."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64"):
        path = f"/{name}"
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--new-session", *command]
    return argv


def run_ok(argv: list[str]) -> None:
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if r.returncode != 0:
        raise BenchError(f"{argv[0]} exited {r.returncode}: {r.stderr.decode(errors='replace').strip()}")


def ensure_fds(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < needed:
            raise BenchError(f"needs {needed} open files, RLIMIT_NOFILE hard limit is {hard}")


def ensure_pids(needed: int) -> None:
    used = len(psutil.pids())
    for path in ("/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"):
        with open(path) as f:
            limit = int(f.read())
        if limit - used < needed:
            raise BenchError(f"needs {needed} more processes; {path} is {limit} and {used} are running")

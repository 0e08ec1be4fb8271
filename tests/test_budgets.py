"""Budgets enforced by the kernel and the supervisor: memory, processes, disk, CPU, command timeout
and sandbox lifetime. Each test exhausts a budget for real, checks the `deny` event, and checks that
the sandbox (and the host) still work afterwards."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

import corral
from corral import Deny, ExecExit, ExecResult, Policy, Sandbox, SandboxStop
from helpers import show

pytestmark = pytest.mark.root

PYTHON = "/usr/bin/python3"
MiB = 1 << 20


def budget(**resources: object) -> Policy:
    return Policy.from_dict({"version": 1, "resources": resources})


def denials(r: ExecResult, layer: str, what: str) -> list[Deny]:
    return [d for d in r.denials if d.layer == layer and d.what == what]


ALLOCATE = "x = bytearray({n} << 20)\nfor i in range(0, len(x), 4096): x[i] = 1\nprint('allocated')"

# Forks sleeping children until the kernel refuses, then reports how many it got and cleans up.
FORK_UNTIL_REFUSED = """
import os, signal, time
children = []
while len(children) < 1000:
    try:
        pid = os.fork()
    except OSError as e:
        print("refused", e.errno, len(children))
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


# --- memory ----------------------------------------------------------------------------------


def test_memory_exhaustion_kills_the_command_and_is_reported() -> None:
    with Sandbox(budget(memory="64MiB"), keep_workspace=False) as sb:
        r = sb.exec([PYTHON, "-c", ALLOCATE.format(n=300)])
        assert r.exit_code == 137 and r.signal == 9 and b"allocated" not in r.stdout, show(r)
        deny = denials(r, "cgroup", "memory")
        assert len(deny) == 1 and deny[0].exec is not None, show(r)
        assert r.peak_memory <= 64 * MiB, r.peak_memory


def test_sandbox_still_works_after_memory_exhaustion() -> None:
    with Sandbox(budget(memory="64MiB"), keep_workspace=False) as sb:
        sb.exec([PYTHON, "-c", ALLOCATE.format(n=300)])
        r = sb.exec([PYTHON, "-c", ALLOCATE.format(n=16)], text=True)
        assert r.exit_code == 0 and r.stdout == "allocated\n" and r.denials == [], show(r)


def test_memory_bomb_in_one_sandbox_does_not_disturb_another() -> None:
    with (
        Sandbox(budget(memory="64MiB"), keep_workspace=False) as bomb,
        Sandbox(budget(memory="256MiB"), keep_workspace=False) as calm,
    ):
        results: dict[str, ExecResult] = {}

        def run_bomb() -> None:
            results["bomb"] = bomb.exec([PYTHON, "-c", ALLOCATE.format(n=1000)])

        thread = threading.Thread(target=run_bomb)
        thread.start()
        # Allocates and touches 100 MiB while the other sandbox is being killed for the same.
        r = calm.exec([PYTHON, "-c", ALLOCATE.format(n=100) + "\nprint(sum(x))"], text=True)
        thread.join()
        assert r.exit_code == 0 and r.stdout == f"allocated\n{(100 * MiB) // 4096}\n", show(r)
        assert r.denials == [] and not any(isinstance(e, Deny) for e in calm.events()), calm.events()
        assert results["bomb"].exit_code == 137, show(results["bomb"])


def test_exec_exit_reports_cpu_seconds_and_peak_memory() -> None:
    with Sandbox(budget(), keep_workspace=False) as sb:
        r = sb.exec([PYTHON, "-c", ALLOCATE.format(n=32) + "\nsum(range(3_000_000))"])
        assert r.exit_code == 0, show(r)
        exit_event = [e for e in sb.events() if isinstance(e, ExecExit)][-1]
        assert exit_event.cpu_seconds > 0 and exit_event.cpu_seconds == r.cpu_seconds, exit_event
        assert exit_event.peak_memory >= 32 * MiB and exit_event.peak_memory == r.peak_memory, exit_event


# --- processes -------------------------------------------------------------------------------


def test_process_budget_refuses_forks_and_is_reported() -> None:
    with Sandbox(budget(processes=32), keep_workspace=False) as sb:
        r = sb.exec([PYTHON, "-c", FORK_UNTIL_REFUSED], text=True)
        words = str(r.stdout).split()
        assert words[:2] == ["refused", "11"], show(r)  # EAGAIN
        assert int(words[2]) < 32, show(r)  # init and the python process count too
        assert len(denials(r, "cgroup", "processes")) == 1, show(r)


def test_shell_fork_bomb_is_contained_and_the_sandbox_recovers() -> None:
    with Sandbox(budget(processes=32), keep_workspace=False) as sb:
        started = time.monotonic()
        r = sb.exec(["bash", "-c", ":(){ :|:& };:; sleep 30"], timeout=2)
        assert r.timed_out and time.monotonic() - started < 10, show(r)
        assert denials(r, "cgroup", "processes"), show(r)
        # The host can still start processes.
        assert subprocess.run(["true"], check=False).returncode == 0
        # Nothing of the bomb outlives the command's process group, so the sandbox can fork again.
        deadline = time.monotonic() + 5
        while True:
            after = sb.exec("echo alive", text=True)
            if after.stdout == "alive\n" or time.monotonic() > deadline:
                break
        assert after.exit_code == 0 and after.stdout == "alive\n", show(after)


# --- disk ------------------------------------------------------------------------------------


def test_disk_budget_gives_enospc_and_is_reported() -> None:
    with Sandbox(budget(disk="16MiB"), keep_workspace=False) as sb:
        r = sb.exec("dd if=/dev/zero of=big bs=1M count=100", text=True)
        assert r.exit_code != 0 and "No space left on device" in str(r.stderr), show(r)
        assert len(denials(r, "storage", "disk")) == 1, show(r)
        r = sb.exec("rm big && echo fine > small && cat small", text=True)
        assert r.stdout == "fine\n", show(r)


def test_disk_budget_is_shared_by_workspace_and_tmp() -> None:
    with Sandbox(budget(disk="16MiB"), keep_workspace=False) as sb:
        r = sb.exec("head -c 10485760 /dev/zero > a && head -c 10485760 /dev/zero > /tmp/b", text=True)
        assert r.exit_code != 0 and "No space left on device" in str(r.stderr), show(r)


# --- CPU -------------------------------------------------------------------------------------


def test_cpu_budget_caps_a_busy_loop() -> None:
    with Sandbox(budget(cpu=0.25), keep_workspace=False) as sb:
        r = sb.exec("timeout 1 sh -c 'while :; do :; done'")
        assert r.exit_code == 124, show(r)
        # A quarter of a core for one second; with nothing in the way it would be about 1.0.
        assert 0.05 < r.cpu_seconds < 0.5, r.cpu_seconds


# --- time ------------------------------------------------------------------------------------


def test_command_timeout_kills_the_command_quickly() -> None:
    with Sandbox(budget(), keep_workspace=False) as sb:
        started = time.monotonic()
        r = sb.exec("sleep 30", timeout=0.5)
        elapsed = time.monotonic() - started
        assert r.timed_out and r.exit_code == 137 and r.signal == 9, show(r)
        assert 0.5 <= elapsed < 2.0, elapsed
        assert len(denials(r, "timeout", "timeout")) == 1, show(r)
        assert sb.exec("echo alive", text=True).stdout == "alive\n"


def test_a_command_killed_at_its_timeout_still_reports_its_children_cpu() -> None:
    # The shell forks a busy child and waits; killed at the timeout, it never reaps the child, so
    # rusage alone would say ~0 s.
    with Sandbox(budget(), keep_workspace=False) as sb:
        r = sb.exec("python3 -c 'while True: pass'; true", timeout=1.0)
        assert r.timed_out, show(r)
        assert r.cpu_seconds > 0.1, r.cpu_seconds


def test_policy_timeout_applies_when_the_command_has_none() -> None:
    with Sandbox(budget(timeout="300ms"), keep_workspace=False) as sb:
        r = sb.exec("sleep 30")
        assert r.timed_out and r.exit_code == 137 and r.duration < 2.0, show(r)


def test_lifetime_ends_the_running_command_and_the_sandbox() -> None:
    with Sandbox(budget(lifetime="800ms"), keep_workspace=False) as sb:
        started = time.monotonic()
        r = sb.exec("sleep 30")
        assert time.monotonic() - started < 3.0, show(r)
        assert r.terminated == "lifetime" and r.exit_code == 137, show(r)
        assert sb.closed
        deny = [e for e in sb.events() if isinstance(e, Deny) and e.layer == "lifetime"]
        assert len(deny) == 1 and deny[0].what == "lifetime", sb.events()
        stop = [e for e in sb.events() if isinstance(e, SandboxStop)]
        assert len(stop) == 1 and stop[0].reason == "lifetime", sb.events()


def test_exec_after_lifetime_raises_sandbox_closed() -> None:
    with Sandbox(budget(lifetime="300ms"), keep_workspace=False) as sb:
        time.sleep(0.6)
        assert sb.closed
        with pytest.raises(corral.SandboxClosedError, match="lifetime"):
            sb.exec("true")
        sb.close(wait=True)

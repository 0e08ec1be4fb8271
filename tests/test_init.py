"""A sandbox's init outlives what the agent can do to its budgets, and its workspace is saved even
when init is gone."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from corral import Policy, Sandbox, SandboxStop, _procfs
from corral.isolation import cgroups
from helpers import wait_until

pytestmark = pytest.mark.root

MiB = 1 << 20


def _init_pid(sb: Sandbox) -> int:
    assert sb.init_pid is not None
    return sb.init_pid


def _stop(sb: Sandbox) -> SandboxStop:
    return next(e for e in sb.events() if isinstance(e, SandboxStop))


def test_files_filling_the_memory_budget_kill_the_command_not_init(tmp_path: Path) -> None:
    # tmpfs pages count against `memory` but belong to no process, so the OOM killer used to pick
    # the biggest process left: init. The writer here is far smaller than init.
    policy = Policy.from_dict({"version": 1, "resources": {"memory": "64MiB", "disk": "256MiB"}})
    with Sandbox(policy, workspace=tmp_path) as sb:
        init = _init_pid(sb)
        assert sb.exec("echo kept > kept.txt").exit_code == 0
        r = sb.exec(["/bin/sh", "-c", "exec head -c 200M /dev/zero > fill"])
        assert r.exit_code == 137 and r.signal == 9, r
        assert [(d.layer, d.what) for d in r.denials] == [("cgroup", "memory")], r.denials
        assert not sb.closed and Path(f"/proc/{init}").exists(), "init was killed"
        # The sandbox still answers. Its memory is spent on files, so the next command may be
        # refused memory in turn (and says so) or may squeeze in; either way it is not gone.
        after = sb.exec(["/bin/rm", "-f", "fill"])
        refused = after.exit_code == 137
        assert after.exit_code == 0 or (refused and [d.what for d in after.denials] == ["memory"]), after
    assert _stop(sb).error == ""
    assert (tmp_path / "kept.txt").read_text() == "kept\n"
    if refused:
        assert (tmp_path / "fill").stat().st_size > 32 * MiB
    else:
        assert not (tmp_path / "fill").exists()


def test_commands_are_in_the_memory_group_and_init_is_not() -> None:
    with Sandbox(keep_workspace=False) as sb:
        cg = sb._cgroup
        if not isinstance(cg, cgroups.V1Cgroup):
            pytest.fail("this test is for hosts whose memory controller is cgroup v1 (as this one was)")
        r = sb.exec("sleep 1000 & echo started")
        (sleeper,) = r.leftover
        # Per thread: init's spawning thread is a member, init's leading thread (its pid) is not.
        members = {int(t) for t in Path(cg.paths["memory"], "tasks").read_text().split()}
        assert sleeper.pid in members and _init_pid(sb) not in members
        assert len(members & {int(t) for t in os.listdir(f"/proc/{_init_pid(sb)}/task")}) == 1


def test_the_workspace_is_saved_when_init_is_gone(tmp_path: Path) -> None:
    sb = Sandbox(workspace=tmp_path)
    try:
        assert sb.exec("echo kept > kept.txt").exit_code == 0
        os.kill(_init_pid(sb), signal.SIGKILL)  # from the host: the kernel ends the sandbox
        assert wait_until(lambda: not Path(f"/proc/{_init_pid(sb)}").exists() or _zombie(_init_pid(sb)))
        time.sleep(0.1)
    finally:
        sb.close()
    assert _stop(sb).error == "", _stop(sb)
    assert (tmp_path / "kept.txt").read_text() == "kept\n"


def _zombie(pid: int) -> bool:
    try:
        return _procfs.stat_fields(pid)[_procfs.STATE] == b"Z"
    except OSError:
        return True

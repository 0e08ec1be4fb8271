"""cgroup v1 and v2: the choice (on fake /proc data), v2's file writes on a fake tree, v1 for real."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from corral import HostError
from corral.isolation import cgroups

V2_MOUNTINFO = "30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw\n"
V1_MOUNTINFO = "".join(
    f"{40 + i} 23 0:{40 + i} / {{root}}/{c} rw - cgroup cgroup rw,{c}\n"
    for i, c in enumerate(("memory", "cpu", "cpuacct", "pids", "freezer"))
)


def _fake_v2(tmp_path: Path, controllers: str) -> Path:
    (tmp_path / "cgroup.controllers").write_text(controllers + "\n")
    own = tmp_path / "agents.slice"
    own.mkdir()
    return own


def test_v2_is_chosen_when_it_has_memory_pids_and_cpu(tmp_path: Path) -> None:
    _fake_v2(tmp_path, "cpuset cpu io memory hugetlb pids")
    h = cgroups.detect(V2_MOUNTINFO.format(root=tmp_path), "0::/agents.slice\n")
    assert h.version == 2


def test_hybrid_host_falls_back_to_v1(tmp_path: Path) -> None:
    # The layout of this project's machines: v2 mounted with hugetlb only, the rest in v1.
    _fake_v2(tmp_path, "hugetlb")
    mountinfo = V2_MOUNTINFO.format(root=tmp_path / "unified") + V1_MOUNTINFO.format(root=tmp_path)
    h = cgroups.detect(mountinfo, "0::/\n4:memory:/job\n")
    assert h.version == 1
    assert isinstance(h, cgroups.V1Hierarchy)
    assert h.parents["memory"] == f"{tmp_path}/memory/job/corral"
    assert h.parents["pids"] == f"{tmp_path}/pids/corral"


def test_no_usable_hierarchy_names_what_is_missing(tmp_path: Path) -> None:
    _fake_v2(tmp_path, "hugetlb")
    mountinfo = V2_MOUNTINFO.format(root=tmp_path) + V1_MOUNTINFO.format(root=tmp_path).replace(
        ",pids", ",net_cls"
    )
    with pytest.raises(HostError, match="cgroup v1 has no hierarchy for pids"):
        cgroups.detect(mountinfo, "0::/\n")


def test_v2_create_writes_limits_and_reads_usage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = _fake_v2(tmp_path, "cpu memory pids")
    h = cgroups.detect(V2_MOUNTINFO.format(root=tmp_path), "0::/agents.slice\n")
    # cgroupfs creates the interface files itself; on a plain directory we create them up front.
    cg_dir = own / "corral" / "sb1"
    original_mkdir = os.mkdir

    def mkdir_with_files(path: str, mode: int = 0o777) -> None:
        original_mkdir(path, mode)
        for name in ("memory.max", "memory.swap.max", "pids.max", "cpu.max", "cgroup.procs"):
            Path(path, name).write_text("")

    monkeypatch.setattr(os, "mkdir", mkdir_with_files)
    cg = h.create("sb1", cgroups.Limits(memory_bytes=64 << 20, cpu_cores=0.5, max_processes=32))
    monkeypatch.undo()
    assert (own / "corral" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (cg_dir / "memory.max").read_text() == str(64 << 20)
    assert (cg_dir / "memory.swap.max").read_text() == "0"
    assert (cg_dir / "pids.max").read_text() == "32"
    assert (cg_dir / "cpu.max").read_text() == "50000 100000"
    assert cg.join_files == [f"{cg_dir}/cgroup.procs"]

    (cg_dir / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (cg_dir / "memory.current").write_text("1048576\n")
    (cg_dir / "memory.peak").write_text("4194304\n")
    (cg_dir / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (cg_dir / "pids.events").write_text("max 7\n")
    (cg_dir / "cgroup.procs").write_text("101\n102\n")
    usage = cg.usage()
    assert usage == cgroups.Usage(
        cpu_seconds=2.5, memory_bytes=1 << 20, memory_peak_bytes=4 << 20, oom_kills=1, pids_refused=7
    )
    assert cg.pids() == [101, 102]


@pytest.mark.root
def test_v1_on_this_host_enforces_and_reports() -> None:
    h = cgroups.detect()
    cg = h.create(
        f"test-{os.getpid()}", cgroups.Limits(memory_bytes=32 << 20, cpu_cores=0.25, max_processes=16)
    )
    try:
        if h.version == 1:
            assert isinstance(cg, cgroups.V1Cgroup)
            assert Path(cg.paths["memory"], "memory.limit_in_bytes").read_text().strip() == str(32 << 20)
            assert Path(cg.paths["pids"], "pids.max").read_text().strip() == "16"
            assert Path(cg.paths["cpu"], "cpu.cfs_quota_us").read_text().strip() == "25000"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            for path in cg.join_files:
                Path(path).write_text(str(os.getpid()))
            os.execv("/bin/sleep", ["sleep", "30"])
        try:
            for _ in range(400):  # joining waits for an RCU grace period in the child
                if pid in cg.pids():
                    break
                time.sleep(0.005)
            assert cg.pids() == [pid]
            assert cg.usage().memory_bytes > 0
            cg.freeze()
            cg.thaw()
            cg.kill()
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status)
        finally:
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    finally:
        cg.remove()
    assert not os.path.exists(cg.path)

"""Warm pools and workspace templates: labels given at hand-out reach the store and verify; a
sandbox is never reused (what an agent leaves can't reach the next episode); refilling stops after
repeated start failures and says why; an episode's sandbox is closed however it ends (cancel,
timeout, exception, kill -9 of the trainer); a template is shown, never copied, never modified."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import corral
from corral import HostError, Pool, PoolError, Sandbox, SandboxClosedError, SandboxLabel, Store
from corral.isolation import plan as planning
from helpers import own_host, policy, show, wait_until

pytestmark = pytest.mark.root

STATE_ROOT = "/run/corral"


@pytest.fixture
def host() -> Iterator[corral.Host]:
    with own_host(networks_ahead=0) as h:
        yield h


def _store(host: corral.Host) -> Store:
    assert host.store_location is not None
    return Store.open(host.store_location)


# --- labels given after the start -----------------------------------------------------------------


def test_labels_added_to_a_running_sandbox_are_chained_filed_and_verified(host: corral.Host) -> None:
    sb = Sandbox(policy(), host=host, keep_workspace=False, labels={"run": "r1"})
    sb.label({"episode": "17", "task": "t3"})
    sb.label({"episode": "17"})  # the same value again: nothing to add
    with pytest.raises(ValueError, match="already has episode='17'; labels are only added"):
        sb.label({"episode": "18"})
    assert sb.labels == {"run": "r1", "episode": "17", "task": "t3"}
    sb.close(wait=True)
    with pytest.raises(SandboxClosedError):
        sb.label({"step": "1"})
    added = [e for e in sb.events() if isinstance(e, SandboxLabel)]
    assert [e.labels for e in added] == [{"episode": "17", "task": "t3"}]
    with _store(host) as store:
        [info] = store.sandboxes(labels={"run": "r1", "episode": "17"})
        assert info.id == sb.id and info.labels == {"run": "r1", "episode": "17", "task": "t3"}
        assert [i.id for i in store.sandboxes(labels={"task": "t3"})] == [sb.id]
        assert store.verify().ok, [f.message for f in store.verify().findings]


def test_audit_verify_finds_a_label_row_that_disagrees_with_the_label_events(host: corral.Host) -> None:
    sb = Sandbox(policy(), host=host, keep_workspace=False, labels={"run": "r1"})
    sb.label({"episode": "17"})
    sb.close(wait=True)
    assert host.store_location is not None
    import sqlite3

    db = sqlite3.connect(host.store_location)
    with db:
        db.execute(
            "UPDATE sandboxes SET labels = ? WHERE id = ?",
            (json.dumps({"run": "r1", "episode": "99"}), sb.id),
        )
    db.close()
    with _store(host) as store:
        v = store.verify()
    assert not v.ok
    assert any(
        f.kind == "edited"
        and "its sandbox.start and sandbox.label events" in f.message
        and sb.id in f.message
        for f in v.findings
    ), [f.message for f in v.findings]


# --- handing out ----------------------------------------------------------------------------------


def test_a_warm_pool_hands_out_in_milliseconds_and_labels_the_episode(host: corral.Host) -> None:
    with Pool(policy(), size=2, host=host, labels={"run": "warm"}) as pool:
        assert pool.wait_ready(timeout=60)
        times: list[float] = []
        ids: list[str] = []
        for episode in range(4):
            assert pool.wait_ready(timeout=60)
            lease = pool.episode(labels={"episode": str(episode)})
            with lease as sb:
                assert sb.labels == {"run": "warm", "episode": str(episode)}
                assert sb.exec("true").exit_code == 0
                ids.append(sb.id)
            assert lease.acquire_seconds is not None
            times.append(lease.acquire_seconds)
            assert sb.closed
        assert len(set(ids)) == 4, "every episode gets a sandbox of its own"
        # The bench measures the P50 (target: 2 ms); here, on a loaded test machine, only that it
        # is a hand-out and not a start (hundreds of milliseconds).
        assert statistics.median(times) < 0.05, times
    with _store(host) as store:
        for episode, sid in enumerate(ids):
            [info] = store.sandboxes(labels={"run": "warm", "episode": str(episode)})
            assert info.id == sid
        assert store.verify().ok


def test_an_empty_pool_starts_a_sandbox_on_demand(host: corral.Host) -> None:
    with Pool(policy(), size=0, host=host) as pool:
        with pool.episode(labels={"episode": "1"}) as sb:
            assert sb.exec("true").exit_code == 0
            assert pool.in_use == 1
        assert pool.in_use == 0 and pool.started == 1


def test_an_episode_label_can_not_change_the_pools(host: corral.Host) -> None:
    with Pool(policy(), size=0, host=host, labels={"run": "r1"}) as pool:
        with (
            pytest.raises(ValueError, match="the pool labels every sandbox with run='r1'"),
            pool.episode(labels={"run": "r2"}),
        ):
            pass
        assert pool.started == 0, "refused before any sandbox was started"


def test_a_sandbox_is_never_reused(host: corral.Host) -> None:
    # What an agent leaves behind: a file in the workspace, a poisoned ~/.bashrc, a file in /tmp, a
    # process in the background. None of it may reach the next episode.
    with Pool(policy(), size=1, host=host) as pool:
        with pool.episode(labels={"episode": "1"}) as first:
            r = first.exec(
                'echo left > /workspace/left.txt && echo "echo POISONED" > "$HOME/.bashrc" '
                "&& echo left > /tmp/left && (setsid nohup sleep 300 >/dev/null 2>&1 &) && whoami && id -u",
                text=True,
            )
            assert r.exit_code == 0, show(r)
            first_uid = first.uid
            assert len(first.pids()) >= 2
        assert first.closed and first.wait_closed(10)
        with pool.episode(labels={"episode": "2"}) as second:
            assert second.id != first.id and second.uid != first_uid
            r = second.exec(
                "ls -A /workspace; cat $HOME/.bashrc; ls -A /tmp; bash -ic true; pgrep -a sleep; true",
                text=True,
            )
            assert r.exit_code == 0, show(r)
            assert "left" not in r.stdout and "POISONED" not in r.stdout + r.stderr, show(r)
            assert "sleep" not in r.stdout, show(r)
            assert second.pids() == [second.init_pid], "only init runs in a fresh sandbox"
        assert not psutil.pid_exists(first.init_pid or 0) or first.init_pid is None


# --- start failures -------------------------------------------------------------------------------


def test_refilling_stops_after_repeated_start_failures_and_says_why(
    host: corral.Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    host.start()
    calls: list[float] = []

    def broken_launch(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        raise OSError(28, "No space left on device: the zygote can't fork")

    monkeypatch.setattr(host, "launch", broken_launch)
    caplog.set_level(logging.WARNING, logger="corral")
    with Pool(policy(), size=3, host=host, max_failures=5) as pool:
        assert wait_until(lambda: pool.failure is not None, timeout=20)
        time.sleep(1.0)
        assert len(calls) == 5, "no start is tried once the pool stopped"
        assert pool.failure is not None and "5 sandbox starts failed in a row" in pool.failure
        assert "No space left on device" in pool.failure
        with (
            pytest.raises(
                PoolError, match=r"no sandbox to hand out: 5 sandbox starts failed in a row.*No space"
            ),
            pool.episode(labels={"episode": "1"}),
        ):
            pass
        assert any("refilling stopped" in r.getMessage() for r in caplog.records)
        assert len(calls) == 5
        # Fixed: resume() starts again.
        monkeypatch.undo()
        pool.resume()
        assert pool.wait_ready(1, timeout=60)
        with pool.episode() as sb:
            assert sb.exec("true").exit_code == 0


# --- however the episode ends, its sandbox is closed ------------------------------------------------


def test_an_episode_that_raises_closes_its_sandbox(host: corral.Host) -> None:
    with Pool(policy(), size=1, host=host) as pool:
        held: list[Sandbox] = []
        with pytest.raises(RuntimeError, match="the agent's harness crashed"), pool.episode() as sb:
            held.append(sb)
            sb.exec("sleep 300 &")
            raise RuntimeError("the agent's harness crashed")
        assert held[0].closed and held[0].wait_closed(10)
        assert pool.in_use == 0


def test_a_cancelled_or_timed_out_async_episode_closes_its_sandbox(host: corral.Host) -> None:
    held: list[Sandbox] = []

    async def episode(pool: Pool, started: asyncio.Event) -> None:
        async with pool.episode(labels={"episode": "cancelled"}) as asb:
            held.append(asb.sandbox)
            started.set()
            await asb.exec("sleep 300")

    async def main() -> None:
        async with Pool(policy(), size=1, host=host) as pool:
            # Cancelled while its command runs.
            started = asyncio.Event()
            task = asyncio.create_task(episode(pool, started))
            await started.wait()
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert held[-1].closed
            # Timed out.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    async with pool.episode(labels={"episode": "timeout"}) as asb:
                        held.append(asb.sandbox)
                        await asb.exec("sleep 300")
            assert held[-1].closed
        # Cancelled while a sandbox was being started for it on demand (the pool is empty): once
        # started, that sandbox is closed, never handed out.
        async with Pool(policy(), size=0, host=host) as empty:
            started = asyncio.Event()
            task = asyncio.create_task(episode(empty, started))
            await asyncio.sleep(0)  # the task runs up to its wait for the start, no further
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not started.is_set()
            assert await asyncio.to_thread(wait_until, lambda: empty.started == 1 and empty.in_use == 0, 30)

    asyncio.run(main())
    assert len(held) == 2
    for sb in held:
        assert sb.closed and sb.wait_closed(10)


TRAINER = textwrap.dedent(
    """
    import sys, time
    import corral
    host = corral.Host(networks_ahead=0, store=sys.argv[1])
    pool = corral.Pool(corral.Policy.from_dict({"version": 1}), size=2, host=host)
    assert pool.wait_ready(timeout=60)
    sb = pool.acquire({"episode": "1"})
    r = sb.exec("sleep 300 & setsid nohup sleep 301 >/dev/null 2>&1 &")
    assert r.exit_code == 0, r
    assert pool.wait_ready(timeout=60)
    print(" ".join(s.id + ":" + str(s.uid) for s in [sb, *pool._ready]), flush=True)
    time.sleep(300)
    """
)


def _processes_of(uid: int) -> list[int]:
    return [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


def test_kill_9_of_the_trainer_kills_its_pool_and_the_next_host_sweeps_it(
    tmp_path: Path, cgroup_dirs: Callable[[str], list[str]]
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(corral.__file__).parent.parent)}
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(tmp_path / "audit.db")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    sandboxes: list[tuple[str, int]] = []
    try:
        assert trainer.stdout is not None
        line = trainer.stdout.readline()
        sandboxes = [(s.split(":")[0], int(s.split(":")[1])) for s in line.split()]
        assert len(sandboxes) == 3, line
        assert all(_processes_of(uid) for _, uid in sandboxes)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        for _, uid in sandboxes:
            assert wait_until(lambda u=uid: _processes_of(u) == [], timeout=10), _processes_of(uid)  # type: ignore[misc]
        # What the dead trainer could not remove, the next host on the machine does when it starts.
        with own_host(networks_ahead=0) as h:
            h.start()
        for sid, uid in sandboxes:
            assert not os.path.exists(f"{STATE_ROOT}/{sid}"), "state directory left behind"
            assert wait_until(lambda s=sid: cgroup_dirs(s) == []), f"cgroups left: {cgroup_dirs(sid)}"  # type: ignore[misc]
            assert not os.path.lexists(f"{STATE_ROOT}/uid-{uid}"), "uid claim left behind"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        if trainer.stdout is not None:
            trainer.stdout.close()
        for sid, _ in sandboxes:
            for path in sorted(cgroup_dirs(sid), key=len, reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            shutil.rmtree(f"{STATE_ROOT}/{sid}", ignore_errors=True)


# --- templates ------------------------------------------------------------------------------------


def _template(root: Path) -> Path:
    t = root / "template"
    (t / "src").mkdir(parents=True)
    (t / "src" / "app.py").write_text("print('template')\n")
    (t / "README").write_text("task\n")
    (t / "keep").write_text("keep\n")
    (t / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (t / "run.sh").chmod(0o755)
    return t


def _snapshot(path: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    out: dict[str, tuple[int, int, int, bytes | str]] = {}
    for p in sorted([path, *path.rglob("*")]):
        st = p.lstat()
        content: bytes | str = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else b""
        out[str(p.relative_to(path))] = (st.st_mode, st.st_uid, st.st_mtime_ns, content)
    return out


def test_a_template_is_the_workspace_and_is_never_modified(tmp_path: Path, host: corral.Host) -> None:
    t = _template(tmp_path)
    before = _snapshot(t)
    with Sandbox(policy(), host=host, template=t) as sb:
        r = sb.exec(
            "cat src/app.py && ./run.sh && stat -c %U src/app.py && "
            "echo changed >> src/app.py && rm README && chmod 600 keep && mv src moved && "
            "echo new > new.txt && mkdir d && touch d/f && ls -A",
            text=True,
        )
        assert r.exit_code == 0, show(r)
        assert r.stdout.startswith("print('template')\nran\nagent\n"), show(r)
        assert sorted(r.stdout.split("\n")[3:-1]) == ["d", "keep", "moved", "new.txt", "run.sh"], show(r)
        assert sb.exec("cat moved/app.py", text=True).stdout == "print('template')\nchanged\n"
        # Not through /proc, nor as the lower layer: nothing inside reaches the template itself.
        r = sb.exec("ls /.corral/changes; touch /.corral/x", text=True)
        assert r.exit_code != 0 and "Permission denied" in r.stderr, show(r)
        workspace = sb.workspace
    assert _snapshot(t) == before, "the template changed"
    # Saved at close: what the agent added or changed (the overlay's upper layer).
    saved = Path(workspace)
    try:
        assert (saved / "new.txt").read_text() == "new\n"
        assert (saved / "moved" / "app.py").read_text() == "print('template')\nchanged\n"
        assert not (saved / "run.sh").exists(), "an unchanged template file is not saved"
    finally:
        shutil.rmtree(saved, ignore_errors=True)


def test_a_symlink_in_the_template_cannot_write_outside(tmp_path: Path, host: corral.Host) -> None:
    t = _template(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_text("host\n")
    os.symlink(outside / "target", t / "abs-link")  # the host's path: means nothing inside
    os.symlink("../../outside/target", t / "rel-link")
    os.symlink("/etc/passwd", t / "etc-link")
    os.symlink(str(t), t / "self-link")
    before = _snapshot(t)
    with Sandbox(policy(), host=host, template=t, keep_workspace=False) as sb:
        for link in ("abs-link", "rel-link", "etc-link", "self-link/README"):
            r = sb.exec(f"echo pwned > {link}", text=True)
            assert r.exit_code != 0, (link, show(r))
        r = sb.exec("echo pwned > /workspace/../../template/README", text=True)
        assert r.exit_code != 0, show(r)
    assert (outside / "target").read_text() == "host\n"
    assert _snapshot(t) == before


def test_a_large_template_costs_no_disk_budget_and_changes_do(tmp_path: Path, host: corral.Host) -> None:
    t = tmp_path / "big"
    t.mkdir()
    with open(t / "data.bin", "wb") as f:
        f.write(os.urandom(1 << 20) * 24)  # 24 MiB, six times the budget
    p = policy(resources={"disk": "4MiB"})
    with Pool(p, size=1, host=host, template=t) as pool, pool.episode() as sb:
        r = sb.exec("wc -c < data.bin && head -c 1000 data.bin > /dev/null", text=True)
        assert r.exit_code == 0 and r.stdout.strip() == str(24 << 20), show(r)
        r = sb.exec("head -c 2M /dev/zero > small && echo ok", text=True)
        assert r.exit_code == 0 and "ok" in r.stdout, show(r)
        # Changing the big file copies it up whole: that is the agent's change, and over budget.
        r = sb.exec("echo x >> data.bin", text=True)
        assert r.exit_code != 0, show(r)
    assert (t / "data.bin").stat().st_size == 24 << 20


def test_a_template_and_a_workspace_are_not_given_together(tmp_path: Path, host: corral.Host) -> None:
    t = _template(tmp_path)
    with pytest.raises(corral.SandboxStartError, match="template and workspace: give one"):
        Sandbox(policy(), host=host, template=t, workspace=tmp_path)
    with pytest.raises(corral.SandboxStartError, match=r"template: .* is not a directory"):
        Sandbox(policy(), host=host, template=t / "README")


@pytest.mark.parametrize("inside", [True, False])
def test_the_plan_shows_the_template_overlay(tmp_path: Path, inside: bool) -> None:
    t = _template(tmp_path)
    if inside:
        plan = planning.build(policy(), uid=5000, gid=5000, sandbox_id="abc", template=str(t))
        assert plan.template == str(t) and plan.template_uid == t.stat().st_uid
        assert planning.Mkdir(planning.CHANGES, 0o700) in plan.root_ops
        assert any("overlay of" in line and str(t) in line for line in plan.describe())
        assert planning.Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    else:
        with pytest.raises(HostError, match=r"template: .* holds .*audit\.db, which no sandbox may see"):
            planning.build(
                policy(),
                uid=5000,
                gid=5000,
                sandbox_id="abc",
                template=str(tmp_path),
                never_shown=[str(t / "audit.db")],
            )

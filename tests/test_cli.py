"""The `corral` command, run as a user would run it."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import psutil
import pytest

from corral.events import parse_event

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = str(ROOT / "examples/policies/offline.yaml")


def corral(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        input=input.decode() if input else None,
        timeout=60,
    )


def test_version() -> None:
    r = corral("--version")
    assert r.returncode == 0 and r.stdout.startswith("corral ")


def test_policy_check_ok_and_precise_error(tmp_path: Path) -> None:
    assert corral("policy", "check", OFFLINE).returncode == 0
    bad = tmp_path / "offline.yaml"
    bad.write_text("version: 1\nresources:\n  memory: lots\n")
    r = corral("policy", "check", str(bad))
    assert r.returncode == 1
    assert r.stderr.strip() == f'{bad}: resources.memory: "lots" is not a size; use e.g. 512MiB'
    assert "Traceback" not in r.stderr


def test_policy_schema_is_json_with_every_top_level_key() -> None:
    r = corral("policy", "schema")
    schema = json.loads(r.stdout)
    assert {"version", "filesystem", "network", "resources", "gpu", "env", "degrade"} <= set(
        schema["properties"]
    )


def test_events_schema_lists_every_type() -> None:
    text = corral("events", "schema").stdout
    for kind in ("sandbox.start", "sandbox.stop", "exec.start", "exec.exit", "deny"):
        assert kind in text


def test_policy_plan_names_the_steps() -> None:
    out = corral("policy", "plan", OFFLINE).stdout
    assert "namespaces: mount, pid, ipc, uts, network, cgroup" in out
    assert "hide file /etc/shadow" in out
    assert "seccomp:" in out


def test_run_without_command_is_a_corral_failure() -> None:
    r = corral("run", "--policy", OFFLINE)
    assert r.returncode == 125
    assert "no command given" in r.stderr


def test_run_with_bad_policy_exits_125_with_the_reason(tmp_path: Path) -> None:
    r = corral("run", "--policy", str(tmp_path / "missing.yaml"), "--", "true")
    assert r.returncode == 125
    assert "missing.yaml: cannot read policy file" in r.stderr


@pytest.mark.root
def test_run_passes_output_and_exit_code_through() -> None:
    r = corral("run", "--policy", OFFLINE, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")


@pytest.mark.root
def test_run_reports_death_by_signal_as_128_plus_n() -> None:
    assert corral("run", "--policy", OFFLINE, "--", "sh", "-c", "kill -TERM $$").returncode == 143


@pytest.mark.root
def test_run_reads_stdin() -> None:
    r = corral("run", "--policy", OFFLINE, "--", "tr", "a-z", "A-Z", input=b"hello\n")
    assert r.stdout == "HELLO\n"


@pytest.mark.root
def test_run_unknown_command_is_127_with_message() -> None:
    r = corral("run", "--policy", OFFLINE, "--", "no-such-tool")
    assert r.returncode == 127
    assert "no-such-tool: command not found" in r.stderr


@pytest.mark.root
def test_run_writes_events_and_summarises_refusals(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    r = corral("run", "--policy", OFFLINE, "--events", str(events), "--", "unshare", "-U", "true")
    assert r.returncode == 1
    assert "corral: seccomp refused unshare" in r.stderr
    # The verdict names each alert: here the attempt to leave the sandbox's namespaces.
    assert "corral: verdict: 2 alerts, worst high" in r.stderr
    assert "corral:   privilege: refused privileged call -> alert" in r.stderr
    # Process events and resource samples (one lands whenever a sample falls while a process runs)
    # come and go with the machine's speed; the sequence of what the command did does not.
    parsed = [
        e
        for e in map(parse_event, events.read_text().splitlines())
        if not e.type.startswith("proc.") and e.type != "resource.sample"
    ]
    assert [e.type for e in parsed] == [
        "sandbox.start",
        "exec.start",
        "alert",
        "deny",
        "alert",
        "exec.exit",
        "sandbox.stop",
    ]
    deny = parsed[3]
    assert deny.layer == "seccomp" and deny.what == "unshare"
    assert deny.process is not None and deny.process.exe == "/usr/bin/unshare"


@pytest.mark.root
def test_run_workspace_round_trip(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("from the host\n")
    r = corral(
        "run",
        "--policy",
        OFFLINE,
        "--workspace",
        str(tmp_path),
        "--",
        "sh",
        "-c",
        "cat in.txt > out.txt; echo more >> out.txt",
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.txt").read_text() == "from the host\nmore\n"


@pytest.mark.root
def test_run_creates_a_missing_workspace_directory(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "1"
    r = corral("run", "--policy", OFFLINE, "--workspace", str(out), "--", "sh", "-c", "echo done > result")
    assert r.returncode == 0, r.stderr
    assert (out / "result").read_text() == "done\n"
    assert out.stat().st_mode & 0o777 == 0o755


def test_run_workspace_that_cannot_be_created_is_a_corral_failure(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "ws"
    r = corral("run", "--policy", OFFLINE, "--workspace", str(bad), "--", "true")
    assert r.returncode == 125
    assert r.stderr == f"corral: --workspace {bad}: cannot create it: Not a directory\n"


@pytest.mark.root
def test_run_timeout_kills_and_says_so() -> None:
    r = corral("run", "--policy", OFFLINE, "--timeout", "0.5", "--", "sleep", "30")
    assert r.returncode == 137
    assert "timed out" in r.stderr


@pytest.mark.root
def test_shell_is_interactive_through_a_pty() -> None:
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        os.execv(sys.executable, [sys.executable, "-m", "corral.cli", "shell", "--policy", OFFLINE])
    os.write(fd, b"echo inside-$((6*7)); test -t 0 && echo terminal-$((2*3)); exit 5\n")
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    if time.monotonic() >= deadline:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert b"inside-42" in out, out
    assert b"terminal-6" in out, out  # a terminal of its own: a pty, never the host's
    assert os.waitstatus_to_exitcode(status) == 5


CLI = [sys.executable, "-m", "corral.cli"]


@pytest.mark.root
def test_run_on_a_terminal_gives_the_command_a_pty_and_leaves_the_host_terminal_as_it_was() -> None:
    master, slave = os.openpty()  # the "host terminal" `corral run` is started on
    try:
        before = termios.tcgetattr(slave)
        proc = subprocess.Popen(
            [
                *CLI,
                "run",
                "--policy",
                OFFLINE,
                "--",
                "sh",
                "-c",
                "stty -echo -icanon && echo inside-$((6*7))",
            ],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        out = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                out += os.read(master, 4096)
            elif proc.poll() is not None:
                break
        assert proc.wait(5) == 0, out
        assert b"inside-42" in out, out  # the pty's modes could be changed, and the output came through
        after = termios.tcgetattr(slave)
        assert after == before, "the command changed the host terminal's modes"
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.root
def test_sigterm_closes_the_sandbox_and_exits_143() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "corral.cli",
            "run",
            "--policy",
            OFFLINE,
            "--",
            "sh",
            "-c",
            "echo up; sleep 100 & sleep 100",
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    proc.terminate()
    assert proc.wait(timeout=10) == 143
    proc.stdout.close()
    deadline = time.monotonic() + 5
    while any(p.info["cmdline"] == ["sleep", "100"] for p in psutil.process_iter(["cmdline"])):
        assert time.monotonic() < deadline, "processes of a terminated `corral run` are still running"
        time.sleep(0.05)

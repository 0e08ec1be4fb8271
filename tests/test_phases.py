"""Network phases: a sandbox's egress rules switched live by its caller (`Sandbox.phase`), and what
was open when a stricter phase began is cut.

Each abuse test sits beside the use it abuses: an agent that opens a connection during `setup` and
keeps it (a long download, an ssh session, a raw TCP socket, a connection still being decided), DNS
answers it got during `setup`, and a way back to a looser phase. Names map to local servers through
`hosts:` and `LocalUpstream`, as in test_egress.py; nothing leaves the test's loopback-only namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from corral import AsyncSandbox, Deny, PhaseChange, Policy, Sandbox, SandboxClosedError, SandboxStart
from corral.egress.decision import Decision
from corral.egress.rules import Rules
from corral.events import DnsQuery, NetConnect
from helpers import show, wait_until
from servers import (
    HOST_KEY_ALIAS,
    LocalUpstream,
    http_server,
    package_index,
    ssh_server,
    tcp_listener,
    trickle_server,
)

WEB = "web.example.internal"
PYPI = "pypi.example.internal"
GIT = "git.example.internal"
FILES = "files.example.internal"
CUT = "cut at the switch from phase setup to agent, which does not allow it"


def phased(setup: list[dict[str, Any]], hosts: dict[str, str] | None = None, **network: Any) -> Policy:
    """setup (with `setup`'s rules), then agent and verify (nothing): the shape of a training task.
    Tripwires off, as in test_egress.py: the fence must hold on its own."""
    return Policy.from_dict(
        {
            "version": 1,
            "network": {
                "hosts": hosts or {},
                "phases": {"setup": {"egress": setup}, "agent": {}, "verify": {}},
                **network,
            },
            "tripwires": {"enabled": False},
        }
    )


def of(sb: Sandbox, kind: type[Any]) -> list[Any]:
    return [e for e in sb.events() if isinstance(e, kind)]


def inside(sb: Sandbox, path: str) -> str:
    """A file in the sandbox, read from the host: polling with a command would wait on the fence's
    settling (a command's result waits for the connections in progress to be decided)."""
    try:
        return Path(f"/proc/{sb.init_pid}/root{path}").read_text()
    except OSError:
        return ""


def file_says(sb: Sandbox, path: str, text: str) -> bool:
    return text in inside(sb, path)


# --- without a sandbox -----------------------------------------------------------------------------


def test_a_decision_made_in_one_phase_is_rejudged_by_the_next() -> None:
    rules = Rules(
        phased([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"}), frozenset()
    )
    decision = Decision(rules, LocalUpstream({}))
    local = ipaddress.ip_address("127.0.0.1")
    synthetic = ipaddress.ip_address("198.18.0.1")
    assert (rules.phase, rules.switches) == ("setup", 0)
    assert decision.recheck(WEB, synthetic, local, 80, "http") is None
    assert decision.recheck(WEB, synthetic, local, 80, "ssh") == (
        f"ssh to {WEB} port 80 is not allowed (allowed: http)"
    )
    rules.enter("agent")
    assert (rules.phase, rules.switches) == ("agent", 1)
    assert decision.recheck(WEB, synthetic, local, 80, "http") == f"no egress rule allows {WEB} port 80"
    # A parked connect is judged by the same rules, and refused at connect() now.
    refusal = decision.at_connect(WEB, synthetic, 80)
    assert refusal is not None and refusal.reason == f"no egress rule allows {WEB} port 80"
    rules.enter("setup")
    assert decision.at_connect(WEB, synthetic, 80) is None


def test_without_phases_the_base_rules_hold_and_no_phase_is_current() -> None:
    rules = Rules(Policy.from_dict({"version": 1, "network": {"egress": [{"host": WEB, "ports": [80]}]}}))
    assert rules.phase is None and [r.host for r in rules.rules] == [WEB]


# --- in a sandbox ----------------------------------------------------------------------------------


@pytest.mark.root
def test_a_switch_changes_the_rules_at_once_and_is_recorded() -> None:
    with http_server() as web:
        up = LocalUpstream({80: web.port})
        p = phased([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            assert sb.current_phase == "setup"
            curl = f"curl -sS --max-time 5 http://{WEB}/host && curl -sS --max-time 5 --noproxy '*' http://{WEB}/host"
            r = sb.exec(curl, text=True)
            assert r.exit_code == 0 and r.stdout == WEB * 2, show(r)
            sb.phase("agent")
            assert sb.current_phase == "agent"
            r = sb.exec(curl.replace("&&", ";"), text=True)
            assert r.exit_code != 0, show(r)
            sb.phase("verify")
            unknown = (
                r"phase 'agnet': not a network phase of policy <policy> \(its phases: setup, agent, verify\)"
            )
            with pytest.raises(ValueError, match=unknown):
                sb.phase("agnet")
            assert sb.current_phase == "verify"
            events = sb.events()
        with pytest.raises(SandboxClosedError, match="it has no phase to switch"):
            sb.phase("setup")
    [start] = [e for e in events if isinstance(e, SandboxStart)]
    assert start.phase == "setup"
    assert [(e.previous, e.phase) for e in events if isinstance(e, PhaseChange)] == [
        ("setup", "agent"),
        ("agent", "verify"),
    ]
    connects = [e for e in events if isinstance(e, NetConnect)]
    assert [(e.via, e.decision) for e in connects] == [
        ("proxy", "allow"),
        ("transparent", "allow"),
        ("proxy", "deny"),
        ("transparent", "deny"),  # refused at connect(): the rules in force are agent's there too
    ]
    refused = [e for e in events if isinstance(e, Deny) and e.layer == "egress"]
    assert [d.detail for d in refused] == [f"no egress rule allows {WEB} port 80"] * 2


@pytest.mark.root
def test_a_policy_without_phases_has_none_to_switch_to() -> None:
    with Sandbox(Policy.default(), keep_workspace=False) as sb:
        assert sb.current_phase is None
        with pytest.raises(ValueError, match=r"phase 'setup': not a network phase .*\(its phases: none\)"):
            sb.phase("setup")
        [start] = of(sb, SandboxStart)
        assert start.phase is None


_HOLD = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 7000), 5)
s.sendall(b"hello from setup\\n")
print("connected", flush=True)
got = b""
try:
    while chunk := s.recv(65536):
        got += chunk
    print("eof after", len(got), flush=True)
except OSError as e:
    print("error", e, flush=True)
try:
    for _ in range(20):
        s.sendall(b"still here\\n")
        time.sleep(0.05)
    print("wrote on", flush=True)
except OSError as e:
    print("send failed", e.__class__.__name__, flush=True)
"""


@pytest.mark.root
def test_a_raw_socket_opened_in_setup_is_cut_when_agent_begins() -> None:
    with tcp_listener(b"welcome\n") as server:
        up = LocalUpstream({7000: server.port})
        p = phased([{"host": WEB, "ports": [7000], "protocols": ["any"]}], {WEB: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("hold.py", _HOLD)
            r = sb.exec(f"python3 hold.py {WEB} > /tmp/hold.log 2>&1 &")
            assert r.exit_code == 0, show(r)
            assert wait_until(lambda: b"hello from setup" in server.received), server.received
            sb.phase("agent")
            # The server sees the end at once, and the agent's socket reads EOF: nothing more passes.
            assert wait_until(lambda: all(c.closed for c in server.connections))
            assert wait_until(lambda: file_says(sb, "/tmp/hold.log", "eof after 8"), 10), inside(
                sb, "/tmp/hold.log"
            )
            assert b"still here" not in server.received
            again = sb.exec(f"nc -w 2 {WEB} 7000 < /dev/null", text=True)
            assert again.exit_code != 0, show(again)
            events = sb.events()
    assert [c.data for c in server.connections] == [bytearray(b"hello from setup\n")]
    [held, retry] = [e for e in events if isinstance(e, NetConnect)]
    assert held.decision == "allow" and held.reason.endswith(f"{CUT}: no egress rule allows {WEB} port 7000")
    assert (held.bytes_out, held.bytes_in) == (len(b"hello from setup\n"), len(b"welcome\n"))
    assert held.process is not None and held.process.exe is not None and "python3" in held.process.exe
    assert retry.decision == "deny"
    cut = [e for e in events if isinstance(e, Deny) and e.detail.startswith(CUT)]
    assert [(d.layer, d.what) for d in cut] == [("egress", f"{WEB} port 7000")]
    # Recorded in order: the switch, then what it cut.
    kinds = [type(e).__name__ for e in events if isinstance(e, PhaseChange | NetConnect | Deny)]
    assert kinds[:3] == ["PhaseChange", "NetConnect", "Deny"]


@pytest.mark.root
def test_a_download_that_outlives_setup_is_cut_and_a_looser_phase_returns_only_by_the_caller() -> None:
    with trickle_server() as server:
        up = LocalUpstream({80: server.port})
        p = phased([{"host": FILES, "ports": [80], "protocols": ["http"]}], {FILES: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            download = f'curl -sS -o /tmp/dl http://{FILES}/model.bin; echo "curl exit $?" > /tmp/dl.status'
            sb.exec(f"({download}) > /dev/null 2>&1 &")
            assert wait_until(lambda: bool(server.sent) and server.sent[0] > 64 << 10, 10), server.sent
            sb.phase("agent")
            assert wait_until(lambda: file_says(sb, "/tmp/dl.status", "curl exit"), 10)
            status = sb.read_file("/tmp/dl.status").decode()
            assert status.strip() == "curl exit 18", status  # partial file: the transfer was cut
            assert wait_until(lambda: len(server.ended) == 1)
            assert server.ended[0].startswith("client went away")
            sent = server.sent[0]
            # Everything the sandbox can reach of corral in agent: the proxy, the transparent path,
            # DNS, a raw connect. None switches it back.
            tries = sb.exec(
                f"curl -sS --max-time 3 http://{FILES}/model.bin -o /dev/null; "
                f"curl -sS --max-time 3 --noproxy '*' http://{FILES}/ -o /dev/null; "
                f"curl -sS --max-time 3 -X PHASE http://{FILES}/setup -o /dev/null; "
                f"getent hosts setup.phase.corral; nc -w 1 {FILES} 80 < /dev/null",
                text=True,
            )
            assert tries.exit_code != 0, show(tries)
            assert sb.current_phase == "agent"
            assert len(server.sent) == 1 and server.sent[0] == sent
            # The caller, and only the caller, opens it again.
            sb.phase("setup")
            again = sb.exec(f"curl -sS --max-time 1 http://{FILES}/model.bin -o /tmp/dl2", text=True)
            assert again.exit_code == 28, show(again)  # ran until its own time limit: allowed again
            events = sb.events()
    assert [(e.previous, e.phase) for e in events if isinstance(e, PhaseChange)] == [
        ("setup", "agent"),
        ("agent", "setup"),
    ]
    connects = [e for e in events if isinstance(e, NetConnect)]
    cut = connects[0]
    assert cut.decision == "allow" and CUT in cut.reason and cut.bytes_in >= 64 << 10
    assert connects[-1].decision == "allow" and "cut" not in connects[-1].reason


@pytest.mark.root
def test_an_ssh_session_opened_in_setup_ends_when_agent_begins(tmp_path: Path) -> None:
    with ssh_server(tmp_path / "sshd") as sshd:
        up = LocalUpstream({22: sshd.port})
        p = phased([{"host": GIT, "ports": [22], "protocols": ["ssh"]}], {GIT: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("key", Path(sshd.client_key).read_bytes())
            sb.write_file("known_hosts", Path(sshd.known_hosts).read_bytes())
            ssh = (
                "ssh -F /dev/null -i key -o BatchMode=yes -o UserKnownHostsFile=known_hosts "
                f"-o StrictHostKeyChecking=yes -o HostKeyAlias={HOST_KEY_ALIAS} -o ConnectTimeout=5 "
                f"{sshd.user}@{GIT}"
            )
            r = sb.exec(
                f"chmod 600 key && ({ssh} 'echo up; sleep 60' > /tmp/ssh.out 2>&1; "
                'echo "ssh exit $?" > /tmp/ssh.status) > /dev/null 2>&1 &'
            )
            assert r.exit_code == 0, show(r)
            assert wait_until(lambda: file_says(sb, "/tmp/ssh.out", "up"), 15), inside(sb, "/tmp/ssh.out")
            sb.phase("agent")
            assert wait_until(lambda: file_says(sb, "/tmp/ssh.status", "ssh exit"), 10)
            assert sb.read_file("/tmp/ssh.status").strip() == b"ssh exit 255"
            late = sb.exec(f"{ssh} true", text=True, timeout=30)
            assert late.exit_code == 255, show(late)
            events = sb.events()
    connects = [e for e in events if isinstance(e, NetConnect)]
    first = connects[0]
    assert (first.protocol, first.decision) == ("ssh", "allow") and CUT in first.reason


_RESOLVE = """
import socket, sys
print(socket.gethostbyname(sys.argv[1]))
"""
_CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(3)
try:
    s.connect((sys.argv[1], 80))
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % sys.argv[2].encode())
    print("answer", s.recv(100))
except OSError as e:
    print("refused", e.__class__.__name__)
"""


@pytest.mark.root
def test_an_address_the_resolver_gave_out_in_setup_lets_nothing_through_in_agent() -> None:
    with http_server() as web:
        # A name the resolver answers only because setup's rule covers it (not in `hosts:`), resolved
        # through the upstream; the checked address is allowed by a cidr rule, also setup's.
        up = LocalUpstream({80: web.port}, {FILES: "127.0.0.1"})
        p = phased(
            [
                {"host": FILES, "ports": [80], "protocols": ["http"]},
                {"cidr": "127.0.0.1/32", "ports": [80], "protocols": ["http"]},
            ]
        )
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("resolve.py", _RESOLVE)
            sb.write_file("connect.py", _CONNECT)
            r = sb.exec(f"python3 resolve.py {FILES}", text=True)
            assert r.exit_code == 0, show(r)
            address = str(r.stdout).strip()
            assert ipaddress.ip_address(address) in ipaddress.ip_network("198.18.0.0/15")
            ok = sb.exec(f"python3 connect.py {address} {FILES}", text=True)
            assert "answer b'HTTP/1.1 200" in str(ok.stdout), show(ok)
            sb.phase("agent")
            # The cached answer: refused at connect(), by the name it stands for.
            cached = sb.exec(f"python3 connect.py {address} {FILES}", text=True)
            assert str(cached.stdout).strip() == "refused ConnectionRefusedError", show(cached)
            # A fresh question gets no answer at all.
            fresh = sb.exec(f"python3 resolve.py {FILES}", text=True)
            assert fresh.exit_code != 0, show(fresh)
            events = sb.events()
    queries = [(e.name, e.decision) for e in events if isinstance(e, DnsQuery) and e.qtype == "A"]
    assert queries[0] == (FILES, "allow") and queries[-1] == (FILES, "deny")
    refused = [e for e in events if isinstance(e, NetConnect) and e.decision == "deny"]
    assert [(e.name, e.reason) for e in refused] == [(FILES, f"no egress rule allows {FILES} port 80")]
    assert up.dialed == [("127.0.0.1", 80)]  # only setup's connection was ever dialled


_SLOW = """
import socket, sys, time
time.sleep(0.5)  # after the command that started it has returned
s = socket.create_connection((sys.argv[1], 80), 5)
print("connected", flush=True)
time.sleep(1.5)  # the fence waits for the first bytes to read the protocol; the phase ends meanwhile
try:
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n" % sys.argv[1].encode())
    print("answer", s.recv(100), flush=True)
except OSError as e:
    print("error", e.__class__.__name__, flush=True)
"""


@pytest.mark.root
def test_a_connection_still_being_decided_at_the_switch_is_judged_by_the_new_phase() -> None:
    with http_server() as web:
        up = LocalUpstream({80: web.port})
        p = phased([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            sb.write_file("slow.py", _SLOW)
            sb.exec(f"python3 slow.py {WEB} > /tmp/slow.log 2>&1 &")
            assert wait_until(lambda: file_says(sb, "/tmp/slow.log", "connected"), 5)
            sb.phase("agent")
            assert wait_until(lambda: file_says(sb, "/tmp/slow.log", "answer"), 10)
            assert inside(sb, "/tmp/slow.log").endswith("answer b''\n"), inside(sb, "/tmp/slow.log")
            assert web.requests == []
            events = sb.events()
    [attempt] = [e for e in events if isinstance(e, NetConnect)]
    assert attempt.decision == "deny"
    assert attempt.reason == f"phase agent began while it was decided: no egress rule allows {WEB} port 80"


@pytest.mark.root
def test_pip_installs_during_setup_and_not_once_the_agent_acts(tmp_path: Path) -> None:
    with package_index(tmp_path / "index") as index:
        up = LocalUpstream({80: index.port})
        p = phased([{"host": PYPI, "ports": [80], "protocols": ["http"]}], {PYPI: "127.0.0.1"})
        pip = (
            "python3 -m pip {verb} -q --disable-pip-version-check --no-cache-dir --retries 0 --timeout 5 "
            f"--trusted-host {PYPI} --index-url http://{PYPI}/simple/ {{where}} corral-probe"
        )
        with Sandbox(p, keep_workspace=False, upstream=up) as sb:
            r = sb.exec(
                pip.format(verb="install", where="--target /tmp/site")
                + " && PYTHONPATH=/tmp/site python3 -c 'import corral_probe; print(corral_probe.VALUE)'",
                text=True,
                timeout=120,
            )
            assert r.exit_code == 0, show(r)
            assert str(r.stdout).strip() == "42"
            sb.phase("agent")
            agent = sb.exec(pip.format(verb="download", where="-d /tmp/again"), text=True, timeout=60)
            assert agent.exit_code != 0, show(agent)
            # What setup installed stays: only the network is gone.
            kept = sb.exec("PYTHONPATH=/tmp/site python3 -c 'import corral_probe'")
            assert kept.exit_code == 0, show(kept)
            refused = [d for d in agent.denials if d.layer == "egress"]
            assert refused and all(d.what == f"{PYPI} port 80" for d in refused), agent.denials


@pytest.mark.root
def test_the_async_twin_switches_phases() -> None:
    p = phased([{"host": WEB, "ports": [80], "protocols": ["http"]}], {WEB: "127.0.0.1"})

    async def episode() -> list[str | None]:
        async with AsyncSandbox(p, keep_workspace=False) as sb:
            seen = [sb.current_phase]
            await sb.phase("agent")
            seen.append(sb.current_phase)
            with pytest.raises(ValueError):
                await sb.phase("nope")
            return seen

    assert asyncio.run(episode()) == ["setup", "agent"]

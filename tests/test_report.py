"""`corral.report`: the report of a sandbox or a run, built from stored events.

Unit tests build events with the models in `corral.events` and store them as the audit store hands
them back (`StoredEvent`, body = the event's JSON); one root test builds the report of a real
sandbox's events."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest

import corral.report
from corral import Sandbox
from corral.events import (
    Alert,
    Deny,
    DnsQuery,
    Event,
    ExecExit,
    ExecStart,
    GpuUsage,
    NetConnect,
    ProcessRef,
    ProcExec,
    ProcExit,
    ResourceSample,
    SandboxStart,
    SandboxStop,
)
from corral.report import (
    Limits,
    ProcessNode,
    Report,
    build,
    printable,
    process_tree,
    resource_series,
    timeline,
    to_html,
    to_json,
    to_text,
    verdict,
)
from corral.report._processes import MAX_DEPTH
from corral.store import SandboxInfo, StoredEvent
from helpers import policy

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CLEAN_ID = "aaaaaaaaaaaa"
BAD_ID = "bbbbbbbbbbbb"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stored(events: Iterable[Event]) -> list[StoredEvent]:
    """Events as the audit store gives them back: numbered per sandbox, body = the emitted JSON."""
    seqs: dict[str, int] = {}
    out = []
    for e in events:
        seqs[e.sandbox] = seqs.get(e.sandbox, 0) + 1
        out.append(StoredEvent(e.sandbox, seqs[e.sandbox], e.time, e.type, e.model_dump(mode="json")))
    return out


def info(sandbox: str, events: Sequence[StoredEvent], **labels: str) -> SandboxInfo:
    """The store's record of a sandbox, as it would summarise `events`."""
    mine = [e for e in events if e.sandbox == sandbox]
    alerts = [e.body for e in mine if e.type == "alert"]
    stop = next((e for e in mine if e.type == "sandbox.stop"), None)
    return SandboxInfo(
        id=sandbox,
        started=mine[0].time,
        stopped=stop.time if stop else None,
        stop_reason=stop.body["reason"] if stop else None,
        policy="policy.yaml",
        labels=labels,
        events=len(mine),
        alerts=len(alerts),
        worst=verdict(a["severity"] for a in alerts) if alerts else None,
    )


def ref(pid: int, ppid: int | None, *cmdline: str, exec: int | None = 1) -> ProcessRef:
    return ProcessRef(pid=pid, ppid=ppid, exe=cmdline[0], cmdline=list(cmdline), exec=exec)


def start(sandbox: str, t: float) -> SandboxStart:
    return SandboxStart(
        sandbox=sandbox,
        time=at(t),
        policy="policy.yaml",
        cgroup_version=2,
        uid=60001,
        limits={"memory": 2**30, "cpu": 2.0},
        workspace="/var/lib/corral/ws",
    )


def clean_events(sandbox: str = CLEAN_ID, t: float = 0.0) -> list[Event]:
    """`sh -c 'echo hi; ls /'`: sh runs ls, both exit 0; one allowed DNS query and connection."""
    sh = ref(100, 50, "/bin/sh", "-c", "echo hi; ls /")
    return [
        start(sandbox, t),
        ExecStart(sandbox=sandbox, time=at(t + 1), exec=1, command=["/bin/sh", "-c", "echo hi; ls /"]),
        ProcExec(sandbox=sandbox, time=at(t + 1.1), process=sh, exec=1),
        ProcExec(sandbox=sandbox, time=at(t + 1.2), process=ref(101, 100, "/bin/ls", "/"), exec=1),
        ProcExit(sandbox=sandbox, time=at(t + 1.3), pid=101, exit_code=0, exec=1),
        ProcExit(sandbox=sandbox, time=at(t + 1.4), pid=100, exit_code=0, exec=1),
        ExecExit(
            sandbox=sandbox, time=at(t + 1.5), exec=1, exit_code=0, duration=0.5, cpu_seconds=0.01,
            peak_memory=3 << 20,
        ),
        ExecStart(sandbox=sandbox, time=at(t + 2), exec=2, command=["pip", "download", "requests"]),
        ProcExec(sandbox=sandbox, time=at(t + 2.1), process=ref(102, 50, "/usr/bin/pip", exec=2), exec=2),
        DnsQuery(
            sandbox=sandbox, time=at(t + 2.2), name="pypi.example", qtype="A", decision="allow",
            answer=["198.18.0.1"], exec=2, process=ref(102, 50, "/usr/bin/pip", exec=2),
        ),
        NetConnect(
            sandbox=sandbox, time=at(t + 2.5), destination="198.18.0.1", port=443, name="pypi.example",
            address="192.0.2.10", protocol="tls", sni="pypi.example", decision="allow", reason="rule 1",
            via="transparent", bytes_out=900, bytes_in=120_000, exec=2,
            process=ref(102, 50, "/usr/bin/pip", exec=2),
        ),
        ProcExit(sandbox=sandbox, time=at(t + 2.6), pid=102, exit_code=0, exec=2),
        ExecExit(
            sandbox=sandbox, time=at(t + 2.7), exec=2, exit_code=0, duration=0.7, cpu_seconds=0.3,
            peak_memory=40 << 20,
        ),
        SandboxStop(sandbox=sandbox, time=at(t + 3), reason="closed", duration=3.0),
    ]  # fmt: skip


def bad_events(sandbox: str = BAD_ID, t: float = 0.0) -> list[Event]:
    """An agent that starts a miner (killed) and a reverse shell, and is refused along the way."""
    python = ref(200, 60, "/usr/bin/python3", "run.py")
    miner = ref(201, 200, "/tmp/xmrig", "-o", "pool.mine.example:3333")
    shell = ref(202, 200, "/bin/bash", "-i")
    return [
        start(sandbox, t),
        ExecStart(sandbox=sandbox, time=at(t + 1), exec=1, command=["python3", "run.py"]),
        ProcExec(sandbox=sandbox, time=at(t + 1.1), process=python, exec=1),
        ProcExec(sandbox=sandbox, time=at(t + 1.2), process=miner, exec=1),
        DnsQuery(
            sandbox=sandbox, time=at(t + 1.3), name="pool.mine.example", qtype="A", decision="deny",
            exec=1, process=miner,
        ),
        NetConnect(
            sandbox=sandbox, time=at(t + 1.4), destination="203.0.113.9", port=3333, protocol="stratum",
            decision="deny", reason="no egress rule allows 203.0.113.9 port 3333", via="transparent",
            exec=1, process=miner,
        ),
        Deny(sandbox=sandbox, time=at(t + 1.4), layer="egress", what="203.0.113.9 port 3333", exec=1,
             process=miner),
        ResourceSample(sandbox=sandbox, time=at(t + 1.5), cpu=1.9, memory=300 << 20, processes=3,
                       gpu=[GpuUsage(index=0, pid=201, memory=1 << 30, sm=97.0)]),
        Alert(
            sandbox=sandbox, time=at(t + 1.6), rule="cpu miner", category="mining", severity="critical",
            action="kill", outcome="killed 1 process", message="xmrig burns 1.9 cores", exec=1,
            process=miner,
        ),
        ProcExit(sandbox=sandbox, time=at(t + 1.7), pid=201, exit_code=137, exec=1),
        ProcExec(sandbox=sandbox, time=at(t + 2), process=shell, exec=1, stdio=["socket"] * 3),
        NetConnect(
            sandbox=sandbox, time=at(t + 2.5), destination="198.18.0.7", port=4444, name="c2.example",
            address="192.0.2.44", protocol="unknown", decision="allow", reason="rule 2", via="transparent",
            bytes_out=2000, bytes_in=300, exec=1, process=shell,
        ),
        Alert(
            sandbox=sandbox, time=at(t + 2.1), rule="shell on a socket", category="reverse_shell",
            severity="high", action="kill", outcome="killed 1 process", message="bash -i on a socket",
            exec=1, process=shell,
        ),
        Deny(sandbox=sandbox, time=at(t + 2.2), layer="seccomp", what="mount", exec=1, count=3),
        Deny(sandbox=sandbox, time=at(t + 2.3), layer="landlock", what="/etc/shadow", exec=1),
        ProcExit(sandbox=sandbox, time=at(t + 2.6), pid=202, exit_code=137, exec=1),
        ExecExit(
            sandbox=sandbox, time=at(t + 3), exec=1, exit_code=1, duration=2.0, cpu_seconds=3.8,
            peak_memory=300 << 20,
        ),
        SandboxStop(sandbox=sandbox, time=at(t + 4), reason="tripwire", duration=4.0),
    ]  # fmt: skip


def report_of(events: list[Event], **labels: str) -> Report:
    s = stored(events)
    return build([info(sid, s, **labels) for sid in dict.fromkeys(e.sandbox for e in s)], s)


def walk(nodes: list[ProcessNode]) -> Iterable[ProcessNode]:
    for n in nodes:
        yield n
        yield from walk(n.children)


def test_public_surface_is_complete() -> None:
    public = {n for n in dir(corral.report) if not n.startswith("_")} - {"annotations"}
    assert public == set(corral.report.__all__)


def test_verdict_is_clean_or_the_worst_severity() -> None:
    assert verdict([]) == "clean"
    assert verdict([None, "clean"]) == "clean"
    assert verdict(["low", "critical", "medium"]) == "critical"
    assert verdict(["info"]) == "info"  # an alert of any severity is not clean
    assert verdict(["clean", "high"]) == "high"


def test_clean_sandbox() -> None:
    r = report_of(clean_events())
    (s,) = r.sandboxes
    assert r.verdict == s.verdict == "clean" and r.alerts == [] and s.alerts == []
    assert r.title == f"sandbox {CLEAN_ID}"
    assert (s.commands, s.failed_commands, s.stop_reason, s.policy) == (2, 0, "closed", "policy.yaml")
    assert (s.connections, s.connections_denied, s.dns_queries, s.dns_denied, s.denials) == (1, 0, 1, 0, {})
    assert s.limits == {"memory": 2**30, "cpu": 2.0}
    assert [e.kind for e in r.timeline.entries] == [
        "sandbox.start", "exec.start", "exec.exit", "exec.start", "dns.query", "net.connect", "exec.exit",
        "sandbox.stop",
    ]  # fmt: skip
    assert r.timeline.entries[1].summary == "#1 $ echo hi; ls /"
    assert r.timeline.entries[3].summary == "#2 $ pip download requests"
    assert not any(e.denied for e in r.timeline.entries)
    sh, pip = s.processes
    assert (sh.pid, sh.exit_code, [c.cmdline for c in sh.children]) == (100, 0, [["/bin/ls", "/"]])
    assert pip.connections[0].destination == "pypi.example:443" and pip.connections[0].bytes_in == 120_000
    (d,) = s.destinations
    assert (d.destination, d.port, d.count, d.allowed, d.bytes_in, d.protocols) == (
        "pypi.example", 443, 1, 1, 120_000, ["tls"]
    )  # fmt: skip
    text = to_text(r)
    assert "verdict    CLEAN" in text and "no alerts" in text and "echo hi; ls /" in text


def test_mining_and_reverse_shell() -> None:
    r = report_of(bad_events())
    (s,) = r.sandboxes
    assert r.verdict == s.verdict == "critical"
    mining, shell = s.alerts
    assert (mining.category, mining.count, mining.worst) == ("mining", 1, "critical")
    assert mining.rules == {"cpu miner": 1} and mining.actions == {"kill": 1}
    assert mining.outcomes == ["killed 1 process"] and mining.messages == ["xmrig burns 1.9 cores"]
    assert (shell.category, shell.worst, shell.rules) == ("reverse_shell", "high", {"shell on a socket": 1})
    assert r.alerts == s.alerts
    assert s.denials == {"seccomp": 3, "egress": 1, "landlock": 1}  # repeats counted
    assert (s.connections, s.connections_denied, s.dns_queries, s.dns_denied) == (2, 1, 1, 1)
    assert (s.commands, s.failed_commands, s.stop_reason) == (1, 1, "tripwire")
    (python,) = s.processes
    miner, bash = python.children
    assert miner.alerts == ["cpu miner"] and miner.exit_code == 137
    assert [(c.destination, c.decision, c.protocol) for c in miner.connections] == [
        ("203.0.113.9:3333", "deny", "stratum")
    ]
    assert bash.alerts == ["shell on a socket"] and bash.connections[0].destination == "c2.example:4444"
    dests = {(d.destination, d.port): d for d in s.destinations}
    assert dests[("203.0.113.9", 3333)].denied == 1
    assert dests[("203.0.113.9", 3333)].reason == "no egress rule allows 203.0.113.9 port 3333"
    assert dests[("c2.example", 4444)].bytes_out == 2000
    alerts = [e for e in r.timeline.entries if e.kind == "alert"]
    assert [a.severity for a in alerts] == ["critical", "high"]
    assert alerts[0].summary == "CRITICAL mining [cpu miner] xmrig burns 1.9 cores -> kill: killed 1 process"
    denied = [e.summary for e in r.timeline.entries if e.denied]
    assert denied[0] == "deny A pool.mine.example by /tmp/xmrig (201)"
    assert "seccomp: mount x3" in denied
    (point,) = s.resources
    assert (point.cpu, point.memory, point.gpu_memory, point.gpu_sm) == (1.9, 300 << 20, 1 << 30, 97.0)
    text = to_text(r)
    assert "verdict    CRITICAL" in text
    assert re.search(r"mining +1 +critical +cpu miner \(1\) +kill 1 +killed 1 process", text), text
    assert "ALERT cpu miner" in text and "denials   seccomp 3, egress 1, landlock 1" in text


def test_sandbox_info_verdict_counts_when_its_alerts_are_not_among_the_events() -> None:
    s = stored(clean_events())
    r = build([SandboxInfo(id=CLEAN_ID, started=T0, worst="medium", alerts=1)], s)
    assert r.verdict == r.sandboxes[0].verdict == "medium"


def test_process_tree_nesting_reexec_pid_reuse_and_unknown_processes() -> None:
    sid = CLEAN_ID
    events: list[Event] = [
        ProcExec(sandbox=sid, time=at(0), process=ref(10, 1, "/bin/sh", "-c", "make")),
        ProcExec(sandbox=sid, time=at(1), process=ref(11, 10, "/usr/bin/make")),
        ProcExec(sandbox=sid, time=at(2), process=ref(12, 11, "/bin/sh", "-c", "cc x.c")),
        ProcExec(sandbox=sid, time=at(3), process=ref(12, 11, "/usr/bin/cc", "x.c")),  # sh -c's exec
        ProcExec(sandbox=sid, time=at(4), process=ref(13, 12, "/usr/bin/ld")),
        NetConnect(
            sandbox=sid, time=at(5), destination="10.0.0.1", port=22, protocol="ssh", decision="deny",
            reason="private", via="transparent", process=ref(13, 12, "/usr/bin/ld"),
        ),
        ProcExit(sandbox=sid, time=at(6), pid=13, exit_code=0),
        ProcExec(sandbox=sid, time=at(7), process=ref(13, 11, "/usr/bin/true")),  # pid 13 reused
        # A process never seen at exec (its proc.exec lost), named by its connection.
        NetConnect(
            sandbox=sid, time=at(8), destination="10.0.0.2", port=80, protocol="http", decision="deny",
            reason="private", via="transparent", process=ref(99, 10, "/usr/bin/curl", "10.0.0.2"),
        ),
        ProcExit(sandbox=sid, time=at(9), pid=12, exit_code=2),
    ]  # fmt: skip
    (sh,) = process_tree(stored(events))
    make, curl = sh.children
    cc, true = make.children
    (ld,) = cc.children
    assert (cc.pid, cc.cmdline, cc.images, cc.exit_code) == (12, ["/usr/bin/cc", "x.c"], 2, 2)
    assert (ld.pid, [c.destination for c in ld.connections], ld.exit_code) == (13, ["10.0.0.1:22"], 0)
    assert (true.pid, true.cmdline, true.exited) == (13, ["/usr/bin/true"], None)
    assert (curl.pid, curl.seen_exec, curl.connections[0].destination) == (99, False, "10.0.0.2:80")
    assert "ld" in to_text(build([], stored(events)))


def test_a_reused_pid_whose_exit_was_lost_is_a_new_process() -> None:
    def born(pid: int, started: float, *cmdline: str) -> ProcessRef:
        return ProcessRef(pid=pid, ppid=1, exe=cmdline[0], cmdline=list(cmdline), started=at(started))

    events: list[Event] = [
        ProcExec(sandbox=CLEAN_ID, time=at(0), process=born(40, 0, "/bin/sh", "-c", "exec sleep 1")),
        ProcExec(sandbox=CLEAN_ID, time=at(0.1), process=born(40, 0, "/bin/sleep", "1")),  # the same one
        ProcExec(sandbox=CLEAN_ID, time=at(9), process=born(40, 9, "/bin/true")),  # no proc.exit between
    ]
    first, second = process_tree(stored(events))
    assert (first.cmdline, first.images) == (["/bin/sleep", "1"], 2)
    assert (second.cmdline, second.images) == (["/bin/true"], 1)


def test_process_tree_depth_and_count_are_bounded() -> None:
    chain = [
        ProcExec(sandbox=CLEAN_ID, time=at(i), process=ref(1000 + i, 999 + i, "/bin/sh")) for i in range(200)
    ]
    nodes = list(walk(process_tree(stored(chain))))
    assert len(nodes) == 200  # every process stays in view

    def depth(n: ProcessNode) -> int:
        return 1 + max((depth(c) for c in n.children), default=0)

    (root,) = process_tree(stored(chain))
    assert depth(root) == MAX_DEPTH + 2  # the root at depth 0; the rest flat under the one at MAX_DEPTH
    r = build([], stored(chain), limits=Limits(processes=50))
    assert len(list(walk(r.sandboxes[0].processes))) == 50 and r.processes_omitted == 150
    assert "150 processes left out" in to_text(r)


def test_connections_listed_per_process_are_capped() -> None:
    p = ref(7, 1, "/usr/bin/nmap")
    events: list[Event] = [ProcExec(sandbox=CLEAN_ID, time=at(0), process=p)] + [
        NetConnect(
            sandbox=CLEAN_ID, time=at(1), destination=f"10.0.0.{i}", port=22, protocol="unknown",
            decision="deny", reason="private", via="transparent", process=p,
        )
        for i in range(30)
    ]  # fmt: skip
    (node,) = process_tree(stored(events), Limits(connections_per_process=5))
    assert len(node.connections) == 5 and node.connections_omitted == 25
    r = build([], stored(events), limits=Limits(destinations=10, top_destinations=3))
    assert len(r.destinations) == 3 and r.destinations_omitted == 20
    assert r.sandboxes[0].connections == 30  # counted, whatever the destination cap


def test_resource_series_is_downsampled_keeping_mean_and_peaks() -> None:
    samples = [
        ResourceSample(
            sandbox=CLEAN_ID, time=at(i), cpu=8.0 if i == 7777 else 1.0, memory=(100 + (i == 4242)) << 20,
            processes=2,
        )
        for i in range(10_000)
    ]  # fmt: skip
    points = resource_series(stored(samples))[CLEAN_ID]
    assert 250 <= len(points) <= 500
    assert sum(p.samples for p in points) == 10_000
    assert max(p.cpu_peak for p in points) == 8.0 and max(p.memory for p in points) == 101 << 20
    total = sum(p.cpu * p.samples for p in points)
    assert total == pytest.approx(10_000 + 7.0)
    assert points == sorted(points, key=lambda p: p.time) and points[0].time == T0
    assert len(resource_series(stored(samples), Limits(points=10))[CLEAN_ID]) <= 10
    html = to_html(build([], stored(samples)))
    assert html.count("<svg") == 2 and "<polyline" in html


def test_timeline_is_capped_and_says_how_many_more() -> None:
    events: list[Event] = [
        ExecStart(sandbox=CLEAN_ID, time=at(i), exec=i + 1, command=["true"]) for i in range(2500)
    ]
    events.append(Deny(sandbox=CLEAN_ID, time=at(2500), layer="seccomp", what="ptrace"))
    t = timeline(stored(events))
    assert len(t.entries) == 2000 and t.omitted == {"exec.start": 500, "deny": 1} and t.omitted_total == 501
    r = build([], stored(events))
    assert r.timeline == t and r.sandboxes[0].commands == 2500
    assert "… 501 more not shown (exec.start 500, deny 1)" in to_text(r)
    assert "501 more not shown" in to_html(r)
    assert len(timeline(stored(events), Limits(timeline=10)).entries) == 10


def test_run_report_of_two_episodes() -> None:
    one = clean_events(CLEAN_ID, 0.0)
    two = bad_events(BAD_ID, 0.5)
    merged = sorted([*one, *two], key=lambda e: e.time)  # interleaved, as a run's events are
    s = stored(merged)
    infos = [info(CLEAN_ID, s, run="R", episode="1"), info(BAD_ID, s, run="R", episode="2")]
    r = build(infos, s)
    assert r.title == "run R (2 sandboxes)"
    assert r.verdict == "critical" and r.verdicts == {"critical": 1, "clean": 1}
    assert [(x.id, x.verdict, x.labels["episode"]) for x in r.sandboxes] == [
        (CLEAN_ID, "clean", "1"),
        (BAD_ID, "critical", "2"),
    ]
    assert [g.category for g in r.alerts] == ["mining", "reverse_shell"]
    assert {e.sandbox for e in r.timeline.entries} == {CLEAN_ID, BAD_ID}
    assert len(r.timeline.entries) == 8 + 12 and r.events == len(s)
    assert {(d.destination, d.port) for d in r.destinations} == {
        ("pypi.example", 443),
        ("203.0.113.9", 3333),
        ("c2.example", 4444),
    }
    assert [len(x.processes) for x in r.sandboxes] == [2, 1]
    text = to_text(r)
    assert "Sandbox aaaaaaaaaaaa  [run=R episode=1]" in text and "Top destinations" in text
    assert "sandboxes  2 (critical 1, clean 1)" in text
    assert build(infos, s, title="nightly").title == "nightly"


def test_events_of_a_sandbox_without_a_record_get_their_own_section() -> None:
    s = stored(bad_events())
    r = build([SandboxInfo(id=CLEAN_ID, started=T0)], s)
    assert [(x.id, x.verdict, x.policy) for x in r.sandboxes] == [
        (CLEAN_ID, "clean", ""),
        (BAD_ID, "critical", "policy.yaml"),
    ]
    assert r.sandboxes[1].started == T0 and r.sandboxes[1].stopped == at(4)


def test_json_round_trips() -> None:
    r = report_of(bad_events())
    data = json.loads(to_json(r))
    assert data["verdict"] == "critical" and data["sandboxes"][0]["alerts"][0]["category"] == "mining"
    assert Report.model_validate_json(to_json(r)) == r


def test_odd_bodies_do_not_break_the_report() -> None:
    odd = [
        StoredEvent(CLEAN_ID, 1, T0, "proc.exec", {"process": "not a dict"}),
        StoredEvent(CLEAN_ID, 2, T0, "exec.start", {"exec": "1", "command": [1, None]}),
        StoredEvent(CLEAN_ID, 3, T0, "net.connect", {}),
        StoredEvent(CLEAN_ID, 4, T0, "alert", {"severity": "weird"}),
        StoredEvent(CLEAN_ID, 5, T0, "resource.sample", {"gpu": [None, {"memory": "x"}]}),
        StoredEvent(CLEAN_ID, 6, T0, "future.type", {"anything": True}),
    ]
    r = build([], odd)
    assert r.verdict == "weird" and r.sandboxes[0].connections == 1
    assert to_text(r) and to_html(r) and to_json(r)


EVIL_CMD = '/tmp/x\x1b[31m\x1b]0;pwned\x07<script>alert("x")</script>\'"\r\u202etxt.exe'
EVIL_NAME = '"><img src=x onerror=alert(1)>.evil.example'


def evil_events() -> list[Event]:
    p = ProcessRef(pid=5, ppid=1, exe=EVIL_CMD, cmdline=[EVIL_CMD, "--x=<b>"])
    return [
        start(CLEAN_ID, 0),
        ExecStart(sandbox=CLEAN_ID, time=at(1), exec=1, command=["/bin/sh", "-c", EVIL_CMD]),
        ProcExec(sandbox=CLEAN_ID, time=at(1), process=p, exec=1),
        DnsQuery(sandbox=CLEAN_ID, time=at(2), name=EVIL_NAME, qtype="A", decision="deny", process=p),
        NetConnect(
            sandbox=CLEAN_ID, time=at(3), destination="198.18.0.3", port=443, name=EVIL_NAME,
            protocol="tls", sni="</svg><script>x</script>", decision="allow", reason="r",
            via="proxy", process=p,
        ),
        ResourceSample(sandbox=CLEAN_ID, time=at(3), cpu=1.0, memory=1, processes=1),
        ResourceSample(sandbox=CLEAN_ID, time=at(4), cpu=2.0, memory=2, processes=1),
        Alert(
            sandbox=CLEAN_ID, time=at(4), rule="<rule>", category="tamper", severity="high", action="alert",
            outcome="<i>logged</i>", message=EVIL_CMD, process=p,
        ),
    ]  # fmt: skip


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_agent_text_is_escaped_in_html() -> None:
    page = to_html(report_of(evil_events(), run="<R>"))
    parsed = _Tags()
    parsed.feed(page)
    assert parsed.tags <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "section", "table", "tr", "th",
        "td", "span", "code", "small", "p", "br", "ul", "li", "div", "svg", "polyline", "line", "text",
    }  # fmt: skip
    assert not parsed.attrs & {"src", "href", "onerror", "onload", "xlink:href", "style", "action"}
    shown = "".join(parsed.text)
    assert '<script>alert("x")</script>' in shown and EVIL_NAME in shown  # shown as text, intact
    assert "\\x1b[31m" in shown and "\\u202e" in shown and "\x1b" not in page and "\u202e" not in page
    assert "&lt;script&gt;" in page and "&quot;&gt;&lt;img src=x" in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_html_is_self_contained() -> None:
    s = stored([*clean_events(), *bad_events(BAD_ID, 0.5)])
    page = to_html(build([info(CLEAN_ID, s), info(BAD_ID, s)], s))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for outside in ("http://", "https://", "src=", "href=", "url(", "@import", "<script", "<link", "//"):
        assert outside not in page, outside


def test_agent_text_is_harmless_in_the_terminal() -> None:
    text = to_text(report_of(evil_events()))
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text and "\u202e" not in text
    assert "\\x1b[31m\\x1b]0;pwned\\x07" in text and "\\r\\u202etxt.exe" in text
    assert all(c == "\n" or c.isprintable() for c in text)
    assert printable("a\nb\tc\x00\u2066") == "a\\nb\\tc\\x00\\u2066"
    raw = json.loads(to_json(report_of(evil_events())))  # JSON keeps the text as it was, encoded
    assert raw["timeline"]["entries"][1]["summary"] == f"#1 $ {EVIL_CMD}"


def test_huge_strings_from_the_agent_are_clipped() -> None:
    long = "A" * 1_000_000
    p = ProcessRef(pid=5, ppid=1, exe="/bin/x", cmdline=["/bin/x", long, long])
    events: list[Event] = [
        ExecStart(sandbox=CLEAN_ID, time=at(0), exec=1, command=["/bin/x", long]),
        ProcExec(sandbox=CLEAN_ID, time=at(0), process=p),
    ]
    r = build([], stored(events))
    assert len(to_json(r)) < 5000
    assert r.timeline.entries[0].summary.endswith("…")


@pytest.mark.root
def test_report_of_a_real_sandbox() -> None:
    with Sandbox(policy(), keep_workspace=False) as sb:
        first = sb.exec("sh -c 'echo hi; ls /'")
        second = sb.exec(["python3", "-c", "import socket; socket.create_connection(('10.1.2.3', 22), 2)"])
        sid = sb.id
        alerts = sb.alerts()
    events = stored(sb.events())
    assert first.exit_code == 0 and second.exit_code != 0
    r = build([SandboxInfo(id=sid, started=events[0].time, policy="default")], events)
    (s,) = r.sandboxes
    assert s.verdict == r.verdict == verdict(a.severity for a in alerts)
    assert (s.commands, s.failed_commands, s.stop_reason) == (2, 1, "closed")
    assert s.denials.get("egress", 0) >= 1 and s.connections_denied >= 1
    starts = [e.summary for e in r.timeline.entries if e.kind == "exec.start"]
    assert starts == [
        "#1 $ sh -c 'echo hi; ls /'",
        "#2 $ python3 -c 'import socket; socket.create_connection(('\"'\"'10.1.2.3'\"'\"', 22), 2)'",
    ]
    nodes = list(walk(s.processes))
    ls = next(n for n in nodes if n.cmdline[:1] == ["ls"])
    parent = next(n for n in nodes if ls in n.children)
    assert parent.exe is not None and parent.exe.endswith("sh") and ls.exec == 1 and ls.exit_code == 0
    python = next(n for n in nodes if n.cmdline[:1] == ["python3"])
    assert python.exec == 2 and [(c.destination, c.decision) for c in python.connections] == [
        ("10.1.2.3:22", "deny")
    ]
    assert "10.1.2.3:22" in to_text(r) and "<script" not in to_html(r)

"""What each page shows, built from the store: small functions, one per part of a page, each reading
only what it needs (a page never loads all of a sandbox's events, let alone the store's). They take
and return plain records, so the report module can take over any of them without touching the pages.

Everything in an event came from an untrusted agent (command lines, names, paths): these functions
pass it on as data; the templates escape it (autoescape is on)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from corral.store import SEVERITIES, Filters, SandboxInfo, Store, StoredEvent

RUN_LABEL = "run"
NO_RUN = ""  # the run of the sandboxes that have no run label
PAGE = 500  # timeline rows per page
# Caps on what one page reads for its summaries; past them the page says what it left out.
MAX_PROCESSES = 1_000
MAX_SAMPLES = 1_000
_SPREAD = 50  # past MAX_SAMPLES, samples are read in this many stretches spread over the sandbox's life
MAX_ALERTS = 500
MAX_DENIALS = 500

TYPES = (
    "sandbox.start",
    "sandbox.stop",
    "phase",
    "exec.start",
    "exec.exit",
    "proc.exec",
    "proc.exit",
    "proc.seccomp",
    "net.connect",
    "dns.query",
    "deny",
    "alert",
    "resource.sample",
)


# --- runs ------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    run: str  # NO_RUN for the sandboxes without a run label
    sandboxes: int = 0
    running: int = 0
    alerts: int = 0
    worst: str | None = None
    verdicts: dict[str, int] = field(default_factory=dict)  # verdict -> sandboxes
    categories: dict[str, int] = field(default_factory=dict)  # alert category -> alerts
    latest: datetime | None = None

    @property
    def verdict(self) -> str:
        return self.worst or "clean"


def worse(a: str | None, b: str | None) -> str | None:
    """The worse of two severities (None: no alert)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if SEVERITIES.index(a) <= SEVERITIES.index(b) else b


def runs(store: Store) -> list[RunSummary]:
    """Every run, newest first, with its sandboxes' verdicts; the unlabelled sandboxes last."""
    found: dict[str, RunSummary] = {}
    for info in store.sandboxes():
        run = info.labels.get(RUN_LABEL, NO_RUN)
        summary = found.setdefault(run, RunSummary(run))
        summary.sandboxes += 1
        summary.running += info.stopped is None
        summary.alerts += info.alerts
        summary.worst = worse(summary.worst, info.worst)
        summary.verdicts[info.verdict] = summary.verdicts.get(info.verdict, 0) + 1
        for category, n in info.categories.items():
            summary.categories[category] = summary.categories.get(category, 0) + n
        if summary.latest is None or info.started > summary.latest:
            summary.latest = info.started
    return sorted(found.values(), key=lambda r: (r.run == NO_RUN, -(r.latest or _EPOCH).timestamp()))


_EPOCH = datetime(1970, 1, 1).astimezone()


def run_sandboxes(store: Store, run: str) -> list[SandboxInfo]:
    """A run's sandboxes, newest first (NO_RUN: those without a run label)."""
    if run == NO_RUN:
        return [s for s in store.sandboxes() if RUN_LABEL not in s.labels]
    return store.sandboxes(labels={RUN_LABEL: run})


# --- a sandbox's timeline --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    seq: int
    time: datetime
    type: str
    summary: str  # one line, for the timeline
    severity: str | None = None  # alerts: their severity; denials: "deny"


@dataclass(frozen=True)
class TimelinePage:
    rows: list[Row]
    after: int  # the cursor this page started after
    next_after: int | None  # the cursor of the next page, None on the last
    prev_after: int | None  # the cursor of the previous page (approximate under a type filter)
    types: list[str]


def timeline(store: Store, sandbox: SandboxInfo, types: Sequence[str], after: int) -> TimelinePage:
    """One page of a sandbox's events in chain order, those with seq > `after`, of `types` (all when
    empty). One more row than a page is read, to know whether there is a next page."""
    wanted = [t for t in types if t in TYPES]
    events = list(
        store.events(Filters(sandbox=sandbox.id, types=wanted), after=max(after, 0), limit=PAGE + 1)
    )
    more = len(events) > PAGE
    events = events[:PAGE]
    rows = [row(e.seq, e.time, e.body) for e in events]
    return TimelinePage(
        rows=rows,
        after=after,
        next_after=events[-1].seq if more else None,
        prev_after=max(after - PAGE, 0) if after > 0 else None,
        types=wanted,
    )


def last_page_after(sandbox: SandboxInfo) -> int:
    """The cursor of the last page when nothing is filtered out."""
    return max(sandbox.events - PAGE, 0)


def row(seq: int, time: datetime, body: dict[str, Any]) -> Row:
    kind = str(body.get("type", ""))
    severity = str(body.get("severity")) if kind == "alert" else ("deny" if kind == "deny" else None)
    return Row(seq=seq, time=time, type=kind, summary=summarize(body), severity=severity)


def _cmd(argv: Any) -> str:
    if isinstance(argv, list):
        return " ".join(str(a) for a in argv)
    return str(argv or "")


def _proc(p: Any) -> str:
    if not isinstance(p, dict):
        return ""
    return f"pid {p.get('pid')} {_cmd(p.get('cmdline')) or p.get('exe') or ''}".rstrip()


def summarize(body: dict[str, Any]) -> str:
    """An event in one line (for the timeline and the live view)."""
    kind = body.get("type")
    if kind == "sandbox.start":
        return f"policy {body.get('policy')}, uid {body.get('uid')}, cgroup v{body.get('cgroup_version')}"
    if kind == "sandbox.stop":
        extra = f", {body['error']}" if body.get("error") else ""
        return f"{body.get('reason')} after {_secs(body.get('duration'))}{extra}"
    if kind == "phase":
        return f"network phase {body.get('previous') or '-'} -> {body.get('phase')}"
    if kind == "exec.start":
        return f"#{body.get('exec')} $ {_cmd(body.get('command'))}"
    if kind == "exec.exit":
        timed = ", timed out" if body.get("timed_out") else ""
        return (
            f"#{body.get('exec')} exit {body.get('exit_code')} in {_secs(body.get('duration'))}, "
            f"cpu {_secs(body.get('cpu_seconds'))}, peak {_bytes(body.get('peak_memory'))}{timed}"
        )
    if kind == "proc.exec":
        p = body.get("process") or {}
        return f"pid {p.get('pid')} (parent {p.get('ppid')}) {_cmd(p.get('cmdline')) or p.get('exe')}"
    if kind == "proc.exit":
        return f"pid {body.get('pid')} exit {body.get('exit_code')} {_cmd(body.get('cmdline'))}".rstrip()
    if kind == "proc.seccomp":
        return f"{_proc(body.get('process'))} installed a seccomp filter ({body.get('how')})"
    if kind == "net.connect":
        name = body.get("name") or body.get("destination")
        return (
            f"{body.get('decision')} {name}:{body.get('port')} {body.get('protocol')} "
            f"({body.get('reason')}) out {_bytes(body.get('bytes_out'))} in {_bytes(body.get('bytes_in'))}"
            f" by {_proc(body.get('process'))}"
        )
    if kind == "dns.query":
        answer = ", ".join(str(a) for a in body.get("answer") or [])
        return f"{body.get('decision')} {body.get('name')} {body.get('qtype')} {answer}".rstrip()
    if kind == "deny":
        count = f" x{body.get('count')}" if (body.get("count") or 1) > 1 else ""
        detail = f": {body.get('detail')}" if body.get("detail") else ""
        return f"{body.get('layer')} refused {body.get('what')}{count}{detail}"
    if kind == "alert":
        return (
            f"{body.get('severity')} {body.get('category')} [{body.get('rule')}] {body.get('message')} "
            f"-> {body.get('action')}: {body.get('outcome')}"
        )
    if kind == "resource.sample":
        return f"cpu {body.get('cpu', 0):.2f} cores, memory {_bytes(body.get('memory'))}, " + (
            f"{body.get('processes')} processes"
        )
    return str(kind)


def _secs(v: Any) -> str:
    return f"{float(v):.3g} s" if isinstance(v, int | float) else "?"


def _bytes(v: Any) -> str:
    if not isinstance(v, int | float):
        return "?"
    n = float(v)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --- the process tree ------------------------------------------------------------------------------


@dataclass
class Process:
    pid: int
    ppid: int | None
    command: str
    exe: str
    seq: int  # the proc.exec event
    time: datetime
    exec: int | None = None
    exit_code: int | None = None
    connections: list[str] = field(default_factory=list)  # "deny 10.0.0.1:22 (reason)"
    children: list[Process] = field(default_factory=list)


@dataclass(frozen=True)
class TreeLine:
    prefix: str  # the tree drawing before the process ("│  ├─ ")
    process: Process


@dataclass(frozen=True)
class Tree:
    lines: list[TreeLine]
    truncated: bool  # more processes than MAX_PROCESSES


def process_tree(store: Store, sandbox: str) -> Tree:
    """Who started whom (proc.exec's pid and ppid, both host pids) and what each connected to
    (net.connect's process.pid). A pid the kernel reused starts a new process: the latest exec of a
    pid is the one its children and connections belong to."""
    procs: list[Process] = []
    roots: list[Process] = []  # those whose parent was not seen exec (the command's first process)
    by_pid: dict[int, Process] = {}
    events = store.events(
        Filters(sandbox=sandbox, types=["proc.exec", "proc.exit", "net.connect"]),
        limit=3 * MAX_PROCESSES,  # each process's exec and exit, and a connection or so
    )
    truncated = False
    for e in events:
        b = e.body
        if e.type == "proc.exec":
            if len(procs) >= MAX_PROCESSES:
                truncated = True
                continue
            p = b.get("process") or {}
            pid = int(p.get("pid") or 0)
            ppid = p.get("ppid")
            proc = Process(
                pid=pid,
                ppid=int(ppid) if isinstance(ppid, int) else None,
                command=_cmd(p.get("cmdline")) or str(p.get("exe") or ""),
                exe=str(p.get("exe") or ""),
                seq=e.seq,
                time=e.time,
                exec=b.get("exec"),
            )
            parent = by_pid.get(proc.ppid) if proc.ppid is not None else None
            (parent.children if parent is not None else roots).append(proc)
            procs.append(proc)
            by_pid[pid] = proc
        elif e.type == "proc.exit":
            proc_ = by_pid.get(int(b.get("pid") or 0))
            if proc_ is not None:
                proc_.exit_code = b.get("exit_code")
        elif e.type == "net.connect":
            pid_ = (b.get("process") or {}).get("pid")
            owner = by_pid.get(pid_) if isinstance(pid_, int) else None
            if owner is not None and len(owner.connections) < 50:
                name = b.get("name") or b.get("destination")
                owner.connections.append(
                    f"{b.get('decision')} {name}:{b.get('port')} {b.get('protocol')} ({b.get('reason')})"
                )
    lines: list[TreeLine] = []
    for i, root in enumerate(roots):
        _draw(root, "", i == len(roots) - 1, True, lines)
    return Tree(lines=lines, truncated=truncated)


def _draw(p: Process, indent: str, last: bool, root: bool, out: list[TreeLine]) -> None:
    # An explicit stack, not recursion: a fork chain thousands deep must not hit the recursion limit.
    stack: list[tuple[Process, str, bool, bool]] = [(p, indent, last, root)]
    while stack:
        proc, ind, is_last, is_root = stack.pop()
        out.append(TreeLine(prefix=ind + ("" if is_root else ("└─ " if is_last else "├─ ")), process=proc))
        child_indent = ind + ("" if is_root else ("   " if is_last else "│  "))
        if len(child_indent) > 60:  # deeper than 20 levels: stop drawing the rails
            child_indent = child_indent[:60]
        kids = proc.children
        for j in range(len(kids) - 1, -1, -1):
            stack.append((kids[j], child_indent, j == len(kids) - 1, False))


# --- resources -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    times: list[float]  # unix seconds
    cpu: list[float]  # cores
    memory: list[float]  # MiB
    truncated: bool


def resource_series(store: Store, sandbox: SandboxInfo) -> Series:
    """The CPU and memory samples; past MAX_SAMPLES, an even spread of stretches of them over the
    sandbox's whole life (each stretch read from a seq on, which the store finds by its index)."""
    samples = list(_samples(store, sandbox.id, 0, MAX_SAMPLES + 1))
    truncated = len(samples) > MAX_SAMPLES
    if truncated:
        step = max(sandbox.events // _SPREAD, 1)
        samples, seen = [], set()
        for after in range(0, sandbox.events, step):
            for e in _samples(store, sandbox.id, after, MAX_SAMPLES // _SPREAD):
                if e.seq not in seen:
                    seen.add(e.seq)
                    samples.append(e)
    return Series(
        times=[e.time.timestamp() for e in samples],
        cpu=[float(e.body.get("cpu") or 0.0) for e in samples],
        memory=[round(float(e.body.get("memory") or 0) / (1 << 20), 2) for e in samples],
        truncated=truncated,
    )


def _samples(store: Store, sandbox: str, after: int, limit: int) -> list[StoredEvent]:
    return list(store.events(Filters(sandbox=sandbox, types=["resource.sample"]), after=after, limit=limit))


# --- alerts and denials ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertView:
    seq: int
    time: datetime
    body: dict[str, Any]  # the alert event (rule, category, severity, action, outcome, message, ...)
    processes: list[str]  # the evidence's processes, one line each
    connections: list[str]
    trigger: list[tuple[str, str]]  # field -> value
    related: list[str]
    mitre: list[str]
    owasp: list[str]


def alerts(store: Store, sandbox: str) -> list[AlertView]:
    return [alert_view(e) for e in store.events(Filters(sandbox=sandbox, types=["alert"]), limit=MAX_ALERTS)]


def alert_view(e: StoredEvent) -> AlertView:
    b = e.body
    evidence = b.get("evidence") or {}
    tags = b.get("tags") or {}
    processes = [
        f"pid {p.get('pid')} (parent {p.get('ppid')}) {_cmd(p.get('cmdline')) or p.get('exe') or ''}"
        for p in evidence.get("processes") or []
        if isinstance(p, dict)
    ]
    connections = [
        f"{c.get('decision')} {c.get('name') or c.get('destination')}:{c.get('port')} "
        f"{c.get('protocol')} ({c.get('reason')})"
        for c in evidence.get("connections") or []
        if isinstance(c, dict)
    ]
    trigger = [(str(k), _value(v)) for k, v in (evidence.get("trigger") or {}).items()]
    related = [
        ", ".join(f"{k}={_value(v)}" for k, v in r.items()) if isinstance(r, dict) else _value(r)
        for r in evidence.get("related") or []
    ]
    return AlertView(
        seq=e.seq,
        time=e.time,
        body=b,
        processes=processes,
        connections=connections,
        trigger=trigger,
        related=related,
        mitre=[str(t) for t in tags.get("mitre") or []],
        owasp=[str(t) for t in tags.get("owasp") or []],
    )


def _value(v: Any) -> str:
    if isinstance(v, dict) and "pid" in v:
        return _proc(v)
    if isinstance(v, dict | list) and any(
        isinstance(x, dict | list) for x in (v.values() if isinstance(v, dict) else v)
    ):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return "—" if v is None else str(v)


def denials(store: Store, sandbox: str) -> list[Row]:
    return [
        row(e.seq, e.time, e.body)
        for e in store.events(Filters(sandbox=sandbox, types=["deny"]), limit=MAX_DENIALS)
    ]

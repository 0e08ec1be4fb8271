"""The process tree, from proc.exec (who started what, read on the host at execve) and proc.exit, with
each process's connections (net.connect names its process) and the rules that fired on it.

A node is one pid's life in one sandbox: a pid seen again after its proc.exit, or with another start
time, is a new process (the kernel reuses pids). A parent is linked only if it was seen before its
child, so no pid reuse can make a cycle. An agent can nest processes as deep as it likes; past
`MAX_DEPTH` the descendants are listed flat under their ancestor at that depth (their `ppid` still
names the real parent), so a renderer's recursion and a report's size stay bounded while every
process stays in view."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from corral.report import _fields as f
from corral.report._model import Limits, ProcessConnection, ProcessNode
from corral.report._timeline import connection_label
from corral.store.records import StoredEvent

MAX_DEPTH = 64
_ALERTS_PER_PROCESS = 10


class _Proc:
    __slots__ = (
        "alerts",
        "anchor",
        "born",
        "children",
        "cmdline",
        "connections",
        "connections_omitted",
        "depth",
        "exe",
        "exec",
        "exit_code",
        "exited",
        "images",
        "index",
        "ns_pid",
        "parent",
        "pid",
        "ppid",
        "sandbox",
        "seen_exec",
        "started",
    )

    def __init__(self, index: int, sandbox: str, pid: int) -> None:
        self.index = index
        self.sandbox = sandbox
        self.pid = pid
        self.ppid: int | None = None
        self.ns_pid: int | None = None
        self.exe: str | None = None
        self.cmdline: list[str] = []
        self.exec: int | None = None
        self.started: datetime | None = None
        self.born: str | None = None  # ProcessRef.started as given: the same across execs, not pids
        self.exited: datetime | None = None
        self.exit_code: int | None = None
        self.images = 0
        self.seen_exec = False
        self.connections: list[ProcessConnection] = []
        self.connections_omitted = 0
        self.alerts: list[str] = []
        self.parent: _Proc | None = None
        self.children: list[_Proc] = []
        self.depth = 0
        self.anchor: _Proc | None = None


class ProcessTreeBuilder:
    """Builds the trees as events stream past, keeping at most `limits.processes` processes."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._procs: list[_Proc] = []
        self._live: dict[tuple[str, int], _Proc] = {}  # (sandbox, pid) -> its latest process
        self.omitted = 0

    def add(self, event: StoredEvent) -> None:
        kind = event.type
        body = event.body
        if kind == "proc.exec":
            self._exec(event.sandbox, event.time, body)
        elif kind == "proc.exit":
            self._exit(event.sandbox, event.time, body)
        elif kind == "net.connect":
            proc = self._known(event.sandbox, event.time, f.mapping(body, "process"), body)
            if proc is not None:
                self._connection(proc, event.time, body)
        elif kind == "alert":
            proc = self._known(event.sandbox, event.time, f.mapping(body, "process"), body)
            rule = f.clip(f.text(body, "rule"), self._limits.text)
            if proc is not None and rule not in proc.alerts and len(proc.alerts) < _ALERTS_PER_PROCESS:
                proc.alerts.append(rule)

    def _new(self, sandbox: str, pid: int) -> _Proc | None:
        if len(self._procs) >= self._limits.processes:
            self.omitted += 1
            return None
        proc = _Proc(len(self._procs), sandbox, pid)
        self._procs.append(proc)
        self._live[(sandbox, pid)] = proc
        return proc

    def _fill(self, proc: _Proc, ref: Mapping[str, Any], body: Mapping[str, Any], time: datetime) -> None:
        proc.ppid = f.opt_int(ref, "ppid")
        proc.ns_pid = f.opt_int(ref, "ns_pid")
        proc.exe = f.opt_text(ref, "exe")
        proc.cmdline = f.clip_list(f.strings(ref, "cmdline"), self._limits.text)
        proc.born = f.opt_text(ref, "started")
        proc.exec = f.opt_int(body, "exec") if f.opt_int(body, "exec") is not None else f.opt_int(ref, "exec")
        if proc.started is None:
            proc.started = time
        if proc.parent is None and proc.ppid is not None:
            parent = self._live.get((proc.sandbox, proc.ppid))
            if parent is not None and parent.index < proc.index:
                proc.parent = parent

    def _exec(self, sandbox: str, time: datetime, body: Mapping[str, Any]) -> None:
        ref = f.mapping(body, "process")
        pid = f.opt_int(ref, "pid")
        if pid is None:
            return
        proc = self._live.get((sandbox, pid))
        born = f.opt_text(ref, "started")
        if proc is not None and proc.born is not None and born is not None and born != proc.born:
            proc = None  # the pid was reused, and its proc.exit never reached us
        if proc is not None and proc.exited is None and proc.seen_exec:
            # The same process running a new program (a shell's `exec`, or sh -c's last command).
            proc.images += 1
            proc.exe = f.opt_text(ref, "exe")
            proc.cmdline = f.clip_list(f.strings(ref, "cmdline"), self._limits.text)
            return
        if proc is None or proc.exited is not None:
            proc = self._new(sandbox, pid)
            if proc is None:
                return
        self._fill(proc, ref, body, time)
        proc.seen_exec = True
        proc.images = max(proc.images, 1)

    def _exit(self, sandbox: str, time: datetime, body: Mapping[str, Any]) -> None:
        pid = f.opt_int(body, "pid")
        if pid is None:
            return
        proc = self._live.get((sandbox, pid))
        if proc is None or proc.exited is not None:
            proc = self._new(sandbox, pid)
            if proc is None:
                return
            proc.cmdline = f.clip_list(f.strings(body, "cmdline"), self._limits.text)
            proc.exec = f.opt_int(body, "exec")
        proc.exited = time
        proc.exit_code = f.opt_int(body, "exit_code")

    def _known(
        self, sandbox: str, time: datetime, ref: Mapping[str, Any], body: Mapping[str, Any]
    ) -> _Proc | None:
        """The process an event names; one never seen at exec (its proc.exec was lost, or it ran
        before the monitor) gets a node from what the event says of it."""
        pid = f.opt_int(ref, "pid")
        if pid is None:
            return None
        proc = self._live.get((sandbox, pid))
        if proc is None:
            proc = self._new(sandbox, pid)
            if proc is not None:
                self._fill(proc, ref, body, time)
        return proc

    def _connection(self, proc: _Proc, time: datetime, body: Mapping[str, Any]) -> None:
        if len(proc.connections) >= self._limits.connections_per_process:
            proc.connections_omitted += 1
            return
        host, port = connection_label(body)
        proc.connections.append(
            ProcessConnection(
                time=time,
                destination=f.clip(f.endpoint(host, port), self._limits.text),
                decision=f.text(body, "decision", "?"),
                protocol=f.clip(f.text(body, "protocol", "?"), 32),
                bytes_out=f.integer(body, "bytes_out"),
                bytes_in=f.integer(body, "bytes_in"),
            )
        )

    def roots(self) -> dict[str, list[ProcessNode]]:
        """Sandbox id -> its trees' roots, in the order they started."""
        for proc in self._procs:  # so that asking twice gives the same trees
            proc.children = []
        for proc in self._procs:  # a parent seen only after its child's proc.exec is linked now
            if proc.parent is None and proc.ppid is not None:
                parent = self._live.get((proc.sandbox, proc.ppid))
                if parent is not None and parent.index < proc.index:
                    proc.parent = parent
        roots: dict[str, list[_Proc]] = {}
        for proc in self._procs:  # parents come first: their index is lower
            parent = proc.parent
            if parent is None:
                roots.setdefault(proc.sandbox, []).append(proc)
                continue
            if parent.depth >= MAX_DEPTH:
                assert parent.anchor is not None
                proc.depth = MAX_DEPTH + 1
                proc.anchor = parent.anchor
                parent.anchor.children.append(proc)
            else:
                proc.depth = parent.depth + 1
                proc.anchor = proc if proc.depth == MAX_DEPTH else None
                parent.children.append(proc)
        # Frozen bottom-up without recursion: a child's index is always above its parent's.
        frozen: dict[int, ProcessNode] = {}
        for proc in reversed(self._procs):
            frozen[proc.index] = ProcessNode(
                sandbox=proc.sandbox,
                pid=proc.pid,
                ppid=proc.ppid,
                ns_pid=proc.ns_pid,
                exe=proc.exe,
                cmdline=proc.cmdline,
                exec=proc.exec,
                started=proc.started,
                exited=proc.exited,
                exit_code=proc.exit_code,
                images=max(proc.images, 1),
                seen_exec=proc.seen_exec,
                connections=proc.connections,
                connections_omitted=proc.connections_omitted,
                alerts=proc.alerts,
                children=[frozen.pop(c.index) for c in proc.children],
            )
        return {sandbox: [frozen[p.index] for p in procs] for sandbox, procs in roots.items()}


def process_tree(events: Iterable[StoredEvent], limits: Limits | None = None) -> list[ProcessNode]:
    """The process trees of `events` (one sandbox's, or several: each node names its sandbox): the
    roots, in the order they started, each with its children."""
    builder = ProcessTreeBuilder(limits or Limits())
    for e in events:
        builder.add(e)
    return [root for roots in builder.roots().values() for root in roots]

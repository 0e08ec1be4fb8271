"""One sandbox's tripwires: its process table, its detector, the observations fed to it, and the
alerts and responses that come out.

Everything here runs on the host. Observations come from three threads (the supervisor's execve
notifications, the sampler, and whichever thread emitted an event); the detector is thread-safe.
The tripwires record what they see (events, through `emit`) but act on nothing: what a rule's
response asks for comes back as `Action`s, which the sandbox carries out (killing, freezing and
terminating are its own to do, off the supervisor's thread where they block).
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from corral.detect.engine import Detector, Match, Observation
from corral.detect.rules import Ruleset
from corral.egress.rules import address_class
from corral.events import Alert, AlertTags, Evidence, ProcessRef, ProcExec, ProcExit, ResourceSample
from corral.events.model import (
    Deny,
    DnsQuery,
    Event,
    ExecExit,
    GpuUsage,
    NetConnect,
    ProcessUsage,
)
from corral.isolation import cgroups, sockdiag
from corral.monitors import _execpath as xp
from corral.monitors import process as pm
from corral.monitors.gpu import GpuProcessUsage
from corral.monitors.resource import CpuMeter, read_stat, uptime

log = logging.getLogger(__name__)

_RECORD_EVERY = 5.0  # seconds between resource.sample events while processes run
_EXIT_GRACE = 2.0  # seconds a process must be gone before the sweep, not the connector, ends it
_IDLE_SWEEP_EVERY = 8  # samples: an idle sandbox is swept every 2 s at the default interval
_EVIDENCE_PROCS = 24
_EVIDENCE_CONNS = 10


@dataclass(frozen=True)
class Record:
    """Record `alert` (a rule fired; its response needs nothing done, or the sandbox does it next)."""

    alert: Alert


@dataclass(frozen=True)
class Kill:
    """SIGKILL `pids` (those still in the sandbox, never its init), then record `alert` as
    `alert_after` words it, with how many died."""

    pids: tuple[int, ...]
    alert: Alert

    def alert_after(self, killed: int) -> Alert:
        outcome = f"killed {killed} process{'es' if killed != 1 else ''}"
        return self.alert.model_copy(update={"outcome": outcome})


@dataclass(frozen=True)
class Freeze:
    """Freeze every process in the sandbox for `rule` (kept, stopped, for inspection)."""

    rule: str


@dataclass(frozen=True)
class Terminate:
    """End the sandbox for `rule`."""

    rule: str


@dataclass(frozen=True)
class MonitorFailed:
    """A monitor the tripwires depend on stopped: fail closed, end the sandbox."""

    reason: str


Action = Record | Kill | Freeze | Terminate | MonitorFailed


@dataclass(frozen=True)
class ExecVerdict:
    """What to answer a parked execve: "continue" (only once its program was resolved and judged);
    "refuse" (answer `error`: its caller was killed, its program could not be resolved with
    certainty, or the call is bound to fail and gets the kernel's own errno); "hold" (no answer: the
    sandbox is being frozen or closed, and the caller stays parked until then). `actions` are
    carried out before the answer."""

    action: Literal["continue", "refuse", "hold"]
    error: int = errno.EPERM
    actions: tuple[Action, ...] = ()


class Tripwires:
    def __init__(
        self,
        sandbox_id: str,
        ruleset: Ruleset,
        responses: dict[str, str],
        *,
        init_pid: int,
        cgroup: cgroups.SandboxCgroup,
        current_exec: Callable[[], int | None],
        emit: Callable[[Event], None],
        connector_error: str | None,
        gpu_granted: bool,
        cpu_budget: float,
    ) -> None:
        self.id = sandbox_id
        self.detector = Detector(ruleset, responses)
        self.table = pm.ProcessTable(init_pid, current_exec)
        self._cgroup = cgroup
        self._current_exec = current_exec
        self._emit = emit
        self._gpu_granted = gpu_granted
        self._cpu_budget = min(cpu_budget, float(os.cpu_count() or 1))
        self._meter = CpuMeter()
        self._connections: collections.deque[NetConnect] = collections.deque(maxlen=64)
        self._last_record = 0.0
        self._missing: dict[int, float] = {}  # pid -> when the sweep first missed it
        self._ticks = 0
        self._last_cpu: tuple[float, float] | None = None
        self.connector_error = connector_error  # why process events are missing (exits: see _sample)
        self._closed = False
        self._diag_lock = threading.Lock()
        self._diag: socket.socket | None = None
        self._diag_table: sockdiag.SocketTable | None = None
        self._wiring_from = 0  # where the next round's fd-table scan begins (pm.WIRING_ROUND_FDS)

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        with self._diag_lock:
            if self._diag is not None:
                self._diag.close()

    # --- observations ----------------------------------------------------------------------------

    def on_exec(self, pid: int, syscall: str, args: tuple[int, ...]) -> ExecVerdict:
        """An execve, with its caller parked. Records it and runs the rules before the program runs."""
        if self._closed:
            # The sandbox is being closed and its processes killed: nothing starts unjudged meanwhile.
            return ExecVerdict("refuse")
        try:
            path, argv, dirfd, flags = pm.read_exec_call(pid, syscall, args)
        except PermissionError as e:
            # Fail closed: a program the monitor can't read is a program it can't judge.
            log.warning("process monitor: cannot read the execve of pid %d: %s", pid, e)
            return self._refuse_exec(
                pid, syscall, f"refused: the process monitor could not read the call ({e.strerror})"
            )
        except OSError as e:
            # The caller died meanwhile (nobody reads the answer), passed a pointer it can't read
            # either (EFAULT) or an argv the kernel would not copy (E2BIG), as the kernel would say.
            # A call that was not read whole is never let through.
            return ExecVerdict("refuse", errno.E2BIG if e.errno == errno.E2BIG else errno.EFAULT)
        loader: list[str] | None = None
        also: list[xp.ExecTarget] = []
        try:
            target = xp.resolve(pid, path, dirfd, flags)
            if isinstance(target, xp.ExecTarget):
                ran = self._interpreters(pid, target, argv, path)
                if isinstance(ran, int):
                    target = ran
                else:
                    also = ran
                    target, argv, loader = self._through_loader(pid, target, argv)
        except xp.ExecUnresolved as e:
            shown = path.decode(errors="replace")[:200]
            return self._refuse_exec(pid, syscall, f"refused: cannot tell which program {shown!r} runs: {e}")
        if isinstance(target, int):
            # Bound to fail (most often a PATH probe): answered here with the kernel's own errno, so
            # that a wrong "no such file" can never let a program run unjudged. Not a program start.
            return ExecVerdict("refuse", target)
        exe = target.exe
        try:
            cwd: str | None = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = None
        stdio, pipes = pm.stdio_kinds(pid)
        ppid, ns_pid = pm.status_ids(pid)
        recorded = pm.recorded_argv(argv)
        info = pm.ProcInfo(
            pid=pid, ppid=ppid or 0, exec_id=None, exe=exe, argv=recorded, cwd=cwd, ns_pid=ns_pid, stdio=stdio
        )
        info = self.table.on_exec(info)
        # Built without validation: every field comes from the kernel, typed here, and this runs
        # while the execve waits.
        event = ProcExec.model_construct(
            sandbox=self.id, process=self._ref(info), cwd=cwd, stdio=stdio, exec=info.exec_id, loader=loader
        )
        self._emit(event)
        lazy: dict[str, Callable[[], Any]] = {
            "proc.stdio_pipe_to_socket": lambda: pm.pipe_peer_has_socket(pid, pipes, self._pids()),
            "proc.content": lambda: pm.content_ref(pid, target, argv, also),
            **_wiring_fields(pm.Wiring(self._pids, self._unix_peer), pid),
        }
        obs = self._observation(event, pid, lazy)
        obs.update({"proc.stdio_socket": "socket" in stdio})
        if recorded is not argv:  # recorded bounded, judged whole
            obs.update({"proc.args": argv[1:], "proc.cmdline": " ".join(argv)})
        verdict, actions = self._handle(self.detector.observe(obs), parked=pid)
        return ExecVerdict(verdict, actions=tuple(actions))

    def _interpreters(
        self, pid: int, target: xp.ExecTarget, argv: list[str], path: bytes
    ) -> list[xp.ExecTarget] | int:
        """What the kernel runs for a `#!` script: its interpreter (and theirs, for a script
        interpreter; and what a loader named there maps), whose bytes are judged with the script's.
        The errno the kernel would give when the interpreter can't run (ENOENT, ELOOP)."""
        out: list[xp.ExecTarget] = []
        current, args = target, argv
        for _ in range(xp.MAX_SCRIPT_DEPTH + 1):
            line = xp.shebang(current)
            if line is None:
                break
            interp, arg = line
            found = xp.resolve(pid, interp, None)  # opened from the caller's cwd, as the kernel does
            if isinstance(found, int):
                return found
            args = [os.fsdecode(interp), *([os.fsdecode(arg)] if arg else []), os.fsdecode(path), *args[1:]]
            current = found
            out.append(found)
        else:
            return errno.ELOOP
        if out:
            loaded, _, through = self._through_loader(pid, current, args)
            if through is not None:
                out.append(loaded)
        return out

    def _through_loader(
        self, pid: int, target: xp.ExecTarget, argv: list[str]
    ) -> tuple[xp.ExecTarget, list[str], list[str] | None]:
        """`ld.so [OPTIONS] PROGRAM ARGS` is judged as PROGRAM ARGS, the program the loader maps (its
        bytes, its name); returned with the loader's own path and options, for the record."""
        loader: list[str] | None = None
        depth = 0
        while xp.is_loader(target):
            loaded = xp.loaded_program(argv)
            if loaded is None:
                break  # the loader alone (--help, --version): nothing else runs
            name = argv[loaded.index]
            if depth >= 4:
                raise xp.ExecUnresolved("dynamic loaders nested too deep")
            if "/" not in name:
                raise xp.ExecUnresolved(f"the dynamic loader would search its library paths for {name!r}")
            program = xp.resolve(pid, os.fsencode(name), None, executable=False)
            if isinstance(program, int):
                raise xp.ExecUnresolved(
                    f"the dynamic loader's program {name!r} is not a file it can map ({os.strerror(program)})"
                )
            if loader is None:
                loader = [target.exe, *argv[1 : loaded.index]]
            target, argv = program, loaded.argv
            depth += 1
        return target, argv, loader

    def _refuse_exec(self, pid: int, syscall: str, detail: str) -> ExecVerdict:
        self._emit(
            Deny(
                sandbox=self.id,
                layer="seccomp",
                what=syscall,
                exec=self._current_exec(),
                process=ProcessRef(pid=pid, exe=pm.exe(pid), cmdline=pm.cmdline(pid)),
                detail=detail,
            )
        )
        return ExecVerdict("refuse")

    def observe_event(self, event: Event) -> list[Action]:
        if self._closed or isinstance(event, Alert | ProcExec):
            return []  # alerts never feed back; proc.exec was observed at the execve itself
        if isinstance(event, NetConnect):
            self._connections.append(event)
        pid = None
        proc = getattr(event, "process", None)
        if isinstance(proc, ProcessRef):
            pid = proc.pid
        return self._handle(self.detector.observe(self._observation(event, pid)))[1]

    def sample(self, gpu: dict[int, list[GpuProcessUsage]]) -> list[Action]:
        """One round of the resource sampler: sweep, judge, now and then record usage."""
        if self._closed:
            return []
        # An idle sandbox (nothing but init, as the connector reports every fork) is swept only
        # every few seconds, as a safety net: a thousand idle sandboxes must not cost a core.
        self._ticks += 1
        idle = self.connector_error is None and not self.table.alive() and not gpu
        if idle and self._ticks % _IDLE_SWEEP_EVERY:
            return []
        try:
            pids = [p for p in self._cgroup.pids() if p != self.table.init_pid]
        except OSError:
            return []
        stats = [s for s in (read_stat(p) for p in pids) if s is not None]
        up = uptime()
        cpu = self._meter.measure(stats, up)
        live = {s.pid for s in stats}
        for s in stats:
            if self.table.get(s.pid) is None:
                self.table.adopt(s.pid)
        # Without the connector, exits are noticed here, a sample late and without a status. With
        # it, an exit it lost (a netlink overrun) is noticed here too, once it is clearly not a
        # race with the connector's own report, so that a reused pid is never taken for the old one.
        grace = 0.0 if self.connector_error is not None else _EXIT_GRACE
        now = time.monotonic()
        missing = {}
        for info in self.table.alive():
            if info.pid in live or info.pid in pids:
                continue
            since = missing[info.pid] = self._missing.get(info.pid, now)
            if now - since >= grace:
                gone = self.table.on_exit(info.pid, None)
                if gone is not None:
                    self.record_exit(gone)
        self._missing = missing
        matches: list[Match] = []
        # Wiring done after a program started (a pipe partner that connects later, a fifo, a socket
        # dup'd onto fd 0) is invisible at its execve; it is read here, each sample, for the processes
        # a rule asks about (shells and interpreters), and only as far as the rule gets.
        wiring = pm.Wiring(lambda: pids, self._unix_peer, self._wiring_from)
        for s in stats:
            obs = self._observation(None, s.pid, _wiring_fields(wiring, s.pid))
            obs.update(
                {
                    "evt.type": "proc.sample",
                    "proc.cpu": cpu.get(s.pid, 0.0),
                    "proc.cpu_share": cpu.get(s.pid, 0.0) / self._cpu_budget,
                    "proc.rss": s.rss,
                    "proc.age": max(0.0, up - s.started),
                }
            )
            matches += self.detector.observe(obs)
        gpu_rows: list[GpuUsage] = []
        for pid in live:
            for u in gpu.get(pid, []):
                gpu_rows.append(GpuUsage(index=u.index, pid=pid, memory=u.memory_bytes, sm=u.sm_percent))
                obs = self._observation(None, pid)
                obs.update(
                    {
                        "evt.type": "gpu.sample",
                        "gpu.index": u.index,
                        "gpu.memory": u.memory_bytes,
                        "gpu.sm": u.sm_percent,
                    }
                )
                matches += self.detector.observe(obs)
        self._wiring_from = wiring.resume_at
        actions = self._handle(matches)[1]
        now = time.monotonic()
        if stats and now - self._last_record >= _RECORD_EVERY:
            self._last_record = now
            self._record(stats, cpu, gpu_rows)
        return actions

    def _record(self, stats: list[Any], cpu: dict[int, float], gpu_rows: list[GpuUsage]) -> None:
        try:
            usage = self._cgroup.usage()
        except OSError:
            return
        total = 0.0
        if self._last_cpu is not None:
            dt = time.monotonic() - self._last_cpu[1]
            total = max(0.0, (usage.cpu_seconds - self._last_cpu[0]) / dt) if dt > 0 else 0.0
        self._last_cpu = (usage.cpu_seconds, time.monotonic())
        top = sorted(stats, key=lambda s: cpu.get(s.pid, 0.0), reverse=True)[:3]
        self._emit(
            ResourceSample(
                sandbox=self.id,
                cpu=round(total, 3),
                memory=usage.memory_bytes,
                processes=len(stats),
                top=[
                    ProcessUsage(
                        pid=s.pid,
                        cmdline=(self.table.get(s.pid) or pm.ProcInfo(s.pid, 0, None)).argv,
                        cpu=round(cpu.get(s.pid, 0.0), 3),
                        rss=s.rss,
                        exec=(self.table.get(s.pid) or pm.ProcInfo(s.pid, 0, None)).exec_id,
                    )
                    for s in top
                ],
                gpu=gpu_rows,
                exec=self._current_exec(),
            )
        )

    def record_exit(self, info: pm.ProcInfo) -> None:
        if not info.execed or self._closed:
            return
        self._emit(
            ProcExit.model_construct(  # kernel data, typed here: no validation on the connector's thread
                sandbox=self.id,
                pid=info.pid,
                exit_code=info.exit_code,
                duration=round(time.time() - info.started, 6),
                exec=info.exec_id,
                cmdline=info.argv,
            )
        )

    # --- observation fields --------------------------------------------------------------------

    def _unix_peer(self, inode: int) -> int | None:
        # Opened on first need, in the sandbox's network namespace (unix sockets are per namespace);
        # never after close(), which closes it, so a sample still running then can't leak one.
        with self._diag_lock:
            if self._closed:
                return None
            if self._diag is None:
                self._diag = sockdiag.open_socket_in(f"/proc/{self.table.init_pid}/ns/net")
                self._diag_table = sockdiag.SocketTable(self._diag)
            table = self._diag_table
        assert table is not None
        return table.unix_peer(inode)

    def _pids(self) -> list[int]:
        try:
            return self._cgroup.pids()
        except OSError:
            return []

    def _observation(
        self, event: Event | None, pid: int | None, lazy: dict[str, Callable[[], Any]] | None = None
    ) -> Observation:
        current = self._current_exec()
        v: dict[str, Any] = {
            "sandbox.gpu_granted": self._gpu_granted,
            "sandbox.cpu_budget": self._cpu_budget,
            "sandbox.command_running": current is not None,
        }
        lz: dict[str, Callable[[], Any]] = dict(lazy or {})
        if event is not None:
            v["evt.type"] = event.type
            v["evt.exec"] = getattr(event, "exec", None)
            _event_fields(event, v)
        else:
            v["evt.exec"] = current
        if pid is not None:
            # A sample knows its process even when the table does not (yet): a kill must still find it.
            v["proc.pid"] = pid
        info = self.table.get(pid) if pid is not None else None
        if info is None and pid is not None and event is not None:
            ref = getattr(event, "process", None)
            if isinstance(ref, ProcessRef):
                info = pm.ProcInfo(
                    pid=pid, ppid=ref.ppid or 0, exec_id=ref.exec, exe=ref.exe, argv=list(ref.cmdline)
                )
        if info is not None:
            v.update(
                {
                    "proc.pid": info.pid,
                    "proc.ppid": info.ppid,
                    "proc.name": os.path.basename(info.exe) if info.exe else None,
                    "proc.exe": info.exe,
                    "proc.argv0": os.path.basename(info.argv[0]) if info.argv else None,
                    "proc.args": info.argv[1:],
                    "proc.cmdline": " ".join(info.argv),
                    "proc.cwd": info.cwd,
                    "proc.exec": info.exec_id,
                    "proc.in_command": info.exec_id is not None and info.exec_id == current,
                    "proc.stdio": info.stdio,
                    "proc.stdin": info.stdio[0] if info.stdio else None,
                }
            )
            parent = self.table.get(info.ppid)
            v["proc.pname"] = os.path.basename(parent.exe) if parent and parent.exe else None
            v["proc.pcmdline"] = " ".join(parent.argv) if parent else None
            lz.setdefault(
                "proc.anames",
                lambda: [os.path.basename(a.exe) for a in self.table.ancestors(info.pid) if a.exe],
            )
        return Observation(v, lz, source=event)

    def _ref(self, info: pm.ProcInfo) -> ProcessRef:
        return ProcessRef.model_construct(
            pid=info.pid,
            ns_pid=info.ns_pid,
            exe=info.exe,
            cmdline=info.argv,
            started=pm.started_at(info),
            ppid=info.ppid,
            exec=info.exec_id,
        )

    # --- alerts and responses ----------------------------------------------------------------------

    def _handle(
        self, matches: list[Match], parked: int | None = None
    ) -> tuple[Literal["continue", "refuse", "hold"], list[Action]]:
        """What to do about each match (its alert recorded, its response carried out, in order);
        what the parked execve (if any) gets."""
        verdict: Literal["continue", "refuse", "hold"] = "continue"
        actions: list[Action] = []
        for m in matches:
            pid = m.observation.get("proc.pid")
            exec_id = m.observation.get("evt.exec") or m.observation.get("proc.exec")
            action = m.response
            outcome = "recorded"
            targets: list[int] = []
            if action == "kill":
                targets = self._kill_targets(pid, exec_id)
                outcome = "killing" if targets else "no process to kill"
                if parked is not None and parked in targets and verdict == "continue":
                    verdict = "refuse"
            elif action in ("freeze", "terminate"):
                verdict = "hold"
            evidence = self._evidence(m, pid)
            alert = Alert(
                sandbox=self.id,
                rule=m.rule.name,
                category=m.rule.category,
                severity=m.rule.severity,
                action=action,
                outcome={"freeze": "sandbox freezing", "terminate": "sandbox terminating"}.get(
                    action, outcome
                ),
                message=m.message,
                exec=exec_id,
                process=evidence.processes[0] if evidence.processes else None,
                evidence=evidence,
                tags=AlertTags(mitre=list(m.rule.tags.mitre), owasp=list(m.rule.tags.owasp)),
            )
            actions.append(Kill(tuple(targets), alert) if targets else Record(alert))
            if action == "freeze":
                actions.append(Freeze(m.rule.name))
            elif action == "terminate":
                actions.append(Terminate(m.rule.name))
        return verdict, actions

    def _kill_targets(self, pid: int | None, exec_id: int | None) -> list[int]:
        init = self.table.init_pid
        if pid is not None and pid != init:
            return [pid, *(p.pid for p in self.table.descendants(pid) if p.pid != init)]
        if exec_id is not None:
            return [p.pid for p in self.table.of_exec(exec_id) if p.pid != init and not p.exited]
        return []

    def _evidence(self, m: Match, pid: int | None) -> Evidence:
        procs: list[ProcessRef] = []
        if pid is not None:
            info = self.table.get(pid)
            if info is None:
                ref = getattr(m.observation.source, "process", None)
                if isinstance(ref, ProcessRef):
                    procs.append(ref)
            else:
                procs.append(self._ref(info))
                procs += [self._ref(a) for a in self.table.ancestors(pid)]
                procs += [self._ref(d) for d in self.table.descendants(pid)]
        conns = [
            c.model_dump(mode="json", exclude={"v", "sandbox", "type", "process"})
            for c in self._connections
            if pid is None or (c.process is not None and c.process.pid == pid)
        ][-_EVIDENCE_CONNS:]
        return Evidence(
            processes=procs[:_EVIDENCE_PROCS],
            connections=conns,
            trigger=_summary(m.observation),
            related=[_summary(o) for o in m.related[-20:]],
        )


def _wiring_fields(wiring: pm.Wiring, pid: int) -> dict[str, Callable[[], Any]]:
    return {
        "proc.stdio_now": lambda: wiring.stdio(pid),
        "proc.stdin_net": lambda: wiring.stdin(pid),
        "proc.stdout_net": lambda: wiring.stdout(pid),
    }


def _summary(obs: Observation) -> dict[str, Any]:
    if obs.source is not None:
        data: dict[str, Any] = obs.source.model_dump(mode="json", exclude={"v", "sandbox"})
        return data
    keys = (
        "evt.type",
        "proc.pid",
        "proc.cmdline",
        "proc.cpu",
        "proc.cpu_share",
        "proc.rss",
        "proc.in_command",
        "proc.stdio_now",
        "proc.stdin_net",
        "proc.stdout_net",
        "gpu.index",
        "gpu.memory",
        "gpu.sm",
    )
    return {k: obs.get(k) for k in keys if obs.get(k) is not None}


def _event_fields(event: Event, v: dict[str, Any]) -> None:
    if isinstance(event, NetConnect):
        v.update(
            {
                "net.destination": event.destination,
                "net.address": event.address,
                "net.port": event.port,
                "net.name": event.name,
                "net.protocol": event.protocol,
                "net.sni": event.sni,
                "net.decision": event.decision,
                "net.reason": event.reason,
                "net.scope": address_scope(event.address or event.destination),
                "net.bytes_out": event.bytes_out,
                "net.bytes_in": event.bytes_in,
            }
        )
    elif isinstance(event, DnsQuery):
        labels = [x for x in event.name.rstrip(".").split(".") if x]
        longest = max(labels, key=len) if labels else ""
        v.update(
            {
                "dns.name": event.name.rstrip("."),
                "dns.qtype": event.qtype,
                "dns.decision": event.decision,
                "dns.label_max": len(longest),
                "dns.entropy": entropy(longest),
            }
        )
    elif isinstance(event, Deny):
        v.update({"deny.layer": event.layer, "deny.what": event.what, "deny.detail": event.detail})
    elif isinstance(event, ExecExit):
        v.update(
            {
                "exec.exit_code": event.exit_code,
                "exec.leftover": len(event.leftover),
                "exec.leftover_cmdlines": [" ".join(p.cmdline) for p in event.leftover],
            }
        )


def address_scope(text: str | None) -> str | None:
    """What kind of address a connection asked for; "name" for corral's synthetic DNS answers."""
    if not text:
        return None
    try:
        scope = address_class(ipaddress.ip_address(text))
    except ValueError:
        return "name"
    return "name" if scope == "benchmark" else scope  # the resolver's synthetic answers stand for names


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    if not text:
        return 0.0
    counts = collections.Counter(text.lower())
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())

"""One pass over a sandbox's or a run's events, feeding each part of the report as it goes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from corral.report import _fields as f
from corral.report._alerts import AlertGrouper, severity_order, verdict
from corral.report._destinations import Budget, DestinationCounter
from corral.report._model import Limits, Report, SandboxReport
from corral.report._processes import ProcessTreeBuilder
from corral.report._resources import Series
from corral.report._timeline import TimelineBuilder
from corral.store.records import SandboxInfo, StoredEvent


class _Sandbox:
    """What the pass has learned about one sandbox so far."""

    def __init__(self, sandbox_id: str, limits: Limits, budget: Budget, info: SandboxInfo | None) -> None:
        self.id = sandbox_id
        self.info = info
        self.policy = info.policy if info else ""
        self.started = info.started if info else None
        self.stopped = info.stopped if info else None
        self.stop_reason = info.stop_reason if info else None
        self.stop_error = ""
        self.limits: dict[str, float] = {}
        self.degraded: list[str] = []
        self.events = 0
        self.commands = 0
        self.failed = 0
        self.timed_out = 0
        self.denials: Counter[str] = Counter()
        self.connections = 0
        self.connections_denied = 0
        self.dns = 0
        self.dns_denied = 0
        self.alerts = AlertGrouper(limits)
        self.destinations = DestinationCounter(limits, budget)
        self.series = Series(limits.points)

    def add(self, e: StoredEvent, text_limit: int) -> None:
        self.events += 1
        body = e.body
        kind = e.type
        if kind == "exec.start":
            self.commands += 1
        elif kind == "exec.exit":
            if f.integer(body, "exit_code") != 0:
                self.failed += 1
            if body.get("timed_out") is True:
                self.timed_out += 1
        elif kind == "deny":
            self.denials[f.clip(f.text(body, "layer", "?"), 32)] += max(1, f.integer(body, "count", 1))
        elif kind == "net.connect":
            self.connections += 1
            self.connections_denied += f.text(body, "decision") == "deny"
            self.destinations.add(body)
        elif kind == "dns.query":
            self.dns += 1
            self.dns_denied += f.text(body, "decision") == "deny"
        elif kind == "alert":
            self.alerts.add(e.time, body)
        elif kind == "resource.sample":
            self.series.add(e.time, body)
        elif kind == "sandbox.start":
            self.policy = self.policy or f.clip(f.text(body, "policy"), text_limit)
            self.started = self.started or e.time
            limits = f.mapping(body, "limits")
            self.limits = {k: float(v) for k, v in limits.items() if isinstance(v, int | float)}
            self.degraded = f.strings(body, "degraded")
        elif kind == "sandbox.stop":
            self.stopped = self.stopped or e.time
            self.stop_reason = self.stop_reason or f.opt_text(body, "reason")
            self.stop_error = f.clip(f.text(body, "error"), text_limit)

    def verdict(self) -> str:
        return verdict([self.alerts.worst, self.info.worst if self.info else None])


def build(
    sandboxes: Sequence[SandboxInfo],
    events: Iterable[StoredEvent],
    *,
    title: str | None = None,
    limits: Limits | None = None,
) -> Report:
    """The report of `sandboxes` (one, or a run's) from their `events`, read once, in the order given
    (each sandbox's in chain order). Events of a sandbox not in `sandboxes` get a section of their own,
    built from the events alone. Memory is bounded by `limits`, not by the number of events."""
    limits = limits or Limits()
    budget = Budget(limits.destinations)
    states: dict[str, _Sandbox] = {info.id: _Sandbox(info.id, limits, budget, info) for info in sandboxes}
    timeline = TimelineBuilder(limits)
    processes = ProcessTreeBuilder(limits)
    alerts = AlertGrouper(limits)
    destinations = DestinationCounter(limits)
    count = 0
    for e in events:
        count += 1
        state = states.get(e.sandbox)
        if state is None:
            state = states[e.sandbox] = _Sandbox(e.sandbox, limits, budget, None)
        state.add(e, limits.text)
        timeline.add(e)
        processes.add(e)
        if e.type == "alert":
            alerts.add(e.time, e.body)
        elif e.type == "net.connect":
            destinations.add(e.body)
    trees = processes.roots()
    reports = [
        SandboxReport(
            id=s.id,
            labels=dict(s.info.labels) if s.info else {},
            policy=s.policy,
            started=s.started,
            stopped=s.stopped,
            stop_reason=s.stop_reason,
            stop_error=s.stop_error,
            limits=s.limits,
            degraded=s.degraded,
            verdict=s.verdict(),
            alerts=s.alerts.groups(),
            events=s.events,
            commands=s.commands,
            failed_commands=s.failed,
            timed_out_commands=s.timed_out,
            denials=dict(s.denials.most_common()),
            connections=s.connections,
            connections_denied=s.connections_denied,
            dns_queries=s.dns,
            dns_denied=s.dns_denied,
            processes=trees.get(s.id, []),
            destinations=s.destinations.top(),
            resources=s.series.points(),
        )
        for s in states.values()
    ]
    verdicts = Counter(r.verdict for r in reports)
    return Report(
        title=title if title is not None else _title(sandboxes, reports),
        generated=datetime.now(UTC),
        verdict=verdict(r.verdict for r in reports),
        verdicts=dict(sorted(verdicts.items(), key=lambda kv: severity_order(kv[0]))),
        alerts=alerts.groups(),
        sandboxes=reports,
        timeline=timeline.result(),
        destinations=destinations.top(),
        events=count,
        processes_omitted=processes.omitted,
        destinations_omitted=destinations.omitted,
        limits=limits,
    )


def _title(sandboxes: Sequence[SandboxInfo], reports: list[SandboxReport]) -> str:
    """'sandbox ID' for one; 'run R' when every sandbox carries the same run label; else a count."""
    if len(reports) == 1:
        return f"sandbox {reports[0].id}"
    runs = {info.labels.get("run") for info in sandboxes}
    if len(runs) == 1 and None not in runs and len(sandboxes) == len(reports):
        return f"run {runs.pop()} ({len(reports)} sandboxes)"
    return f"{len(reports)} sandboxes"

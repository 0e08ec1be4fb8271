"""The timeline: one line per command, connection, DNS query, denial, alert, network phase switch and
sandbox start/stop."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from corral.report import _fields as f
from corral.report._model import Limits, Timeline, TimelineEntry
from corral.store.records import StoredEvent

Body = Mapping[str, Any]


def _by(body: Body, limit: int) -> str:
    process = f.mapping(body, "process")
    if not process:
        return ""
    name = f.text(process, "exe") or (f.strings(process, "cmdline") or ["?"])[0]
    return f" by {f.clip(name, limit)} ({f.integer(process, 'pid')})"


def _start(body: Body, limit: int) -> str:
    shown = f.limits(f.mapping(body, "limits"))
    degraded = f.strings(body, "degraded")
    line = f"sandbox started, policy {f.clip(f.text(body, 'policy'), limit)}"
    if shown:
        line += f" ({shown})"
    if degraded:
        line += f"; degraded: {', '.join(degraded)}"
    return line


def _stop(body: Body, limit: int) -> str:
    line = f"sandbox stopped ({f.text(body, 'reason', '?')}) after {f.number(body, 'duration'):.2f}s"
    leftover = body.get("leftover")
    if isinstance(leftover, list) and leftover:
        line += f", {len(leftover)} leftover process(es) killed"
    error = f.text(body, "error")
    if error:
        line += f"; error: {f.clip(error, limit)}"
    return line


def _phase(body: Body, limit: int) -> str:
    previous = f.clip(f.text(body, "previous", "-"), limit)
    return f"network phase {previous} -> {f.clip(f.text(body, 'phase', '?'), limit)}"


def _exec_start(body: Body, limit: int) -> str:
    return f"#{f.integer(body, 'exec')} $ {f.command(f.strings(body, 'command'), limit)}"


def _exec_exit(body: Body, limit: int) -> str:
    line = (
        f"#{f.integer(body, 'exec')} exit {f.integer(body, 'exit_code')} "
        f"in {f.number(body, 'duration'):.2f}s "
        f"(cpu {f.number(body, 'cpu_seconds'):.2f}s, peak {f.size(f.integer(body, 'peak_memory'))})"
    )
    if body.get("timed_out") is True:
        line += ", timed out"
    leftover = body.get("leftover")
    if isinstance(leftover, list) and leftover:
        line += f", {len(leftover)} process(es) left running"
    return line


def connection_label(body: Body) -> tuple[str, int]:
    """Where a net.connect went: the name the program asked for when it gave one (what a person
    recognises), else the address; and the port."""
    return f.text(body, "name") or f.text(body, "destination", "?"), f.integer(body, "port")


def _connect(body: Body, limit: int) -> str:
    host, port = connection_label(body)
    where = f.clip(f.endpoint(host, port), limit)
    line = f"{f.text(body, 'decision', '?')} {f.text(body, 'protocol', '?')} {where}"
    address = f.text(body, "address")
    if address and address != host:
        line += f" ({f.clip(address, 64)})"
    sni = f.text(body, "sni")
    if sni and sni != host:
        line += f" sni {f.clip(sni, limit)}"
    if f.text(body, "decision") == "deny":
        line += f": {f.clip(f.text(body, 'reason'), limit)}"
    else:
        line += f", {f.size(f.integer(body, 'bytes_out'))} out, {f.size(f.integer(body, 'bytes_in'))} in"
    return line + _by(body, limit)


def _dns(body: Body, limit: int) -> str:
    name = f.clip(f.text(body, "name"), limit)
    line = f"{f.text(body, 'decision', '?')} {f.text(body, 'qtype', '?')} {name}"
    answer = f.strings(body, "answer")
    if answer:
        line += " -> " + f.clip(", ".join(answer[:4]), limit) + (" …" if len(answer) > 4 else "")
    return line + _by(body, limit)


def _deny(body: Body, limit: int) -> str:
    line = f"{f.text(body, 'layer', '?')}: {f.clip(f.text(body, 'what'), limit)}"
    detail = f.text(body, "detail")
    if detail:
        line += f" ({f.clip(detail, limit)})"
    count = f.integer(body, "count", 1)
    if count > 1:
        line += f" x{count}"
    return line + _by(body, limit)


def _label(body: Body, limit: int) -> str:
    labels = f.mapping(body, "labels")
    return "labelled " + f.clip(" ".join(f"{k}={v}" for k, v in sorted(labels.items())), limit)


def _alert(body: Body, limit: int) -> str:
    return (
        f"{f.text(body, 'severity', '?').upper()} {f.text(body, 'category', '?')} "
        f"[{f.clip(f.text(body, 'rule'), limit)}] {f.clip(f.text(body, 'message'), limit)} -> "
        f"{f.text(body, 'action', '?')}: {f.clip(f.text(body, 'outcome'), limit)}"
    )


_SUMMARIES: dict[str, Callable[[Body, int], str]] = {
    "sandbox.start": _start,
    "sandbox.label": _label,
    "sandbox.stop": _stop,
    "phase": _phase,
    "exec.start": _exec_start,
    "exec.exit": _exec_exit,
    "net.connect": _connect,
    "dns.query": _dns,
    "deny": _deny,
    "alert": _alert,
}
KINDS = tuple(_SUMMARIES)  # the event types the timeline shows


def entry(event: StoredEvent, limit: int = 300) -> TimelineEntry | None:
    """The timeline line for `event`, or None for a type the timeline doesn't show (proc.exec,
    resource.sample, ...: the process tree and the charts show those)."""
    summarize = _SUMMARIES.get(event.type)
    if summarize is None:
        return None
    body = event.body
    denied = event.type == "deny" or (
        event.type in ("net.connect", "dns.query") and f.text(body, "decision") == "deny"
    )
    return TimelineEntry(
        time=event.time,
        sandbox=event.sandbox,
        kind=event.type,
        summary=summarize(body, limit),
        exec=f.opt_int(body, "exec"),
        denied=denied,
        severity=f.opt_text(body, "severity") if event.type == "alert" else None,
    )


class TimelineBuilder:
    """Keeps the first `limits.timeline` entries and counts, by kind, those past the cap."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._entries: list[TimelineEntry] = []
        self._omitted: Counter[str] = Counter()

    def add(self, event: StoredEvent) -> None:
        if event.type not in _SUMMARIES:
            return
        if len(self._entries) >= self._limits.timeline:
            self._omitted[event.type] += 1
            return
        made = entry(event, self._limits.text)
        if made is not None:
            self._entries.append(made)

    def result(self) -> Timeline:
        return Timeline(entries=list(self._entries), omitted=dict(self._omitted))


def timeline(events: Iterable[StoredEvent], limits: Limits | None = None) -> Timeline:
    """The timeline of `events`, in the order given (the store gives a sandbox's events in chain
    order): the first `limits.timeline` entries, and how many of each kind were left out."""
    builder = TimelineBuilder(limits or Limits())
    for e in events:
        builder.add(e)
    return builder.result()

"""The report for a terminal: plain text, aligned columns, no colour. Every string passes through
`printable`, so nothing an agent wrote can reach the terminal as a control sequence."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from corral.report._fields import limits, size
from corral.report._model import AlertGroup, Destination, ProcessNode, Report, ResourcePoint, SandboxReport
from corral.report._safe import printable

_BARS = "▁▂▃▄▅▆▇█"
_SPARK_WIDTH = 60


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Rows as lines with each column padded to its widest cell (the last column isn't padded)."""
    rows = [[printable(c) for c in row] for row in rows]
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        cells = [c.ljust(widths[i]) if i < len(row) - 1 else c for i, c in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t is not None else "-"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _alerts(groups: list[AlertGroup], indent: str) -> list[str]:
    if not groups:
        return [f"{indent}no alerts"]
    rows = [["category", "count", "worst", "rules", "actions", "outcomes"]]
    for g in groups:
        rows.append(
            [
                g.category,
                str(g.count),
                g.worst,
                ", ".join(f"{r} ({n})" for r, n in g.rules.items()),
                _counts(g.actions),
                "; ".join(g.outcomes) or "-",
            ]
        )
    lines = _table(rows, indent)
    for g in groups:
        lines.extend(f"{indent}  {g.category}: {printable(m)}" for m in g.messages)
    return lines


def _destinations(items: list[Destination], indent: str) -> list[str]:
    rows = [["destination", "port", "count", "allowed", "denied", "out", "in", "protocols"]]
    for d in items:
        rows.append(
            [
                d.destination,
                str(d.port),
                str(d.count),
                str(d.allowed),
                str(d.denied),
                size(d.bytes_out),
                size(d.bytes_in),
                ", ".join(d.protocols) + (f"  ({d.reason})" if d.reason else ""),
            ]
        )
    return _table(rows, indent)


def _node_line(node: ProcessNode) -> str:
    command = " ".join(node.cmdline) or node.exe or "?"
    line = f"{node.pid} {command}"
    if node.exec is not None:
        line += f"  [#{node.exec}]"
    if node.exited is not None:
        line += f"  exit {node.exit_code if node.exit_code is not None else '?'}"
    if node.images > 1:
        line += f"  ({node.images} programs)"
    if node.alerts:
        line += "  ALERT " + ", ".join(node.alerts)
    return printable(line)


def _tree(roots: list[ProcessNode], indent: str) -> list[str]:
    lines: list[str] = []

    def walk(node: ProcessNode, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        lines.append(indent + prefix + branch + _node_line(node))
        inner = prefix + ("" if top else ("   " if last else "│  "))
        items: list[str] = [
            printable(
                f"{c.decision} {c.protocol} {c.destination} ({size(c.bytes_out)} out, {size(c.bytes_in)} in)"
            )
            for c in node.connections
        ]
        if node.connections_omitted:
            items.append(f"… {node.connections_omitted} more connections")
        for item in items:
            lines.append(f"{indent}{inner}{'│  ' if node.children else '   '}-> {item}")
        for i, child in enumerate(node.children):
            walk(child, inner, i == len(node.children) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return lines


def _spark(values: list[float]) -> str:
    if not values:
        return ""
    step = max(1, -(-len(values) // _SPARK_WIDTH))
    chunks = [max(values[i : i + step]) for i in range(0, len(values), step)]
    top = max(chunks) or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1) + 0.5))] for v in chunks)


def _resources(points: list[ResourcePoint], indent: str) -> list[str]:
    if not points:
        return [f"{indent}no resource samples"]
    samples = sum(p.samples for p in points)
    cpu_mean = sum(p.cpu * p.samples for p in points) / samples
    cpu = [p.cpu_peak for p in points]
    memory = [float(p.memory) for p in points]
    lines = [
        f"{indent}cpu     {_spark(cpu)}  peak {max(cpu):.2f} cores, mean {cpu_mean:.2f}",
        f"{indent}memory  {_spark(memory)}  peak {size(max(memory))}",
    ]
    if any(p.gpu_memory or p.gpu_sm for p in points):
        gpu = [p.gpu_sm for p in points]
        gpu_memory = max(p.gpu_memory for p in points)
        lines.append(f"{indent}gpu     {_spark(gpu)}  peak {max(gpu):.0f}% busy, {size(gpu_memory)}")
    lines.append(f"{indent}({samples} samples, {_when(points[0].time)} to {_when(points[-1].time)})")
    return lines


def _sandbox(s: SandboxReport) -> list[str]:
    labels = " ".join(f"{k}={v}" for k, v in s.labels.items())
    lines = [printable(f"Sandbox {s.id}" + (f"  [{labels}]" if labels else "")), ""]
    stop = _when(s.stopped) + (f" ({s.stop_reason})" if s.stop_reason else "")
    if s.started and s.stopped:
        stop += f", {(s.stopped - s.started).total_seconds():.1f}s"
    rows = [
        ["verdict", s.verdict.upper()],
        ["policy", s.policy or "-"],
        ["started", _when(s.started)],
        ["stopped", stop],
        ["commands", f"{s.commands} ({s.failed_commands} failed, {s.timed_out_commands} timed out)"],
        ["denials", _counts(s.denials)],
        [
            "network",
            f"{s.connections} connections ({s.connections_denied} denied), "
            f"{s.dns_queries} DNS queries ({s.dns_denied} denied)",
        ],
        ["events", str(s.events)],
    ]
    if s.limits:
        rows.append(["limits", limits(s.limits)])
    if s.degraded:
        rows.append(["degraded", ", ".join(s.degraded)])
    if s.stop_error:
        rows.append(["stop error", s.stop_error])
    lines += _table(rows)
    lines += ["", "  Alerts", *_alerts(s.alerts, "    ")]
    lines += ["", "  Processes", *(_tree(s.processes, "    ") or ["    none seen"])]
    if s.destinations:
        lines += ["", "  Destinations", *_destinations(s.destinations, "    ")]
    lines += ["", "  Resources", *_resources(s.resources, "    ")]
    return lines


def _timeline(report: Report) -> list[str]:
    lines = ["Timeline", ""]
    day = None
    rows: list[list[str]] = []
    for e in report.timeline.entries:
        if e.time.date() != day:
            lines += _table(rows)
            rows = []
            day = e.time.date()
            lines.append(f"  {day.isoformat()}")
        mark = "!" if e.kind == "alert" else ("x" if e.denied else " ")
        rows.append([e.time.strftime("%H:%M:%S.%f")[:-3], e.sandbox, mark, e.kind, e.summary])
    lines += _table(rows)
    if not report.timeline.entries:
        lines.append("  nothing happened")
    if report.timeline.omitted:
        lines.append(
            f"  … {report.timeline.omitted_total} more not shown ({_counts(report.timeline.omitted)})"
        )
    return lines


def to_text(report: Report) -> str:
    """The report as plain text for a terminal."""
    lines = [
        printable(f"corral report: {report.title}"),
        "",
        *_table(
            [
                ["verdict", report.verdict.upper()],
                ["sandboxes", f"{len(report.sandboxes)} ({_counts(report.verdicts)})"],
                ["events", str(report.events)],
                ["generated", _when(report.generated)],
            ]
        ),
        "",
        "Alerts",
        *_alerts(report.alerts, "  "),
    ]
    if report.destinations and len(report.sandboxes) > 1:
        lines += ["", "Top destinations", *_destinations(report.destinations, "  ")]
    for s in report.sandboxes:
        lines += ["", "─" * 80, *_sandbox(s)]
    if report.processes_omitted:
        lines += [
            "",
            f"({report.processes_omitted} processes left out of the trees: the cap is "
            f"{report.limits.processes})",
        ]
    if report.destinations_omitted:
        lines += ["", f"({report.destinations_omitted} connections to destinations past the cap not counted)"]
    lines += ["", "─" * 80, *_timeline(report)]
    return "\n".join(lines) + "\n"

"""The report as one self-contained HTML file: inline CSS, charts drawn here as inline SVG, no script,
no font, no image, nothing fetched (a report is opened on analysts' machines and must not call out,
nor run anything an agent wrote). Every string is escaped, and a Content-Security-Policy that allows
only the inline style is the second line of defence should an escape ever be missed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape

from corral.report._fields import limits, size
from corral.report._model import AlertGroup, Destination, ProcessNode, Report, ResourcePoint, SandboxReport
from corral.report._safe import printable

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1d1d1f;background:#fff}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:2em;border-top:1px solid #ccc;padding-top:1em}
h3{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f3}tr:nth-child(even) td{background:#fafafa}
code,.mono{font-family:ui-monospace,monospace;font-size:12.5px;word-break:break-all}
.v{display:inline-block;padding:1px 8px;border-radius:4px;font-weight:600;color:#fff;background:#2e7d32}
.v-critical{background:#b71c1c}.v-high{background:#e65100}.v-medium{background:#f9a825;color:#000}
.v-low{background:#1565c0}.v-info{background:#607d8b}
tr.deny td{color:#b71c1c}tr.alert td{background:#fff3e0;font-weight:600}
ul.tree,ul.tree ul{list-style:none;padding-left:1.2em;margin:0;border-left:1px dotted #aaa}
ul.tree{border-left:none;padding-left:0}.conn{color:#555}.flag{color:#b71c1c;font-weight:600}
svg{background:#fafafa;border:1px solid #ddd;margin:4px 8px 4px 0}
svg .line{fill:none;stroke:#1565c0;stroke-width:1.5}svg .peak{fill:none;stroke:#e65100;stroke-width:1}
svg text{font:11px system-ui,sans-serif;fill:#444}
"""
_CSP = "default-src 'none'; style-src 'unsafe-inline'"  # the inline <style>, nothing else
_W, _H, _PAD = 560, 140, 24


def _e(s: object) -> str:
    """Text for HTML: control characters shown as escapes, then HTML-escaped (quotes too)."""
    return escape(printable(str(s)), quote=True)


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t is not None else "-"


def _badge(verdict: str) -> str:
    return f'<span class="v v-{_e(verdict)}">{_e(verdict)}</span>'


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], classes: Iterable[str] = ()) -> str:
    """A table; cells in `rows` are HTML already (escaped by the caller), `head` is plain text."""
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    class_list = list(classes)
    for i, row in enumerate(rows):
        cls = class_list[i] if i < len(class_list) and class_list[i] else ""
        out.append(f'<tr class="{cls}">' if cls else "<tr>")
        out.extend(f"<td>{cell}</td>" for cell in row)
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _counts(counts: dict[str, int]) -> str:
    return _e(", ".join(f"{k} {v}" for k, v in counts.items()) or "none")


def _alerts(groups: list[AlertGroup]) -> str:
    if not groups:
        return "<p>No alerts.</p>"
    return _table(
        ["category", "count", "worst", "rules", "actions", "outcomes", "messages"],
        [
            [
                _e(g.category),
                str(g.count),
                _badge(g.worst),
                _e(", ".join(f"{r} ({n})" for r, n in g.rules.items())),
                _counts(g.actions),
                "<br>".join(_e(o) for o in g.outcomes) or "-",
                "<br>".join(f'<span class="mono">{_e(m)}</span>' for m in g.messages),
            ]
            for g in groups
        ],
    )


def _destinations(items: list[Destination]) -> str:
    return _table(
        ["destination", "port", "count", "allowed", "denied", "out", "in", "protocols", "refused because"],
        [
            [
                f'<span class="mono">{_e(d.destination)}</span>',
                str(d.port),
                str(d.count),
                str(d.allowed),
                str(d.denied),
                _e(size(d.bytes_out)),
                _e(size(d.bytes_in)),
                _e(", ".join(d.protocols)),
                _e(d.reason),
            ]
            for d in items
        ],
        ["deny" if d.denied and not d.allowed else "" for d in items],
    )


def _node(node: ProcessNode, out: list[str]) -> None:
    command = " ".join(node.cmdline) or node.exe or "?"
    out.append(f'<li><span class="mono">{node.pid} {_e(command)}</span>')
    facts = []
    if node.exe and node.cmdline:
        facts.append(f"exe {_e(node.exe)}")
    if node.exec is not None:
        facts.append(f"command #{node.exec}")
    if node.exited is not None:
        facts.append(f"exit {node.exit_code if node.exit_code is not None else '?'}")
    if node.images > 1:
        facts.append(f"{node.images} programs")
    if not node.seen_exec:
        facts.append("start not seen")
    if facts:
        out.append(f" <small>({'; '.join(facts)})</small>")
    if node.alerts:
        out.append(f' <span class="flag">alert: {_e(", ".join(node.alerts))}</span>')
    if node.connections or node.children:
        out.append("<ul>")
        for c in node.connections:
            out.append(
                f'<li class="conn">&rarr; {_e(c.decision)} {_e(c.protocol)} '
                f'<span class="mono">{_e(c.destination)}</span> '
                f"({_e(size(c.bytes_out))} out, {_e(size(c.bytes_in))} in)</li>"
            )
        if node.connections_omitted:
            out.append(f'<li class="conn">&hellip; {node.connections_omitted} more connections</li>')
        for child in node.children:
            _node(child, out)
        out.append("</ul>")
    out.append("</li>")


def _tree(roots: list[ProcessNode]) -> str:
    if not roots:
        return "<p>No processes seen.</p>"
    out = ['<ul class="tree">']
    for root in roots:
        _node(root, out)
    out.append("</ul>")
    return "".join(out)


def _chart(title: str, points: list[ResourcePoint], mean: list[float], peak: list[float], unit: str) -> str:
    """A line chart of `mean` (and `peak`, when it differs) over the points' times."""
    t0 = points[0].time.timestamp()
    span = max(points[-1].time.timestamp() - t0, 1e-9)
    top = max([*peak, *mean, 1e-9])

    def path(values: list[float]) -> str:
        return " ".join(
            f"{_PAD + (p.time.timestamp() - t0) / span * (_W - 2 * _PAD):.1f},"
            f"{_H - _PAD - v / top * (_H - 2 * _PAD):.1f}"
            for p, v in zip(points, values, strict=True)
        )

    first, last = (_e(p.time.strftime("%H:%M:%S")) for p in (points[0], points[-1]))
    label = size(top) if unit == "bytes" else f"{top:.2f} {unit}"
    lines = [f'<polyline class="line" points="{path(mean)}"/>']
    if peak != mean:
        lines.append(f'<polyline class="peak" points="{path(peak)}"/>')
    return (
        f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(title)}">'
        f'<text x="{_PAD}" y="14">{_e(title)} (max {_e(label)})</text>'
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#999"/>'
        f"{''.join(lines)}"
        f'<text x="{_PAD}" y="{_H - 6}">{first}</text>'
        f'<text x="{_W - _PAD}" y="{_H - 6}" text-anchor="end">{last}</text>'
        "</svg>"
    )


def _resources(points: list[ResourcePoint]) -> str:
    if not points:
        return "<p>No resource samples.</p>"
    charts = [
        _chart(
            "CPU, cores (mean; peak in orange)",
            points,
            [p.cpu for p in points],
            [p.cpu_peak for p in points],
            "cores",
        ),
        _chart(
            "memory", points, [float(p.memory) for p in points], [float(p.memory) for p in points], "bytes"
        ),
    ]
    if any(p.gpu_memory or p.gpu_sm for p in points):
        charts.append(_chart("GPU busy", points, [p.gpu_sm for p in points], [p.gpu_sm for p in points], "%"))
        charts.append(
            _chart(
                "GPU memory",
                points,
                [float(p.gpu_memory) for p in points],
                [float(p.gpu_memory) for p in points],
                "bytes",
            )
        )
    samples = sum(p.samples for p in points)
    return (
        "<div>" + "".join(charts) + f"</div><p><small>{samples} samples in {len(points)} points</small></p>"
    )


def _sandbox(s: SandboxReport) -> str:
    labels = ", ".join(f"{k}={v}" for k, v in s.labels.items())
    stop = _when(s.stopped) + (f" ({s.stop_reason})" if s.stop_reason else "")
    if s.started and s.stopped:
        stop += f", {(s.stopped - s.started).total_seconds():.1f}s"
    facts = [
        ["verdict", _badge(s.verdict)],
        ["labels", _e(labels or "-")],
        ["policy", f'<span class="mono">{_e(s.policy or "-")}</span>'],
        ["started", _e(_when(s.started))],
        ["stopped", _e(stop)],
        ["commands", _e(f"{s.commands} ({s.failed_commands} failed, {s.timed_out_commands} timed out)")],
        ["denials", _counts(s.denials)],
        [
            "network",
            _e(
                f"{s.connections} connections ({s.connections_denied} denied), "
                f"{s.dns_queries} DNS queries ({s.dns_denied} denied)"
            ),
        ],
        ["events", str(s.events)],
    ]
    if s.limits:
        facts.append(["limits", _e(limits(s.limits))])
    if s.degraded:
        facts.append(["degraded", _e(", ".join(s.degraded))])
    if s.stop_error:
        facts.append(["stop error", _e(s.stop_error)])
    parts = [
        f'<section id="sandbox-{_e(s.id)}"><h2>Sandbox <code>{_e(s.id)}</code></h2>',
        _table(["", ""], facts),
        "<h3>Alerts</h3>",
        _alerts(s.alerts),
        "<h3>Processes</h3>",
        _tree(s.processes),
    ]
    if s.destinations:
        parts += ["<h3>Destinations</h3>", _destinations(s.destinations)]
    parts += ["<h3>CPU and memory</h3>", _resources(s.resources), "</section>"]
    return "".join(parts)


def _timeline(report: Report) -> str:
    entries = report.timeline.entries
    body = _table(
        ["time", "sandbox", "kind", "what"],
        [
            [
                _e(e.time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]),
                f"<code>{_e(e.sandbox)}</code>",
                _e(e.kind),
                f'<span class="mono">{_e(e.summary)}</span>',
            ]
            for e in entries
        ],
        ["alert" if e.kind == "alert" else ("deny" if e.denied else "") for e in entries],
    )
    if report.timeline.omitted:
        body += (
            f"<p>&hellip; {report.timeline.omitted_total} more not shown "
            f"({_counts(report.timeline.omitted)}).</p>"
        )
    return body


def to_html(report: Report) -> str:
    """The report as one self-contained HTML page."""
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>corral report: {_e(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>corral report: {_e(report.title)}</h1>",
        _table(
            ["verdict", "sandboxes", "events", "generated"],
            [
                [
                    _badge(report.verdict),
                    _e(len(report.sandboxes)) + f" ({_counts(report.verdicts)})",
                    str(report.events),
                    _e(_when(report.generated)),
                ]
            ],
        ),
        "<h2>Alerts</h2>",
        _alerts(report.alerts),
    ]
    if report.destinations:
        parts += ["<h2>Top destinations</h2>", _destinations(report.destinations)]
    if report.processes_omitted:
        parts.append(
            f"<p>{report.processes_omitted} processes left out of the trees (the cap is "
            f"{report.limits.processes}).</p>"
        )
    if report.destinations_omitted:
        parts.append(
            f"<p>{report.destinations_omitted} connections to destinations past the cap not counted.</p>"
        )
    parts.extend(_sandbox(s) for s in report.sandboxes)
    parts += ["<h2>Timeline</h2>", _timeline(report), "</body></html>\n"]
    return "".join(parts)

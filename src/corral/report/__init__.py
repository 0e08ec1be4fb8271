"""The report of a sandbox or of a run, built from what the audit store hands back.

    report = build(sandboxes, events)          # SandboxInfo records, StoredEvents (one pass)
    print(to_text(report))                     # or to_json(report), to_html(report)

A report says: the verdict ('clean', or the worst alert severity) and the alerts by category (how
many, how bad, which rules, what was done and what it achieved); a timeline of commands,
connections, DNS queries, denials, alerts and sandbox starts and stops; each sandbox's process tree
with its connections; the top destinations; CPU, memory and GPU over time; and each sandbox's labels,
policy, start and stop, commands and denials by layer.

Events are read once, in the order given, and may be many (a run's million): what a report keeps is
bounded by `Limits` (the first 2,000 timeline entries, 500 resource points per sandbox, 5,000
processes, ...), and what it leaves out is counted in the report.

The parts, for the dashboard to build on its own (each takes `StoredEvent`s and an optional
`Limits`):

- `verdict(severities) -> str`: 'clean', or the worst of the severities given.
- `alert_groups(events) -> list[AlertGroup]`: alerts by category, worst first.
- `timeline(events) -> Timeline`: one-line entries, and counts of those past the cap.
- `process_tree(events) -> list[ProcessNode]`: the roots, each with its children and connections.
- `top_destinations(events) -> list[Destination]`: the busiest destinations.
- `resource_series(events) -> dict[str, list[ResourcePoint]]`: per sandbox, downsampled.
- `printable(text) -> str`: agent-written text with control and invisible characters escaped, for any
  other place that shows it.

Strings in a `Report` are as the events had them (clipped in length): agent-written, untrusted.
`to_text` escapes control characters; `to_html` also HTML-escapes everything, and its page loads
nothing and runs no script.
"""

from corral.report._alerts import alert_groups, verdict
from corral.report._build import build
from corral.report._destinations import top_destinations
from corral.report._model import (
    AlertGroup,
    Destination,
    Limits,
    ProcessConnection,
    ProcessNode,
    Report,
    ResourcePoint,
    SandboxReport,
    Timeline,
    TimelineEntry,
)
from corral.report._processes import process_tree
from corral.report._render_html import to_html
from corral.report._render_text import to_text
from corral.report._resources import resource_series
from corral.report._safe import printable
from corral.report._timeline import timeline


def to_json(report: Report) -> str:
    """The report as JSON (the `Report` model's fields; times in RFC 3339)."""
    return report.model_dump_json(indent=2) + "\n"


__all__ = [
    "AlertGroup",
    "Destination",
    "Limits",
    "ProcessConnection",
    "ProcessNode",
    "Report",
    "ResourcePoint",
    "SandboxReport",
    "Timeline",
    "TimelineEntry",
    "alert_groups",
    "build",
    "printable",
    "process_tree",
    "resource_series",
    "timeline",
    "to_html",
    "to_json",
    "to_text",
    "top_destinations",
    "verdict",
]

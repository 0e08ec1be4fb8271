"""The templates, with autoescaping on for every one of them: every string in an event came from the
agent (command lines, DNS names, paths, an HTTP Host header) and is shown as text, never as markup."""

from __future__ import annotations

from datetime import UTC, datetime

import jinja2

SEVERITY_CLASS = {
    "critical": "sev-critical",
    "high": "sev-high",
    "medium": "sev-medium",
    "low": "sev-low",
    "info": "sev-info",
    "clean": "sev-clean",
    "deny": "sev-deny",
}


def _when(t: datetime | None) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if t is not None else ""


def _clock(t: datetime | None) -> str:
    return t.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3] if t is not None else ""


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("corral.ui", "templates"),
        # On for every template, whatever its name ends with (select_autoescape would leave a
        # template not named .html unescaped).
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["clock"] = _clock
    env.filters["sev"] = lambda s: SEVERITY_CLASS.get(str(s), "sev-info")
    return env

"""Verdicts and alerts grouped by category."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from corral.report import _fields as f
from corral.report._model import AlertGroup, Limits
from corral.store.records import SEVERITIES, StoredEvent

CLEAN = "clean"
_RANK = {s: i for i, s in enumerate(SEVERITIES)}  # 0 is the worst
_RULES_KEPT = 100  # distinct rules named per category; corral ships far fewer


def worse(a: str | None, b: str | None) -> str | None:
    """The worse of two severities (None: no alert). An unknown severity ranks below `info`: it is
    still an alert, never clean."""
    if a is None:
        return b
    if b is None:
        return a
    return a if _RANK.get(a, len(SEVERITIES)) <= _RANK.get(b, len(SEVERITIES)) else b


def verdict(severities: Iterable[str | None]) -> str:
    """'clean' when no severity is given (None counts as none), else the worst one given: the verdict
    of a sandbox from its alerts' severities, or of a run from its sandboxes' verdicts."""
    worst: str | None = None
    for s in severities:
        worst = worse(worst, None if s == CLEAN else s)
    return worst or CLEAN


def severity_order(s: str) -> int:
    """Sort key: clean last, the worst first."""
    return len(SEVERITIES) + 1 if s == CLEAN else _RANK.get(s, len(SEVERITIES))


class AlertGrouper:
    """Alerts counted by category as they stream past; memory is bounded by the categories, rules and
    `limits.messages` quotes, not by the alerts."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._groups: dict[str, _Group] = {}

    def add(self, time: datetime, body: Mapping[str, Any]) -> None:
        category = f.text(body, "category", "unknown")
        group = self._groups.get(category)
        if group is None:
            group = self._groups[category] = _Group(time)
        group.count += 1
        group.last = time
        group.worst = worse(group.worst, f.text(body, "severity", "info"))
        rule = f.clip(f.text(body, "rule"), self._limits.text)
        if rule in group.rules or len(group.rules) < _RULES_KEPT:
            group.rules[rule] += 1
        group.actions[f.clip(f.text(body, "action"), 32)] += 1
        outcome = f.clip(f.text(body, "outcome"), self._limits.text)
        if outcome and outcome not in group.outcomes and len(group.outcomes) < self._limits.messages:
            group.outcomes.append(outcome)
        if len(group.messages) < self._limits.messages:
            group.messages.append(f.clip(f.text(body, "message"), self._limits.text))

    @property
    def worst(self) -> str | None:
        return verdict(g.worst for g in self._groups.values()) if self._groups else None

    def groups(self) -> list[AlertGroup]:
        """Worst category first, then the most alerts."""
        out = [
            AlertGroup(
                category=category,
                count=g.count,
                worst=g.worst or "info",
                rules=dict(g.rules.most_common()),
                actions=dict(g.actions.most_common()),
                outcomes=list(g.outcomes),
                messages=list(g.messages),
                first=g.first,
                last=g.last,
            )
            for category, g in self._groups.items()
        ]
        out.sort(key=lambda g: (severity_order(g.worst), -g.count, g.category))
        return out


class _Group:
    __slots__ = ("actions", "count", "first", "last", "messages", "outcomes", "rules", "worst")

    def __init__(self, first: datetime) -> None:
        self.count = 0
        self.worst: str | None = None
        self.rules: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.outcomes: list[str] = []
        self.messages: list[str] = []
        self.first = first
        self.last = first


def alert_groups(events: Iterable[StoredEvent], limits: Limits | None = None) -> list[AlertGroup]:
    """The `alert` events among `events`, grouped by category (worst first)."""
    grouper = AlertGrouper(limits or Limits())
    for e in events:
        if e.type == "alert":
            grouper.add(e.time, e.body)
    return grouper.groups()

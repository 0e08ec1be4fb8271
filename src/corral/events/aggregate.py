"""Repeated identical denials folded into one event, so a flood costs the host a few events a second
instead of one each (95,000 refused `unshare` calls in 15 s used to be 95,000 events in memory).

Two denials are identical when layer, what, command and the refused program agree. The first of a
window is recorded in full at once; repeats within `window` seconds of it are counted, and recorded
as one event (`count`, `first`, `last`, the detail of the first repeat) when the window closes: at the
next denial after it, or whenever the owner flushes (a command's end, the sandbox's stop).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from corral.events.model import Alert, Deny

_Key = tuple[str, str, int | None, str | None]


@dataclass
class _Window:
    started: float  # monotonic
    repeat: Deny | None = None  # the first repeat, the model of the aggregate
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None

    def aggregate(self) -> Deny | None:
        if self.repeat is None:
            return None
        return self.repeat.model_copy(
            update={"count": self.count, "first": self.first, "last": self.last, "time": self.last}
        )


class DenyRepeats:
    """Not thread-safe: the owner calls it under the lock that orders its events."""

    def __init__(self, window: float = 1.0, keys: int = 1024) -> None:
        self.window = window
        self.keys = keys  # distinct denials tracked at once; past it, every open window is flushed
        self._open: OrderedDict[_Key, _Window] = OrderedDict()  # oldest window first

    def add(self, deny: Deny) -> list[Deny]:
        """What to record now for `deny`: closed aggregates, then `deny` itself when it opens a window
        (nothing when it is a repeat, counted)."""
        now = time.monotonic()
        key = (deny.layer, deny.what, deny.exec, deny.process.exe if deny.process is not None else None)
        out = self.expired(now)
        window = self._open.get(key)
        if window is not None:
            window.count += 1
            if window.repeat is None:
                window.repeat, window.first = deny, deny.time
            window.last = deny.time
            return out
        if len(self._open) >= self.keys:
            out += self.flush()
        self._open[key] = _Window(now)
        out.append(deny)
        return out

    def expired(self, now: float | None = None) -> list[Deny]:
        """Aggregates of the windows that have closed by `now`."""
        now = time.monotonic() if now is None else now
        out: list[Deny] = []
        while self._open:
            key, window = next(iter(self._open.items()))
            if now - window.started < self.window:
                break
            del self._open[key]
            if (event := window.aggregate()) is not None:
                out.append(event)
        return out

    def flush(self) -> list[Deny]:
        """Every pending aggregate, closing all windows."""
        out = [e for w in self._open.values() if (e := w.aggregate()) is not None]
        self._open.clear()
        return out


ALERTS_KEPT = 100  # alerts a verdict lists one by one (all are counted)
_MESSAGE_KEPT = 500  # characters of an alert's message a verdict keeps


@dataclass(frozen=True)
class AlertEntry:
    """One alert as a verdict lists it: what fired, what was done, and where it is in the chain."""

    seq: int  # the alert's place in its sandbox's chain (the store's `seq`)
    rule: str
    category: str
    severity: str
    action: str
    outcome: str
    exec: int | None
    message: str


class AlertTally:
    """A sandbox's alerts as a verdict needs them, built the same way from the running sandbox's
    events and from the store's: every alert whose response is not `log` counted by (category,
    severity, action, rule), and the first `ALERTS_KEPT` listed. Bounded whatever an agent makes the
    rules fire: the counts by the rules that exist, the list by `ALERTS_KEPT`.

    Not thread-safe: the owner adds under the lock that orders its events."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str, str], int] = {}
        self.first: list[AlertEntry] = []

    def add(self, seq: int, body: Alert | dict[str, object]) -> None:
        """Count one alert (an `Alert`, or its JSON as stored); `log` ones are not alerts here (the
        policy said to record them only)."""
        if isinstance(body, Alert):
            entry = AlertEntry(
                seq,
                body.rule,
                body.category,
                body.severity,
                body.action,
                body.outcome,
                body.exec,
                body.message[:_MESSAGE_KEPT],
            )
        else:
            exec_id = body.get("exec")
            entry = AlertEntry(
                seq,
                str(body.get("rule", "")),
                str(body.get("category", "")),
                str(body.get("severity", "")),
                str(body.get("action", "")),
                str(body.get("outcome", "")),
                exec_id if isinstance(exec_id, int) else None,
                str(body.get("message", ""))[:_MESSAGE_KEPT],
            )
        if entry.action == "log":
            return
        key = (entry.category, entry.severity, entry.action, entry.rule)
        self.counts[key] = self.counts.get(key, 0) + 1
        if len(self.first) < ALERTS_KEPT:
            self.first.append(entry)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

"""Where a sandbox's connections went: per name (or address) and port, how often, how much, and what
the fence decided."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from corral.report import _fields as f
from corral.report._model import Destination, Limits
from corral.report._timeline import connection_label
from corral.store.records import StoredEvent

_PROTOCOLS_KEPT = 4


class _Counts:
    __slots__ = ("allowed", "bytes_in", "bytes_out", "count", "denied", "protocols", "reason")

    def __init__(self) -> None:
        self.count = 0
        self.allowed = 0
        self.denied = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.protocols: list[str] = []
        self.reason = ""


class Budget:
    """Distinct destinations several counters may still add between them (a run's sandboxes share
    one, so a thousand scanning sandboxes can't hold ten million entries)."""

    def __init__(self, left: int) -> None:
        self.left = left

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


class DestinationCounter:
    """Counts connections by destination. A scan makes a destination per address it tries, so at most
    `limits.destinations` distinct ones are counted (or as many as a shared `budget` allows);
    connections to the rest are counted in `omitted`."""

    def __init__(self, limits: Limits, budget: Budget | None = None) -> None:
        self._limits = limits
        self._budget = budget or Budget(limits.destinations)
        self._counts: dict[tuple[str, int], _Counts] = {}
        self.omitted = 0

    def add(self, body: Mapping[str, Any]) -> None:
        host, port = connection_label(body)
        key = (f.clip(host, self._limits.text), port)
        counts = self._counts.get(key)
        if counts is None:
            if not self._budget.take():
                self.omitted += 1
                return
            counts = self._counts[key] = _Counts()
        counts.count += 1
        if f.text(body, "decision") == "deny":
            counts.denied += 1
            if not counts.reason:
                counts.reason = f.clip(f.text(body, "reason"), self._limits.text)
        else:
            counts.allowed += 1
        counts.bytes_out += f.integer(body, "bytes_out")
        counts.bytes_in += f.integer(body, "bytes_in")
        protocol = f.clip(f.text(body, "protocol", "?"), 32)
        if protocol not in counts.protocols and len(counts.protocols) < _PROTOCOLS_KEPT:
            counts.protocols.append(protocol)

    def top(self, n: int | None = None) -> list[Destination]:
        """The `n` (default `limits.top_destinations`) busiest: most connections, then most bytes."""
        ranked = sorted(
            self._counts.items(), key=lambda kv: (-kv[1].count, -(kv[1].bytes_out + kv[1].bytes_in), kv[0])
        )
        return [
            Destination(
                destination=host,
                port=port,
                count=c.count,
                allowed=c.allowed,
                denied=c.denied,
                bytes_out=c.bytes_out,
                bytes_in=c.bytes_in,
                protocols=list(c.protocols),
                reason=c.reason,
            )
            for (host, port), c in ranked[: self._limits.top_destinations if n is None else n]
        ]


def top_destinations(
    events: Iterable[StoredEvent], limits: Limits | None = None, n: int | None = None
) -> list[Destination]:
    """The busiest destinations of the net.connect events among `events`."""
    counter = DestinationCounter(limits or Limits())
    for e in events:
        if e.type == "net.connect":
            counter.add(e.body)
    return counter.top(n)

"""A sandbox's event record: the events in order, each hashed into the sandbox's chain and handed
to the host's audit writer; the list `Sandbox.events()` returns; the JSONL file, if asked for; and
the folding of repeated denials (`DenyRepeats`) before any of them sees them.

The chain (`corral.store.writer.SandboxChain`) is extended here, under the log's lock, because here
is where the events get their order:
they come from several threads (the command's, the supervisor's, the egress loop's, the monitors').
The chain ends with `sandbox.stop`, which carries the hash of everything before it; an event that
arrives after it is not recorded (logged for the operator)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from corral.events import Alert, Deny, JsonlSink, SandboxStop
from corral.events.aggregate import AlertTally, DenyRepeats
from corral.events.model import Event
from corral.store.writer import AuditWriter

log = logging.getLogger("corral")

# Events a sandbox keeps in memory for `events()`; past it the oldest (but sandbox.start) are dropped
# a tenth at a time and counted in `elided`. The JSONL file, when there is one, has every event.
# Repeated denials are aggregated first (see `DenyRepeats`), so ordinary work never comes near it.
EVENTS_KEPT = 10_000


@dataclass(frozen=True)
class Record:
    """A sandbox's record as its verdict reads it: the alerts, the stop (None while it runs), how
    many events are chained and the hash of the last ('' before the first)."""

    alerts: AlertTally
    stop: SandboxStop | None
    events: int
    head: str


class EventLog:
    def __init__(
        self,
        sandbox_id: str,
        path: str | os.PathLike[str] | None,
        writer: AuditWriter,
        labels: Mapping[str, str],
    ) -> None:
        self._id = sandbox_id
        self._chain = writer.sandbox(sandbox_id, labels)
        self._kept = EVENTS_KEPT
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._repeats = DenyRepeats()
        self.elided = 0  # events dropped from `events()` (not from the store or file) to bound memory
        self._sink = JsonlSink(path) if path is not None else None
        # What a verdict reads, kept apart from `_events` (which drops the oldest): every alert, the stop.
        self._alerts = AlertTally()
        self._stop: SandboxStop | None = None

    def add(self, event: Event) -> list[Event]:
        """Record `event` (a denial may be held back, to be counted with its repeats); what was
        recorded now, in order. Events come from several threads (the command's, the supervisor's,
        the egress loop's, the monitors'); the file gets them in the same order as `events()`."""
        with self._lock:
            if isinstance(event, Deny):
                recorded: list[Event] = [*self._repeats.add(event)]
            else:
                recorded = [*self._repeats.expired(), event]
            return self._record(recorded)

    def flush(self) -> list[Event]:
        """Record the denials still being counted (at a command's end, so its result lists them, and
        at the sandbox's stop)."""
        with self._lock:
            return self._record([*self._repeats.flush()])

    def _record(self, events: list[Event]) -> list[Event]:
        recorded: list[Event] = []
        for event in events:
            chained = self._chain.record(event)
            if chained is None:
                log.warning("sandbox %s: %s after the sandbox stopped; not recorded", self._id, event.type)
                continue
            event, body = chained
            recorded.append(event)
            if isinstance(event, Alert):
                self._alerts.add(self._chain.seq, event)
            elif isinstance(event, SandboxStop):
                self._stop = event
            self._events.append(event)
            if self._sink is not None:
                self._sink.write_json(body)
        if len(self._events) > self._kept:
            drop = self._kept // 10
            del self._events[1 : 1 + drop]  # [0] is sandbox.start, which says what the sandbox was
            if not self.elided:
                log.warning(
                    "sandbox %s: over %d events; the oldest are dropped from events() (the audit store "
                    "keeps them)",
                    self._id,
                    self._kept,
                )
            self.elided += drop
        return recorded

    @property
    def seq(self) -> int:
        """Events in the sandbox's chain so far."""
        return self._chain.seq

    def record(self) -> Record:
        """What the sandbox's verdict is made of, as of now (one consistent view)."""
        with self._lock:
            tally = AlertTally()
            tally.counts, tally.first = dict(self._alerts.counts), list(self._alerts.first)
            return Record(tally, self._stop, self._chain.seq, self._chain.head if self._chain.seq else "")

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def mark(self) -> int:
        """A position in the event stream, for `since`."""
        with self._lock:
            return self.elided + len(self._events)

    def since(self, mark: int) -> list[Event]:
        with self._lock:
            if mark == 0:
                return list(self._events)
            return self._events[max(1, mark - self.elided) :]

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()

"""A sandbox's event list: what `Sandbox.events()` returns, the JSONL file beside it, and the
folding of repeated denials (`DenyRepeats`) before either sees them."""

from __future__ import annotations

import logging
import os
import threading

from corral.events import Deny, JsonlSink
from corral.events.aggregate import DenyRepeats
from corral.events.model import Event

log = logging.getLogger("corral")

# Events a sandbox keeps in memory for `events()`; past it the oldest (but sandbox.start) are dropped
# a tenth at a time and counted in `elided`. The JSONL file, when there is one, has every event.
# Repeated denials are aggregated first (see `DenyRepeats`), so ordinary work never comes near it.
EVENTS_KEPT = 10_000


class EventLog:
    def __init__(self, sandbox_id: str, path: str | os.PathLike[str] | None) -> None:
        self._id = sandbox_id
        self._kept = EVENTS_KEPT
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._repeats = DenyRepeats()
        self.elided = 0  # events dropped from `events()` (not from the JSONL file) to bound memory
        self._sink = JsonlSink(path) if path is not None else None

    def add(self, event: Event) -> list[Event]:
        """Record `event` (a denial may be held back, to be counted with its repeats); what was
        recorded now, in order. Events come from several threads (the command's, the supervisor's,
        the egress loop's, the monitors'); the file gets them in the same order as `events()`."""
        with self._lock:
            if isinstance(event, Deny):
                recorded: list[Event] = [*self._repeats.add(event)]
            else:
                recorded = [*self._repeats.expired(), event]
            self._record(recorded)
        return recorded

    def flush(self) -> list[Event]:
        """Record the denials still being counted (at a command's end, so its result lists them, and
        at the sandbox's stop)."""
        with self._lock:
            recorded: list[Event] = [*self._repeats.flush()]
            self._record(recorded)
        return recorded

    def _record(self, recorded: list[Event]) -> None:
        for event in recorded:
            self._events.append(event)
            if self._sink is not None:
                self._sink.write(event)
        if len(self._events) > self._kept:
            drop = self._kept // 10
            del self._events[1 : 1 + drop]  # [0] is sandbox.start, which says what the sandbox was
            if not self.elided:
                log.warning(
                    "sandbox %s: over %d events; the oldest are dropped from events() (the event file "
                    "keeps them)",
                    self._id,
                    self._kept,
                )
            self.elided += drop

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

"""Following a running sandbox: server-sent events, one per stored event after a seq, found by
polling the store (the writer commits every 100 ms, so a 250 ms poll shows an alert well within a
second). The stream ends when the client goes away, and after it has sent the sandbox's stop."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread

from corral.store import Filters, Store, StoredEvent
from corral.ui import _views

POLL = 0.25  # seconds between looks at the store
BATCH = 500  # events sent per look at most
KEEPALIVE = 15.0  # seconds of quiet before a comment line keeps proxies from closing the stream


def message(e: StoredEvent) -> str:
    """One SSE message: the timeline row the page appends, and for an alert what its entry shows."""
    r = _views.row(e.seq, e.time, e.body)
    data: dict[str, Any] = {
        "seq": r.seq,
        "time": e.time.strftime("%H:%M:%S.%f")[:-3],
        "type": r.type,
        "summary": r.summary,
        "severity": r.severity,
    }
    if e.type == "alert":
        view = _views.alert_view(e)
        data["alert"] = {
            "rule": e.body.get("rule"),
            "category": e.body.get("category"),
            "severity": e.body.get("severity"),
            "action": e.body.get("action"),
            "outcome": e.body.get("outcome"),
            "message": e.body.get("message"),
            "processes": view.processes,
            "connections": view.connections,
            "trigger": view.trigger,
            "mitre": view.mitre,
            "owasp": view.owasp,
        }
    if e.type == "resource.sample":
        data["sample"] = {
            "t": e.time.timestamp(),
            "cpu": float(e.body.get("cpu") or 0.0),
            "memory": round(float(e.body.get("memory") or 0) / (1 << 20), 2),
        }
    # The JSON is one line (no raw newlines in json.dumps' output), as an SSE data field must be.
    event = "stop" if e.type == "sandbox.stop" else "event"
    return f"id: {e.seq}\nevent: {event}\ndata: {json.dumps(data)}\n\n"


async def stream(
    store: Store, sandbox: str, after: int, disconnected: Callable[[], Any]
) -> AsyncIterator[str]:
    quiet = 0.0
    yield "retry: 1000\n\n"
    while True:
        if await disconnected():
            return
        events = await anyio.to_thread.run_sync(_read, store, sandbox, after)
        for e in events:
            yield message(e)
            after = e.seq
            if e.type == "sandbox.stop":
                return
        if not events:
            info = await anyio.to_thread.run_sync(store.sandbox, sandbox)
            if info is None or (info.stopped is not None and info.events <= after):
                yield "event: stop\ndata: {}\n\n"  # stopped before the stream began: nothing more to come
                return
            quiet += POLL
            if quiet >= KEEPALIVE:
                quiet = 0.0
                yield ": keepalive\n\n"
        else:
            quiet = 0.0
        await anyio.sleep(POLL)


def _read(store: Store, sandbox: str, after: int) -> list[StoredEvent]:
    return list(store.events(Filters(sandbox=sandbox), after=after, limit=BATCH))

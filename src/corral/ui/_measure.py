"""How long the dashboard's pages take to render over a given store: for the benchmark, which fills
a store with a million events and reports these next to its other numbers."""

from __future__ import annotations

import statistics
import time
from typing import Any
from urllib.parse import quote

import anyio
from starlette.types import ASGIApp, Message

from corral.store import Store


def measure_pages(store_where: str, *, repeat: int = 7) -> dict[str, float]:
    """Median milliseconds of GET / (the runs), a run's page and a sandbox's page (the one with the
    most events: its newest timeline page, alerts, process tree and resource charts), each rendered
    `repeat` times in-process (no socket: what is measured is the page, not the network)."""
    from corral.ui.app import make_app

    with Store.open(store_where, create=False) as store:
        runs = store.label_values("run")
        sandboxes = store.sandboxes()
    if not sandboxes:
        raise ValueError(f"audit store {store_where}: no sandbox to measure a page of")
    busiest = max(sandboxes, key=lambda s: s.events)
    paths = {"runs": "/", "sandbox": f"/sandboxes/{quote(busiest.id)}"}
    paths["run"] = f"/runs/{quote(runs[0][0])}" if runs else "/runs/"
    app = make_app(store_where, token=None)
    timings: dict[str, float] = {}
    for name, path in paths.items():
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            status, _headers, _body = get(app, path)
            samples.append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status}")
        timings[name] = statistics.median(samples)
    return timings


def get(app: ASGIApp, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET through the ASGI app, without a server: (status, headers, body)."""
    target, _, query = path.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": target,
        "raw_path": target.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8765),
    }
    result: dict[str, Any] = {"status": 0, "headers": {}, "body": b""}
    requested = False
    done = anyio.Event()

    async def receive() -> Message:
        # The request once; then, as a client would, the disconnect after the whole response.
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            result["status"] = message["status"]
            result["headers"] = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            result["body"] += message.get("body", b"")
            if not message.get("more_body", False):
                done.set()

    async def call() -> None:
        nonlocal done
        done = anyio.Event()  # made inside the event loop that waits on it
        await app(scope, receive, send)

    anyio.run(call)
    return int(result["status"]), dict(result["headers"]), bytes(result["body"])

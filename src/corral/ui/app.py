"""`corral ui`: the dashboard over an audit store, and its Prometheus metrics.

Pages: / (runs), /runs/{run} (a run's sandboxes), /sandboxes/{id} (one sandbox: verdict, alerts with
their evidence, denials, process tree, resources, timeline), /sandboxes/{id}/live (server-sent
events), /sandboxes/{id}/packet.zip (the evidence packet), /verify (the store checked against its
chains, on demand), /metrics (Prometheus), /static/... (the package's own files only).

The dashboard reads the store and nothing else: never a sandbox's files, never the host's."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from corral._errors import StoreError
from corral.store import SandboxInfo, Store, Verification, verify
from corral.ui import _guard, _live, _metrics, _packet, _render, _views

log = logging.getLogger("corral")

STATIC = Path(__file__).parent / "static"


@dataclass
class _Checked:
    result: Verification
    at: datetime


class _State:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.env = _render.environment()
        self.metrics = _metrics.registry(store)
        self.checked: _Checked | None = None  # the last /verify, shown in every page's header
        self.verifying = threading.Lock()


def make_app(store_where: str | None, *, token: str | None) -> Starlette:
    """The dashboard over the store at `store_where` (a SQLite path or a postgresql:// URL; None: the
    CORRAL_STORE environment variable, else /var/lib/corral/audit.db). With `token`, every request
    needs it (see `_guard`). Raises StoreError when there is no store there."""
    store = Store.open(store_where, create=False)
    state = _State(store)

    def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = state.env.get_template(template).render(
            store=store.where, checked=state.checked, now=datetime.now(UTC), **context
        )
        return HTMLResponse(html, status_code=status)

    def sandbox_or_404(request: Request) -> SandboxInfo:
        info = store.sandbox(request.path_params["sandbox"])
        if info is None:
            raise HTTPException(404, "no such sandbox in this store")
        return info

    def index(request: Request) -> Response:
        return page(request, "runs.html", runs=_views.runs(store), no_run=_views.NO_RUN)

    def run(request: Request) -> Response:
        name = request.path_params["run"]
        sandboxes = _views.run_sandboxes(store, name)
        if not sandboxes:
            raise HTTPException(404, "no such run in this store")
        return page(request, "run.html", run=name, sandboxes=sandboxes)

    def no_run(request: Request) -> Response:
        return page(request, "run.html", run=_views.NO_RUN, sandboxes=_views.run_sandboxes(store, ""))

    def sandbox(request: Request) -> Response:
        info = sandbox_or_404(request)
        types = [t for t in request.query_params.getlist("type") if t in _views.TYPES]
        after = _int(request.query_params.get("after"), default=-1)
        if after < 0:  # by default the newest page: what a running sandbox is doing now
            after = 0 if types else _views.last_page_after(info)
        timeline = _views.timeline(store, info, types, after)
        return page(
            request,
            "sandbox.html",
            sandbox=info,
            timeline=timeline,
            all_types=_views.TYPES,
            alerts=_views.alerts(store, info.id),
            denials=_views.denials(store, info.id),
            tree=_views.process_tree(store, info.id),
            series=_views.resource_series(store, info),
            live=info.stopped is None and timeline.next_after is None,
            last_seq=info.events,  # the live stream's start: read before everything else shown
        )

    async def live(request: Request) -> Response:
        info = await anyio.to_thread.run_sync(sandbox_or_404, request)
        # EventSource sends Last-Event-ID when it reconnects: go on from there.
        after = _int(request.headers.get("last-event-id") or request.query_params.get("after"), default=0)
        return StreamingResponse(
            _live.stream(store, info.id, after, request.is_disconnected),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    def packet(request: Request) -> Response:
        info = sandbox_or_404(request)
        f = _packet.build(store, info)
        return StreamingResponse(
            _packet.chunks(f),
            media_type="application/zip",
            headers={"content-disposition": f'attachment; filename="corral-{info.id}-evidence.zip"'},
        )

    def verify_page(request: Request) -> Response:
        with state.verifying:  # one check at a time: it reads the whole store
            result = verify(store)
            state.checked = _Checked(result, datetime.now(UTC))
        return page(request, "verify.html", result=result)

    def metrics(request: Request) -> Response:
        return Response(generate_latest(state.metrics), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: Exception) -> Response:
        detail = exc.detail if isinstance(exc, HTTPException) else "not found"
        code = exc.status_code if isinstance(exc, HTTPException) else 404
        if request.url.path.startswith("/static/"):
            return PlainTextResponse(f"{code}: {detail}\n", status_code=code)
        return await anyio.to_thread.run_sync(
            lambda: page(request, "error.html", status=code, code=code, detail=detail)
        )

    async def store_failed(request: Request, exc: Exception) -> Response:
        # The store went away or is locked past its timeout: say so, rather than a bare 500.
        return await anyio.to_thread.run_sync(
            lambda: page(request, "error.html", status=503, code=503, detail=str(exc))
        )

    routes = [
        Route("/", index),
        Route("/runs/", no_run),
        Route("/runs/{run:path}", run),
        Route("/sandboxes/{sandbox}", sandbox),
        Route("/sandboxes/{sandbox}/live", live),
        Route("/sandboxes/{sandbox}/packet.zip", packet),
        Route("/verify", verify_page),
        Route("/metrics", metrics),
        # Only the package's own static directory; StaticFiles refuses paths that leave it.
        Mount("/static", app=StaticFiles(directory=STATIC, follow_symlink=False), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_guard.Guard, token=token)],
        exception_handlers={HTTPException: not_found, StoreError: store_failed},
        lifespan=_closing(store),
    )
    return app


def _closing(store: Store) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            store.close()

    return lifespan


def _int(value: str | None, *, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def serve(listen: str = _guard.DEFAULT_LISTEN, store: str | None = None, token: str | None = None) -> None:
    """Run the dashboard until interrupted (what `corral ui` calls).

    listen: HOST:PORT, default 127.0.0.1:8765. A non-loopback address needs a token.
    store:  the audit store (a SQLite path or a postgresql:// URL); None: CORRAL_STORE, else
            /var/lib/corral/audit.db.
    token:  required of every request (Authorization: Bearer TOKEN, or ?token=TOKEN once, which sets
            a cookie); None: the CORRAL_UI_TOKEN environment variable, else no token (loopback only).
    Raises ListenError for an address it must not or can't listen on, StoreError when there is no
    store."""
    import uvicorn  # only serving needs it

    token = token or os.environ.get(_guard.TOKEN_ENV) or None
    host, port = _guard.check_listen(listen, token)
    app = make_app(store, token=token)
    log.info("corral ui: http://%s:%d/ over %s", host, port, store or "the default store")
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False, server_header=False)

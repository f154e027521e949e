"""The ASGI application: API, webhook, dashboard, metrics, OpenAPI at ``/openapi.json``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import RedirectResponse, Response

from storno import __version__
from storno._app import Storno
from storno._server._api import router, webhook_router
from storno._server._api_common import authenticate
from storno._server._auth import Role, TokenStore
from storno._server._errors import BodyLimit, install_handlers
from storno._server._guards import EncodedSlashes, LoopbackHosts
from storno._server._logging import AccessLog, EventLog
from storno._server._metrics import Metrics
from storno._server._state import DEFAULT_MAX_WAITERS, ServerState, WaitSlots
from storno._server._stats import StatsCache
from storno._stuck import DEFAULT_STUCK_AFTER

__all__ = ["create_app"]

log = logging.getLogger("storno.server")

DESCRIPTION = """\
Start runs of registered sagas, read runs with their full history, send signals, approve,
reject, cancel, retry or resolve dead letters, and receive third-party webhooks as signals.

Authenticate with `Authorization: Bearer TOKEN`. Read-only tokens may read; operator tokens
may also change runs. Errors are `{"error": {"type": ..., "message": ...}}` with a 4xx code
naming the problem.
"""


def create_app(
    app: Storno,
    *,
    tokens: TokenStore,
    worker: bool = False,
    worker_options: dict[str, Any] | None = None,
    stuck_after: float = DEFAULT_STUCK_AFTER,
    public_metrics: bool = False,
    max_body_bytes: int | None = None,
    stats_ttl: float = 5.0,
    event_log: bool = True,
    tracing: Any = None,
    dashboard: bool = True,
    max_waiters: int = DEFAULT_MAX_WAITERS,
) -> FastAPI:
    """The server for a storno application.

    ``tokens`` decides who may do what (:class:`TokenStore`). ``worker`` also executes runs
    in this process. ``tracing`` is a :class:`storno.server.Tracing` (or any listener) to
    add. ``max_waiters`` bounds the requests waiting for a run's end at once (``wait``).
    The application is opened when the server starts and closed when it stops.
    """
    if tokens.empty and not tokens.open:
        from storno._errors import ConfigurationError

        raise ConfigurationError(
            "no API tokens are configured: set STORNO_API_TOKENS (operators) and "
            "STORNO_API_READ_TOKENS (read-only), or pass a tokens file"
        )
    limit = max_body_bytes or app.max_payload_bytes + 64 * 1024
    metrics = Metrics()
    state = ServerState(
        app=app,
        tokens=tokens,
        metrics=metrics,
        stats=StatsCache(app, ttl=stats_ttl, default_stuck_after=stuck_after),
        stuck_after=stuck_after,
        public_metrics=public_metrics,
        max_body_bytes=limit,
        run_worker=worker,
        worker_options=dict(worker_options or {}),
        waiters=WaitSlots(max_waiters),
    )
    # Saga objects as declared: Storno.start() registers the options() copy it is given
    # (run id and all), so find_saga() may later return a copy bound to an old run id.
    for name in app.saga_names:
        state.sagas[name] = app.find_saga(name)
    state.listeners.append(metrics.events)
    if event_log:
        state.listeners.append(EventLog())
    if tracing is not None:
        state.listeners.append(tracing)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for listener in state.listeners:
            app.add_listener(listener)
        await app.open()
        running = None
        if state.run_worker:
            running = app.worker(**state.worker_options)
            await running.start()
            log.info("worker %s started (sagas: %s)", running.id, ", ".join(app.saga_names))
        try:
            yield
        finally:
            if running is not None:
                await running.stop()
            for listener in state.listeners:
                app.remove_listener(listener)
            await app.close()

    api = FastAPI(
        title="storno",
        version=__version__,
        description=DESCRIPTION,
        openapi_url="/openapi.json",
        docs_url=None,  # Swagger UI and ReDoc load scripts from a CDN; the server fetches none
        redoc_url=None,
        lifespan=lifespan,
    )
    api.state.server = state
    api.include_router(router)
    api.include_router(webhook_router)

    @api.get("/metrics", include_in_schema=False)
    async def prometheus(request: Request) -> Response:
        if not state.public_metrics:
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header[:7].lower() == "bearer " else None
            authenticate(request, token, Role.READ)
        snap = await state.stats.get()
        body = state.metrics.render(snap)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    html = None
    if dashboard:
        from storno._server._dashboard import install_dashboard

        html = install_dashboard(api)

        @api.get("/", include_in_schema=False)
        async def root() -> Response:
            return RedirectResponse("/ui/", status_code=307)

    install_handlers(api, html)
    api.add_middleware(BodyLimit, limit=limit)
    api.add_middleware(EncodedSlashes)
    if tokens.open:
        api.add_middleware(LoopbackHosts)
    api.add_middleware(AccessLog)
    return api

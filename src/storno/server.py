"""The public face of storno's operator surfaces (the ``storno[server]`` extra).

``create_app`` builds the ASGI application that ``storno serve`` runs; the listeners feed
metrics, structured logs and OpenTelemetry spans from any process that executes runs (a plain
``storno worker`` too: ``app.add_listener(EventMetrics(...))``); ``trace_headers(ctx)`` gives
step code the ``traceparent`` header of its attempt's span for its outgoing calls.
"""

from __future__ import annotations

from storno._server import (
    DEFAULT_STUCK_AFTER,
    EventLog,
    EventMetrics,
    JsonFormatter,
    Metrics,
    Tracing,
    configure_logging,
    create_app,
    find_stuck,
    trace_headers,
)

__all__ = [
    "DEFAULT_STUCK_AFTER",
    "EventLog",
    "EventMetrics",
    "JsonFormatter",
    "Metrics",
    "Tracing",
    "configure_logging",
    "create_app",
    "find_stuck",
    "trace_headers",
]

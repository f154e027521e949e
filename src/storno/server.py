"""The public face of storno's operator surfaces (the ``storno[server]`` extra).

``create_app`` builds the ASGI application that ``storno serve`` runs; the listeners feed
metrics, structured logs and OpenTelemetry spans from any process that executes runs (a plain
``storno worker`` too: ``app.add_listener(EventMetrics(...))``); ``trace_headers(ctx)`` gives
step code the ``traceparent`` header of its attempt's span for its outgoing calls;
``find_stuck`` lists the runs that made no progress for longer than their threshold (what
``storno stuck`` prints, which needs no extra).
"""

from __future__ import annotations

from storno._server._factory import create_app
from storno._server._logging import EventLog, JsonFormatter, configure_logging
from storno._server._metrics import EventMetrics, Metrics
from storno._server._tracing import Tracing, trace_headers
from storno._stuck import DEFAULT_STUCK_AFTER, find_stuck

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

"""storno's operator surfaces: HTTP API, webhook, dashboard, metrics, tracing, logs.

Needs the ``storno[server]`` extra (tracing: ``storno[otel]``). ``storno serve`` runs it;
:func:`create_app` builds the ASGI application for another server or a test. Names are
imported on first use, so ``storno stuck`` works without the extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storno._server._auth import Principal, Role, TokenStore, is_loopback
    from storno._server._factory import create_app
    from storno._server._logging import EventLog, JsonFormatter, configure_logging
    from storno._server._metrics import EventMetrics, Metrics
    from storno._server._stats import DEFAULT_STUCK_AFTER, find_stuck, stuck_reason
    from storno._server._tracing import Tracing, trace_headers

_WHERE = {
    "Principal": "_auth",
    "Role": "_auth",
    "TokenStore": "_auth",
    "is_loopback": "_auth",
    "create_app": "_factory",
    "EventLog": "_logging",
    "JsonFormatter": "_logging",
    "configure_logging": "_logging",
    "EventMetrics": "_metrics",
    "Metrics": "_metrics",
    "DEFAULT_STUCK_AFTER": "_stats",
    "find_stuck": "_stats",
    "stuck_reason": "_stats",
    "Tracing": "_tracing",
    "trace_headers": "_tracing",
}

__all__ = [
    "DEFAULT_STUCK_AFTER",
    "EventLog",
    "EventMetrics",
    "JsonFormatter",
    "Metrics",
    "Principal",
    "Role",
    "TokenStore",
    "Tracing",
    "configure_logging",
    "create_app",
    "find_stuck",
    "is_loopback",
    "stuck_reason",
    "trace_headers",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'storno._server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"storno._server.{module}"), name)

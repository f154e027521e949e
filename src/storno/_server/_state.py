"""What every route needs: the application, the tokens, the stats cache, the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from storno._app import Storno
from storno._server._auth import Sessions, TokenStore
from storno._server._metrics import Metrics
from storno._server._stats import StatsCache
from storno._stuck import DEFAULT_STUCK_AFTER

__all__ = ["ServerState"]


@dataclass(slots=True)
class ServerState:
    app: Storno
    tokens: TokenStore
    metrics: Metrics
    stats: StatsCache
    stuck_after: float = DEFAULT_STUCK_AFTER
    public_metrics: bool = False
    max_body_bytes: int = 0
    run_worker: bool = False
    worker_options: dict[str, Any] = field(default_factory=dict)
    listeners: list[Any] = field(default_factory=list)
    sagas: dict[str, Any] = field(default_factory=dict)  # as declared, before any start
    sessions: Sessions = field(default_factory=Sessions)  # dashboard sign-ins

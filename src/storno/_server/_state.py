"""What every route needs: the application, the tokens, the stats cache, the metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from storno._app import Storno
from storno._server._auth import Sessions, TokenStore
from storno._server._errors import ApiError
from storno._server._metrics import Metrics
from storno._server._stats import StatsCache
from storno._stuck import DEFAULT_STUCK_AFTER

__all__ = ["ServerState", "WaitSlots"]

DEFAULT_MAX_WAITERS = 1000


@dataclass(slots=True)
class WaitSlots:
    """Requests waiting for a run's end, at most ``limit`` at a time: each holds a connection
    and a little memory for up to a minute, so a flood of them is refused, not queued."""

    limit: int = DEFAULT_MAX_WAITERS
    taken: int = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.taken >= self.limit:
            raise ApiError(
                429,
                "too_many_waiters",
                f"{self.taken} requests already wait for runs to end (the limit is "
                f"{self.limit}); nothing was done: ask again without wait, or retry later",
                headers={"Retry-After": "1"},
            )
        self.taken += 1
        try:
            yield
        finally:
            self.taken -= 1


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
    waiters: WaitSlots = field(default_factory=WaitSlots)  # requests waiting for a run's end

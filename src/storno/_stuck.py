"""Stuck runs: not ended, and no progress for longer than their saga's threshold.

Used by ``storno stuck`` (without the server extra), the HTTP API, the dashboard and the
server's counts; not a server feature, so it lives outside :mod:`storno._server`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from storno._app import Storno
from storno._errors import ConfigurationError
from storno._model import ENDED_STATUSES, RunStatus
from storno._views import RunInfo

__all__ = [
    "DEFAULT_STUCK_AFTER",
    "OPEN_STATUSES",
    "StuckRun",
    "find_stuck",
    "run_pages",
    "stuck_reason",
    "threshold_for",
]

DEFAULT_STUCK_AFTER = 3600.0
"""A run that has not ended and made no progress for an hour is stuck, unless its saga says
otherwise with ``@storno.saga(stuck_after=...)``."""

PAGE = 500

OPEN_STATUSES = tuple(s for s in RunStatus if s not in ENDED_STATUSES)
"""The states a stuck run can be in (every state but the ended ones), in lifecycle order."""


def threshold_for(app: Storno, saga: str, default: float = DEFAULT_STUCK_AFTER) -> float:
    """The saga's ``stuck_after``, else ``default`` (also for sagas this app does not know)."""
    try:
        found = app.find_saga(saga)
    except ConfigurationError:
        return default
    value = getattr(found, "stuck_after", None)
    return float(value) if value else default


def stuck_reason(
    run: RunInfo, now: float, threshold: float, *, fixed: float | None = None
) -> str | None:
    """Why a run counts as stuck, or ``None``.

    A run is stuck when it has not ended and nothing happened to it for longer than the
    threshold (``fixed`` overrides the saga's). A waiting or scheduled run whose wake time is
    still ahead is not stuck: it is waiting on purpose. Time is counted from its last change,
    or from its wake time if that came later (a run nobody picked up when it was due).
    """
    if run.status in ENDED_STATUSES:
        return None
    if run.wake_at is not None and run.wake_at > now:
        return None
    since = max(run.updated_at, run.wake_at or 0.0)
    limit = fixed if fixed is not None else threshold
    idle = now - since
    if idle <= limit:
        return None
    what = {
        RunStatus.PENDING: "pending, not picked up by any worker",
        RunStatus.RUNNING: "running, with no step finished or started",
        RunStatus.WAITING: "waiting, with no wake time, for a signal or child",
        RunStatus.COMPENSATING: "compensating, with no compensation finished or started",
    }.get(run.status, run.status.value)
    if run.status is RunStatus.WAITING and run.wake_at is not None:
        what = "waiting past its wake time, not woken"
    return f"{what} for {_duration(idle)} (threshold {_duration(limit)})"


def _duration(value: float) -> str:
    value = max(value, 0.0)
    if value < 120:
        return f"{value:.0f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    if value < 172800:
        return f"{value / 3600:.1f}h"
    return f"{value / 86400:.1f}d"


async def run_pages(
    app: Storno, status: RunStatus | None, saga: str | None
) -> AsyncIterator[list[RunInfo]]:
    """Runs newest first, a page of the store's listing at a time."""
    offset = 0
    while True:
        page = await app.list_runs(status=status, saga=saga, limit=PAGE, offset=offset)
        if page:
            yield page
        if len(page) < PAGE:
            return
        offset += PAGE


@dataclass(frozen=True, slots=True)
class StuckRun:
    """A stuck run, why it counts as stuck, and the threshold it passed."""

    run: RunInfo
    reason: str
    threshold: float

    def to_json(self) -> dict[str, Any]:
        out = self.run.to_json(with_history=False)
        del out["steps"]
        out["stuck_reason"] = self.reason
        out["stuck_threshold_seconds"] = self.threshold
        return out


async def find_stuck(
    app: Storno,
    *,
    now: float | None = None,
    older_than: float | None = None,
    default: float = DEFAULT_STUCK_AFTER,
    limit: int | None = None,
) -> list[StuckRun]:
    """Runs that have not ended and made no progress for longer than their threshold,
    least recently changed first. ``older_than`` replaces every saga's threshold."""
    now = time.time() if now is None else now
    found: list[StuckRun] = []
    for status in OPEN_STATUSES:
        async for page in run_pages(app, status, None):
            for run in page:
                threshold = threshold_for(app, run.saga, default)
                reason = stuck_reason(run, now, threshold, fixed=older_than)
                if reason is not None:
                    found.append(StuckRun(run, reason, older_than or threshold))
    found.sort(key=lambda s: s.run.updated_at)
    return found if limit is None else found[:limit]

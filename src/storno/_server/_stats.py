"""What the store holds, counted: runs by saga and status, dead letters, stuck runs.

The store lists runs page by page (newest first); these helpers walk those pages. Counting
reads every run's row, so callers cache the result for a few seconds (see
:class:`StatsCache`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from storno._app import ENDED, Storno
from storno._errors import ConfigurationError
from storno._model import RunStatus
from storno._views import RunInfo

__all__ = [
    "DEFAULT_STUCK_AFTER",
    "Snapshot",
    "StatsCache",
    "filtered_runs",
    "find_stuck",
    "stuck_reason",
    "threshold_for",
]

DEFAULT_STUCK_AFTER = 3600.0
"""A run that has not ended and made no progress for an hour is stuck, unless its saga says
otherwise with ``@storno.saga(stuck_after=...)``."""

PAGE = 500

OPEN_STATUSES = (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.WAITING, RunStatus.COMPENSATING)


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
    if run.status in ENDED:
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


async def _pages(
    app: Storno, status: RunStatus | None, saga: str | None
) -> AsyncIterator[list[RunInfo]]:
    offset = 0
    while True:
        page = await app.list_runs(status=status, saga=saga, limit=PAGE, offset=offset)
        if page:
            yield page
        if len(page) < PAGE:
            return
        offset += PAGE


async def filtered_runs(
    app: Storno,
    *,
    status: RunStatus | None = None,
    saga: str | None = None,
    created_after: float | None = None,
    created_before: float | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[RunInfo], bool]:
    """Runs newest first, filtered by status, saga and creation time; and whether more follow.

    Without a time filter this is one store query; with one, pages are walked (and the walk
    stops at the first run created before ``created_after``).
    """
    if created_after is None and created_before is None:
        runs = await app.list_runs(status=status, saga=saga, limit=limit + 1, offset=offset)
        return runs[:limit], len(runs) > limit
    out: list[RunInfo] = []
    skipped = 0
    async for page in _pages(app, status, saga):
        for run in page:
            if created_after is not None and run.created_at < created_after:
                return out, False
            if created_before is not None and run.created_at >= created_before:
                continue
            if skipped < offset:
                skipped += 1
                continue
            if len(out) == limit:
                return out, True
            out.append(run)
    return out, False


@dataclass(frozen=True, slots=True)
class StuckRun:
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
        async for page in _pages(app, status, None):
            for run in page:
                threshold = threshold_for(app, run.saga, default)
                reason = stuck_reason(run, now, threshold, fixed=older_than)
                if reason is not None:
                    found.append(StuckRun(run, reason, older_than or threshold))
    found.sort(key=lambda s: s.run.updated_at)
    return found if limit is None else found[:limit]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Counts taken from the store at one moment."""

    taken_at: float
    by_saga_status: dict[tuple[str, str], int]
    stuck: list[StuckRun]

    @property
    def by_status(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for (_, status), count in self.by_saga_status.items():
            totals[status] += count
        return {s.value: totals.get(s.value, 0) for s in RunStatus}

    @property
    def total(self) -> int:
        return sum(self.by_saga_status.values())

    @property
    def dead_letters(self) -> int:
        return self.by_status[RunStatus.COMPENSATION_FAILED.value]

    @property
    def stuck_ids(self) -> set[str]:
        return {s.run.run_id for s in self.stuck}

    def stuck_by_saga(self) -> dict[str, int]:
        return dict(Counter(s.run.saga for s in self.stuck))


async def take_snapshot(app: Storno, *, default: float = DEFAULT_STUCK_AFTER) -> Snapshot:
    now = time.time()
    counts: Counter[tuple[str, str]] = Counter()
    stuck: list[StuckRun] = []
    async for page in _pages(app, None, None):
        for run in page:
            counts[(run.saga, run.status.value)] += 1
            reason = stuck_reason(run, now, threshold_for(app, run.saga, default))
            if reason is not None:
                threshold = threshold_for(app, run.saga, default)
                stuck.append(StuckRun(run, reason, threshold))
    stuck.sort(key=lambda s: s.run.updated_at)
    return Snapshot(now, dict(counts), stuck)


@dataclass(slots=True)
class StatsCache:
    """A snapshot reused for ``ttl`` seconds, so that scrapes and page views share one walk."""

    app: Storno
    ttl: float = 5.0
    default_stuck_after: float = DEFAULT_STUCK_AFTER
    _snapshot: Snapshot | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self, *, fresh: bool = False) -> Snapshot:
        async with self._lock:
            snap = self._snapshot
            if fresh or snap is None or time.time() - snap.taken_at > self.ttl:
                snap = await take_snapshot(self.app, default=self.default_stuck_after)
                self._snapshot = snap
            return snap

    def invalidate(self) -> None:
        self._snapshot = None

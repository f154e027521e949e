"""What the store holds, counted: runs by saga and status, dead letters, stuck runs (found by
:mod:`storno._stuck`), and how the outbox stands.

The store lists runs page by page (newest first); these helpers walk those pages. Counting
reads every run's row, so callers cache the result for a few seconds (see
:class:`StatsCache`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from storno._app import Storno
from storno._model import RunStatus
from storno._store._outbox import OutboxStats
from storno._stuck import DEFAULT_STUCK_AFTER, StuckRun, run_pages, stuck_reason, threshold_for
from storno._views import RunInfo

__all__ = ["Snapshot", "StatsCache", "filtered_runs", "take_snapshot"]


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
    async for page in run_pages(app, status, saga):
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
class Snapshot:
    """Counts taken from the store at one moment."""

    taken_at: float
    by_saga_status: dict[tuple[str, str], int]
    stuck: list[StuckRun]
    outbox: OutboxStats = field(default_factory=lambda: OutboxStats(0, 0, None))

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
    async for page in run_pages(app, None, None):
        for run in page:
            counts[(run.saga, run.status.value)] += 1
            reason = stuck_reason(run, now, threshold_for(app, run.saga, default))
            if reason is not None:
                threshold = threshold_for(app, run.saga, default)
                stuck.append(StuckRun(run, reason, threshold))
    stuck.sort(key=lambda s: s.run.updated_at)
    return Snapshot(now, dict(counts), stuck, await app.store.outbox.stats())


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

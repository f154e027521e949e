"""A clock that tests move by hand: retry backoffs, deadlines and timers without waiting."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from datetime import UTC, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storno._app import Storno

__all__ = ["VirtualClock", "advance"]


def _timestamp(when: dt.datetime | float) -> float:
    if isinstance(when, dt.datetime):
        if when.tzinfo is None:
            raise ValueError(
                f"a naive datetime is ambiguous: give {when.isoformat()} a timezone "
                f"(e.g. tzinfo=datetime.UTC)"
            )
        return float(when.timestamp())
    return float(when)


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, UTC).isoformat()


def _seconds(delta: float | timedelta) -> float:
    value = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
    if value < 0:
        raise ValueError(f"time only moves forward; cannot advance by {delta!r}")
    return value


class VirtualClock:
    """The engine's clock, moved by the test instead of by the wall.

    Pass it as ``storno.Storno(url, clock=VirtualClock(...))``. ``now()`` starts at ``start``
    (an aware ``datetime`` or epoch seconds; default: the real time when the clock is made) and
    only moves when the engine sleeps or the test calls :meth:`advance`.

    ``sleep(s)`` does not wait: it moves the clock to ``start_of_sleep + s`` (never backwards)
    and yields to the event loop once, so a retry backoff of minutes takes no real time. Every
    requested sleep is kept in :attr:`sleeps`, so a test can check the backoff schedule.

    Leases are timed by this clock too: advancing past ``lease_seconds`` makes every lease
    held by a worker that has not renewed it since look expired, as it would after that long.
    """

    def __init__(self, start: dt.datetime | float | None = None) -> None:
        self._now = time.time() if start is None else _timestamp(start)
        self._lock = threading.Lock()
        self.sleeps: list[float] = []
        """The duration of every ``sleep()`` the engine asked for, in order."""

    def __repr__(self) -> str:
        return f"<VirtualClock {self.datetime().isoformat()}>"

    def now(self) -> float:
        """Seconds since the epoch, as the engine sees them."""
        with self._lock:
            return self._now

    def datetime(self) -> dt.datetime:
        """:meth:`now` as an aware UTC ``datetime`` (what ``ctx.now()`` records)."""
        return dt.datetime.fromtimestamp(self.now(), UTC)

    async def sleep(self, seconds: float) -> None:
        """Let other tasks run once, then skip to ``seconds`` after the sleep began.

        Time moves after the yield, not before it, so the engine's next write (which renews
        the run's lease) is queued before any worker can see the skipped time.
        """
        with self._lock:
            self.sleeps.append(seconds)
            wake_at = self._now + max(seconds, 0.0)
        await asyncio.sleep(0)
        with self._lock:
            self._now = max(self._now, wake_at)

    def advance(self, delta: float | timedelta) -> float:
        """Move time forward by ``delta`` (seconds or a ``timedelta``); return the new now.

        Workers are not told: use :func:`storno.testing.advance` with the application to
        have due runs claimed at once.
        """
        step = _seconds(delta)
        with self._lock:
            self._now += step
            return self._now

    def set(self, when: dt.datetime | float) -> float:
        """Move time forward to ``when`` (an aware ``datetime`` or epoch seconds)."""
        target = _timestamp(when)
        with self._lock:
            if target < self._now:
                raise ValueError(
                    f"time only moves forward; {_iso(target)} is before {_iso(self._now)}"
                )
            self._now = target
            return self._now


async def advance(app: Storno, delta: float | timedelta) -> float:
    """Advance the application's :class:`VirtualClock` by ``delta`` and wake its workers.

    The leases of runs the app's workers are executing are renewed first, as their heartbeats
    would have done during that time, so a skip of days does not make a live run look
    abandoned; a run whose worker died (a :class:`~storno.testing.SimulatedCrash`) keeps its
    old lease, which then expires. Every worker then claims at once instead of at its next
    poll, so runs whose timer or lease is now due are picked up without waiting. Returns the
    new time.
    """
    clock = app.clock
    if not isinstance(clock, VirtualClock):
        raise TypeError(
            f"advance() needs an application made with clock=storno.testing.VirtualClock(); "
            f"this one uses {type(clock).__name__}"
        )
    target = clock.now() + _seconds(delta)
    workers = app.workers
    for worker in workers:
        if worker.active_runs:
            await app.store.renew(
                worker.id, worker.active_runs, now=target, lease_seconds=app.lease_seconds
            )
    now = clock.set(max(target, clock.now()))
    for worker in workers:
        worker.wake()
    await asyncio.sleep(0)
    return now

"""The relay: sends committed outbox rows through a broker, at least once, in order per key.

Any number of relays share one outbox. Each claims a batch under a lease token, publishes it
in waves (the n-th row of every key in wave n, so no two rows of a key are in flight at
once), marks the confirmed rows sent, and hands back the rest. A row the broker refuses is
retried with backoff and, after ``max_attempts``, becomes dead: it blocks its own key (later
events of that key wait, so order holds) and no other. A broker that cannot be reached is an
outage, not the rows' fault: the rows are handed back with no attempt counted and the relay
backs off. New rows wake the relay (in process, or by ``NOTIFY`` on PostgreSQL); polling
covers a lost notification and SQLite's other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from storno import _faults
from storno._clock import Clock, SystemClock
from storno._errors import ConfigurationError, StoreError
from storno._model import RetryPolicy
from storno._store import Store
from storno._store._outbox import OutboxRow
from storno.events._protocol import Broker

__all__ = ["Relay", "RelayCounts", "is_outage"]

log = logging.getLogger("storno.relay")

DEFAULT_BACKOFF = RetryPolicy(initial_interval=1.0, maximum_interval=60.0, maximum_attempts=10)


def is_outage(error: BaseException) -> bool:
    """Whether a publish error says the broker was unreachable, rather than that it refused
    the message: timeouts and connection errors, or an error an adapter marks ``outage``."""
    if getattr(error, "outage", False):
        return True
    if isinstance(error, TimeoutError | ConnectionError | OSError):
        return True
    name = type(error).__name__.lower()
    return any(word in name for word in ("timeout", "connection", "noresponders", "unreachable"))


@dataclass(slots=True)
class RelayCounts:
    """What a relay has done since it started (for metrics and logs)."""

    sent: int = 0
    retried: int = 0  # sends the broker refused, to be tried again
    dead: int = 0  # rows that became dead letters
    outages: int = 0  # batches handed back because the broker could not be reached
    lost_claims: int = 0  # confirmed rows whose claim had expired (another relay may resend)


class Relay:
    """Moves outbox rows to a broker; ``async with Relay(store, broker):`` or start/stop."""

    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        relay_id: str | None = None,
        batch_size: int = 500,
        lease_seconds: float = 30.0,
        poll_interval: float = 1.0,
        backoff: RetryPolicy = DEFAULT_BACKOFF,
        retention: float = 86_400.0,
        clock: Clock | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, got {batch_size}")
        if poll_interval <= 0 or lease_seconds <= 0 or retention < 0:
            raise ConfigurationError(
                "poll_interval and lease_seconds must be positive and retention not negative"
            )
        if backoff.maximum_attempts is None:
            raise ConfigurationError(
                "the relay's backoff needs maximum_attempts: a row that never goes through "
                "must end as a dead letter"
            )
        self.store = store
        self.broker = broker
        self.id = relay_id or f"relay:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.backoff = backoff
        self.retention = retention
        self.clock = clock or SystemClock()
        self.counts = RelayCounts()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._outage_failures = 0
        self._pruned_at = 0.0

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Connect the broker and begin relaying in the background."""
        if self._task is not None:
            return
        await self.store.open()
        await self.broker.connect()
        self._stopping = False
        self.store.outbox.subscribe(self.wake)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"{self.id}")

    async def stop(self) -> None:
        """Finish the batch in hand, then stop (rows claimed and unsent are handed back)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(task, timeout=self.lease_seconds)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """New rows may be there: claim now rather than at the next poll."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                count = await self.relay_once()
            except StoreError as exc:
                log.warning("relay %s: the store failed, retrying: %s", self.id, exc)
                count = 0
                await self._pause(self.poll_interval)
            except Exception:
                log.exception("relay %s: unexpected error; carrying on", self.id)
                count = 0
                await self._pause(self.poll_interval)
            if count == 0 and not self._stopping:
                await self._idle()

    async def _idle(self) -> None:
        if self._outage_failures:  # try the broker again soon: an outage is not the rows' fault
            await self._pause(min(0.5 * 2 ** (self._outage_failures - 1), 5.0))
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        await self._maybe_prune()

    async def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), deadline - time.monotonic())
            if not self._outage_failures:
                return

    async def _maybe_prune(self) -> None:
        now = self.clock.now()
        if now - self._pruned_at < 60.0:
            return
        self._pruned_at = now
        pruned = await self.store.outbox.prune(before=now - self.retention)
        if pruned:
            log.debug("relay %s: pruned %d sent rows", self.id, pruned)

    async def relay_once(self) -> int:
        """Claim one batch and send it; the number of rows the broker confirmed (0: nothing
        was due, or the broker could not be reached)."""
        token = uuid.uuid4().hex
        rows = await self.store.outbox.claim(
            self.id,
            token,
            limit=self.batch_size,
            now=self.clock.now(),
            lease_seconds=self.lease_seconds,
        )
        if not rows:
            return 0
        _faults.point("relay.claimed", relay=self.id, rows=len(rows))
        return await self._send(token, rows)

    async def _send(self, token: str, rows: Sequence[OutboxRow]) -> int:
        outbox = self.store.outbox
        by_key: dict[object, list[OutboxRow]] = {}
        for row in rows:  # rows come oldest first; a row with no key is a key of its own
            key = row.message.key if row.message.key is not None else row.id
            by_key.setdefault(key, []).append(row)
        queues = list(by_key.values())
        confirmed: list[int] = []
        untried: list[int] = []
        wave = 0
        while queues:
            batch = [q[wave] for q in queues]
            results = await self.broker.publish([r.message for r in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"broker {self.broker.name} answered {len(results)} results for "
                    f"{len(batch)} messages"
                )
            outage = [r for r, e in zip(batch, results, strict=True) if e and is_outage(e)]
            if outage and len(outage) == len(batch):
                self._outage_failures += 1
                self.counts.outages += 1
                first = next(e for e in results if e)
                log.warning(
                    "relay %s: broker %s unreachable, %d rows handed back: %s",
                    self.id,
                    self.broker.name,
                    len(rows) - len(confirmed),
                    first,
                )
                untried += [r.id for q in queues for r in q[wave:]]
                break
            self._outage_failures = 0
            _faults.point("relay.confirmed", relay=self.id, rows=len(batch))
            survivors = []
            for row, error, queue in zip(batch, results, queues, strict=True):
                if error is None:
                    confirmed.append(row.id)
                    if len(queue) > wave + 1:
                        survivors.append(queue)
                    continue
                if is_outage(error):  # unreachable for this one only: try it again soon
                    untried += [r.id for r in queue[wave:]]
                    continue
                await self._refused(token, row, error)
                untried += [r.id for r in queue[wave + 1 :]]
            queues = survivors
            wave += 1
        if untried:
            await outbox.release(token, untried)
        if confirmed:
            marked = await outbox.sent(token, confirmed, now=self.clock.now())
            self.counts.sent += len(confirmed)
            if marked < len(confirmed):
                self.counts.lost_claims += len(confirmed) - marked
                log.warning(
                    "relay %s: %d confirmed rows had lost their claim; they may be sent again "
                    "(consumers drop the repeat by its event id)",
                    self.id,
                    len(confirmed) - marked,
                )
        return len(confirmed)

    async def _refused(self, token: str, row: OutboxRow, error: BaseException) -> None:
        attempts = row.attempts + 1
        retry_at = self.clock.now() + self.backoff.delay(attempts)
        maximum = self.backoff.maximum_attempts or 1
        text = f"{type(error).__name__}: {error}"
        status = await self.store.outbox.failed(
            token, row.id, text, retry_at=retry_at, max_attempts=maximum
        )
        if status == "dead":
            self.counts.dead += 1
            log.error(
                "outbox event %s (%s, key %r) is a dead letter after %d attempts, blocking "
                "only its key: %s",
                row.message.event_id,
                row.message.topic,
                row.message.key,
                attempts,
                text,
            )
        else:
            self.counts.retried += 1
            log.warning(
                "outbox event %s (%s) refused by %s (attempt %d of %d): %s",
                row.message.event_id,
                row.message.topic,
                self.broker.name,
                attempts,
                maximum,
                text,
            )

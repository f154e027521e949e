"""The journal of one execution: the run's history as written so far, and its commits.

Events are appended in memory and made durable together with the run's next write, under the
worker's lease (a write under a lost lease is refused: :class:`~storno.LeaseLostError`). A step's
start is committed before its call (rule 1); its result rides on the next commit, so a step
costs one. A run started in this process is inserted with its first write (the *birth*), and
the switch to ``compensating`` is deferred to the first compensation's commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from typing import TYPE_CHECKING, Any, Protocol

from storno._clock import Clock
from storno._errors import LeaseLostError, StoreError
from storno._model import Event, EventType, Lease, RetryPolicy, RunRecord
from storno._store import NewRun, RunUpdate, Store

if TYPE_CHECKING:
    from storno._inbox import Inbox

__all__ = ["Birth", "Journal", "JournalHost"]

log = logging.getLogger("storno.engine")
_TOUCH_EVERY = 1.0  # seconds between updates of a running run's row (updated_at, lease)
_COMMIT_RETRY = RetryPolicy(initial_interval=0.05, maximum_interval=2.0, maximum_attempts=6)


class JournalHost(Protocol):
    """What the journal needs from the application: where to write, and whom to tell."""

    store: Store
    clock: Clock
    lease_seconds: float

    def committed(self, record: RunRecord, events: list[Event]) -> None:
        """Events of a run were made durable by this process (for listeners: metrics, logs)."""


class Birth:
    """A run started here that its first write creates, saving a commit; ``recorded`` is
    settled once it is durable (or failed to be)."""

    def __init__(self, run: NewRun) -> None:
        self.run = run
        self.recorded: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(self, error: BaseException | None = None) -> None:
        if not self.recorded.done():
            if error is None:
                self.recorded.set_result(None)
            else:
                self.recorded.set_exception(error)

    def abandon(self) -> None:
        """The execution stopped; a run never written was never created."""
        self.settle(StoreError(f"run {self.run.run_id} stopped before it was recorded"))


class Journal:
    """Appends a run's events and commits them under its lease."""

    def __init__(
        self,
        host: JournalHost,
        record: RunRecord,
        lease: Lease,
        history: list[Event],
        inbox: Inbox,
        birth: Birth | None = None,
    ) -> None:
        self._host = host
        self._record = record
        self._lease = lease
        self._inbox = inbox
        self._events: list[Event] = list(history)
        self._pending: list[Event] = []
        self._next_seq = history[-1].seq + 1 if history else 0
        self._lock = asyncio.Lock()  # parallel branches commit one after another
        self._state: dict[str, Any] = dict(record.state or {})
        self._state_dirty = False
        self._deferred: RunUpdate | None = None
        self._touched_at = host.clock.now()  # the claim just wrote the run's row
        self._birth = birth
        self._create = birth.run if birth else None  # the run to insert with the first write
        self.lease_lost = False
        self.released = False  # the run's lease was given up: it ended, parked or suspended
        # The store keeps the last result and error written.
        self.result, self.error = record.result, record.error

    @property
    def events(self) -> list[Event]:
        """The whole history: what was recorded, then what this execution appended."""
        return self._events

    @property
    def unborn(self) -> bool:
        """The run started here has not been written yet."""
        return self._create is not None

    def append(
        self,
        type: EventType,
        position: int | None = None,
        data: dict[str, Any] | None = None,
        payload: str | None = None,
    ) -> None:
        event = Event(self._next_seq, type, self._host.clock.now(), position, data or {}, payload)
        self._next_seq += 1
        self._pending.append(event)
        self._events.append(event)

    def publish(self, name: str, value: Any) -> None:
        """A value for queries, written with the next commit."""
        self._state[name] = value
        self._state_dirty = True

    def defer(self, update: RunUpdate) -> None:
        """An update of the run's row that goes with the next commit, not one of its own."""
        self._deferred = update

    async def commit(self, update: RunUpdate | None = None) -> None:
        """Make the buffered events (and the update) durable, renewing the lease."""
        async with self._lock:
            deferred = self._deferred
            if deferred is not None:
                if update is None:
                    update = deferred
                elif update.error is None:
                    update = dataclasses.replace(update, error=deferred.error)
            failures = 0
            while True:
                events, self._pending = self._pending, []
                state = json.dumps(self._state) if self._state_dirty else None
                self._state_dirty = False
                now = self._host.clock.now()
                # Appending alone leaves the run's row untouched; the row's last change and
                # lease are refreshed a few times a second at most (the heartbeat renews too).
                touch = now - self._touched_at >= min(_TOUCH_EVERY, self._host.lease_seconds / 4)
                try:
                    latest = await self._host.store.write(
                        self._lease,
                        events,
                        update,
                        now=now,
                        lease_seconds=self._host.lease_seconds,
                        state=state,
                        touch=touch,
                        create=self._create,
                    )
                except StoreError as exc:
                    self._pending[:0] = events
                    self._state_dirty = self._state_dirty or state is not None
                    if isinstance(exc, LeaseLostError):
                        self.lease_lost = True
                        self._born(exc)
                        raise
                    failures += 1
                    if not _COMMIT_RETRY.allows_another(failures):
                        self._born(exc)
                        raise
                    log.warning("run %s: write failed, retrying: %s", self._record.run_id, exc)
                    await asyncio.sleep(_COMMIT_RETRY.delay(failures))
                    continue
                if touch or update is not None or state is not None:
                    self._touched_at = now
                if self._deferred is deferred:  # not one deferred while this write ran
                    self._deferred = None
                self._born(None)
                self._inbox.note(latest)
                if update is not None:
                    self.result = update.result or self.result
                    self.error = update.error or self.error
                self.released = update is not None and update.release
                if events:
                    self._host.committed(self._record, events)
                return

    def _born(self, error: BaseException | None) -> None:
        if self._birth is not None:
            self._create = None
            self._birth.settle(error)
            self._birth = None

    async def force_birth(self) -> None:
        """Write the run now if its body has not yet: its start is waiting for that."""
        if self._create is not None:
            with contextlib.suppress(StoreError):
                await self.commit()

    def abandon(self) -> None:
        """The execution stopped: a start still waiting for the first write is told so."""
        if self._birth is not None:
            self._birth.abandon()

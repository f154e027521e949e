"""The transactional outbox as the store keeps it: rows, their claims, and the SQL both
backends share.

An event becomes a row in the same transaction as what caused it: a run's commit (its
history holds an ``event_emitted`` event) or a user's own transaction
(:func:`storno.outbox.enqueue`). Relays claim rows under a lease token, a claim never takes
a row while an older row of the same key is unsent (leased, backing off, or dead), and a row
counts as sent only when the relay that holds its token says the broker confirmed it.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from storno._model import Event, EventType
from storno._store._rows import Row
from storno.events._protocol import EventMessage

__all__ = [
    "COLUMNS",
    "Outbox",
    "OutboxEntry",
    "OutboxRow",
    "OutboxStats",
    "Statements",
    "emitted_entries",
    "row_to_entry",
]

COLUMNS = (
    "event_id",
    "topic",
    "key",
    "payload",
    "headers",
    "correlation_id",
    "causation_id",
    "source",
    "traceparent",
    "run_id",
    "created_at",
    "available_at",
)
"""The columns an insert fills, in the order of :meth:`OutboxEntry.values`."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """An event to put into the outbox."""

    event_id: str
    topic: str
    payload: str  # JSON text
    key: str | None
    headers: dict[str, str]
    correlation_id: str | None
    causation_id: str | None
    source: str | None
    traceparent: str | None
    run_id: str | None
    created_at: float

    def values(self) -> tuple[Any, ...]:
        return (
            self.event_id,
            self.topic,
            self.key,
            self.payload,
            json.dumps(self.headers),
            self.correlation_id,
            self.causation_id,
            self.source,
            self.traceparent,
            self.run_id,
            self.created_at,
            self.created_at,
        )


def emitted_entries(run_id: str, events: Sequence[Event]) -> list[OutboxEntry]:
    """The outbox rows a run's commit carries: one per ``event_emitted`` event."""
    out = []
    for event in events:
        if event.type is not EventType.EVENT_EMITTED:
            continue
        d = event.data
        out.append(
            OutboxEntry(
                event_id=d["event_id"],
                topic=d["topic"],
                payload=event.payload or "null",
                key=d.get("key"),
                headers=d.get("headers") or {},
                correlation_id=d.get("correlation_id"),
                causation_id=d.get("causation_id"),
                source=f"run {run_id}",
                traceparent=d.get("traceparent"),
                run_id=run_id,
                created_at=event.at,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A row as a relay or an operator sees it."""

    id: int
    message: EventMessage
    status: str  # pending, sent, dead, discarded
    attempts: int
    created_at: float
    available_at: float
    sent_at: float | None
    last_error: str | None
    run_id: str | None

    def to_json(self) -> dict[str, Any]:
        m = self.message
        return {
            "id": self.id,
            "event_id": m.event_id,
            "topic": m.topic,
            "key": m.key,
            "status": self.status,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "available_at": self.available_at,
            "sent_at": self.sent_at,
            "last_error": self.last_error,
            "run_id": self.run_id,
            "correlation_id": m.correlation_id,
            "causation_id": m.causation_id,
            "source": m.source,
        }


def row_to_entry(row: Row) -> OutboxRow:
    """The :class:`OutboxRow` a ``storno_outbox`` row holds."""
    return OutboxRow(
        id=int(row["id"]),
        message=EventMessage(
            event_id=row["event_id"],
            topic=row["topic"],
            payload=row["payload"],
            key=row["key"],
            correlation_id=row["correlation_id"],
            causation_id=row["causation_id"],
            source=row["source"],
            traceparent=row["traceparent"],
            emitted_at=row["created_at"],
            headers=json.loads(row["headers"]),
        ),
        status=row["status"],
        attempts=int(row["attempts"]),
        created_at=row["created_at"],
        available_at=row["available_at"],
        sent_at=row["sent_at"],
        last_error=row["last_error"],
        run_id=row["run_id"],
    )


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """How the outbox stands: what waits, since when, and what is dead."""

    pending: int
    dead: int
    oldest_pending_at: float | None  # created_at of the oldest unsent row

    def lag(self, now: float) -> float:
        """Seconds the oldest unsent event has waited (0 with none)."""
        return max(now - self.oldest_pending_at, 0.0) if self.oldest_pending_at else 0.0


class Statements:
    """The outbox's SQL for one table name and placeholder style (``?`` or ``%s``)."""

    def __init__(self, table: str, mark: str) -> None:
        self.table = t = table
        postgres = mark == "%s"

        def least(a: str, b: str) -> str:
            # The smaller of two ids either of which may be NULL (PostgreSQL's LEAST skips
            # NULLs; SQLite's two-argument MIN would return NULL).
            return f"LEAST({a}, {b})" if postgres else f"COALESCE(MIN({a}, {b}), {a}, {b})"

        def p(sql: str) -> str:
            return sql.replace("?", mark)

        self._p = p
        self.insert = p(
            f"INSERT INTO {t} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
            " ON CONFLICT (event_id) DO NOTHING"
        )
        # A row is due when it is pending, its backoff is over, no live claim holds it, and the
        # head of its key (its oldest row not yet sent: claims take a key's rows from there,
        # so it alone can be dead, backing off or claimed) is the row itself or free too.
        # Looking at the head alone keeps the check to a few index probes per row, however
        # many rows of the key wait.
        head = least(
            f"(SELECT MIN(h.id) FROM {t} h WHERE h.key = o.key AND h.status = 'pending')",
            f"(SELECT MIN(h.id) FROM {t} h WHERE h.key = o.key AND h.status = 'dead')",
        )
        self.claim = p(
            f"UPDATE {t} SET owner = ?, token = ?, lease_expires_at = ? WHERE id IN ("
            f"SELECT o.id FROM {t} o WHERE o.status = 'pending' AND o.available_at <= ?"
            " AND (o.lease_expires_at IS NULL OR o.lease_expires_at < ?)"
            f" AND (o.key IS NULL OR NOT EXISTS (SELECT 1 FROM {t} b WHERE b.id = {head}"
            " AND b.id < o.id AND (b.status = 'dead' OR b.available_at > ?"
            " OR b.lease_expires_at >= ?)))"
            " ORDER BY o.id LIMIT ?) RETURNING *"
        )
        self.failed = p(
            f"UPDATE {t} SET attempts = attempts + 1, last_error = ?, available_at = ?,"
            " status = CASE WHEN attempts + 1 >= ? THEN 'dead' ELSE 'pending' END,"
            " owner = NULL, token = NULL, lease_expires_at = NULL WHERE id = ? AND token = ?"
            " RETURNING status"
        )
        self.stats = (
            "SELECT SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END),"
            " SUM(CASE WHEN status = 'dead' THEN 1 ELSE 0 END),"
            " MIN(CASE WHEN status = 'pending' THEN created_at END)"
            f" FROM {t} WHERE status IN ('pending', 'dead')"
        )
        # Operators' changes of dead rows, completed by by_event(): retried with a fresh budget,
        # or given up (counted as sent for pruning, unblocking the key).
        self.retry = f"UPDATE {t} SET status = 'pending', attempts = 0, available_at = ?"
        self.discard = f"UPDATE {t} SET status = 'discarded', sent_at = ?"
        self.prune = p(
            f"DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE sent_at IS NOT NULL"
            " AND sent_at < ? ORDER BY sent_at LIMIT ?)"
        )
        self.sent = p(
            f"UPDATE {t} SET status = 'sent', sent_at = ?, attempts = attempts + 1,"
            " owner = NULL, token = NULL, lease_expires_at = NULL, last_error = NULL"
            " WHERE token = ? AND"
        )
        self.release = p(
            f"UPDATE {t} SET owner = NULL, token = NULL, lease_expires_at = NULL"
            " WHERE token = ? AND"
        )

    def ids(self, sql: str, n: int) -> str:
        """``sql`` (one of the ``... AND`` prefixes) followed by ``id IN (...)`` for ``n``."""
        return self._p(f"{sql} id IN ({', '.join('?' * n)})")

    def by_event(self, sql: str, n: int, *, dead_only: bool = True) -> str:
        """``sql`` (``retry`` or ``discard``) for the dead rows among ``n`` event ids (any
        row, without ``dead_only``)."""
        dead = " AND status = 'dead'" if dead_only else ""
        return self._p(f"{sql} WHERE event_id IN ({', '.join('?' * n)}){dead}")

    def listing(self, status: str | None) -> str:
        where = "WHERE status = ? " if status else ""
        return self._p(f"SELECT * FROM {self.table} {where}ORDER BY id DESC LIMIT ? OFFSET ?")

    def counting(self, status: str | None) -> str:
        where = " WHERE status = ?" if status else ""
        return self._p(f"SELECT COUNT(*) FROM {self.table}{where}")

    def finding(self, n: int) -> str:
        return self.by_event(f"SELECT * FROM {self.table}", n, dead_only=False)


class Outbox(abc.ABC):
    """The outbox operations of a store (``store.outbox``); safe to call concurrently."""

    @abc.abstractmethod
    async def enqueue(self, entries: Sequence[OutboxEntry]) -> int:
        """Insert events in a transaction of their own (rows whose id exists are skipped);
        how many were new."""

    @abc.abstractmethod
    async def claim(
        self, owner: str, token: str, *, limit: int, now: float, lease_seconds: float
    ) -> list[OutboxRow]:
        """Lease up to ``limit`` due rows to ``token``, oldest first (see the module)."""

    @abc.abstractmethod
    async def sent(self, token: str, ids: Sequence[int], *, now: float) -> int:
        """The broker confirmed these rows: mark those ``token`` still holds as sent."""

    @abc.abstractmethod
    async def failed(
        self, token: str, row_id: int, error: str, *, retry_at: float, max_attempts: int
    ) -> str | None:
        """A send failed: back off until ``retry_at``, or become dead after ``max_attempts``;
        the row's status afterwards (``None`` if ``token`` no longer holds it)."""

    @abc.abstractmethod
    async def release(self, token: str, ids: Sequence[int]) -> None:
        """Hand back rows claimed but not attempted (a later row of a key that failed)."""

    @abc.abstractmethod
    async def stats(self) -> OutboxStats:
        """Counts of unsent and dead rows and the oldest unsent row's time."""

    @abc.abstractmethod
    async def rows(
        self, *, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[OutboxRow]:
        """Rows, newest first, optionally of one status."""

    @abc.abstractmethod
    async def count(self, *, status: str | None = None) -> int:
        """How many rows :meth:`rows` with this status lists, without its limit."""

    @abc.abstractmethod
    async def find(self, event_ids: Sequence[str]) -> list[OutboxRow]:
        """The rows of these event ids (those that exist), in the order of the ids."""

    @abc.abstractmethod
    async def retry(self, event_ids: Sequence[str], *, now: float) -> int:
        """Dead rows (by event id) become pending again with a fresh budget; how many."""

    @abc.abstractmethod
    async def discard(self, event_ids: Sequence[str], *, now: float) -> int:
        """Dead rows (by event id) are given up, unblocking their key; how many."""

    @abc.abstractmethod
    async def prune(self, *, before: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` rows sent (or discarded) before ``before``; how many."""

    def subscribe(self, callback: Callable[[], None]) -> None:  # noqa: B027 - optional hook
        """Have ``callback`` called in the event loop when rows may have been added."""

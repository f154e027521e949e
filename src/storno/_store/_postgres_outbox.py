"""The outbox on PostgreSQL: claims serialised per schema by an advisory lock, rows locked
with ``SKIP LOCKED``, relays in other processes woken by ``NOTIFY``.

Two relays claiming at once could each see the other's older row of a key as free and send a
key's rows side by side; the transaction-scoped advisory lock makes claims take turns (a
claim is one short statement over a batch, so the turns are cheap), while marking rows sent
or failed never waits for it.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from storno._store._outbox import Outbox, OutboxEntry, OutboxRow, OutboxStats, Statements
from storno._store._outbox import row_to_entry as _entry

with contextlib.suppress(ImportError):  # the store refuses to start without the driver
    from psycopg.rows import dict_row

if TYPE_CHECKING:
    from storno._store._postgres_connection import Connection

__all__ = ["PostgresOutbox", "insert_entries"]

T = TypeVar("T")
Op = Callable[[str, Callable[["Connection", int], Awaitable[Any]]], Awaitable[Any]]


async def insert_entries(
    conn: Connection, sql: Statements, notify: str, entries: Sequence[OutboxEntry]
) -> None:
    """Insert outbox rows and notify relays, inside the caller's transaction."""
    async with conn.cursor() as cur:
        await cur.executemany(sql.insert, [e.values() for e in entries])
        await cur.execute(f"SELECT {notify}")


class PostgresOutbox(Outbox):
    def __init__(
        self,
        op: Op,
        schema: str,
        table: str,
        notify: str,
        subscribe: Callable[[Callable[[], None]], None],
    ) -> None:
        self._op = op
        self.sql = Statements(table, "%s")
        self.notify = notify  # pg_notify(...) on the outbox channel
        self._subscribe = subscribe
        self._lock = zlib.crc32(f"storno.outbox:{schema}".encode())
        self._callbacks: list[Callable[[], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._subscribe(callback)

    async def enqueue(self, entries: Sequence[OutboxEntry]) -> int:
        async def op(conn: Connection, attempt: int) -> int:
            async with conn.transaction(), conn.cursor() as cur:
                added = 0
                for entry in entries:  # executemany cannot count rows per statement
                    await cur.execute(self.sql.insert, entry.values())
                    added += max(cur.rowcount, 0)
                await cur.execute(f"SELECT {self.notify}")
                return added

        added: int = await self._op("outbox enqueue", op)
        return added

    async def claim(
        self, owner: str, token: str, *, limit: int, now: float, lease_seconds: float
    ) -> list[OutboxRow]:
        params = (owner, token, now + lease_seconds, now, now, now, now, limit)
        claim = self.sql.claim.replace(
            "ORDER BY o.id LIMIT %s)", "ORDER BY o.id LIMIT %s FOR UPDATE SKIP LOCKED)"
        )

        async def op(conn: Connection, attempt: int) -> list[OutboxRow]:
            async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
                found: list[OutboxRow] = []
                if attempt > 0:  # an earlier try may have committed its claim
                    await cur.execute(f"SELECT * FROM {self.sql.table} WHERE token = %s", (token,))
                    found = [_entry(r) for r in await cur.fetchall()]
                await cur.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock,))
                await cur.execute(claim, params)
                found += [_entry(r) for r in await cur.fetchall()]
                return sorted(found, key=lambda r: r.id)

        rows: list[OutboxRow] = await self._op("outbox claim", op)
        return rows

    async def sent(self, token: str, ids: Sequence[int], *, now: float) -> int:
        if not ids:
            return 0
        sql = f"{self.sql.sent} id = ANY(%s)"

        async def op(conn: Connection, attempt: int) -> int:
            cur = await conn.execute(sql, (now, token, list(ids)))
            return max(cur.rowcount, 0)

        count: int = await self._op("outbox sent", op)
        return count

    async def failed(
        self, token: str, row_id: int, error: str, *, retry_at: float, max_attempts: int
    ) -> str | None:
        async def op(conn: Connection, attempt: int) -> str | None:
            cur = await conn.execute(
                self.sql.failed, (error[:2000], retry_at, max_attempts, row_id, token)
            )
            row = await cur.fetchone()
            return None if row is None else str(row[0])

        status: str | None = await self._op("outbox failed", op)
        return status

    async def release(self, token: str, ids: Sequence[int]) -> None:
        if not ids:
            return
        sql = f"{self.sql.release} id = ANY(%s)"

        async def op(conn: Connection, attempt: int) -> None:
            await conn.execute(sql, (token, list(ids)))

        await self._op("outbox release", op)

    async def stats(self) -> OutboxStats:
        async def op(conn: Connection, attempt: int) -> OutboxStats:
            cur = await conn.execute(self.sql.stats)
            row = await cur.fetchone()
            assert row is not None
            return OutboxStats(int(row[0] or 0), int(row[1] or 0), row[2])

        stats: OutboxStats = await self._op("outbox stats", op)
        return stats

    async def rows(
        self, *, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[OutboxRow]:
        params: tuple[Any, ...] = (limit, offset) if status is None else (status, limit, offset)
        sql = self.sql.listing(status)

        async def op(conn: Connection, attempt: int) -> list[OutboxRow]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(sql, params)
                return [_entry(r) for r in await cur.fetchall()]

        rows: list[OutboxRow] = await self._op("outbox rows", op)
        return rows

    async def count(self, *, status: str | None = None) -> int:
        sql, params = self.sql.counting(status), () if status is None else (status,)

        async def op(conn: Connection, attempt: int) -> int:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        count: int = await self._op("outbox count", op)
        return count

    async def find(self, event_ids: Sequence[str]) -> list[OutboxRow]:
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return []
        sql = f"SELECT * FROM {self.sql.table} WHERE event_id = ANY(%s)"

        async def op(conn: Connection, attempt: int) -> list[OutboxRow]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(sql, (ids,))
                found = {(row := _entry(r)).message.event_id: row for r in await cur.fetchall()}
            return [found[i] for i in ids if i in found]

        rows: list[OutboxRow] = await self._op("outbox find", op)
        return rows

    async def retry(self, event_ids: Sequence[str], *, now: float) -> int:
        sql = self.sql.by_event(self.sql.retry, len(event_ids))
        return await self._change("outbox retry", sql, (now, *event_ids), len(event_ids) > 0)

    async def discard(self, event_ids: Sequence[str], *, now: float) -> int:
        sql = self.sql.by_event(self.sql.discard, len(event_ids))
        return await self._change("outbox discard", sql, (now, *event_ids), len(event_ids) > 0)

    async def prune(self, *, before: float, limit: int = 1000) -> int:
        return await self._change("outbox prune", self.sql.prune, (before, limit), True)

    async def _change(self, what: str, sql: str, params: tuple[Any, ...], any_: bool) -> int:
        if not any_:
            return 0

        async def op(conn: Connection, attempt: int) -> int:
            async with conn.transaction():
                cur = await conn.execute(sql, params)
                if cur.rowcount and what != "outbox prune":
                    await conn.execute(f"SELECT {self.notify}")
                return max(cur.rowcount, 0)

        count: int = await self._op(what, op)
        return count

"""The outbox on SQLite: writes through the store's writer thread (so claims, marks and the
runs' commits share its group commit), reads on the reader connections.

SQLite has no cross-process notification: a relay in this process is woken by the commits of
this process, and one elsewhere finds new rows by polling.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from storno._store._outbox import Outbox, OutboxEntry, OutboxRow, OutboxStats, Statements
from storno._store._outbox import row_to_entry as _entry

__all__ = ["SQLiteOutbox"]

T = TypeVar("T")
Write = Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]
Read = Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]

SQL = Statements("storno_outbox", "?")
_CHUNK = 500  # ids per statement, well below SQLite's limit on parameters


def insert_entries(conn: sqlite3.Connection, entries: Sequence[OutboxEntry]) -> int:
    """Insert outbox rows inside the caller's transaction; how many were new."""
    before = conn.total_changes
    conn.executemany(SQL.insert, [e.values() for e in entries])
    return conn.total_changes - before


class SQLiteOutbox(Outbox):
    def __init__(self, write: Write, read: Read) -> None:
        self._write = write
        self._read = read
        self._callbacks: list[Callable[[], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> None:
        if callback not in self._callbacks:
            self._callbacks.append(callback)

    def fire(self) -> None:
        """Rows were committed by this process: wake its relays."""
        for callback in list(self._callbacks):
            callback()

    async def enqueue(self, entries: Sequence[OutboxEntry]) -> int:
        added: int = await self._write(lambda conn: insert_entries(conn, entries))
        if added:
            self.fire()
        return added

    async def claim(
        self, owner: str, token: str, *, limit: int, now: float, lease_seconds: float
    ) -> list[OutboxRow]:
        params = (owner, token, now + lease_seconds, now, now, now, now, limit)

        def op(conn: sqlite3.Connection) -> list[OutboxRow]:
            return sorted((_entry(r) for r in conn.execute(SQL.claim, params)), key=_by_id)

        rows: list[OutboxRow] = await self._write(op)
        return rows

    async def sent(self, token: str, ids: Sequence[int], *, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            done = 0
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                done += conn.execute(SQL.ids(SQL.sent, len(chunk)), (now, token, *chunk)).rowcount
            return done

        count: int = await self._write(op)
        return count

    async def failed(
        self, token: str, row_id: int, error: str, *, retry_at: float, max_attempts: int
    ) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                SQL.failed, (error[:2000], retry_at, max_attempts, row_id, token)
            ).fetchone()
            return None if row is None else str(row[0])

        status: str | None = await self._write(op)
        return status

    async def release(self, token: str, ids: Sequence[int]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                conn.execute(SQL.ids(SQL.release, len(chunk)), (token, *chunk))

        if ids:
            await self._write(op)

    async def stats(self) -> OutboxStats:
        def fn(conn: sqlite3.Connection) -> OutboxStats:
            pending, dead, oldest = conn.execute(SQL.stats).fetchone()
            return OutboxStats(int(pending or 0), int(dead or 0), oldest)

        stats: OutboxStats = await self._read(fn)
        return stats

    async def rows(
        self, *, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[OutboxRow]:
        params: tuple[Any, ...] = (limit, offset) if status is None else (status, limit, offset)
        sql = SQL.listing(status)

        def fn(conn: sqlite3.Connection) -> list[OutboxRow]:
            return [_entry(r) for r in conn.execute(sql, params)]

        rows: list[OutboxRow] = await self._read(fn)
        return rows

    async def count(self, *, status: str | None = None) -> int:
        sql, params = SQL.counting(status), () if status is None else (status,)
        count: int = await self._read(lambda conn: int(conn.execute(sql, params).fetchone()[0]))
        return count

    async def find(self, event_ids: Sequence[str]) -> list[OutboxRow]:
        ids = list(dict.fromkeys(event_ids))

        def fn(conn: sqlite3.Connection) -> list[OutboxRow]:
            found: dict[str, OutboxRow] = {}
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                for r in conn.execute(SQL.finding(len(chunk)), chunk):
                    row = _entry(r)
                    found[row.message.event_id] = row
            return [found[i] for i in ids if i in found]

        rows: list[OutboxRow] = await self._read(fn)
        return rows

    async def retry(self, event_ids: Sequence[str], *, now: float) -> int:
        sql = SQL.by_event(SQL.retry, len(event_ids))
        return await self._change(sql, (now, *event_ids), bool(event_ids), wake=True)

    async def discard(self, event_ids: Sequence[str], *, now: float) -> int:
        sql = SQL.by_event(SQL.discard, len(event_ids))
        return await self._change(sql, (now, *event_ids), bool(event_ids), wake=True)

    async def prune(self, *, before: float, limit: int = 1000) -> int:
        return await self._change(SQL.prune, (before, limit), True, wake=False)

    async def _change(self, sql: str, params: tuple[Any, ...], any_: bool, *, wake: bool) -> int:
        if not any_:
            return 0
        count: int = await self._write(lambda conn: conn.execute(sql, params).rowcount)
        if count and wake:
            self.fire()
        return count


def _by_id(row: OutboxRow) -> int:
    return row.id

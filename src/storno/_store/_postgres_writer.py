"""Group commit on PostgreSQL: concurrent runs' writes share one transaction and one round trip.

Each write is one statement (see :mod:`storno._store._postgres_sql`). The writer holds a
connection of its own and sends whatever writes arrived while its previous batch was
committing as one pipeline: the statements, then one Sync. The server runs everything
between two Syncs as one implicit transaction and commits it at the Sync, so the batch costs
one round trip and one WAL flush however many runs it carries.

Each statement checks its run's lease fence itself: a fenced write returns no row and writes
nothing, so it fails alone. Any error aborts the whole implicit transaction; the writer then
tells every caller to redo its write alone (:class:`Redo`), so one refused write does not undo
the others. A connection lost while the batch was in flight leaves its commit unknown: every
caller is told so (:class:`Unknown`) and settles its write as the store settles a single write
whose answer was lost (it checks whether its first event is recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

with contextlib.suppress(ImportError):  # the store refuses to start without the driver
    import psycopg

if TYPE_CHECKING:
    from storno._store._postgres_connection import Connection

__all__ = ["BatchWriter", "Redo", "Unknown"]

log = logging.getLogger("storno.store.postgres")

_BATCH_MAX = 256


class Redo(Exception):
    """The batch was rolled back (or never sent): redo this write alone."""


class Unknown(Exception):
    """The connection was lost while the batch was in flight: it may have committed."""


Statements = list[tuple[str, dict[str, Any]]]
_Item = tuple[str, Statements, "asyncio.Future[int | None]"]


class BatchWriter:
    """Commits fenced single-statement writes in batches on a connection of its own."""

    def __init__(self, connect: Callable[[], Awaitable[Connection]]) -> None:
        self._connect = connect
        self._conn: Connection | None = None
        self._pending: list[_Item] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.commits = 0  # batches committed; each is one transaction and one round trip
        self.operations = 0  # writes committed in them

    async def write(self, run_id: str, statements: Statements) -> int | None:
        """Run's ``statements`` in the next batch; the first column of the last one's row (the
        run's inbox number), ``None`` if it returned no row (the lease fence refused it);
        :class:`Redo` or :class:`Unknown` if the batch failed."""
        if self._closed:
            raise Redo
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._pending.append((run_id, statements, future))
        if self._task is None:
            # Started on the loop's next pass: the writes runs queue in this one join it.
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name="storno-postgres-writer"
            )
        return await future

    async def close(self) -> None:
        """Commit what is queued, then close the connection."""
        self._closed = True
        task = self._task
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:_BATCH_MAX], self._pending[_BATCH_MAX:]
                await self._commit(batch)
        finally:
            self._task = None

    async def _commit(self, batch: list[_Item]) -> None:
        # The same order of row locks in every batch: two processes' batches never wait for
        # each other in a cycle.
        batch.sort(key=lambda item: item[0])
        try:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = await self._connect()
        except (psycopg.Error, OSError) as exc:
            log.debug("the writer cannot connect, writes go alone: %s", exc)
            _fail(batch, Redo())
            return
        try:
            rows = await self._send(conn, batch)
        except asyncio.CancelledError:
            self._lost(conn)
            _fail(batch, Unknown())
            raise
        except (psycopg.Error, OSError) as exc:
            # An error the server sent (it has an SQLSTATE) on a connection still up rolled
            # the batch back; any other means the Sync's answer may never have come.
            refused = getattr(exc, "sqlstate", None) is not None
            if refused and not (conn.broken or conn.closed):
                _fail(batch, Redo())
            else:
                log.warning("PostgreSQL connection lost during a batch of %d writes", len(batch))
                self._lost(conn)
                _fail(batch, Unknown())
            return
        self.commits += 1
        self.operations += len(batch)
        for (_, _, future), row in zip(batch, rows, strict=True):
            if not future.done():
                future.set_result(None if row is None else int(row[0]))

    async def _send(self, conn: Connection, batch: list[_Item]) -> list[Any]:
        """Run the batch as one pipeline: its statements, one Sync; each write's last row."""
        async with conn.pipeline():
            cursors = [
                [await conn.execute(sql, params) for sql, params in statements][-1]
                for _, statements, _ in batch
            ]
        # Leaving the pipeline sent the Sync and read its answer: the batch is committed
        # (durably: synchronous_commit) and every statement's result is here.
        return [await cur.fetchone() for cur in cursors]

    def _lost(self, conn: Connection) -> None:
        if self._conn is conn:
            self._conn = None
        # Closing a broken connection only frees its socket; the answer is lost already.
        with contextlib.suppress(Exception):
            conn.pgconn.finish()


def _fail(batch: list[_Item], exc: Exception) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(exc)

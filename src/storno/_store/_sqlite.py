"""The embedded default: one SQLite file in WAL mode, through the standard library.

Writes go through one thread that commits whatever is queued as one transaction (group
commit, see :mod:`storno._store._sqlite_connection`). Reads use per-thread connections, which
WAL lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from storno._errors import StoreError
from storno._model import Event, EventType, InboxMessage, Lease, RunRecord, RunStatus
from storno._store._base import (
    ENDED_STATUSES,
    EXPIRED,
    Delivery,
    NewRun,
    RunExistsError,
    RunUpdate,
    Store,
    lease_lost,
)
from storno._store._claims import Batch, ClaimPlan, ClaimRequest
from storno._store._migrations import SchemaStatus
from storno._store._outbox import emitted_entries
from storno._store._rows import (
    event_from_row,
    event_values,
    leased_runs,
    message_from_row,
    message_values,
    run_filters,
    run_from_row,
)
from storno._store._sqlite_connection import (
    Op,
    Writer,
    connect,
    migrate,
    need_folder,
    parse_sqlite_url,
    read_status,
    sqlite_error,
)
from storno._store._sqlite_outbox import SQLiteOutbox, insert_entries
from storno._store._sqlite_sql import COUNT_EXECUTING, claim_sql, update_statement

__all__ = ["SQLiteStore", "migrate", "parse_sqlite_url"]

T = TypeVar("T")


def _event_rows(run_id: str, events: Sequence[Event]) -> list[tuple[Any, ...]]:
    return [(run_id, *event_values(e)) for e in events]


_FENCE = "SELECT inbox_seq FROM storno_runs WHERE run_id = ? AND owner = ? AND epoch = ?"
_INSERT_EVENTS = (
    "INSERT INTO storno_events (run_id, seq, type, at, position, data, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _deliver(
    conn: sqlite3.Connection, run_id: str, message: InboxMessage, now: float
) -> Delivery | None:
    """Store a message in a run's inbox and wake the run if it waits (inside a transaction)."""
    row = conn.execute(
        "SELECT status, inbox_seq FROM storno_runs WHERE run_id = ?", (run_id,)
    ).fetchone()
    if row is None:
        return None
    status = RunStatus(row["status"])
    # A repeated id is a duplicate even once the run has ended: a sender whose answer was lost
    # retries, and must hear that its message was taken.
    if message.message_id is not None:
        seen = conn.execute(
            "SELECT seq FROM storno_inbox WHERE run_id = ? AND message_id = ?",
            (run_id, message.message_id),
        ).fetchone()
        if seen is not None:
            return Delivery(status, seen[0], duplicate=True)
    if status in ENDED_STATUSES:
        return Delivery(status, 0)
    seq = row["inbox_seq"] + 1
    conn.execute(
        "INSERT INTO storno_inbox (run_id, seq, kind, name, message_id, payload, meta, sent_at)"
        " VALUES (?,?,?,?,?,?,?,?)",
        (run_id, seq, *message_values(message), now),
    )
    conn.execute(
        "UPDATE storno_runs SET inbox_seq = ?, "
        "wake_at = CASE WHEN status = 'waiting' THEN ? ELSE wake_at END WHERE run_id = ?",
        (seq, now, run_id),
    )
    return Delivery(status, seq)


def _insert_run(
    conn: sqlite3.Connection, run: NewRun, claim_for: str | None, lease_seconds: float
) -> tuple[sqlite3.Row, bool]:
    """Insert a run with its first event; the existing row (and ``False``) if the id is taken."""
    claimed = claim_for is not None
    row = conn.execute(
        "INSERT INTO storno_runs (run_id, saga, status, input, created_at, updated_at,"
        " deadline, owner, lease_expires_at, epoch, wake_at, parent_run_id, correlation_id)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT (run_id) DO NOTHING RETURNING *",
        (
            run.run_id,
            run.saga,
            (RunStatus.RUNNING if claimed else RunStatus.PENDING).value,
            run.input,
            run.created_at,
            run.created_at,
            run.deadline,
            claim_for,
            run.created_at + lease_seconds if claimed else None,
            1 if claimed else 0,
            run.wake_at,
            run.parent_run_id,
            run.correlation_id,
        ),
    ).fetchone()
    if row is None:
        existing = conn.execute(
            "SELECT * FROM storno_runs WHERE run_id = ?", (run.run_id,)
        ).fetchone()
        return existing, False
    conn.executemany(_INSERT_EVENTS, _event_rows(run.run_id, [run.event]))
    return row, True


def _claim_rows(conn: sqlite3.Connection, request: ClaimRequest, batch: Batch) -> list[sqlite3.Row]:
    """Lease one batch's runs (inside the claim's transaction)."""
    params = request.params(batch)
    for name in ("sagas", "not_sagas", "skip"):
        params.update((f"{name}{i}", value) for i, value in enumerate(params.pop(name)))
    return conn.execute(claim_sql(request.shape(batch)), params).fetchall()


class SQLiteStore(Store):
    """Runs and histories in one SQLite file, durable against a killed process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path, self.synchronous = parse_sqlite_url(url)
        self._writer: Writer | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self.outbox: SQLiteOutbox = SQLiteOutbox(self._write, self._read)

    async def open(self) -> None:
        if self._writer is not None:
            return
        need_folder(self.path)

        def setup() -> sqlite3.Connection:
            conn = connect(self.path, self.synchronous)
            try:
                migrate(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await asyncio.to_thread(setup)
        except sqlite3.Error as exc:
            raise sqlite_error(exc, self.path, "open") from exc
        self._writer = Writer(self.path, self.synchronous)
        self._writer.start()
        self._writer.bind(asyncio.get_running_loop(), conn)

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
            await asyncio.to_thread(writer.join)
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()

    async def exists(self) -> bool:
        return self.path.exists()

    async def schema_status(self) -> SchemaStatus:
        return await asyncio.to_thread(read_status, self.url)

    @property
    def write_counts(self) -> tuple[int, int]:
        """(commits, write operations) since the store was opened: the batching ratio."""
        writer = self._writer
        return (writer.commits, writer.operations) if writer else (0, 0)

    async def _write(self, op: Op) -> Any:
        if self._writer is None:
            raise StoreError("the store is not open; use `async with Storno(...)` or open()")
        return await self._writer.submit(op)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, self.synchronous)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise sqlite_error(exc, self.path, "read") from exc

        return await asyncio.to_thread(run)

    async def create_run(
        self, run: NewRun, *, claim_for: str | None, lease_seconds: float
    ) -> tuple[RunRecord, bool]:
        def op(conn: sqlite3.Connection) -> tuple[RunRecord, bool]:
            row, created = _insert_run(conn, run, claim_for, lease_seconds)
            return run_from_row(row), created

        result: tuple[RunRecord, bool] = await self._write(op)
        return result

    async def get_run(self, run_id: str) -> RunRecord | None:
        def fn(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute("SELECT * FROM storno_runs WHERE run_id = ?", (run_id,)).fetchone()
            return run_from_row(row) if row else None

        return await self._read(fn)

    async def list_runs(
        self,
        *,
        status: RunStatus | Sequence[RunStatus] | None = None,
        saga: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunRecord]:
        where, params = run_filters(status, saga, "?")
        sql = f"SELECT * FROM storno_runs {where} ORDER BY created_at DESC, run_id LIMIT ? OFFSET ?"

        def fn(conn: sqlite3.Connection) -> list[RunRecord]:
            return [run_from_row(r) for r in conn.execute(sql, (*params, limit, offset))]

        return await self._read(fn)

    async def count_runs(
        self, *, status: RunStatus | Sequence[RunStatus] | None = None, saga: str | None = None
    ) -> int:
        where, params = run_filters(status, saga, "?")
        sql = f"SELECT COUNT(*) FROM storno_runs {where}"
        return await self._read(lambda conn: int(conn.execute(sql, params).fetchone()[0]))

    async def correlated(self, correlation_id: str, *, limit: int = 500) -> list[RunRecord]:
        sql = (
            "SELECT * FROM storno_runs WHERE correlation_id = ? OR run_id = ?"
            " ORDER BY created_at, run_id LIMIT ?"
        )

        def fn(conn: sqlite3.Connection) -> list[RunRecord]:
            return [run_from_row(r) for r in conn.execute(sql, (correlation_id,) * 2 + (limit,))]

        return await self._read(fn)

    async def histories(self, run_ids: Sequence[str]) -> dict[str, list[Event]]:
        ids = list(dict.fromkeys(run_ids))

        def fn(conn: sqlite3.Connection) -> dict[str, list[Event]]:
            found: dict[str, list[Event]] = {run_id: [] for run_id in ids}
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = conn.execute(
                    "SELECT run_id, seq, type, at, position, data, payload FROM storno_events "
                    f"WHERE run_id IN ({','.join('?' * len(chunk))}) ORDER BY run_id, seq",
                    chunk,
                )
                for row in rows:
                    found[row["run_id"]].append(event_from_row(row))
            return found

        return await self._read(fn)

    async def write(
        self,
        lease: Lease,
        events: Sequence[Event],
        update: RunUpdate | None,
        *,
        now: float,
        lease_seconds: float,
        state: str | None = None,
        touch: bool = True,
        create: NewRun | None = None,
    ) -> int:
        rows = _event_rows(lease.run_id, events)
        emitted = emitted_entries(lease.run_id, events)

        def born(conn: sqlite3.Connection) -> None:
            # A run started here is inserted with its first write (one commit, not two).
            if create is not None and not _insert_run(conn, create, lease.owner, lease_seconds)[1]:
                raise RunExistsError(create.run_id)

        notify: tuple[str, InboxMessage] | None = None
        if not touch and update is None and state is None:
            # Reading the row inside the write transaction fences as well as updating it.
            sql, params = _FENCE, [lease.run_id, lease.owner, lease.epoch]
        else:
            sql, params = update_statement(lease, update, now, lease_seconds, state)
            if update is not None and update.notify is not None and update.notify_run_id:
                notify = (update.notify_run_id, update.notify)

        def op(conn: sqlite3.Connection) -> int:
            born(conn)
            row = conn.execute(sql, params).fetchone()
            if row is None:
                # Refused before anything was written: the writer relies on it to skip the
                # savepoint around each operation.
                raise lease_lost(lease)
            if rows:
                conn.executemany(_INSERT_EVENTS, rows)
            if emitted:
                insert_entries(conn, emitted)
            if notify is not None:
                _deliver(conn, notify[0], notify[1], now)
            return int(row[0])

        result: int = await self._write(op)
        if emitted:
            self.outbox.fire()
        return result

    async def deliver(self, run_id: str, message: InboxMessage, *, now: float) -> Delivery | None:
        result: Delivery | None = await self._write(
            lambda conn: _deliver(conn, run_id, message, now)
        )
        return result

    async def inbox(self, run_id: str, *, after: int = 0) -> list[InboxMessage]:
        def fn(conn: sqlite3.Connection) -> list[InboxMessage]:
            rows = conn.execute(
                "SELECT * FROM storno_inbox WHERE run_id = ? AND seq > ? ORDER BY seq",
                (run_id, after),
            )
            return [message_from_row(r) for r in rows]

        return await self._read(fn)

    async def operate(
        self,
        run_id: str,
        *,
        expected: Sequence[RunStatus],
        status: RunStatus,
        event_type: EventType,
        data: dict[str, Any],
        now: float,
        claimable: bool,
        error: dict[str, Any] | None = None,
        lift_deadline: bool = False,
    ) -> RunRecord | None:
        marks = ",".join("?" * len(expected))
        error_text = None if error is None else json.dumps(error)

        def op(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(
                "UPDATE storno_runs SET status = ?, updated_at = ?, owner = NULL, "
                "lease_expires_at = ?, wake_at = NULL, error = COALESCE(?, error), "
                "deadline = CASE WHEN ? THEN NULL ELSE deadline END "
                f"WHERE run_id = ? AND status IN ({marks}) "
                "AND (owner IS NULL OR lease_expires_at < ?) RETURNING *",
                (
                    status.value,
                    now,
                    EXPIRED if claimable else None,
                    error_text,
                    lift_deadline,
                    run_id,
                    *expected,
                    now,
                ),
            ).fetchone()
            if row is None:
                return None
            seq = conn.execute(
                "SELECT COALESCE(MAX(seq), -1) + 1 FROM storno_events WHERE run_id = ?",
                (run_id,),
            ).fetchone()[0]
            conn.executemany(
                _INSERT_EVENTS,
                _event_rows(run_id, [Event(seq, event_type, now, None, data)]),
            )
            return run_from_row(row)

        result: RunRecord | None = await self._write(op)
        return result

    async def claim(
        self,
        owner: str,
        *,
        limit: int,
        now: float,
        lease_seconds: float,
        sagas: Sequence[str] | None = None,
        include_own: bool = False,
        exclude: Sequence[str] = (),
        limits: Mapping[str, int] | None = None,
    ) -> list[tuple[RunRecord, Lease]]:
        plan = ClaimPlan.of(limit, sagas, limits)
        if plan is None:
            return []
        request = ClaimRequest(owner, now, lease_seconds, include_own, tuple(exclude))

        def op(conn: sqlite3.Connection) -> list[tuple[RunRecord, Lease]]:
            # One transaction of the one writer: no other claimer counts or claims meanwhile.
            rows: list[sqlite3.Row] = []
            batch = plan.free_batch()
            if batch is not None:
                rows += _claim_rows(conn, request, batch)
            for saga, cap in plan.capped:
                executing = int(conn.execute(COUNT_EXECUTING, (now, saga)).fetchone()[0])
                batch = plan.capped_batch(saga, cap, executing, len(rows))
                if batch is not None:
                    rows += _claim_rows(conn, request, batch)
            return leased_runs(rows, owner)

        result: list[tuple[RunRecord, Lease]] = await self._write(op)
        return result

    async def renew(
        self, owner: str, run_ids: Sequence[str], *, now: float, lease_seconds: float
    ) -> set[str]:
        ids = list(run_ids)
        if not ids:
            return set()

        def op(conn: sqlite3.Connection) -> set[str]:
            kept: set[str] = set()
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                kept.update(
                    r[0]
                    for r in conn.execute(
                        f"UPDATE storno_runs SET lease_expires_at = ? "
                        f"WHERE owner = ? AND run_id IN ({marks}) RETURNING run_id",
                        (now + lease_seconds, owner, *chunk),
                    )
                )
            return set(ids) - kept

        result: set[str] = await self._write(op)
        return result

    async def release(self, owner: str, run_ids: Sequence[str]) -> None:
        ids = list(run_ids)
        if not ids:
            return

        def op(conn: sqlite3.Connection) -> None:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                conn.execute(
                    f"UPDATE storno_runs SET lease_expires_at = {EXPIRED} WHERE owner = ? "
                    f"AND run_id IN ({','.join('?' * len(chunk))})",
                    (owner, *chunk),
                )

        await self._write(op)

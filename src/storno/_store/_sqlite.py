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
    split_limits,
)
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
    sqlite_error,
)

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
        " deadline, owner, lease_expires_at, epoch, wake_at, parent_run_id)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
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
        ),
    ).fetchone()
    if row is None:
        existing = conn.execute(
            "SELECT * FROM storno_runs WHERE run_id = ?", (run.run_id,)
        ).fetchone()
        return existing, False
    conn.executemany(_INSERT_EVENTS, _event_rows(run.run_id, [run.event]))
    return row, True


def _update_statement(
    lease: Lease, update: RunUpdate | None, now: float, lease_seconds: float, state: str | None
) -> tuple[str, list[Any]]:
    """The UPDATE of a run's row for a write under ``lease`` (fenced by owner and epoch)."""
    sets = ["updated_at = ?", "lease_expires_at = ?", "state = COALESCE(?, state)"]
    params: list[Any] = [now, now + lease_seconds, state]
    if update is not None:
        if update.release:
            params[1] = None
        sets += [
            "status = ?",
            "result = COALESCE(?, result)",
            "error = COALESCE(?, error)",
            "owner = CASE WHEN ? THEN NULL ELSE owner END",
            # A message that arrived while the run decided to wait wakes it at once.
            "wake_at = CASE WHEN ? IS NOT NULL AND inbox_seq > ? THEN ? ELSE ? END",
        ]
        params += [
            update.status.value,
            update.result,
            json.dumps(update.error) if update.error is not None else None,
            update.release,
            update.seen_inbox,
            update.seen_inbox,
            now,
            update.wake_at,
        ]
    sql = (
        f"UPDATE storno_runs SET {', '.join(sets)} "
        "WHERE run_id = ? AND owner = ? AND epoch = ? RETURNING inbox_seq"
    )
    params += [lease.run_id, lease.owner, lease.epoch]
    return sql, params


def _executing(conn: sqlite3.Connection, saga: str, now: float) -> int:
    """Runs of a saga that a live worker holds right now (for concurrency limits)."""
    row = conn.execute(
        "SELECT COUNT(*) FROM storno_runs INDEXED BY storno_runs_by_status "
        "WHERE status IN ('running', 'compensating') AND lease_expires_at >= ? AND +saga = ?",
        (now, saga),
    ).fetchone()
    return int(row[0])


def _claim_rows(
    conn: sqlite3.Connection,
    owner: str,
    now: float,
    lease_seconds: float,
    include_own: bool,
    skip: list[str],
    limit: int,
    sagas: list[str] | None,
    not_sagas: list[str],
) -> list[sqlite3.Row]:
    """Lease up to ``limit`` due runs of these sagas (any, if ``None``) but ``not_sagas``."""
    # "+saga" keeps the planner off the saga index: each branch below must walk its own
    # status index, touching due runs only, never a saga's finished ones.
    only, filters = "", [*(sagas or []), *not_sagas, *skip]
    if sagas is not None:
        only += f" AND +saga IN ({','.join('?' * len(sagas))})"
    if not_sagas:
        only += f" AND +saga NOT IN ({','.join('?' * len(not_sagas))})"
    if skip:
        only += f" AND run_id NOT IN ({','.join('?' * len(skip))})"
    branches = (
        "SELECT run_id, created_at FROM storno_runs INDEXED BY storno_runs_by_status_created"
        f" WHERE status = 'pending' AND (wake_at IS NULL OR wake_at <= ?){only}"
        " ORDER BY created_at LIMIT ?",
        "SELECT run_id, created_at FROM storno_runs INDEXED BY storno_runs_by_wake"
        f" WHERE status = 'waiting' AND wake_at <= ?{only} ORDER BY wake_at LIMIT ?",
        "SELECT run_id, created_at FROM storno_runs INDEXED BY storno_runs_by_status"
        " WHERE status IN ('running', 'compensating')"
        f" AND (lease_expires_at < ? OR (? AND owner = ?)){only} LIMIT ?",
    )
    union = " UNION ALL ".join(f"SELECT * FROM ({b})" for b in branches)
    sql = (
        "UPDATE storno_runs SET owner = ?, epoch = epoch + 1, lease_expires_at = ?, "
        " updated_at = ?, wake_at = NULL, "
        " status = CASE WHEN status IN ('pending', 'waiting') THEN 'running' ELSE status END "
        f"WHERE run_id IN (SELECT run_id FROM ({union}) ORDER BY created_at LIMIT ?) "
        "RETURNING *"
    )
    params = (
        *(owner, now + lease_seconds, now),
        *(now, *filters, limit),
        *(now, *filters, limit),
        *(now, include_own, owner, *filters, limit),
        limit,
    )
    return conn.execute(sql, params).fetchall()


class SQLiteStore(Store):
    """Runs and histories in one SQLite file, durable against a killed process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path, self.synchronous = parse_sqlite_url(url)
        self._writer: Writer | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

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

        def born(conn: sqlite3.Connection) -> None:
            # A run started here is inserted with its first write (one commit, not two).
            if create is not None and not _insert_run(conn, create, lease.owner, lease_seconds)[1]:
                raise RunExistsError(create.run_id)

        notify: tuple[str, InboxMessage] | None = None
        if not touch and update is None and state is None:
            # Reading the row inside the write transaction fences as well as updating it.
            sql, params = _FENCE, [lease.run_id, lease.owner, lease.epoch]
        else:
            sql, params = _update_statement(lease, update, now, lease_seconds, state)
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
            if notify is not None:
                _deliver(conn, notify[0], notify[1], now)
            return int(row[0])

        result: int = await self._write(op)
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
    ) -> RunRecord | None:
        marks = ",".join("?" * len(expected))

        def op(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute(
                "UPDATE storno_runs SET status = ?, updated_at = ?, owner = NULL, "
                "lease_expires_at = ?, wake_at = NULL "
                f"WHERE run_id = ? AND status IN ({marks}) "
                "AND (owner IS NULL OR lease_expires_at < ?) RETURNING *",
                (status.value, now, EXPIRED if claimable else None, run_id, *expected, now),
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
        if limit <= 0 or (sagas is not None and not sagas):
            return []
        free, capped = split_limits(sagas, limits)
        common = (owner, now, lease_seconds, include_own, list(exclude))

        def op(conn: sqlite3.Connection) -> list[tuple[RunRecord, Lease]]:
            rows: list[sqlite3.Row] = []
            if free is None or free:
                rows += _claim_rows(conn, *common, limit, free, list(capped))
            for name, cap in sorted(capped.items()):
                room = min(cap - _executing(conn, name, now), limit - len(rows))
                if room > 0:
                    rows += _claim_rows(conn, *common, room, [name], [])
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

"""The embedded default: one SQLite file in WAL mode, through the standard library.

Every step costs at least one durable write, so writes are the engine's speed limit. All
writes go through one thread that drains whatever is queued and commits it as one
transaction (group commit): 32 concurrent runs share one fsync instead of paying 32. Each
queued operation runs inside its own savepoint, so one refused write (a lost lease) does not
undo the others in its batch. Reads use per-thread connections, which WAL lets run beside
the writer.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from storno._errors import ConfigurationError, LeaseLostError, StoreError
from storno._model import (
    Event,
    EventType,
    InboxMessage,
    Lease,
    MessageKind,
    RunRecord,
    RunStatus,
)
from storno._store._base import Delivery, NewRun, RunUpdate, Store

__all__ = ["SQLiteStore", "parse_sqlite_url"]

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]
_BATCH_MAX = 512
_SYNCHRONOUS = {"off", "normal", "full", "extra"}


def parse_sqlite_url(url: str) -> tuple[Path, str]:
    """The file path and synchronous level of ``sqlite:///rel.db?synchronous=normal``.

    Three slashes make a path relative to the working directory, four an absolute one (the
    SQLAlchemy convention). A bare path is accepted too.
    """
    if not url.startswith("sqlite:"):
        return Path(url), "full"
    parts = urlsplit(url)
    if parts.netloc:
        raise ConfigurationError(
            f"SQLite URL {url!r} has a host part; write sqlite:///relative.db or "
            f"sqlite:////absolute/path.db"
        )
    raw = unquote(parts.path)
    path = raw[1:] if raw.startswith("/") else raw
    if not path or path == ":memory:":
        raise ConfigurationError(
            f"SQLite URL {url!r} names no file; storno needs a file so that runs survive the "
            f"process (an in-memory database would lose them)"
        )
    query = parse_qs(parts.query)
    unknown = set(query) - {"synchronous"}
    if unknown:
        raise ConfigurationError(
            f"unknown SQLite URL option(s) {sorted(unknown)} in {url!r}; known: synchronous"
        )
    synchronous = query.get("synchronous", ["full"])[-1].lower()
    if synchronous not in _SYNCHRONOUS:
        raise ConfigurationError(
            f"synchronous={synchronous!r} in {url!r}; use one of {sorted(_SYNCHRONOUS)}"
        )
    return Path(path), synchronous


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("storno._store").joinpath("migrations", "sqlite")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text()))
    return sorted(found)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database lacks, under a write lock; return the version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS storno_schema "
            "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM storno_schema").fetchone()[0]
        known = _migrations()
        latest = known[-1][0] if known else 0
        if current > latest:
            raise StoreError(
                f"the database is at schema version {current}, newer than this storno "
                f"understands ({latest}); upgrade storno"
            )
        for version, sql in known:
            if version > current:
                for statement in _split_sql(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO storno_schema (version, applied_at) VALUES (?, julianday('now'))",
                    (version,),
                )
                current = version
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return int(current)


def _split_sql(sql: str) -> list[str]:
    """Statements of a migration file; trigger bodies keep their inner semicolons."""
    statements, buffer = [], ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"],
        saga=row["saga"],
        status=RunStatus(row["status"]),
        input=row["input"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        result=row["result"],
        error=json.loads(row["error"]) if row["error"] else None,
        deadline=row["deadline"],
        owner=row["owner"],
        lease_expires_at=row["lease_expires_at"],
        epoch=row["epoch"],
        wake_at=row["wake_at"],
        parent_run_id=row["parent_run_id"],
        inbox_seq=row["inbox_seq"],
        state=json.loads(row["state"]) if row["state"] else None,
    )


def _event_rows(run_id: str, events: Sequence[Event]) -> list[tuple[Any, ...]]:
    return [
        (run_id, e.seq, e.type.value, e.at, e.position, json.dumps(e.data), e.payload)
        for e in events
    ]


_INSERT_EVENTS = (
    "INSERT INTO storno_events (run_id, seq, type, at, position, data, payload) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_ENDED = tuple(
    s.value
    for s in (
        RunStatus.COMPLETED,
        RunStatus.COMPENSATED,
        RunStatus.COMPENSATION_FAILED,
        RunStatus.NEEDS_ATTENTION,
        RunStatus.CANCELLED,
    )
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
    if status.value in _ENDED:
        return Delivery(status, 0)
    if message.message_id is not None:
        seen = conn.execute(
            "SELECT seq FROM storno_inbox WHERE run_id = ? AND message_id = ?",
            (run_id, message.message_id),
        ).fetchone()
        if seen is not None:
            return Delivery(status, seen[0], duplicate=True)
    seq = row["inbox_seq"] + 1
    conn.execute(
        "INSERT INTO storno_inbox (run_id, seq, kind, name, message_id, payload, meta, sent_at)"
        " VALUES (?,?,?,?,?,?,?,?)",
        (
            run_id,
            seq,
            message.kind.value,
            message.name,
            message.message_id,
            message.payload,
            json.dumps(message.meta),
            now,
        ),
    )
    conn.execute(
        "UPDATE storno_runs SET inbox_seq = ?, "
        "wake_at = CASE WHEN status = 'waiting' THEN ? ELSE wake_at END WHERE run_id = ?",
        (seq, now, run_id),
    )
    return Delivery(status, seq)


class _Writer(threading.Thread):
    """The one thread that writes; it commits everything queued at once as one transaction."""

    def __init__(self, path: Path, synchronous: str) -> None:
        super().__init__(name="storno-sqlite-writer", daemon=True)
        self._path = path
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[
            tuple[_Op, asyncio.Future[Any], asyncio.AbstractEventLoop] | None
        ] = queue.SimpleQueue()
        self.commits = 0  # transactions committed; each is one durable write
        self.operations = 0  # writes requested; several share a commit under load

    def submit(self, op: _Op) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put((op, future, loop))
        return future

    def stop(self) -> None:
        self._queue.put(None)

    def run(self) -> None:
        conn = _connect(self._path, self._synchronous)
        try:
            stopping = False
            while not stopping:
                item = self._queue.get()
                if item is None:
                    break
                batch = [item]
                while len(batch) < _BATCH_MAX:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stopping = True
                        break
                    batch.append(more)
                self._commit(conn, batch)
                self.commits += 1
                self.operations += len(batch)
        finally:
            conn.close()

    @staticmethod
    def _commit(
        conn: sqlite3.Connection,
        batch: list[tuple[_Op, asyncio.Future[Any], asyncio.AbstractEventLoop]],
    ) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, _, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(conn)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    outcomes.append((False, exc))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StoreError(f"SQLite write failed and was rolled back: {exc}")
            error.__cause__ = exc
            outcomes = [(False, error)] * len(batch)
        for (_, future, loop), outcome in zip(batch, outcomes, strict=True):
            loop.call_soon_threadsafe(_settle, future, outcome)


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.cancelled():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


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
        self._writer: _Writer | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    async def open(self) -> None:
        if self._writer is not None:
            return
        if self.path.parent and not self.path.parent.exists():
            raise ConfigurationError(
                f"cannot create the SQLite database {str(self.path)!r}: folder "
                f"{str(self.path.parent)!r} does not exist"
            )

        def setup() -> None:
            conn = _connect(self.path, self.synchronous)
            try:
                migrate(conn)
            finally:
                conn.close()

        try:
            await asyncio.to_thread(setup)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {str(self.path)!r}: {exc}") from exc
        self._writer = _Writer(self.path, self.synchronous)
        self._writer.start()

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

    async def _write(self, op: _Op) -> Any:
        if self._writer is None:
            raise StoreError("the store is not open; use `async with Storno(...)` or open()")
        return await self._writer.submit(op)

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, self.synchronous)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite read failed: {exc}") from exc

        return await asyncio.to_thread(run)

    async def create_run(
        self, run: NewRun, *, claim_for: str | None, lease_seconds: float
    ) -> tuple[RunRecord, bool]:
        def op(conn: sqlite3.Connection) -> tuple[RunRecord, bool]:
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
                return _record(existing), False
            conn.executemany(_INSERT_EVENTS, _event_rows(run.run_id, [run.event]))
            return _record(row), True

        result: tuple[RunRecord, bool] = await self._write(op)
        return result

    async def get_run(self, run_id: str) -> RunRecord | None:
        def fn(conn: sqlite3.Connection) -> RunRecord | None:
            row = conn.execute("SELECT * FROM storno_runs WHERE run_id = ?", (run_id,)).fetchone()
            return _record(row) if row else None

        return await self._read(fn)

    async def list_runs(
        self,
        *,
        status: RunStatus | None = None,
        saga: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunRecord]:
        clauses, params = [], []
        if status is not None:
            clauses.append("status = ?")
            params.append(status.value)
        if saga is not None:
            clauses.append("saga = ?")
            params.append(saga)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT * FROM storno_runs {where} ORDER BY created_at DESC, run_id LIMIT ? OFFSET ?"

        def fn(conn: sqlite3.Connection) -> list[RunRecord]:
            return [_record(r) for r in conn.execute(sql, (*params, limit, offset))]

        return await self._read(fn)

    async def history(self, run_id: str) -> list[Event]:
        def fn(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                "SELECT seq, type, at, position, data, payload FROM storno_events "
                "WHERE run_id = ? ORDER BY seq",
                (run_id,),
            )
            return [
                Event(
                    seq=r["seq"],
                    type=EventType(r["type"]),
                    at=r["at"],
                    position=r["position"],
                    data=json.loads(r["data"]),
                    payload=r["payload"],
                )
                for r in rows
            ]

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
    ) -> int:
        rows = _event_rows(lease.run_id, events)
        sets = ["updated_at = ?", "lease_expires_at = ?", "state = COALESCE(?, state)"]
        params: list[Any] = [now, now + lease_seconds, state]
        notify: tuple[str, InboxMessage] | None = None
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
            if update.notify is not None and update.notify_run_id is not None:
                notify = (update.notify_run_id, update.notify)
        sql = (
            f"UPDATE storno_runs SET {', '.join(sets)} "
            "WHERE run_id = ? AND owner = ? AND epoch = ? RETURNING inbox_seq"
        )
        params += [lease.run_id, lease.owner, lease.epoch]

        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(sql, params).fetchone()
            if row is None:
                raise LeaseLostError(
                    f"run {lease.run_id} is no longer leased to worker {lease.owner} "
                    f"(epoch {lease.epoch}); another worker took it over, so this worker's "
                    f"writes for it are refused"
                )
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
            return [
                InboxMessage(
                    kind=MessageKind(r["kind"]),
                    name=r["name"],
                    payload=r["payload"],
                    message_id=r["message_id"],
                    meta=json.loads(r["meta"]),
                    seq=r["seq"],
                    sent_at=r["sent_at"],
                )
                for r in rows
            ]

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
                (status.value, now, 0.0 if claimable else None, run_id, *expected, now),
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
            return _record(row)

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
        capped = {n: c for n, c in (limits or {}).items() if sagas is None or n in sagas}
        free = [n for n in sagas if n not in capped] if sagas is not None else None
        common = (owner, now, lease_seconds, include_own, list(exclude))

        def op(conn: sqlite3.Connection) -> list[tuple[RunRecord, Lease]]:
            rows: list[sqlite3.Row] = []
            if free is None or free:
                rows += _claim_rows(conn, *common, limit, free, list(capped))
            for name, cap in sorted(capped.items()):
                room = min(cap - _executing(conn, name, now), limit - len(rows))
                if room > 0:
                    rows += _claim_rows(conn, *common, room, [name], [])
            records = sorted((_record(r) for r in rows), key=lambda r: (r.created_at, r.run_id))
            return [(r, Lease(r.run_id, owner, r.epoch)) for r in records]

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

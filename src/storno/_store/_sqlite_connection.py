"""The SQLite file: its URL, connections, migrations, and the one thread that writes to it.

Every step costs at least one durable write, so writes are the engine's speed limit. Writes
are committed in batches (group commit): whatever the runs of one event loop asked for while
it went round once is committed as one transaction, so 32 concurrent runs share one fsync
instead of paying 32. The batch is written on the loop's own thread when the file's write lock
is free at once: handing each write to another thread and back cost more than the commit. When
another connection holds the lock (a second process, a long migration), the batch goes to a
writer thread that waits for it, so the loop never blocks on a lock. A failed batch is redone
with each operation in a savepoint of its own, so one refused write does not undo the others.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from storno._errors import ConfigurationError, LeaseLostError, StoreError
from storno._store._migrations import SchemaStatus, available, redact, status_of, too_new

__all__ = [
    "Op",
    "Writer",
    "connect",
    "migrate",
    "need_folder",
    "parse_sqlite_url",
    "sqlite_error",
]

Op = Callable[[sqlite3.Connection], Any]
"""A write: runs on the writer's connection inside the batch's transaction."""

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
            f"SQLite URL {redact(url)!r} has a host part; write sqlite:///relative.db or "
            f"sqlite:////absolute/path.db"
        )
    raw = unquote(parts.path)
    path = raw[1:] if raw.startswith("/") else raw
    if not path or path == ":memory:":
        raise ConfigurationError(
            f"SQLite URL {redact(url)!r} names no file; storno needs a file so that runs survive "
            f"the process (an in-memory database would lose them)"
        )
    query = parse_qs(parts.query)
    unknown = set(query) - {"synchronous"}
    if unknown:
        raise ConfigurationError(
            f"unknown SQLite URL option(s) {sorted(unknown)} in {redact(url)!r}; known: synchronous"
        )
    synchronous = query.get("synchronous", ["full"])[-1].lower()
    if synchronous not in _SYNCHRONOUS:
        raise ConfigurationError(
            f"synchronous={synchronous!r} in {redact(url)!r}; use one of {sorted(_SYNCHRONOUS)}"
        )
    return Path(path), synchronous


def sqlite_error(
    exc: sqlite3.Error, path: Path, what: str, *, code: int | None = None
) -> StoreError:
    """A StoreError for a failed SQLite ``what`` ("write", "read", "open") that names the
    cause an operator can act on: a read-only file, a full disk, a corrupted file. ``code``
    stands in for the error's own SQLite code."""
    code = code or getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    where = repr(str(path))
    if primary == sqlite3.SQLITE_READONLY:
        message = (
            f"the SQLite database {where} is read-only ({exc}): storno needs to write to the "
            f"file and to its folder (for the -wal and -shm files); `storno list` and "
            f"`storno show` can still read it"
        )
    elif primary == sqlite3.SQLITE_FULL:
        message = (
            f"the disk holding the SQLite database {where} is full ({exc}); nothing of the "
            f"failed {what} was recorded: free space, and the runs resume from their histories"
        )
    elif primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        message = (
            f"the SQLite database {where} is corrupted or not a database ({exc}); stop the "
            f"workers and restore it from a backup (`sqlite3 FILE .recover` can save what is "
            f"still readable)"
        )
    elif primary == sqlite3.SQLITE_IOERR:
        message = f"the disk failed while SQLite {what} on {where} ran ({exc})"
    elif primary == sqlite3.SQLITE_CANTOPEN:
        message = f"cannot open the SQLite database {where} ({exc}); check the file's permissions"
    else:
        message = f"SQLite {what} on {where} failed: {exc}"
    error = StoreError(message)
    error.__cause__ = exc
    return error


def need_folder(path: Path) -> None:
    """Refuse a database file whose folder does not exist (SQLite would not create it)."""
    if path.parent and not path.parent.exists():
        raise ConfigurationError(
            f"cannot create the SQLite database {str(path)!r}: folder "
            f"{str(path.parent)!r} does not exist"
        )


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """A connection in WAL mode with the given synchronous level, rows readable by name."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database lacks, under a write lock; return the version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS storno_schema "
            "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM storno_schema").fetchone()[0]
        known = available("sqlite")
        latest = known[-1].version if known else 0
        if current > latest:
            raise too_new(current, latest)
        for migration in known:
            if migration.version > current:
                for statement in _split_sql(migration.sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO storno_schema (version, applied_at) VALUES (?, julianday('now'))",
                    (migration.version,),
                )
                current = migration.version
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


Item = tuple[Op, "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class Writer(threading.Thread):
    """Commits queued writes in batches: on the owning loop's thread when the file is free,
    else on this thread, which waits for the write lock."""

    def __init__(self, path: Path, synchronous: str) -> None:
        super().__init__(name="storno-sqlite-writer", daemon=True)
        self._path = path
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inline: sqlite3.Connection | None = None
        self._pending: list[Item] = []
        self.commits = 0  # transactions committed; each is one durable write
        self.operations = 0  # writes requested; several share a commit under load

    def bind(self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection) -> None:
        """Write batches of this loop's runs on its own thread, through ``conn``."""
        conn.execute("PRAGMA busy_timeout=0")  # a held lock sends the batch to the thread
        self._inline = conn
        self._loop = loop

    def submit(self, op: Op) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if loop is self._loop and self._inline is not None:
            if not self._pending:
                # Runs resumed in this pass of the loop queue their writes before the flush.
                loop.call_soon(self._flush)
            self._pending.append((op, future, loop))
        else:
            self._queue.put((op, future, loop))
        return future

    def stop(self) -> None:
        """Finish what is queued, then end the thread (call on the owning loop's thread)."""
        self._flush()
        inline, self._inline = self._inline, None
        if inline is not None:
            inline.close()
        self._queue.put(None)

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        conn = self._inline
        if not batch:
            return
        if conn is None:
            self._hand_over(batch)
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            # Another connection holds the write lock: wait for it on the writer thread.
            self._hand_over(batch)
            return
        try:
            ops = [op for op, _, _ in batch]
            outcomes = _apply(conn, ops, self._path, isolate=False, begun=True)
        except _Isolate:
            self._hand_over(batch)
            return
        self.commits += 1
        self.operations += len(batch)
        futures = [future for _, future, _ in batch]
        _settle(list(zip(futures, outcomes, strict=True)))

    def _hand_over(self, batch: list[Item]) -> None:
        for item in batch:
            self._queue.put(item)

    def run(self) -> None:
        conn = connect(self._path, self._synchronous)
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
                self._commit(conn, batch, self._path)
                self.commits += 1
                self.operations += len(batch)
        finally:
            conn.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, batch: list[Item], path: Path) -> None:
        ops = [op for op, _, _ in batch]
        try:
            outcomes = _apply(conn, ops, path, isolate=False)
        except _Isolate:
            outcomes = _apply(conn, ops, path, isolate=True)
        # One wake-up of each event loop per batch, not one per write.
        settled: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Outcome]]] = {}
        for (_, future, loop), outcome in zip(batch, outcomes, strict=True):
            settled.setdefault(loop, []).append((future, outcome))
        for loop, items in settled.items():
            loop.call_soon_threadsafe(_settle, items)


Outcome = tuple[bool, Any]


class _Isolate(Exception):
    """An operation failed after it may have written: redo the batch, each in a savepoint."""


def _apply(
    conn: sqlite3.Connection, ops: list[Op], path: Path, *, isolate: bool, begun: bool = False
) -> list[Outcome]:
    """Run the operations in one transaction; their outcomes in order.

    The fast path runs them side by side. A lost lease is refused before its operation
    writes anything, so it needs no undoing; any other failure may have left half a write,
    so the batch starts again with each operation in a savepoint of its own, and only the
    failed one is undone. SQLite errors come out as StoreErrors naming their cause.
    """
    outcomes: list[Outcome] = []
    try:
        if not begun:
            conn.execute("BEGIN IMMEDIATE")
        for op in ops:
            if isolate:
                conn.execute("SAVEPOINT op")
            try:
                outcomes.append((True, op(conn)))
            except LeaseLostError as exc:
                outcomes.append((False, exc))
            except Exception as exc:
                if isinstance(exc, sqlite3.Error) and not conn.in_transaction:
                    # SQLite rolled the whole transaction back itself (a full disk, an I/O
                    # error): every write of the batch failed, for that reason.
                    raise
                if not isolate:
                    conn.execute("ROLLBACK")
                    raise _Isolate from exc
                conn.execute("ROLLBACK TO op")
                failed = sqlite_error(exc, path, "write") if isinstance(exc, sqlite3.Error) else exc
                outcomes.append((False, failed))
            if isolate:
                conn.execute("RELEASE op")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        error = sqlite_error(exc, path, "write")
        outcomes = [(False, error)] * len(ops)
    return outcomes


def _settle(items: list[tuple[asyncio.Future[Any], Outcome]]) -> None:
    for future, (ok, value) in items:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def read_status(url: str) -> SchemaStatus:
    """The schema version of the SQLite file at ``url``, read-only; a damaged file raises."""
    path, _ = parse_sqlite_url(url)
    if not path.exists():
        return status_of("sqlite", url, [])
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            # A damaged file can still hold a readable version table: check the file first.
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                found = sqlite3.DatabaseError("; ".join(p.replace("\n", "; ") for p in problems))
                raise sqlite_error(found, path, "read", code=sqlite3.SQLITE_CORRUPT)
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'storno_schema'"
            ).fetchone()
            rows = (
                conn.execute("SELECT version, applied_at FROM storno_schema ORDER BY version")
                if has_table
                else []
            )
            # SQLite records julian days; report Unix seconds like PostgreSQL.
            applied = [
                (int(v), (float(at) - 2440587.5) * 86400.0 if at is not None else None)
                for v, at in rows
            ]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise sqlite_error(exc, path, "read") from exc
    return status_of("sqlite", url, applied)


def upgrade_file(url: str) -> None:
    """Apply the migrations the SQLite file at ``url`` lacks (creating it if need be)."""
    path, _ = parse_sqlite_url(url)
    need_folder(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            migrate(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise sqlite_error(exc, path, "migration") from exc

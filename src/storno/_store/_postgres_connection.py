"""Reaching PostgreSQL: the URL, a connection pool with retries, migrations, LISTEN/NOTIFY.

Connection loss: each operation is retried with backoff on ``psycopg.OperationalError`` (a
restart, a dropped network, a deadlock) a bounded number of times, then fails as
:class:`storno.StoreError`. The operations themselves (in :mod:`storno._store._postgres`) make
a repeated try safe.

Idle workers are woken across processes by LISTEN/NOTIFY: creating a run, delivering a
message, an operator making a run claimable, and a run suspending with a wake time all notify
the channel of the store's schema. A missed notification only costs a poll interval.

URL: ``postgresql://user:password@host:5432/dbname?schema=name&pool_size=10`` plus any libpq
option (``sslmode``, ``connect_timeout``, ``application_name`` ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import re
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from storno._errors import ConfigurationError, StoreError
from storno._store._migrations import SchemaStatus, available, redact, status_of, too_new
from storno._store._postgres_writer import BatchWriter

# This module imports without the driver (the CLI imports the store classes); a store made
# for a PostgreSQL URL refuses to start without it (see _need_driver).
try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from psycopg_pool import AsyncConnectionPool
except ImportError:  # pragma: no cover - exercised by a test that hides psycopg
    pass

if TYPE_CHECKING:
    from psycopg.rows import TupleRow

    Connection = psycopg.AsyncConnection[TupleRow]
    Pool = AsyncConnectionPool[Connection]

__all__ = ["PostgresConnection", "parse_postgres_url", "quote"]

log = logging.getLogger("storno.store.postgres")
T = TypeVar("T")

DEFAULT_POOL_SIZE = 10
_OWN_OPTIONS = ("schema", "pool_size")
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS storno_schema "
    "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
)


def _need_driver() -> None:
    """Refuse PostgreSQL, saying how to install the driver, when psycopg is missing."""
    # An import, not a flag set when this module loaded: the store module may be imported
    # again after the driver went away (a test hides it) while this one stays loaded.
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "PostgreSQL URLs need the psycopg 3 driver, which is not installed; install it "
            "with storno's postgres extra, e.g. pip install './storno[postgres]' from a checkout"
        ) from None


def parse_postgres_url(url: str) -> tuple[str, str, int]:
    """The libpq connection string, schema name and pool size of a PostgreSQL URL.

    storno's own query options (``schema``, ``pool_size``) are taken out; the others are
    passed to libpq, which refuses the ones it does not know.
    """
    _need_driver()
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"{redact(url)!r} is not a postgresql:// URL")
    schema, pool_size = "public", DEFAULT_POOL_SIZE
    rest: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "schema":
            if not _SCHEMA_NAME.fullmatch(value):
                raise ConfigurationError(
                    f"schema={value!r} in {redact(url)!r} is not a plain schema name; use "
                    f"lowercase letters, digits and underscores (at most 63, not starting with "
                    f"a digit)"
                )
            schema = value
        elif key == "pool_size":
            try:
                pool_size = int(value)
            except ValueError:
                pool_size = 0
            if pool_size < 1:
                raise ConfigurationError(
                    f"pool_size={value!r} in {redact(url)!r}; use a whole number of at least 1"
                )
        else:
            rest.append((key, value))
    if not any(key == "application_name" for key, _ in rest):
        rest.append(("application_name", "storno"))
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), ""))
    try:
        conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"bad PostgreSQL URL {redact(url)!r}: {str(exc).strip()}; storno's own options "
            f"are {', '.join(_OWN_OPTIONS)}, the others must be libpq connection parameters "
            f"(sslmode, connect_timeout, application_name, ...)"
        ) from exc
    return conninfo, schema, pool_size


def quote(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _lock_key(schema: str) -> int:
    """The advisory lock that serialises migrations of one schema."""
    return zlib.crc32(f"storno.migrate:{schema}".encode())


class PostgresConnection:
    """A PostgreSQL store's link to its server: pool, retries, migrations, notifications."""

    retry_attempts = 10
    """Tries of one operation on connection errors before it fails as StoreError."""
    retry_seconds = 20.0
    """... or once this much time has passed since its first try."""
    listen_check_seconds = 10.0
    """How often the LISTEN connection is checked while no notification arrives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conninfo, self.schema, self.pool_size = parse_postgres_url(url)
        self.channel = f"storno:{self.schema}"
        self.outbox_channel = f"storno_outbox:{self.schema}"
        self._pool: Pool | None = None
        self._writer: BatchWriter | None = None  # group commit, on a connection of its own
        self._callbacks: list[Callable[[], None]] = []
        self._outbox_callbacks: list[Callable[[], None]] = []
        self._listener: asyncio.Task[None] | None = None
        self._timers: list[float] = []  # wake times announced by other processes (a heap)
        self._timer: asyncio.TimerHandle | None = None
        self._notify_now = self._notify_sql("''")
        self._notify_outbox_sql = f"pg_notify('{self.outbox_channel}', '')"

    # --- connecting and migrating ------------------------------------------------------

    async def _connect(self) -> Connection:
        conn: Connection = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)
        return conn

    async def _retrying(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` again on connection errors, with backoff, within the retry budget."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return await fn()
            except (psycopg.OperationalError, OSError) as exc:
                attempt += 1
                spent = time.monotonic() - started
                if attempt >= self.retry_attempts or spent >= self.retry_seconds:
                    raise StoreError(
                        f"PostgreSQL {what} failed {attempt} times in {spent:.1f}s "
                        f"({redact(self.url)}): {str(exc).strip()}"
                    ) from exc
                delay = min(0.05 * 2 ** (attempt - 1), 2.0) * random.uniform(0.8, 1.2)
                log.warning("PostgreSQL %s failed, retrying in %.2fs: %s", what, delay, exc)
                await asyncio.sleep(delay)
            except psycopg.Error as exc:
                raise StoreError(f"PostgreSQL {what} failed: {str(exc).strip()}") from exc

    async def _migrate_on(self, conn: Connection) -> int:
        """Apply the missing migrations under the schema's advisory lock; return the version."""
        known = available("postgres")
        latest = known[-1].version if known else 0
        q = quote(self.schema)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(self.schema),))
            cur = await conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)
            )
            if await cur.fetchone() is None:
                await conn.execute(f"CREATE SCHEMA {q}")
            await conn.execute(f"SET LOCAL search_path TO {q}")
            await conn.execute(_VERSION_TABLE)
            cur = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM storno_schema")
            row = await cur.fetchone()
            current = int(row[0]) if row else 0
            if current > latest:
                raise too_new(current, latest)
            for migration in known:
                if migration.version > current:
                    await conn.execute(migration.sql)  # no parameters: may hold many statements
                    await conn.execute(
                        "INSERT INTO storno_schema (version, applied_at) "
                        "VALUES (%s, extract(epoch FROM clock_timestamp()))",
                        (migration.version,),
                    )
                    log.info("schema %s migrated to version %s", self.schema, migration.name)
                    current = migration.version
        return current

    async def migrate(self) -> int:
        """Bring the schema up to date without opening the store; return the version."""
        _need_driver()

        async def once() -> int:
            async with await self._connect() as conn:
                return await self._migrate_on(conn)

        return await self._retrying("migration", once)

    async def exists(self) -> bool:
        """Whether the URL's schema exists; changes nothing."""
        _need_driver()

        async def once() -> bool:
            async with await self._connect() as conn:
                cur = await conn.execute(
                    "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)
                )
                return await cur.fetchone() is not None

        return await self._retrying("status", once)

    async def schema_status(self) -> SchemaStatus:
        """The schema's migration state; changes nothing."""
        _need_driver()

        async def once() -> SchemaStatus:
            async with await self._connect() as conn:
                cur = await conn.execute(
                    "SELECT to_regclass(%s)", (f"{quote(self.schema)}.storno_schema",)
                )
                row = await cur.fetchone()
                applied: list[tuple[int, float | None]] = []
                if row is not None and row[0] is not None:
                    cur = await conn.execute(
                        f"SELECT version, applied_at FROM {quote(self.schema)}.storno_schema "
                        "ORDER BY version"
                    )
                    applied = [(int(v), at) for v, at in await cur.fetchall()]
            return status_of("postgres", redact(self.url), applied)

        return await self._retrying("status", once)

    async def open(self) -> None:
        if self._pool is not None:
            return
        await self.migrate()
        pool: Pool = AsyncConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True},
            open=False,
            timeout=10.0,
            name=f"storno-{self.schema}",
        )
        try:
            await pool.open(wait=True, timeout=30.0)
        except psycopg.Error as exc:
            await pool.close()
            raise StoreError(
                f"cannot connect to PostgreSQL at {redact(self.url)}: {str(exc).strip()}"
            ) from exc
        self._pool = pool
        self._writer = BatchWriter(self._connect)
        if self._callbacks or self._outbox_callbacks:
            self._start_listener()

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timers = []
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _op(self, what: str, fn: Callable[[Connection, int], Awaitable[T]]) -> T:
        """Run ``fn(conn, attempt)`` on a pooled connection, retried on connection errors;
        ``attempt`` > 0 tells it an earlier try may have committed."""
        pool = self._pool
        if pool is None:
            raise StoreError("the store is not open; use `async with Storno(...)` or open()")
        attempt = -1

        async def once() -> T:
            nonlocal attempt
            attempt += 1
            try:
                async with pool.connection() as conn:
                    return await fn(conn, attempt)
            except (psycopg.OperationalError, OSError):
                # What dropped this connection (a restart, killed backends) may have dropped
                # the idle ones too: discard those now rather than spend a try on each.
                with contextlib.suppress(Exception):
                    await pool.check()
                raise

        return await self._retrying(what, once)

    # --- notifications -----------------------------------------------------------------

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` in the event loop whenever another process may have made work
        available (a new run, a message, a run made claimable, a wake time that came)."""
        if callback not in self._callbacks:
            self._callbacks.append(callback)
        if self._pool is not None:
            self._start_listener()

    def subscribe_outbox(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` in the event loop whenever outbox rows may have been added."""
        if callback not in self._outbox_callbacks:
            self._outbox_callbacks.append(callback)
        if self._pool is not None:
            self._start_listener()

    def _fire_outbox(self) -> None:
        for callback in list(self._outbox_callbacks):
            try:
                callback()
            except Exception:
                log.exception("an outbox subscriber failed")

    def _start_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name=f"storno-listen-{self.schema}"
            )

    def _fire(self) -> None:
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("a store subscriber failed")

    def _notified(self, payload: str) -> None:
        """A notification: work now (empty payload) or at a wake time (the payload)."""
        try:
            at = float(payload) if payload else 0.0
        except ValueError:
            at = 0.0
        if at <= time.time():
            self._fire()
            return
        if len(self._timers) < 10_000:  # beyond that, polling finds the rest
            heapq.heappush(self._timers, at)
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timers:
            delay = max(self._timers[0] - time.time(), 0.0)
            self._timer = asyncio.get_running_loop().call_later(delay, self._timer_due)

    def _timer_due(self) -> None:
        self._timer = None
        now = time.time()
        fired = False
        while self._timers and self._timers[0] <= now + 0.001:
            heapq.heappop(self._timers)
            fired = True
        if fired:
            self._fire()
        self._arm_timer()

    async def _listen(self) -> None:
        """Hold a LISTEN connection; reconnect with backoff when it drops."""
        delay = 0.1
        first = True
        while True:
            try:
                async with await self._connect() as conn:
                    await conn.execute(
                        f"LISTEN {quote(self.channel)}; LISTEN {quote(self.outbox_channel)}"
                    )
                    if not first:
                        self._fire()  # notifications sent while disconnected are lost
                        self._fire_outbox()
                    first = False
                    delay = 0.1
                    while True:
                        async for notify in conn.notifies(timeout=self.listen_check_seconds):
                            if notify.channel == self.outbox_channel:
                                self._fire_outbox()
                            else:
                                self._notified(notify.payload)
                        await asyncio.wait_for(conn.execute("SELECT 1"), 10.0)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("LISTEN connection lost, reconnecting in %.1fs: %s", delay, exc)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, 5.0)

    def _notify_sql(self, payload_sql: str) -> str:
        return f"pg_notify('{self.channel}', {payload_sql})"

"""The shared store: PostgreSQL through psycopg 3 (async) and a connection pool.

Many worker processes on many hosts share one database. They claim runs with ``FOR UPDATE
SKIP LOCKED`` (two claimers never lock the same row, so never get the same run), and every
write for a run is fenced by the (owner, epoch) of its lease exactly as on SQLite: a worker
whose lease was taken over has its writes refused. Hot operations (claim, create, write,
renew) are one SQL statement each, hence one round trip and one transaction; the rarer ones
(inbox deliveries, operator changes) are short explicit transactions.

Connections, retries, migrations and notifications are in
:mod:`storno._store._postgres_connection`. An operation retried after a connection error may
repeat one whose commit happened before the connection dropped; that is safe: a repeated run
creation is recognised by its creation time, and a repeated history write by the events it
finds already recorded under the same lease.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from storno._errors import LeaseLostError, StoreError
from storno._model import Event, EventType, InboxMessage, Lease, RunRecord, RunStatus
from storno._store._base import (
    EXPIRED,
    Delivery,
    NewRun,
    RunExistsError,
    RunUpdate,
    Store,
    lease_lost,
)
from storno._store._claims import ClaimPlan, ClaimRequest
from storno._store._migrations import redact
from storno._store._outbox import emitted_entries
from storno._store._postgres_connection import PostgresConnection, parse_postgres_url, quote
from storno._store._postgres_inbox import deliver_in
from storno._store._postgres_outbox import PostgresOutbox, insert_entries
from storno._store._postgres_params import events_json, run_params, same_event
from storno._store._postgres_sql import Statements
from storno._store._postgres_writer import Redo, Unknown
from storno._store._rows import (
    event_from_row,
    leased_runs,
    message_from_row,
    run_filters,
    run_from_row,
)

# Importable without the driver, like the connection module; the store refuses to start then.
try:
    import psycopg
    import psycopg.errors
    from psycopg.rows import dict_row
except ImportError:  # pragma: no cover - exercised by a test that hides psycopg
    pass

if TYPE_CHECKING:
    from storno._store._postgres_connection import Connection

__all__ = ["PostgresStore", "parse_postgres_url"]

log = logging.getLogger("storno.store.postgres")


def _limit_key(schema: str, saga: str) -> int:
    """The advisory lock under which claimers count and claim a capped saga's runs."""
    return zlib.crc32(f"storno.limit:{schema}:{saga}".encode())


class _Fenced(Exception):
    """The write's lease is not the run's current one (raised inside, to roll back)."""


class PostgresStore(PostgresConnection, Store):
    """Runs and histories in a PostgreSQL schema, shared by any number of workers."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._sql = Statements(quote(self.schema), self._notify_sql)
        self._runs, self._events, self._inbox = self._sql.runs, self._sql.events, self._sql.inbox
        self._uncertain: set[tuple[str, int]] = set()  # leases whose last write may have landed
        self.outbox: PostgresOutbox = PostgresOutbox(
            self._op,
            self.schema,
            f"{quote(self.schema)}.storno_outbox",
            self._notify_outbox_sql,
            self.subscribe_outbox,
        )

    def __repr__(self) -> str:
        return f"<PostgresStore {redact(self.url)}>"

    # --- creating and reading runs -----------------------------------------------------

    async def create_run(
        self, run: NewRun, *, claim_for: str | None, lease_seconds: float
    ) -> tuple[RunRecord, bool]:
        async def op(conn: Connection, attempt: int) -> tuple[RunRecord, bool]:
            return await self._insert_run(conn, run, claim_for, lease_seconds, attempt)

        return await self._op("create_run", op)

    async def _insert_run(
        self,
        conn: Connection,
        run: NewRun,
        claim_for: str | None,
        lease_seconds: float,
        attempt: int,
    ) -> tuple[RunRecord, bool]:
        """Insert a run with its first event; the existing run (and ``False``) if the id is
        taken, unless an earlier try of this very insert committed (then ``True``)."""
        claimed = claim_for is not None
        sql = self._sql.insert_run(claimed)
        params = run_params(run, claim_for, lease_seconds)
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql, params)
        row = await cur.fetchone()
        if row is not None:
            return run_from_row(row), True
        # It exists (perhaps inserted by a concurrent start, committed since).
        await cur.execute(f"SELECT * FROM {self._runs} WHERE run_id = %s", (run.run_id,))
        row = await cur.fetchone()
        if row is None:
            raise StoreError(f"run {run.run_id} was neither created nor found")
        record = run_from_row(row)
        # An earlier try of this very call may have committed before its answer was
        # lost: the same creation time, saga, input and claim mean it is ours.
        ours = (
            attempt > 0
            and record.created_at == run.created_at
            and record.saga == run.saga
            and record.input == run.input
            and record.owner == claim_for
            and (not claimed or record.epoch == 1)
        )
        return record, ours

    async def get_run(self, run_id: str) -> RunRecord | None:
        async def op(conn: Connection, attempt: int) -> RunRecord | None:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"SELECT * FROM {self._runs} WHERE run_id = %s", (run_id,))
            row = await cur.fetchone()
            return run_from_row(row) if row else None

        return await self._op("get_run", op)

    async def list_runs(
        self,
        *,
        status: RunStatus | Sequence[RunStatus] | None = None,
        saga: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[RunRecord]:
        where, params = run_filters(status, saga, "%s")
        sql = (
            f"SELECT * FROM {self._runs} {where} "
            "ORDER BY created_at DESC, run_id LIMIT %s OFFSET %s"
        )

        async def op(conn: Connection, attempt: int) -> list[RunRecord]:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, (*params, limit, offset))
            return [run_from_row(r) for r in await cur.fetchall()]

        return await self._op("list_runs", op)

    async def count_runs(
        self, *, status: RunStatus | Sequence[RunStatus] | None = None, saga: str | None = None
    ) -> int:
        where, params = run_filters(status, saga, "%s")
        sql = f"SELECT COUNT(*) FROM {self._runs} {where}"

        async def op(conn: Connection, attempt: int) -> int:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        return await self._op("count_runs", op)

    async def correlated(self, correlation_id: str, *, limit: int = 500) -> list[RunRecord]:
        sql = (
            f"SELECT * FROM {self._runs} WHERE correlation_id = %s OR run_id = %s"
            " ORDER BY created_at, run_id LIMIT %s"
        )

        async def op(conn: Connection, attempt: int) -> list[RunRecord]:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, (correlation_id, correlation_id, limit))
            return [run_from_row(r) for r in await cur.fetchall()]

        return await self._op("correlated", op)

    async def histories(self, run_ids: Sequence[str]) -> dict[str, list[Event]]:
        ids = list(dict.fromkeys(run_ids))

        async def op(conn: Connection, attempt: int) -> dict[str, list[Event]]:
            found: dict[str, list[Event]] = {run_id: [] for run_id in ids}
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT run_id, seq, type, at, position, data, payload FROM {self._events} "
                "WHERE run_id = ANY(%s) ORDER BY run_id, seq",
                (ids,),
            )
            for row in await cur.fetchall():
                found[row["run_id"]].append(event_from_row(row))
            return found

        return await self._op("history", op)

    # --- writing under a lease ---------------------------------------------------------

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
        if not touch and update is None and state is None:
            sql = self._sql.append(bool(events))
        else:
            sql = self._sql.write(update, bool(events))
        params: dict[str, Any] = {
            "now": now,
            "expires": now + lease_seconds,
            "state": state,
            "run_id": lease.run_id,
            "owner": lease.owner,
            "epoch": lease.epoch,
            "events": events_json(events),
        }
        notify: tuple[str, InboxMessage] | None = None
        if update is not None:
            if update.release:
                params["expires"] = None
            params.update(
                status=update.status.value,
                result=update.result,
                error=json.dumps(update.error) if update.error is not None else None,
                release=update.release,
                seen=update.seen_inbox,
                wake_at=update.wake_at,
            )
            if update.notify is not None and update.notify_run_id is not None:
                notify = (update.notify_run_id, update.notify)
        key = (lease.run_id, lease.epoch)
        emitted = emitted_entries(lease.run_id, events)
        writer = self._writer
        if writer is not None and notify is None and not emitted and key not in self._uncertain:
            # It joins the other runs' writes in the next group commit. A run started here is
            # inserted first, in the same transaction; if its id is taken, the batch fails and
            # this write is redone alone, which tells the cases apart.
            statements = [(sql, params)]
            if create is not None:
                created = run_params(create, lease.owner, lease_seconds)
                statements.insert(0, (self._sql.create_run(), created))
            try:
                got = await writer.write(lease.run_id, statements)
            except Redo:
                pass  # rolled back with its batch: write it alone below
            except Unknown:
                self._uncertain.add(key)  # its batch may have committed: settled below
            else:
                if got is None:
                    raise lease_lost(lease)
                return got

        async def op(conn: Connection, attempt: int) -> int:
            uncertain = attempt > 0 or key in self._uncertain
            try:
                if notify is None and create is None and not emitted:
                    cur = await conn.execute(sql, params)
                    row = await cur.fetchone()
                    if row is None:
                        raise _Fenced
                    return int(row[0])
                async with conn.transaction():
                    if create is not None:
                        # A run started here is inserted with its first write. If an earlier
                        # try may have committed, its events tell (the run's row may have
                        # changed since: a write that waits releases the lease).
                        if uncertain:
                            landed = await self._landed(conn, lease.run_id, events)
                            if landed is not None:
                                return landed
                        tries = max(attempt, int(uncertain))
                        insert = self._insert_run(conn, create, lease.owner, lease_seconds, tries)
                        if not (await insert)[1]:
                            raise RunExistsError(create.run_id)
                    cur = await conn.execute(sql, params)
                    row = await cur.fetchone()
                    if row is None:
                        raise _Fenced
                    if emitted:
                        outbox = self.outbox
                        await insert_entries(conn, outbox.sql, outbox.notify, emitted)
                    if notify is not None:
                        run_id, message = notify
                        await deliver_in(
                            conn,
                            self._sql,
                            self._notify_now,
                            run_id,
                            message,
                            now,
                            uncertain=uncertain,
                        )
                    return int(row[0])
            except (_Fenced, psycopg.errors.UniqueViolation) as exc:
                # Refused, or its events are there already: if an earlier try whose answer
                # was lost committed this very write, it is done.
                landed = await self._landed(conn, lease.run_id, events) if uncertain else None
                if landed is not None:
                    return landed
                if isinstance(exc, _Fenced):
                    raise lease_lost(lease) from None
                raise

        try:
            result = await self._op("write", op)
        except LeaseLostError:
            self._uncertain.discard(key)
            raise
        except StoreError as exc:
            if isinstance(exc.__cause__, (psycopg.OperationalError, OSError)):
                if len(self._uncertain) > 10_000:  # runs whose execution gave up long ago
                    self._uncertain.clear()
                self._uncertain.add(key)  # the next try must check whether this one landed
            raise
        self._uncertain.discard(key)
        if emitted:
            self._fire_outbox()
        return result

    async def _landed(self, conn: Connection, run_id: str, events: Sequence[Event]) -> int | None:
        """The run's inbox number if ``events`` are recorded already, else ``None``."""
        if not events:
            return None
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            f"SELECT r.inbox_seq, e.type, e.at, e.position, e.data FROM {self._runs} r "
            f"LEFT JOIN {self._events} e ON e.run_id = r.run_id AND e.seq = %s "
            "WHERE r.run_id = %s",
            (events[0].seq, run_id),
        )
        row = await cur.fetchone()
        if row is None or not same_event(row, events[0]):
            return None
        log.info("run %s: a write whose answer was lost had committed", run_id)
        return int(row["inbox_seq"])

    # --- the inbox ---------------------------------------------------------------------

    async def deliver(self, run_id: str, message: InboxMessage, *, now: float) -> Delivery | None:
        async def op(conn: Connection, attempt: int) -> Delivery | None:
            async with conn.transaction():
                return await deliver_in(
                    conn, self._sql, self._notify_now, run_id, message, now, uncertain=attempt > 0
                )

        return await self._op("deliver", op)

    async def inbox(self, run_id: str, *, after: int = 0) -> list[InboxMessage]:
        async def op(conn: Connection, attempt: int) -> list[InboxMessage]:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT * FROM {self._inbox} WHERE run_id = %s AND seq > %s ORDER BY seq",
                (run_id, after),
            )
            return [message_from_row(r) for r in await cur.fetchall()]

        return await self._op("inbox", op)

    # --- operators ---------------------------------------------------------------------

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
        data_text = json.dumps(data)

        async def op(conn: Connection, attempt: int) -> RunRecord | None:
            cur = conn.cursor(row_factory=dict_row)
            async with conn.transaction():
                await cur.execute(
                    f"UPDATE {self._runs} SET status = %s, updated_at = %s, owner = NULL, "
                    "lease_expires_at = %s, wake_at = NULL, error = COALESCE(%s, error), "
                    "deadline = CASE WHEN %s THEN NULL ELSE deadline END "
                    "WHERE run_id = %s AND status = ANY(%s::text[]) "
                    "AND (owner IS NULL OR lease_expires_at < %s) RETURNING *",
                    (
                        status.value,
                        now,
                        EXPIRED if claimable else None,
                        None if error is None else json.dumps(error),
                        lift_deadline,
                        run_id,
                        [s.value for s in expected],
                        now,
                    ),
                )
                row = await cur.fetchone()
                if row is None:
                    if attempt == 0:
                        return None
                    return await self._operated(conn, run_id, event_type, now, data)
                # A statement of its own: it sees every event committed before the lock.
                await cur.execute(
                    f"INSERT INTO {self._events} (run_id, seq, type, at, position, data) "
                    "SELECT %s, COALESCE(MAX(seq), -1) + 1, %s, %s, NULL, %s "
                    f"FROM {self._events} WHERE run_id = %s",
                    (run_id, event_type.value, now, data_text, run_id),
                )
                if claimable:
                    await conn.execute(f"SELECT {self._notify_now}")
                return run_from_row(row)

        return await self._op("operate", op)

    async def _operated(
        self,
        conn: Connection,
        run_id: str,
        event_type: EventType,
        now: float,
        data: dict[str, Any],
    ) -> RunRecord | None:
        """The run, if an earlier try of this operator change committed (its event is last)."""
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            f"SELECT type, at, position, data FROM {self._events} WHERE run_id = %s "
            "ORDER BY seq DESC LIMIT 1",
            (run_id,),
        )
        last = await cur.fetchone()
        if last is None or not same_event(last, Event(0, event_type, now, None, data)):
            return None
        await cur.execute(f"SELECT * FROM {self._runs} WHERE run_id = %s", (run_id,))
        row = await cur.fetchone()
        return run_from_row(row) if row else None

    # --- work distribution -------------------------------------------------------------

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

        async def op(conn: Connection, attempt: int) -> list[tuple[RunRecord, Lease]]:
            cur = conn.cursor(row_factory=dict_row)
            rows: list[dict[str, Any]] = []
            async with conn.transaction():
                # Plain index scans, not bitmap ones: a plain scan marks the index entries of
                # dead row versions (a parked run leaves some behind in each status index) as
                # dead once it has seen them, so the next claim skips them; a bitmap scan
                # never does, and walked every one of them, each claim, until vacuum ran.
                await cur.execute("SET LOCAL enable_bitmapscan = off")
                batch = plan.free_batch()
                if batch is not None:
                    await cur.execute(self._sql.claim(request.shape(batch)), request.params(batch))
                    rows += await cur.fetchall()
                for saga, cap in plan.capped:
                    # One claimer at a time counts and claims a capped saga's runs, across
                    # every worker; the lock ends with the transaction.
                    await cur.execute(
                        "SELECT pg_advisory_xact_lock(%s)", (_limit_key(self.schema, saga),)
                    )
                    await cur.execute(self._sql.executing(), {"saga": saga, "now": now})
                    counted = await cur.fetchone()
                    executing = int(counted["n"]) if counted else 0
                    batch = plan.capped_batch(saga, cap, executing, len(rows))
                    if batch is not None:
                        await cur.execute(
                            self._sql.claim(request.shape(batch)), request.params(batch)
                        )
                        rows += await cur.fetchall()
            return leased_runs(rows, owner)

        return await self._op("claim", op)

    async def renew(
        self, owner: str, run_ids: Sequence[str], *, now: float, lease_seconds: float
    ) -> set[str]:
        ids = list(run_ids)
        if not ids:
            return set()

        sql = (
            f"UPDATE {self._runs} SET lease_expires_at = %s "
            "WHERE owner = %s AND run_id = ANY(%s::text[]) RETURNING run_id"
        )

        async def op(conn: Connection, attempt: int) -> set[str]:
            cur = await conn.execute(sql, (now + lease_seconds, owner, ids))
            kept = {r[0] for r in await cur.fetchall()}
            return set(ids) - kept

        return await self._op("renew", op)

    async def release(self, owner: str, run_ids: Sequence[str]) -> None:
        ids = list(run_ids)
        if not ids:
            return
        # Others may take the runs now: wake idle workers elsewhere.
        sql = (
            f"WITH r AS (UPDATE {self._runs} SET lease_expires_at = {EXPIRED} "
            "WHERE owner = %s AND run_id = ANY(%s::text[]) RETURNING run_id) "
            f"SELECT {self._notify_now} WHERE EXISTS (SELECT 1 FROM r)"
        )

        async def op(conn: Connection, attempt: int) -> None:
            await conn.execute(sql, (owner, ids))

        await self._op("release", op)

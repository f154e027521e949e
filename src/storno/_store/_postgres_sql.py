"""The SQL text the PostgreSQL store sends, built once per shape of statement.

Each write is one statement (CTEs append the events and change the run's row together), so
a step costs one round trip. Table names carry the store's schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storno._model import RunStatus
from storno._store._base import RunUpdate

__all__ = ["Statements"]


class Statements:
    """The statements of one store (one schema)."""

    def __init__(self, schema: str, notify: Callable[[str], str]) -> None:
        self.runs = f"{schema}.storno_runs"
        self.events = f"{schema}.storno_events"
        self.inbox = f"{schema}.storno_inbox"
        self._notify = notify  # SQL that sends a NOTIFY on the store's channel
        self._cache: dict[tuple[Any, ...], str] = {}

    def insert_run(self, claimed: bool) -> str:
        """Insert a run and its first event unless the id is taken; the row if inserted."""
        key = ("insert_run", claimed)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # A run claimed by its creator is executed at once; only others need waking.
        notify = "" if claimed else f", {self._notify('%(wake)s')} AS notified"
        sql = (
            f"WITH ins AS (INSERT INTO {self.runs} (run_id, saga, status, input, created_at,"
            " updated_at, deadline, owner, lease_expires_at, epoch, wake_at, parent_run_id)"
            " VALUES (%(run_id)s, %(saga)s, %(status)s, %(input)s, %(created_at)s,"
            " %(created_at)s, %(deadline)s, %(owner)s, %(expires)s, %(epoch)s, %(wake_at)s,"
            " %(parent)s) ON CONFLICT (run_id) DO NOTHING RETURNING *),"
            f" ev AS (INSERT INTO {self.events} (run_id, seq, type, at, position, data, payload)"
            " SELECT run_id, %(seq)s, %(type)s, %(at)s, %(position)s, %(data)s, %(payload)s"
            f" FROM ins) SELECT ins.*{notify} FROM ins"
        )
        self._cache[key] = sql
        return sql

    def _insert_events(self) -> str:
        """The CTE that appends ``%(events)s`` if the ``upd`` CTE found the run leased."""
        return (
            f", ev AS (INSERT INTO {self.events} "
            "(run_id, seq, type, at, position, data, payload) "
            "SELECT %(run_id)s, e.s, e.t, e.a, e.p, e.d, e.y "
            "FROM json_to_recordset(%(events)s::json) AS e(s integer, t text, "
            "a double precision, p integer, d text, y text) "
            "WHERE EXISTS (SELECT 1 FROM upd))"
        )

    def write(self, update: RunUpdate | None, with_events: bool) -> str:
        """Append events and change the run's row, fenced by its lease."""
        has_update = update is not None
        waits = update is not None and update.release and update.status is RunStatus.WAITING
        key = ("write", has_update, waits, with_events)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        sets = [
            "updated_at = %(now)s",
            "lease_expires_at = %(expires)s",
            "state = COALESCE(%(state)s, state)",
        ]
        if has_update:
            sets += [
                "status = %(status)s",
                "result = COALESCE(%(result)s, result)",
                "error = COALESCE(%(error)s, error)",
                "owner = CASE WHEN %(release)s THEN NULL ELSE owner END",
                # A message that arrived while the run decided to wait wakes it at once.
                "wake_at = CASE WHEN %(seen)s::integer IS NOT NULL AND inbox_seq > %(seen)s"
                " THEN %(now)s ELSE %(wake_at)s::double precision END",
            ]
        sql = (
            f"WITH upd AS (UPDATE {self.runs} SET {', '.join(sets)} "
            "WHERE run_id = %(run_id)s AND owner = %(owner)s AND epoch = %(epoch)s "
            "RETURNING inbox_seq, wake_at)"
        )
        if with_events:
            sql += self._insert_events()
        sql += " SELECT inbox_seq"
        if waits:
            # Suspended with a wake time: tell idle workers elsewhere when it is due.
            sql += f", CASE WHEN wake_at IS NOT NULL THEN {self._notify('wake_at::text')} END"
        sql += " FROM upd"
        self._cache[key] = sql
        return sql

    def append(self, with_events: bool) -> str:
        """Append events under the lease without changing the run's row."""
        key = ("append", with_events)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # FOR SHARE holds off a claim (FOR UPDATE SKIP LOCKED) until this commits, so the
        # fence holds as an UPDATE's would, without writing a new version of the row.
        sql = (
            f"WITH upd AS (SELECT inbox_seq FROM {self.runs} "
            "WHERE run_id = %(run_id)s AND owner = %(owner)s AND epoch = %(epoch)s FOR SHARE)"
        )
        if with_events:
            sql += self._insert_events()
        sql += " SELECT inbox_seq FROM upd"
        self._cache[key] = sql
        return sql

    def claim(self, sagas: list[str] | None, not_sagas: list[str], skip: bool, own: bool) -> str:
        """Lease up to %(limit)s due runs of ``sagas`` (any, if ``None``) but ``not_sagas``;
        with ``own``, the runs %(owner)s holds too (a worker restarted under its id)."""
        only = " AND saga = ANY(%(sagas)s::text[])" if sagas is not None else ""
        if not_sagas:
            only += " AND NOT (saga = ANY(%(not_sagas)s::text[]))"
        if skip:
            only += " AND NOT (run_id = ANY(%(skip)s::text[]))"
        # Each kind of due run is read through its own status index, oldest first, so a
        # claim touches due runs only, never the finished ones beside them. SKIP LOCKED: rows
        # another claimer has locked are passed over, not waited for, so concurrent claimers
        # split the due runs between them and never share one.
        lock = "LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
        # A range on the lease expiry keeps the scan off the index entries of the superseded
        # "running" versions of runs that went on to wait or end (until vacuum removes them,
        # a parked run leaves one behind): their leases had not expired when they changed.
        expired = "lease_expires_at < %(now)s"
        if own:
            expired = f"({expired} OR owner = %(owner)s)"
        return (
            f"WITH pending AS (SELECT run_id, created_at FROM {self.runs} "
            f"WHERE status = 'pending' AND (wake_at IS NULL OR wake_at <= %(now)s){only} "
            f"ORDER BY created_at {lock}), "
            f"woken AS (SELECT run_id, created_at FROM {self.runs} "
            f"WHERE status = 'waiting' AND wake_at <= %(now)s{only} ORDER BY wake_at {lock}), "
            f"expired AS (SELECT run_id, created_at FROM {self.runs} "
            "WHERE status IN ('running', 'compensating') "
            f"AND {expired}{only} {lock}), "
            "due AS (SELECT run_id FROM (SELECT * FROM pending UNION ALL SELECT * FROM woken "
            "UNION ALL SELECT * FROM expired) AS d ORDER BY created_at LIMIT %(limit)s) "
            f"UPDATE {self.runs} AS r SET owner = %(owner)s, epoch = r.epoch + 1, "
            "lease_expires_at = %(expires)s, updated_at = %(now)s, wake_at = NULL, "
            "status = CASE WHEN r.status IN ('pending', 'waiting') THEN 'running' "
            "ELSE r.status END "
            "FROM due WHERE r.run_id = due.run_id RETURNING r.*"
        )

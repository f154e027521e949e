"""The SQL text the PostgreSQL store sends, built once per shape of statement.

Each write is one statement (CTEs append the events and change the run's row together), so
a step costs one round trip. Table names carry the store's schema.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storno._model import RunStatus
from storno._store._base import RunUpdate
from storno._store._claims import EXECUTING, Shape, branches, take_over, where

__all__ = ["Statements"]


class _Dialect:
    """PostgreSQL's placeholders for the claim plan: named, a list as one array."""

    def mark(self, name: str) -> str:
        return f"%({name})s"

    def among(self, column: str, name: str, count: int, *, negate: bool) -> str:
        term = f"{column} = ANY(%({name})s::text[])"
        return f"NOT ({term})" if negate else term


_DIALECT = _Dialect()

# A new run's row and its first event, as both statements that create a run insert them.
_RUN_VALUES = (
    "(run_id, saga, status, input, created_at, updated_at, deadline, owner, lease_expires_at,"
    " epoch, wake_at, parent_run_id, correlation_id) VALUES (%(run_id)s, %(saga)s, %(status)s,"
    " %(input)s, %(created_at)s, %(created_at)s, %(deadline)s, %(owner)s, %(expires)s,"
    " %(epoch)s, %(wake_at)s, %(parent)s, %(correlation)s)"
)
_FIRST_EVENT = (
    "(run_id, seq, type, at, position, data, payload)"
    " SELECT run_id, %(seq)s, %(type)s, %(at)s, %(position)s, %(data)s, %(payload)s"
)


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
            f"WITH ins AS (INSERT INTO {self.runs} {_RUN_VALUES}"
            " ON CONFLICT (run_id) DO NOTHING RETURNING *),"
            f" ev AS (INSERT INTO {self.events} {_FIRST_EVENT}"
            f" FROM ins) SELECT ins.*{notify} FROM ins"
        )
        self._cache[key] = sql
        return sql

    def create_run(self) -> str:
        """Insert a claimed run and its first event; fails if the id is taken (for the group
        commit: the batch is then redone with each write alone, see :meth:`insert_run`)."""
        key = ("create_run",)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        sql = (
            f"WITH ins AS (INSERT INTO {self.runs} {_RUN_VALUES} RETURNING run_id)"
            f" INSERT INTO {self.events} {_FIRST_EVENT}"
            " FROM ins"
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

    def claim(self, shape: Shape) -> str:
        """Lease one batch's runs (see :mod:`storno._store._claims`), for batches of this shape."""
        key = ("claim", shape)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # SKIP LOCKED: rows another claimer has locked are passed over, not waited for, so
        # concurrent claimers split the due runs between them and never share one. Without
        # include_own, the range on the lease expiry also keeps the scan off the index entries
        # of the superseded "running" versions of runs that went on to wait or end (until
        # vacuum removes them, a parked run leaves one behind): their leases had not expired
        # when they changed.
        lock = "LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
        kinds = branches(shape.include_own)
        picks = []
        for branch in kinds:
            order = f" ORDER BY {branch.order}" if branch.order else ""
            picks.append(
                f"{branch.name} AS (SELECT run_id, created_at FROM {self.runs} "
                f"WHERE {where(branch, shape, _DIALECT)}{order} {lock})"
            )
        union = " UNION ALL ".join(f"SELECT * FROM {branch.name}" for branch in kinds)
        sql = (
            f"WITH {', '.join(picks)}, "
            f"due AS (SELECT run_id FROM ({union}) AS d ORDER BY created_at LIMIT %(limit)s) "
            f"UPDATE {self.runs} AS r SET {take_over(_DIALECT)} "
            "FROM due WHERE r.run_id = due.run_id RETURNING r.*"
        )
        self._cache[key] = sql
        return sql

    def executing(self) -> str:
        """How many runs of saga %(saga)s a live worker holds (against the saga's limit)."""
        return (
            f"SELECT COUNT(*) AS n FROM {self.runs} WHERE saga = %(saga)s AND "
            f"{EXECUTING.format(now='%(now)s')}"
        )

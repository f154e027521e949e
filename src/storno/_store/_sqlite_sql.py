"""The SQL text of the SQLite store that depends on what a call asks for (built per shape).

The claim's branches follow the backend-neutral plan of :mod:`storno._store._claims`; this
module supplies SQLite's placeholders and index hints.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from storno._model import Lease
from storno._store._base import RunUpdate
from storno._store._claims import EXECUTING, Shape, branches, take_over, where

__all__ = ["COUNT_EXECUTING", "claim_sql", "update_statement"]


def update_statement(
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


class _Dialect:
    """SQLite's placeholders for the claim plan: named, one per item of a list."""

    def mark(self, name: str) -> str:
        return f":{name}"

    def among(self, column: str, name: str, count: int, *, negate: bool) -> str:
        # "+saga" keeps the planner off the saga index: each branch of a claim must walk its
        # own status index, touching due runs only, never a saga's finished ones.
        term = "+saga" if column == "saga" else column
        marks = ",".join(f":{name}{i}" for i in range(count))
        return f"{term} {'NOT IN' if negate else 'IN'} ({marks})"


_DIALECT = _Dialect()


@functools.lru_cache(maxsize=256)
def claim_sql(shape: Shape) -> str:
    """The statement that leases one batch's runs, for batches of this shape."""
    picks = []
    for branch in branches(shape.include_own):
        order = f" ORDER BY {branch.order}" if branch.order else ""
        picks.append(
            f"SELECT * FROM (SELECT run_id, created_at FROM storno_runs INDEXED BY {branch.index}"
            f" WHERE {where(branch, shape, _DIALECT)}{order} LIMIT :limit)"
        )
    return (
        f"UPDATE storno_runs SET {take_over(_DIALECT)} WHERE run_id IN (SELECT run_id FROM "
        f"({' UNION ALL '.join(picks)}) ORDER BY created_at LIMIT :limit) RETURNING *"
    )


COUNT_EXECUTING = (
    "SELECT COUNT(*) FROM storno_runs INDEXED BY storno_runs_by_status "
    f"WHERE {EXECUTING.format(now='?')} AND +saga = ?"
)

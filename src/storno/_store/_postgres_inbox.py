"""Delivering a message to a run's inbox on PostgreSQL, inside the caller's transaction.

Used by ``deliver()`` and by a child run's end, which tells its parent in the same commit. A
repeated message id is a duplicate whatever the run's state; a retried delivery whose first
try may have committed is recognised instead of stored twice.
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

from storno._model import InboxMessage, RunStatus
from storno._store._base import ENDED_STATUSES, Delivery
from storno._store._postgres_sql import Statements
from storno._store._rows import MESSAGE_COLUMNS, message_values

with contextlib.suppress(ImportError):  # the store refuses to start without the driver
    from psycopg.rows import dict_row

if TYPE_CHECKING:
    from storno._store._postgres_connection import Connection

__all__ = ["deliver_in"]


async def deliver_in(
    conn: Connection,
    sql: Statements,
    notify_now: str,
    run_id: str,
    message: InboxMessage,
    now: float,
    *,
    uncertain: bool = False,
) -> Delivery | None:
    """Store a message and wake the run if it waits (inside the caller's transaction)."""
    cur = await conn.execute(
        f"SELECT status, inbox_seq FROM {sql.runs} WHERE run_id = %s FOR UPDATE",
        (run_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    status = RunStatus(row[0])
    # A repeated id is a duplicate even once the run has ended (see the SQLite store).
    if message.message_id is not None:
        cur = await conn.execute(
            f"SELECT seq FROM {sql.inbox} WHERE run_id = %s AND message_id = %s",
            (run_id, message.message_id),
        )
        seen = await cur.fetchone()
        if seen is not None:
            return Delivery(status, int(seen[0]), duplicate=True)
    if status in ENDED_STATUSES:
        return Delivery(status, 0)
    if message.message_id is None and uncertain and row[1] > 0:
        # An earlier try of this delivery may have committed: the same message sent at
        # the same time is taken for it rather than stored twice.
        dcur = conn.cursor(row_factory=dict_row)
        await dcur.execute(
            f"SELECT * FROM {sql.inbox} WHERE run_id = %s AND seq = %s", (run_id, row[1])
        )
        last = await dcur.fetchone()
        if (
            last is not None
            and last["kind"] == message.kind.value
            and last["name"] == message.name
            and last["payload"] == message.payload
            and last["sent_at"] == now
            and json.loads(last["meta"]) == message.meta
        ):
            return Delivery(status, int(row[1]))
    seq = int(row[1]) + 1
    await conn.execute(
        f"WITH m AS (INSERT INTO {sql.inbox} (run_id, seq, kind, name, message_id, payload,"
        " meta, sent_at) VALUES (%(run_id)s, %(seq)s, %(kind)s, %(name)s, %(message_id)s,"
        f" %(payload)s, %(meta)s, %(now)s)) UPDATE {sql.runs} SET inbox_seq = %(seq)s,"
        " wake_at = CASE WHEN status = 'waiting' THEN %(now)s ELSE wake_at END"
        " WHERE run_id = %(run_id)s"
        f" RETURNING CASE WHEN status = 'waiting' THEN {notify_now} END",
        {
            "run_id": run_id,
            "seq": seq,
            **dict(zip(MESSAGE_COLUMNS, message_values(message), strict=True)),
            "now": now,
        },
    )
    return Delivery(status, seq)

"""Enqueue an event in your own database transaction: committed with your writes, or not at all.

A service that writes its own tables in the database storno uses (the SQLite file, or the
PostgreSQL database and schema) puts an event into storno's outbox in that same transaction;
the relay of any storno worker on the database sends it::

    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute("UPDATE orders SET state = 'paid' WHERE id = %s", (order_id,))
        storno.outbox.enqueue(conn, "order.paid", {"order": order_id}, key=str(order_id))

The outbox table must exist: open a storno application on the database once (or run
``storno db upgrade``).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Mapping
from typing import Any

from storno._errors import ConfigurationError
from storno._model import check_event_meta, check_topic
from storno._serde import DEFAULT_MAX_PAYLOAD_BYTES, encode
from storno._store._outbox import OutboxEntry, Statements

__all__ = ["aenqueue", "enqueue"]

_SQLITE = Statements("storno_outbox", "?")


def _entry(
    topic: str,
    payload: Any,
    key: str | None,
    headers: Mapping[str, str] | None,
    event_id: str | None,
    correlation_id: str | None,
    causation_id: str | None,
    source: str | None,
) -> OutboxEntry:
    check_topic(topic)
    own = check_event_meta(key, headers)
    event_id = event_id or uuid.uuid4().hex
    if not isinstance(event_id, str) or len(event_id) > 200:
        raise ConfigurationError(f"event_id must be 1 to 200 characters, got {event_id!r}")
    return OutboxEntry(
        event_id=event_id,
        topic=topic,
        payload=encode(
            payload, what=f"payload of event {topic!r}", limit=DEFAULT_MAX_PAYLOAD_BYTES
        ),
        key=key,
        headers=own,
        correlation_id=correlation_id or event_id,
        causation_id=causation_id,
        source=source,
        traceparent=None,
        run_id=None,
        created_at=time.time(),
    )


def _no_table(exc: Exception) -> ConfigurationError:
    return ConfigurationError(
        f"storno's outbox table is not in this database ({str(exc).strip()}); open a storno "
        f"application on it once, or run `storno db upgrade`, before enqueueing events"
    )


def enqueue(
    conn: Any,
    topic: str,
    payload: Any = None,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    event_id: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    source: str | None = None,
    schema: str = "public",
) -> str:
    """Insert an event into the outbox inside ``conn``'s current transaction; its id.

    ``conn`` is a ``sqlite3.Connection`` on storno's SQLite file or a psycopg (3)
    ``Connection`` on its PostgreSQL database (``schema``: storno's, as in its URL). Nothing
    is sent unless the transaction commits. An ``event_id`` of your own makes the enqueue
    idempotent: a second enqueue of the same id adds nothing.
    """
    entry = _entry(topic, payload, key, headers, event_id, correlation_id, causation_id, source)
    if isinstance(conn, sqlite3.Connection):
        try:
            conn.execute(_SQLITE.insert, entry.values())
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise _no_table(exc) from exc
            raise
        return entry.event_id
    insert, notify = _postgres(conn, schema)
    import psycopg

    try:
        conn.execute(insert, entry.values())
    except psycopg.errors.UndefinedTable as exc:
        raise _no_table(exc) from exc
    conn.execute(notify)
    return entry.event_id


async def aenqueue(
    conn: Any,
    topic: str,
    payload: Any = None,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    event_id: str | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    source: str | None = None,
    schema: str = "public",
) -> str:
    """:func:`enqueue` on a psycopg ``AsyncConnection``, inside its current transaction."""
    entry = _entry(topic, payload, key, headers, event_id, correlation_id, causation_id, source)
    insert, notify = _postgres(conn, schema)
    import psycopg

    try:
        await conn.execute(insert, entry.values())
    except psycopg.errors.UndefinedTable as exc:
        raise _no_table(exc) from exc
    await conn.execute(notify)
    return entry.event_id


def _postgres(conn: Any, schema: str) -> tuple[str, str]:
    try:
        import psycopg
    except ImportError:
        psycopg = None  # type: ignore[assignment]
    if psycopg is None or not isinstance(conn, psycopg.Connection | psycopg.AsyncConnection):
        raise ConfigurationError(
            f"enqueue needs a sqlite3.Connection or a psycopg Connection, got {type(conn).__name__}"
        )
    from storno._store._postgres_connection import quote

    table = f"{quote(schema)}.storno_outbox"
    sql = Statements(table, "%s")
    channel = json.dumps(f"storno_outbox:{schema}").replace('"', "'")
    return sql.insert, f"SELECT pg_notify({channel}, '')"

"""How the backends' rows become records and back: one mapping for SQLite and PostgreSQL.

Both schemas store the same columns with the same encodings (JSON objects as text), so a row
read by either backend, by column name, maps to the model the same way.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from storno._model import Event, EventType, InboxMessage, Lease, MessageKind, RunRecord, RunStatus

__all__ = [
    "run_filters",
    "EVENT_COLUMNS",
    "MESSAGE_COLUMNS",
    "Row",
    "event_from_row",
    "event_values",
    "leased_runs",
    "message_from_row",
    "message_values",
    "run_from_row",
]


class Row(Protocol):
    """A row whose columns are read by name: ``sqlite3.Row`` or psycopg's ``dict_row``."""

    def __getitem__(self, key: str, /) -> Any: ...


EVENT_COLUMNS = ("seq", "type", "at", "position", "data", "payload")
"""The columns of ``storno_events`` after ``run_id``, in the order of :func:`event_values`."""

MESSAGE_COLUMNS = ("kind", "name", "message_id", "payload", "meta")
"""The columns of ``storno_inbox`` a message fills, in the order of :func:`message_values`."""


def run_from_row(row: Row) -> RunRecord:
    """The run a ``storno_runs`` row holds."""
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
        correlation_id=row["correlation_id"],
        state=json.loads(row["state"]) if row["state"] else None,
    )


def leased_runs(rows: Iterable[Row], owner: str) -> list[tuple[RunRecord, Lease]]:
    """The runs a claim just leased to ``owner``, oldest first, each with its lease."""
    records = sorted((run_from_row(r) for r in rows), key=lambda r: (r.created_at, r.run_id))
    return [(r, Lease(r.run_id, owner, r.epoch)) for r in records]


def event_from_row(row: Row) -> Event:
    """The history event a ``storno_events`` row holds."""
    return Event(
        seq=row["seq"],
        type=EventType(row["type"]),
        at=row["at"],
        position=row["position"],
        data=json.loads(row["data"]),
        payload=row["payload"],
    )


def _refuse(o: object) -> Any:
    raise TypeError(f"event data holds a {type(o).__name__}, which is not JSON")


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps(data, separators=(",", ":"))``, with the C encoder made once: building it
    anew for every small dict cost as much as the encoding itself."""
    make = getattr(json.encoder, "c_make_encoder", None)
    fallback = functools.partial(json.dumps, separators=(",", ":"), default=_refuse)
    if make is None:
        return fallback
    try:
        chunks = make(None, _refuse, json.encoder.encode_basestring_ascii, None, ":", ",",
                      False, False, True)  # fmt: skip
        if "".join(chunks({"a": [1, 2.5, None]}, 0)) != '{"a":[1,2.5,null]}':
            return fallback
    except Exception:
        return fallback
    return lambda data: "".join(chunks(data, 0))


dump_data = _compact_encoder()
"""The JSON text an event's ``data`` is stored as (engine-built dicts: no cycles)."""


def event_values(e: Event) -> tuple[int, str, float, int | None, str, str | None]:
    """The values of :data:`EVENT_COLUMNS` for an event.

    ``data`` is stored as the compact JSON text :data:`dump_data` makes, the same on both
    backends.
    """
    return (e.seq, e.type.value, e.at, e.position, dump_data(e.data), e.payload)


def message_from_row(row: Row) -> InboxMessage:
    """The message a ``storno_inbox`` row holds."""
    return InboxMessage(
        kind=MessageKind(row["kind"]),
        name=row["name"],
        payload=row["payload"],
        message_id=row["message_id"],
        meta=json.loads(row["meta"]),
        seq=row["seq"],
        sent_at=row["sent_at"],
    )


def message_values(m: InboxMessage) -> tuple[str, str, str | None, str | None, str]:
    """The values of :data:`MESSAGE_COLUMNS` for a message."""
    return (m.kind.value, m.name, m.message_id, m.payload, json.dumps(m.meta))


def run_filters(
    status: RunStatus | Sequence[RunStatus] | None, saga: str | None, mark: str
) -> tuple[str, list[str]]:
    """The WHERE clause (or "") and its parameters for listing runs in one of the statuses
    (any, for ``None``); ``mark`` is the driver's placeholder (``?`` or ``%s``)."""
    clauses: list[str] = []
    params: list[str] = []
    if status is not None:
        wanted = [status] if isinstance(status, RunStatus) else list(dict.fromkeys(status))
        clauses.append(f"status IN ({', '.join([mark] * len(wanted))})" if wanted else "1 = 0")
        params += [s.value for s in wanted]
    if saga is not None:
        clauses.append(f"saga = {mark}")
        params.append(saga)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params

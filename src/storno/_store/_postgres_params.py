"""The parameters the PostgreSQL store sends for a run's insertion and its history writes, and
how it recognises an event it recorded already (a write whose answer was lost)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from storno._model import Event, RunStatus
from storno._store._base import NewRun
from storno._store._rows import EVENT_COLUMNS, event_values

__all__ = ["events_json", "run_params", "same_event"]

_EVENT_KEYS = ("s", "t", "a", "p", "d", "y")  # EVENT_COLUMNS as json_to_recordset reads them


def events_json(events: Sequence[Event]) -> str:
    """Events as one JSON text, unpacked by the server (cheaper to send than six arrays).
    ``data`` goes as a string so that the stored text is exactly what SQLite stores."""
    return json.dumps([dict(zip(_EVENT_KEYS, event_values(e), strict=True)) for e in events])


def same_event(row: dict[str, Any], event: Event) -> bool:
    """Whether a stored event row is ``event`` (recorded by an earlier try of a write)."""
    return (
        row.get("type") == event.type.value
        and row.get("at") == event.at
        and row.get("position") == event.position
        and row.get("data") is not None
        and json.loads(row["data"]) == event.data
    )


def run_params(run: NewRun, claim_for: str | None, lease_seconds: float) -> dict[str, Any]:
    """The parameters of a run's insertion (with its first event)."""
    claimed = claim_for is not None
    return {
        "run_id": run.run_id,
        "saga": run.saga,
        "status": (RunStatus.RUNNING if claimed else RunStatus.PENDING).value,
        "input": run.input,
        "created_at": run.created_at,
        "deadline": run.deadline,
        "owner": claim_for,
        "expires": run.created_at + lease_seconds if claimed else None,
        "epoch": 1 if claimed else 0,
        "wake_at": run.wake_at,
        "parent": run.parent_run_id,
        "correlation": run.correlation_id,
        "wake": repr(run.wake_at) if run.wake_at is not None else "",
        **dict(zip(EVENT_COLUMNS, event_values(run.event), strict=True)),
    }

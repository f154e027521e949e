"""The outbox as operators see it: its state as JSON, and its dead letters retried or discarded
by event id (``storno outbox``, the API, the dashboard's outbox page).

:func:`act` touches dead letters only and says which of the ids it was given were not dead
letters (unknown, or pending, sent, discarded), so that each surface can refuse them by name.
An outbox row has no history to journal who acted, so every action is logged at INFO
(logger ``storno.outbox``) with its actor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from storno._store._outbox import Outbox, OutboxRow, OutboxStats

__all__ = ["STATUSES", "Action", "OutboxAction", "act", "refusal", "row_json", "stats_json"]

log = logging.getLogger("storno.outbox")

STATUSES = ("pending", "sent", "dead", "discarded")
"""The statuses of an outbox row."""

Action = Literal["retry", "discard"]
_DONE = {"retry": ("retried", "pending"), "discard": ("discarded", "discarded")}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _payload(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def row_json(row: OutboxRow) -> dict[str, Any]:
    """A row as the API and ``storno outbox list --json`` show it (times in ISO 8601)."""
    out = row.to_json()
    for name in ("created_at", "available_at", "sent_at"):
        out[name] = _iso(out[name])
    out["payload"] = _payload(row.message.payload)
    out["headers"] = dict(row.message.headers)
    return out


def stats_json(stats: OutboxStats, now: float) -> dict[str, Any]:
    """The outbox's state: unsent and dead rows, and how long the oldest unsent one waited."""
    return {
        "pending": stats.pending,
        "dead": stats.dead,
        "oldest_pending_at": _iso(stats.oldest_pending_at),
        "lag_seconds": round(stats.lag(now), 3),
    }


@dataclass(frozen=True, slots=True)
class OutboxAction:
    """What a retry or discard did: the dead letters it changed, and the ids it refused."""

    action: Action
    by: str
    changed: list[OutboxRow] = field(default_factory=list)  # as they were before
    refused: dict[str, str | None] = field(default_factory=dict)  # id -> status (None: no row)

    @property
    def done(self) -> str:
        """``retried`` or ``discarded``."""
        return _DONE[self.action][0]


def refusal(refused: dict[str, str | None]) -> str:
    """The ids that are not dead letters, each with what it is."""
    parts = [f"{i!r} ({'no such event' if s is None else s})" for i, s in refused.items()]
    return (
        f"not dead letters, left as they are: {', '.join(parts)}; only dead letters are "
        f"retried or discarded (storno outbox list --status dead)"
    )


async def act(
    outbox: Outbox,
    action: Action,
    event_ids: Sequence[str],
    *,
    by: str,
    now: float,
    note: str | None = None,
) -> OutboxAction:
    """Retry (pending again, with a fresh budget) or discard (given up, unblocking its key)
    the dead letters among ``event_ids``; the others are refused, not touched."""
    ids = list(dict.fromkeys(event_ids))
    found = {row.message.event_id: row for row in await outbox.find(ids)}
    dead = [found[i] for i in ids if i in found and found[i].status == "dead"]
    refused: dict[str, str | None] = {
        i: found[i].status if i in found else None
        for i in ids
        if i not in found or found[i].status != "dead"
    }
    if not dead:
        return OutboxAction(action, by, [], refused)
    dead_ids = [row.message.event_id for row in dead]
    change = outbox.retry if action == "retry" else outbox.discard
    if await change(dead_ids, now=now) < len(dead):
        # Another operator or process acted in between: what is not where this action would
        # have put it was not changed here.
        target = _DONE[action][1]
        now_found = {row.message.event_id: row for row in await outbox.find(dead_ids)}
        for i in dead_ids:
            status = now_found[i].status if i in now_found else None
            if status != target:
                refused[i] = status
        dead = [row for row in dead if row.message.event_id not in refused]
    said = f": {note}" if note else ""
    for row in dead:
        m = row.message
        log.info(
            "outbox event %s (%s, key %r) %s by %s%s",
            m.event_id,
            m.topic,
            m.key,
            _DONE[action][0],
            by,
            said,
            extra={"event_id": m.event_id, "topic": m.topic, "actor": by},
        )
    return OutboxAction(action, by, dead, refused)

"""The API's events: the outbox (its state and rows; dead letters retried or discarded) and
the runs of one correlation id.

Reading needs a read or operator token, acting an operator token. An outbox row keeps no
history, so who retried or discarded it is logged at INFO (``storno.outbox``) rather than
journaled. Event and correlation ids may hold ``/`` (a run's event is ``<run id>/<position>``):
send it as is or as ``%2F``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request

from storno._correlation import load_correlation
from storno._outbox_ops import Action, act, refusal, row_json, stats_json
from storno._server._api_common import (
    AUTH,
    Operator,
    Reader,
    actor,
    error_responses,
    state_of,
)
from storno._server._errors import ApiError
from storno._server._guards import run_id_of
from storno._server._models import (
    CorrelationModel,
    OutboxActionRequest,
    OutboxActionResult,
    OutboxList,
    check_identifier,
)

__all__ = ["router"]

router = APIRouter()

OutboxStatus = Literal["pending", "sent", "dead", "discarded"]


def _checked(value: str, what: str) -> str:
    try:
        return check_identifier(run_id_of(value), what)
    except ValueError as exc:
        raise ApiError(422, f"invalid_{what.replace(' ', '_')}", str(exc)) from None


@router.get("/outbox", response_model=OutboxList, tags=["events"], responses=error_responses(*AUTH))
async def outbox(
    request: Request,
    principal: Reader,
    status: OutboxStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> dict[str, Any]:
    """How the outbox stands (events not sent yet, dead letters, the lag) and its rows,
    newest first, optionally of one status."""
    store = state_of(request).app.store
    stats = await store.outbox.stats()
    rows = await store.outbox.rows(status=status, limit=limit + 1, offset=offset)
    return {
        "stats": stats_json(stats, time.time()),
        "rows": [row_json(r) for r in rows[:limit]],
        "status": status,
        "limit": limit,
        "offset": offset,
        "next_offset": offset + limit if len(rows) > limit else None,
    }


async def _act(
    request: Request, principal: Any, event_id: str, action: Action, body: OutboxActionRequest
) -> dict[str, Any]:
    server, who = state_of(request), actor(principal, body.by)
    event_id = _checked(event_id, "event id")
    outbox = server.app.store.outbox
    done = await act(outbox, action, [event_id], by=who, now=server.app.clock.now(), note=body.note)
    if event_id in done.refused:
        status = done.refused[event_id]
        if status is None:
            raise ApiError(404, "event_not_found", f"no outbox event with id {event_id!r}")
        raise ApiError(409, "event_state", refusal(done.refused))
    server.stats.invalidate()
    [row] = await outbox.find([event_id])
    return {"event_id": event_id, "action": action, "by": who, "row": row_json(row)}


_ACTED = error_responses(*AUTH, 404, 409)


@router.post(
    "/outbox/{event_id:path}/retry",
    response_model=OutboxActionResult,
    tags=["events"],
    responses=_ACTED,
)
async def retry_event(
    request: Request,
    principal: Operator,
    event_id: str,
    body: Annotated[OutboxActionRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Make a dead letter pending again with a fresh attempt budget; a relay sends it at its
    next claim. 409 for an event that is not a dead letter (pending, sent, discarded)."""
    return await _act(request, principal, event_id, "retry", body or OutboxActionRequest())


@router.post(
    "/outbox/{event_id:path}/discard",
    response_model=OutboxActionResult,
    tags=["events"],
    responses=_ACTED,
)
async def discard_event(
    request: Request,
    principal: Operator,
    event_id: str,
    body: Annotated[OutboxActionRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Give a dead letter up: it is never sent, and the later events of its key go out. 409
    for an event that is not a dead letter."""
    return await _act(request, principal, event_id, "discard", body or OutboxActionRequest())


@router.get(
    "/correlations/{correlation_id:path}",
    response_model=CorrelationModel,
    tags=["events"],
    responses=error_responses(*AUTH, 404),
)
async def correlation(request: Request, principal: Reader, correlation_id: str) -> dict[str, Any]:
    """The runs sharing a correlation id (a choreography), oldest first: each with the event
    that started it, the events it emitted and the signals events sent it; and one timeline
    across them."""
    server = state_of(request)
    correlation_id = _checked(correlation_id, "correlation id")
    found = await load_correlation(server.app, correlation_id)
    if not found.runs:
        raise ApiError(
            404, "correlation_not_found", f"no run with correlation id {correlation_id!r}"
        )
    out = found.to_json()
    stuck = (await server.stats.get()).stuck_ids
    for run in out["runs"]:
        run["run"]["stuck"] = run["run"]["id"] in stuck
    return out

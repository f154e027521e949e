"""The API's operator views: dead letters, stuck runs, counts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from storno._server._api_common import AUTH, Reader, error_responses, state_of, summary
from storno._server._models import RunList, Stats, StuckList
from storno._stuck import find_stuck

__all__ = ["router"]

router = APIRouter()


@router.get(
    "/dead-letters", response_model=RunList, tags=["operator"], responses=error_responses(*AUTH)
)
async def dead_letters(
    request: Request,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> dict[str, Any]:
    """Runs whose compensation kept failing (``compensation_failed``), newest first."""
    runs = await state_of(request).app.dead_letters(limit=limit + 1, offset=offset)
    more = len(runs) > limit
    return {
        "runs": [summary(r) for r in runs[:limit]],
        "limit": limit,
        "offset": offset,
        "next_offset": offset + limit if more else None,
    }


@router.get("/stuck", response_model=StuckList, tags=["operator"], responses=error_responses(*AUTH))
async def stuck(
    request: Request,
    principal: Reader,
    older_than: Annotated[float | None, Query(gt=0, le=1e9)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Runs not ended and without progress for longer than their saga's threshold
    (``older_than`` seconds replaces every threshold)."""
    server = state_of(request)
    found = await find_stuck(
        server.app, older_than=older_than, default=server.stuck_after, limit=limit
    )
    runs = []
    for item in found:
        out = item.to_json()
        out["stuck"] = True
        runs.append(out)
    return {"runs": runs, "older_than": older_than}


@router.get("/stats", response_model=Stats, tags=["operator"], responses=error_responses(*AUTH))
async def stats(request: Request, principal: Reader) -> dict[str, Any]:
    """Counts by status and saga, dead letters and stuck runs (cached for a few seconds)."""
    snap = await state_of(request).stats.get()
    by_saga: dict[str, dict[str, int]] = {}
    for (saga, status), count in snap.by_saga_status.items():
        by_saga.setdefault(saga, {})[status] = count
    return {
        "total": snap.total,
        "by_status": snap.by_status,
        "by_saga": by_saga,
        "dead_letters": snap.dead_letters,
        "stuck": len(snap.stuck),
        "taken_at": datetime.fromtimestamp(snap.taken_at, UTC).isoformat(),
    }

"""The API's runs: health, listing, starting runs and plans, waiting for a run's result,
published values, one run."""

from __future__ import annotations

import copy
import functools
import inspect
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from storno import __version__
from storno._errors import ConfigurationError, RunNotFoundError
from storno._handle import RunHandle
from storno._model import ENDED_STATUSES, RunRecord, RunStatus
from storno._plan import PLAN_SAGA_NAME
from storno._server._api_common import (
    AUTH,
    Operator,
    Reader,
    checked_run_id,
    error_responses,
    known_query,
    run_detail,
    state_of,
    summary,
    timestamp_of,
)
from storno._server._errors import ApiError
from storno._server._models import (
    MAX_WAIT,
    Health,
    QueryResult,
    RunDetail,
    RunList,
    RunResult,
    StartPlanRequest,
    StartResult,
    StartRunRequest,
    check_identifier,
)
from storno._server._state import ServerState
from storno._server._stats import filtered_runs
from storno._views import describe_run

__all__ = ["detail_router", "router"]

router = APIRouter()
detail_router = APIRouter()
"""``GET /runs/{run_id}``, included after every route with a suffix (its path takes them)."""

_signature = functools.lru_cache(maxsize=1024)(inspect.signature)
"""A saga function's signature, made once (it is read on every start)."""

_STARTED: dict[int | str, dict[str, Any]] = {
    200: {"model": StartResult, "description": "The run id existed: that run, unchanged"},
    **error_responses(401, 403, 409, 429),
}


@router.get("/health", response_model=Health, tags=["health"], dependencies=[Depends(known_query)])
async def health(request: Request) -> dict[str, Any]:
    """Liveness and store reachability; needs no token."""
    await state_of(request).app.list_runs(limit=1)
    return {"status": "ok", "version": __version__}


@router.get("/runs", response_model=RunList, tags=["runs"], responses=error_responses(*AUTH))
async def list_runs(
    request: Request,
    principal: Reader,
    status: RunStatus | None = None,
    saga: Annotated[str | None, Query(max_length=200)] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> dict[str, Any]:
    """Runs, newest first, filtered by status, saga and creation time, a page at a time."""
    server = state_of(request)
    if saga is not None:
        try:
            check_identifier(saga, "saga")
        except ValueError as exc:
            raise ApiError(422, "invalid_saga", str(exc)) from None
    runs, more = await filtered_runs(
        server.app,
        status=status,
        saga=saga,
        created_after=timestamp_of(created_after),
        created_before=timestamp_of(created_before),
        limit=limit,
        offset=offset,
    )
    snap = await server.stats.get()
    stuck = snap.stuck_ids
    return {
        "runs": [summary(r, r.run_id in stuck) for r in runs],
        "limit": limit,
        "offset": offset,
        "next_offset": offset + len(runs) if more else None,
    }


def _saga_for(server: ServerState, name: str) -> Any:
    """The saga as declared, without the run id or schedule of an earlier start."""
    app = server.app
    if name == PLAN_SAGA_NAME:
        raise ApiError(422, "unknown_saga", "start plans with POST /api/v1/plans")
    declared = server.sagas.get(name)
    if declared is not None:
        return declared
    try:
        found = copy.copy(app.find_saga(name))
    except ConfigurationError:
        known = ", ".join(n for n in app.saga_names if n != PLAN_SAGA_NAME) or "none"
        raise ApiError(
            422,
            "unknown_saga",
            f"saga {name!r} is not registered with the served application (registered: "
            f"{known}); serve the application with `storno serve --app MODULE:ATTR`",
        ) from None
    found.run_id, found.start_at, found.start_delay = None, None, None
    return found


@router.post(
    "/runs",
    response_model=StartResult,
    status_code=201,
    tags=["runs"],
    responses=_STARTED,
)
async def start_run(request: Request, principal: Operator, body: StartRunRequest) -> Response:
    """Start a run of a registered saga. With ``run_id`` the start is idempotent: the same id
    returns the existing run (200), never a second one; another saga or input is a 409."""
    server = state_of(request)
    app = server.app
    saga = _saga_for(server, body.saga)
    try:
        _signature(saga.fn).bind(None, *body.args, **body.kwargs)
    except TypeError as exc:
        raise ApiError(
            422, "bad_arguments", f"saga {body.saga!r} cannot take these arguments: {exc}"
        ) from None
    if body.start_at is not None and body.start_delay is not None:
        raise ApiError(422, "invalid", "give start_at or start_delay, not both")
    start_at = body.start_at
    if start_at is not None and start_at.tzinfo is None:
        start_at = start_at.replace(tzinfo=UTC)
    timestamp_of(start_at)
    options = saga.options(
        run_id=body.run_id, timeout=body.timeout, start_at=start_at, start_delay=body.start_delay
    )
    if body.wait:
        # The slot is taken before the start: a refused request changes nothing.
        with server.waiters.hold():
            handle = await app.start(options, *body.args, **body.kwargs)
            record = await handle.wait(body.wait)
    else:
        handle = await app.start(options, *body.args, **body.kwargs)
        record = await _record_of(handle)
    return _started(server, handle, record)


async def _record_of(handle: RunHandle[Any]) -> RunRecord:
    """The run as it stands after its start: the one found under its id, else read back."""
    if handle.existing is not None:
        return handle.existing
    record = await handle.app.store.get_run(handle.run_id)
    if record is None:
        raise RunNotFoundError(handle.run_id)
    return record


def _started(server: ServerState, handle: RunHandle[Any], record: RunRecord) -> Response:
    """The start's answer, as a response of its own: the body is built from our own types,
    so FastAPI's validation of it against the model would only cost time."""
    server.stats.invalidate()
    existed = handle.existing is not None
    body = {
        "run": summary(describe_run(record)),
        "created": not existed,
        "ended": record.status in ENDED_STATUSES,
    }
    return JSONResponse(body, status_code=200 if existed else 201)


@router.post(
    "/plans",
    response_model=StartResult,
    status_code=201,
    tags=["runs"],
    responses=_STARTED,
)
async def start_plan(request: Request, principal: Operator, body: StartPlanRequest) -> Response:
    """Validate a plan (a saga as data) against the registered steps and start it."""
    server = state_of(request)
    handle = await server.app.start_plan(body.plan, run_id=body.run_id, timeout=body.timeout)
    return _started(server, handle, await _record_of(handle))


@router.get(
    "/runs/{run_id:path}/result",
    response_model=RunResult,
    tags=["runs"],
    responses=error_responses(*AUTH, 404, 429),
)
async def run_result(
    request: Request,
    principal: Reader,
    run_id: str,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0,
) -> dict[str, Any]:
    """The run's result, or why it has none. With ``wait`` (seconds, at most 60) the answer
    comes as soon as the run ends, or when the wait runs out with the run's current status
    (``ended`` false: the run goes on)."""
    server = state_of(request)
    handle = server.app.get_handle(checked_run_id(run_id))
    if wait > 0:
        with server.waiters.hold():
            record = await handle.wait(wait)
    else:
        record = await handle.wait(0)
    info = describe_run(record)
    ended = record.status in ENDED_STATUSES
    return {
        "run_id": info.run_id,
        "saga": info.saga,
        "status": info.status.value,
        "ended": ended,
        "result": info.result if record.status is RunStatus.COMPLETED else None,
        "error": info.error if ended else None,
    }


@router.get(
    "/runs/{run_id:path}/state/{name}",
    response_model=QueryResult,
    tags=["runs"],
    responses=error_responses(*AUTH, 404),
)
async def query_one(request: Request, principal: Reader, run_id: str, name: str) -> dict[str, Any]:
    """One value the run published with ``ctx.publish()``."""
    app, run_id = state_of(request).app, checked_run_id(run_id)
    try:
        value = await app.query(run_id, name)
    except RunNotFoundError:
        raise
    except LookupError as exc:
        raise ApiError(404, "not_published", str(exc)) from None
    return {"run_id": run_id, "name": name, "value": value}


@router.get(
    "/runs/{run_id:path}/state",
    response_model=QueryResult,
    tags=["runs"],
    responses=error_responses(*AUTH, 404),
)
async def query_all(request: Request, principal: Reader, run_id: str) -> dict[str, Any]:
    """All values the run published with ``ctx.publish()``."""
    run_id = checked_run_id(run_id)
    value = await state_of(request).app.query(run_id)
    return {"run_id": run_id, "name": None, "value": value}


@detail_router.get(
    "/runs/{run_id:path}",
    response_model=RunDetail,
    tags=["runs"],
    responses=error_responses(*AUTH, 404),
)
async def get_run(request: Request, principal: Reader, run_id: str) -> dict[str, Any]:
    """A run with its steps, compensations and full history."""
    server = state_of(request)
    info = await server.app.describe(checked_run_id(run_id))
    return run_detail(server, info)

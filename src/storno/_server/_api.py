"""The HTTP API under ``/api/v1``: runs, signals, operator actions, dead letters, stuck runs.

Reading needs a read or operator token; anything that changes a run needs an operator token.
Actions are recorded in the run's history under the token's name (or ``by``, with the
token's name beside it), never under the token.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from storno import __version__
from storno._errors import ConfigurationError, RunNotFoundError
from storno._model import RESERVED_PREFIX, RunStatus
from storno._plan import PLAN_SAGA_NAME
from storno._server._auth import Principal, Role
from storno._server._errors import ApiError
from storno._server._guards import run_id_of
from storno._server._models import (
    ActionResult,
    ApproveRequest,
    CancelRequest,
    CompensateRequest,
    ErrorResponse,
    Health,
    QueryResult,
    RejectRequest,
    ResolveRequest,
    RetryRequest,
    RunDetail,
    RunList,
    SignalRequest,
    SignalResult,
    StartPlanRequest,
    StartResult,
    StartRunRequest,
    Stats,
    StuckList,
    check_identifier,
)
from storno._server._state import ServerState
from storno._server._stats import filtered_runs
from storno._stuck import find_stuck, stuck_reason, threshold_for
from storno._views import RunInfo

__all__ = ["actor", "router", "run_detail", "summary", "webhook_router"]

_bearer = HTTPBearer(auto_error=False, description="An operator or read-only token.")


def _err(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


async def known_query(request: Request) -> None:
    """Refuse query parameters the operation does not take (a typo must not be ignored)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known: set[str] = set()
    stack = [dependant]
    while stack:
        current = stack.pop()
        known.update(param.alias for param in getattr(current, "query_params", []))
        stack.extend(getattr(current, "dependencies", []))
    unknown = sorted({key for key in request.query_params if key not in known})
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ApiError(
            422,
            "unknown_parameter",
            f"unknown query parameter(s) {', '.join(map(repr, unknown))}; this operation "
            f"takes: {allowed}",
        )


AUTH = (401, 403)
_STARTED: dict[int | str, dict[str, Any]] = {
    200: {"model": StartResult, "description": "The run id existed: that run, unchanged"},
    **_err(401, 403, 409),
}
router = APIRouter(prefix="/api/v1", responses=_err(400, 413, 422))


def state_of(request: Request) -> ServerState:
    server: ServerState = request.app.state.server
    return server


def authenticate(request: Request, token: str | None, wanted: Role) -> Principal:
    server = state_of(request)
    principal = server.tokens.check(token)
    if principal is None:
        message = (
            "a bearer token is required: send `Authorization: Bearer TOKEN`"
            if not token
            else "the bearer token is not valid"
        )
        raise ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
    if not principal.role.allows(wanted):
        raise ApiError(
            403,
            "forbidden",
            f"token {principal.name!r} is {principal.role.value}-only; this needs an "
            f"{'operator' if wanted is Role.OPERATE else wanted.value} token",
        )
    request.state.principal_name = principal.name
    return principal


def _role(wanted: Role) -> Callable[..., Awaitable[Principal]]:
    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        token = credentials.credentials if credentials else None
        principal = authenticate(request, token, wanted)
        # Only once the caller is known: an anonymous request must not learn parameter names.
        await known_query(request)
        return principal

    return dependency


Reader = Annotated[Principal, Depends(_role(Role.READ))]
Operator = Annotated[Principal, Depends(_role(Role.OPERATE))]


def actor(principal: Principal, by: str | None) -> str:
    """Who is recorded: ``by`` when given (with the token's name), else the token's name."""
    if not by or by == principal.name:
        return principal.name
    return f"{by} (via {principal.name})"


def _signal_name(value: str) -> str:
    """A signal name a caller may send: storno's own (``storno.*``) are refused."""
    try:
        check_identifier(value, "signal name")
    except ValueError as exc:
        raise ApiError(422, "invalid_signal", str(exc)) from None
    if value.startswith(RESERVED_PREFIX):
        raise ApiError(
            422,
            "reserved_signal",
            f"signal names starting with {RESERVED_PREFIX!r} are reserved for storno, got "
            f"{value!r}; approvals are given by operators with POST "
            f"/api/v1/runs/{{run_id}}/approve or /reject, never as signals or webhooks",
        )
    return value


def _run_id(value: str) -> str:
    try:
        return check_identifier(run_id_of(value), "run id")
    except ValueError as exc:
        raise ApiError(422, "invalid_run_id", str(exc)) from None


def summary(run: RunInfo, stuck: bool = False) -> dict[str, Any]:
    out = run.to_json(with_history=False)
    del out["steps"]
    out["stuck"] = stuck
    return out


def run_detail(server: ServerState, info: RunInfo, now: float | None = None) -> dict[str, Any]:
    out = info.to_json()
    threshold = threshold_for(server.app, info.saga, server.stuck_after)
    reason = stuck_reason(info, now or datetime.now(UTC).timestamp(), threshold)
    out["stuck"] = reason is not None
    out["stuck_reason"] = reason
    return out


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.timestamp()
    except (OverflowError, OSError, ValueError) as exc:
        raise ApiError(422, "invalid_time", f"time {value!r} is out of range: {exc}") from None


# --- health and runs -----------------------------------------------------------------------


@router.get("/health", response_model=Health, tags=["health"], dependencies=[Depends(known_query)])
async def health(request: Request) -> dict[str, Any]:
    """Liveness and store reachability; needs no token."""
    await state_of(request).app.list_runs(limit=1)
    return {"status": "ok", "version": __version__}


@router.get("/runs", response_model=RunList, tags=["runs"], responses=_err(*AUTH))
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
        created_after=_ts(created_after),
        created_before=_ts(created_before),
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
async def start_run(
    request: Request, response: Response, principal: Operator, body: StartRunRequest
) -> dict[str, Any]:
    """Start a run of a registered saga. With ``run_id`` the start is idempotent: the same id
    returns the existing run (200), never a second one; another saga or input is a 409."""
    server = state_of(request)
    app = server.app
    saga = _saga_for(server, body.saga)
    try:
        inspect.signature(saga.fn).bind(None, *body.args, **body.kwargs)
    except TypeError as exc:
        raise ApiError(
            422, "bad_arguments", f"saga {body.saga!r} cannot take these arguments: {exc}"
        ) from None
    if body.start_at is not None and body.start_delay is not None:
        raise ApiError(422, "invalid", "give start_at or start_delay, not both")
    start_at = body.start_at
    if start_at is not None and start_at.tzinfo is None:
        start_at = start_at.replace(tzinfo=UTC)
    _ts(start_at)
    options = saga.options(
        run_id=body.run_id, timeout=body.timeout, start_at=start_at, start_delay=body.start_delay
    )
    existed = body.run_id is not None and await app.store.get_run(body.run_id) is not None
    handle = await app.start(options, *body.args, **body.kwargs)
    info = await app.describe(handle.run_id)
    server.stats.invalidate()
    response.status_code = 200 if existed else 201
    return {"run": summary(info), "created": not existed}


@router.post(
    "/plans",
    response_model=StartResult,
    status_code=201,
    tags=["runs"],
    responses=_STARTED,
)
async def start_plan(
    request: Request, response: Response, principal: Operator, body: StartPlanRequest
) -> dict[str, Any]:
    """Validate a plan (a saga as data) against the registered steps and start it."""
    server = state_of(request)
    app = server.app
    existed = body.run_id is not None and await app.store.get_run(body.run_id) is not None
    handle = await app.start_plan(body.plan, run_id=body.run_id, timeout=body.timeout)
    info = await app.describe(handle.run_id)
    server.stats.invalidate()
    response.status_code = 200 if existed else 201
    return {"run": summary(info), "created": not existed}


# --- talking to runs: routes with a suffix come before GET /runs/{run_id} -------------------


@router.get(
    "/runs/{run_id:path}/state/{name}",
    response_model=QueryResult,
    tags=["runs"],
    responses=_err(*AUTH, 404),
)
async def query_one(request: Request, principal: Reader, run_id: str, name: str) -> dict[str, Any]:
    """One value the run published with ``ctx.publish()``."""
    app, run_id = state_of(request).app, _run_id(run_id)
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
    responses=_err(*AUTH, 404),
)
async def query_all(request: Request, principal: Reader, run_id: str) -> dict[str, Any]:
    """All values the run published with ``ctx.publish()``."""
    run_id = _run_id(run_id)
    value = await state_of(request).app.query(run_id)
    return {"run_id": run_id, "name": None, "value": value}


async def _after(server: ServerState, run_id: str, action: str, by: str) -> dict[str, Any]:
    server.stats.invalidate()
    info = await server.app.describe(run_id)
    return {"run_id": run_id, "action": action, "by": by, "run": summary(info)}


@router.post(
    "/runs/{run_id:path}/signals/{name}",
    response_model=SignalResult,
    status_code=202,
    tags=["signals"],
    responses=_err(*AUTH, 404, 409),
)
async def send_signal(
    request: Request,
    principal: Operator,
    run_id: str,
    name: str,
    body: Annotated[SignalRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Send a signal; it is buffered until the run waits for it. A repeated ``id`` is stored
    once (``delivered: duplicate``), even after the run ended; a run that has ended refuses
    any other signal (409)."""
    body = body or SignalRequest()
    _signal_name(name)
    app, run_id = state_of(request).app, _run_id(run_id)
    stored = await app.signal(run_id, name, body.data, id=body.id)
    return {
        "run_id": run_id,
        "signal": name,
        "delivered": "new" if stored else "duplicate",
        "id": body.id,
    }


@router.post(
    "/runs/{run_id:path}/approve",
    response_model=ActionResult,
    status_code=202,
    tags=["operator"],
    responses=_err(*AUTH, 404, 409),
)
async def approve(
    request: Request,
    principal: Operator,
    run_id: str,
    body: Annotated[ApproveRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Approve a run waiting in ``ctx.wait_for_approval()``."""
    body = body or ApproveRequest()
    server, who, run_id = state_of(request), actor(principal, body.by), _run_id(run_id)
    await server.app.approve(run_id, by=who, note=body.note)
    return await _after(server, run_id, "approve", who)


@router.post(
    "/runs/{run_id:path}/reject",
    response_model=ActionResult,
    status_code=202,
    tags=["operator"],
    responses=_err(*AUTH, 404, 409),
)
async def reject(
    request: Request, principal: Operator, run_id: str, body: RejectRequest
) -> dict[str, Any]:
    """Reject a run waiting for approval; it compensates unless its code handles that."""
    server, who, run_id = state_of(request), actor(principal, body.by), _run_id(run_id)
    await server.app.reject(run_id, by=who, reason=body.reason)
    return await _after(server, run_id, "reject", who)


@router.post(
    "/runs/{run_id:path}/cancel",
    response_model=ActionResult,
    status_code=202,
    tags=["operator"],
    responses=_err(*AUTH, 404, 409),
)
async def cancel(
    request: Request, principal: Operator, run_id: str, body: CancelRequest
) -> dict[str, Any]:
    """Cancel a run: its completed steps are compensated and it ends ``cancelled``. Refused
    (409) after its point of no return or once it has ended."""
    server, who, run_id = state_of(request), actor(principal, body.by), _run_id(run_id)
    await server.app.cancel(run_id, by=who, reason=body.reason)
    return await _after(server, run_id, "cancel", who)


@router.post(
    "/runs/{run_id:path}/retry",
    response_model=ActionResult,
    status_code=202,
    tags=["operator"],
    responses=_err(*AUTH, 404, 409),
)
async def retry(
    request: Request,
    principal: Operator,
    run_id: str,
    body: Annotated[RetryRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Retry a dead letter's compensation where it failed, or resume a run in
    ``needs_attention`` under the current code; the same keys."""
    body = body or RetryRequest()
    server, who, run_id = state_of(request), actor(principal, body.by), _run_id(run_id)
    await server.app.retry(run_id, by=who, note=body.note)
    return await _after(server, run_id, "retry", who)


@router.post(
    "/runs/{run_id:path}/compensate",
    response_model=ActionResult,
    status_code=202,
    tags=["operator"],
    responses=_err(*AUTH, 404, 409, 422),
)
async def compensate(
    request: Request,
    principal: Operator,
    run_id: str,
    body: Annotated[CompensateRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Compensate a run in ``needs_attention``. Refused (409) where a step at or after its
    point of no return completed, or may have taken effect and is not in ``not_applied``."""
    body = body or CompensateRequest()
    server, who, run_id = state_of(request), actor(principal, body.by), _run_id(run_id)
    await server.app.compensate(run_id, by=who, note=body.note, not_applied=body.not_applied)
    return await _after(server, run_id, "compensate", who)


@router.post(
    "/runs/{run_id:path}/resolve",
    response_model=ActionResult,
    tags=["operator"],
    responses=_err(*AUTH, 404, 409, 422),
)
async def resolve(
    request: Request, principal: Operator, run_id: str, body: ResolveRequest
) -> dict[str, Any]:
    """Close a run that needs a person as handled by hand: a dead letter as compensated, a
    run in ``needs_attention`` as ``outcome`` says; the note says what was done."""
    server, who, run_id = state_of(request), actor(principal, body.by), _run_id(run_id)
    await server.app.resolve(run_id, by=who, note=body.note, outcome=body.outcome)
    return await _after(server, run_id, "resolve", who)


@router.get(
    "/runs/{run_id:path}", response_model=RunDetail, tags=["runs"], responses=_err(*AUTH, 404)
)
async def get_run(request: Request, principal: Reader, run_id: str) -> dict[str, Any]:
    """A run with its steps, compensations and full history."""
    server = state_of(request)
    info = await server.app.describe(_run_id(run_id))
    return run_detail(server, info)


# --- operator views ------------------------------------------------------------------------


@router.get("/dead-letters", response_model=RunList, tags=["operator"], responses=_err(*AUTH))
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


@router.get("/stuck", response_model=StuckList, tags=["operator"], responses=_err(*AUTH))
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


@router.get("/stats", response_model=Stats, tags=["operator"], responses=_err(*AUTH))
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


# --- webhooks ------------------------------------------------------------------------------

webhook_router = APIRouter(prefix="/api/v1", responses=_err(400, 413, 422))

EVENT_ID_HEADERS = (
    "idempotency-key",
    "x-storno-event-id",
    "webhook-id",
    "x-event-id",
    "x-github-delivery",
    "x-shopify-webhook-id",
)
_WEBHOOK_BODY = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {"schema": {}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}


def _webhook_data(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return body
    if media == "application/x-www-form-urlencoded":
        fields: dict[str, Any] = {}
        for key, value in parse_qsl(text, keep_blank_values=True):
            if key in fields:
                previous = fields[key]
                fields[key] = (
                    [*previous, value] if isinstance(previous, list) else [previous, value]
                )
            else:
                fields[key] = value
        return fields
    return text


def _event_id(request: Request, data: Any, id_field: str | None, event_id: str | None) -> Any:
    if event_id:
        return event_id
    for header in EVENT_ID_HEADERS:
        value = request.headers.get(header)
        if value:
            return value
    if id_field:
        found: Any = data
        for part in id_field.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if found is None:
            raise ApiError(
                422, "missing_event_id", f"the body has no {id_field!r} to use as the event id"
            )
        return str(found)
    return None


@webhook_router.post(
    "/webhooks/{run_id:path}/{signal}",
    response_model=SignalResult,
    status_code=202,
    tags=["signals"],
    openapi_extra=_WEBHOOK_BODY,
    responses=_err(401, 403, 404, 409),
)
async def webhook(
    request: Request,
    run_id: str,
    signal: str,
    token: Annotated[
        str | None, Query(description="The webhook token, for providers that take a URL only.")
    ] = None,
    event_id: Annotated[str | None, Query(max_length=200)] = None,
    id_field: Annotated[
        str | None,
        Query(max_length=200, description="Dotted path of the event id in a JSON body."),
    ] = None,
) -> dict[str, Any]:
    """Turn a third party's callback into signal ``signal`` for run ``run_id``.

    The body becomes the signal's data (JSON parsed; a form as an object; other text as a
    string). The provider's event id (``Idempotency-Key``, ``Webhook-Id``, ``X-Event-Id``,
    ``X-GitHub-Delivery`` ... header, ``event_id=``, or ``id_field=`` in the body) is the
    signal's id, so a delivery the provider repeats resumes the run once. Authenticate with a
    webhook or operator token: ``Authorization: Bearer``, ``X-Storno-Token`` or ``?token=``.
    """
    presented = token or request.headers.get("x-storno-token")
    auth = request.headers.get("authorization", "")
    if not presented and auth[:7].lower() == "bearer ":
        presented = auth[7:].strip()
    principal = authenticate(request, presented, Role.WEBHOOK)
    await known_query(request)
    try:
        run_id = check_identifier(run_id_of(run_id), "run id")
    except ValueError as exc:
        raise ApiError(422, "invalid", str(exc)) from None
    _signal_name(signal)
    data = _webhook_data(await request.body(), request.headers.get("content-type", ""))
    raw_id = _event_id(request, data, id_field, event_id)
    message_id = None
    if raw_id is not None:
        try:
            message_id = check_identifier(str(raw_id), "event id")
        except ValueError as exc:
            raise ApiError(422, "invalid_event_id", str(exc)) from None
    app = state_of(request).app
    stored = await app.signal(run_id, signal, data, id=message_id)
    del principal
    return {
        "run_id": run_id,
        "signal": signal,
        "delivered": "new" if stored else "duplicate",
        "id": message_id,
    }

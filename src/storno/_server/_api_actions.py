"""The API's operator actions on a run: signal, approve, reject, cancel, retry, compensate,
resolve. Each needs an operator token and is recorded under its name."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request

from storno._server._api_common import (
    AUTH,
    Operator,
    actor,
    checked_run_id,
    error_responses,
    signal_name,
    state_of,
    summary,
)
from storno._server._models import (
    ActionResult,
    ApproveRequest,
    CancelRequest,
    CompensateRequest,
    RejectRequest,
    ResolveRequest,
    RetryRequest,
    SignalRequest,
    SignalResult,
)
from storno._server._state import ServerState

__all__ = ["router"]

router = APIRouter()


async def _after(server: ServerState, run_id: str, action: str, by: str) -> dict[str, Any]:
    server.stats.invalidate()
    info = await server.app.describe(run_id)
    return {"run_id": run_id, "action": action, "by": by, "run": summary(info)}


@router.post(
    "/runs/{run_id:path}/signals/{name}",
    response_model=SignalResult,
    status_code=202,
    tags=["signals"],
    responses=error_responses(*AUTH, 404, 409),
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
    signal_name(name)
    app, run_id = state_of(request).app, checked_run_id(run_id)
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
    responses=error_responses(*AUTH, 404, 409),
)
async def approve(
    request: Request,
    principal: Operator,
    run_id: str,
    body: Annotated[ApproveRequest | None, Body()] = None,
) -> dict[str, Any]:
    """Approve a run waiting in ``ctx.wait_for_approval()``."""
    body = body or ApproveRequest()
    server, who, run_id = state_of(request), actor(principal, body.by), checked_run_id(run_id)
    await server.app.approve(run_id, by=who, note=body.note, digest=body.digest)
    return await _after(server, run_id, "approve", who)


@router.post(
    "/runs/{run_id:path}/reject",
    response_model=ActionResult,
    status_code=202,
    tags=["operator"],
    responses=error_responses(*AUTH, 404, 409),
)
async def reject(
    request: Request, principal: Operator, run_id: str, body: RejectRequest
) -> dict[str, Any]:
    """Reject a run waiting for approval; it compensates unless its code handles that."""
    server, who, run_id = state_of(request), actor(principal, body.by), checked_run_id(run_id)
    await server.app.reject(run_id, by=who, reason=body.reason)
    return await _after(server, run_id, "reject", who)


@router.post(
    "/runs/{run_id:path}/cancel",
    response_model=ActionResult,
    status_code=202,
    tags=["operator"],
    responses=error_responses(*AUTH, 404, 409),
)
async def cancel(
    request: Request, principal: Operator, run_id: str, body: CancelRequest
) -> dict[str, Any]:
    """Cancel a run: its completed steps are compensated and it ends ``cancelled``. Refused
    (409) after its point of no return or once it has ended."""
    server, who, run_id = state_of(request), actor(principal, body.by), checked_run_id(run_id)
    await server.app.cancel(run_id, by=who, reason=body.reason)
    return await _after(server, run_id, "cancel", who)


@router.post(
    "/runs/{run_id:path}/retry",
    response_model=ActionResult,
    status_code=202,
    tags=["operator"],
    responses=error_responses(*AUTH, 404, 409),
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
    server, who, run_id = state_of(request), actor(principal, body.by), checked_run_id(run_id)
    await server.app.retry(run_id, by=who, note=body.note)
    return await _after(server, run_id, "retry", who)


@router.post(
    "/runs/{run_id:path}/compensate",
    response_model=ActionResult,
    status_code=202,
    tags=["operator"],
    responses=error_responses(*AUTH, 404, 409, 422),
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
    server, who, run_id = state_of(request), actor(principal, body.by), checked_run_id(run_id)
    await server.app.compensate(run_id, by=who, note=body.note, not_applied=body.not_applied)
    return await _after(server, run_id, "compensate", who)


@router.post(
    "/runs/{run_id:path}/resolve",
    response_model=ActionResult,
    tags=["operator"],
    responses=error_responses(*AUTH, 404, 409, 422),
)
async def resolve(
    request: Request, principal: Operator, run_id: str, body: ResolveRequest
) -> dict[str, Any]:
    """Close a run that needs a person as handled by hand: a dead letter as compensated, a
    run in ``needs_attention`` as ``outcome`` says; the note says what was done."""
    server, who, run_id = state_of(request), actor(principal, body.by), checked_run_id(run_id)
    await server.app.resolve(run_id, by=who, note=body.note, outcome=body.outcome)
    return await _after(server, run_id, "resolve", who)

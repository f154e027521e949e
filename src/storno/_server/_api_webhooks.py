"""The webhook: a third party's callback becomes a signal, deduplicated by its event id."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request

from storno._server._api_common import (
    authenticate,
    error_responses,
    known_query,
    signal_name,
    state_of,
)
from storno._server._auth import Role
from storno._server._errors import ApiError
from storno._server._guards import run_id_of
from storno._server._models import SignalResult, check_identifier

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", responses=error_responses(400, 413, 422))

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


@router.post(
    "/webhooks/{run_id:path}/{signal}",
    response_model=SignalResult,
    status_code=202,
    tags=["signals"],
    openapi_extra=_WEBHOOK_BODY,
    responses=error_responses(401, 403, 404, 409),
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
    signal_name(signal)
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

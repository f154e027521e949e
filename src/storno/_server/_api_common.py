"""What the API's routes share: who is calling (bearer tokens, roles), refusal of unknown
query parameters, checked identifiers, and the JSON shape of a run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from storno._model import RESERVED_PREFIX
from storno._server._auth import Principal, Role
from storno._server._errors import ApiError
from storno._server._guards import run_id_of
from storno._server._models import ErrorResponse, check_identifier
from storno._server._state import ServerState
from storno._stuck import stuck_reason, threshold_for
from storno._views import RunInfo

__all__ = [
    "AUTH",
    "Operator",
    "Reader",
    "actor",
    "authenticate",
    "checked_run_id",
    "error_responses",
    "known_query",
    "run_detail",
    "signal_name",
    "state_of",
    "summary",
    "timestamp_of",
]

_bearer = HTTPBearer(auto_error=False, description="An operator or read-only token.")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of these error codes (each an :class:`ErrorResponse`)."""
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


def signal_name(value: str) -> str:
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


def checked_run_id(value: str) -> str:
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


def timestamp_of(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.timestamp()
    except (OverflowError, OSError, ValueError) as exc:
        raise ApiError(422, "invalid_time", f"time {value!r} is out of range: {exc}") from None

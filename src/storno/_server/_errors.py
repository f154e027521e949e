"""Every error the server answers with: ``{"error": {"type": ..., "message": ...}}``.

storno's own errors map to 4xx codes; a request the framework cannot parse or validate gets a
4xx naming the problem. Nothing a client sends should reach the catch-all 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storno._errors import (
    ConfigurationError,
    PayloadTooLargeError,
    PlanError,
    RunConflictError,
    RunNotFoundError,
    RunStateError,
    SerializationError,
    StoreError,
)

__all__ = ["ApiError", "BodyLimit", "error_response", "install_handlers"]

log = logging.getLogger("storno.server")

_STATUS_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid",
}


class ApiError(Exception):
    """An error with its HTTP status, type and message."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.details = details
        self.headers = headers


def error_response(
    status: int,
    type: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": type, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def from_storno(exc: Exception) -> ApiError | None:
    """The HTTP error for one of storno's own errors, or ``None``."""
    if isinstance(exc, RunNotFoundError):
        return ApiError(404, "run_not_found", str(exc))
    if isinstance(exc, RunConflictError):
        return ApiError(409, "run_conflict", str(exc))
    if isinstance(exc, RunStateError):
        return ApiError(409, "run_state", str(exc))
    if isinstance(exc, PayloadTooLargeError):
        return ApiError(413, "payload_too_large", str(exc))
    if isinstance(exc, PlanError):
        return ApiError(
            422, "plan_invalid", str(exc), details=[{"problem": p} for p in exc.problems]
        )
    if isinstance(exc, SerializationError):
        return ApiError(422, "not_serializable", str(exc))
    if isinstance(exc, ConfigurationError):
        return ApiError(422, "invalid", str(exc))
    if isinstance(exc, StoreError):
        return ApiError(503, "store_unavailable", f"the database failed: {exc}")
    return None


def _where(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body",)] if isinstance(loc, list | tuple) else []
    return ".".join(parts) or "body"


def _validation(exc: RequestValidationError) -> ApiError:
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return ApiError(400, "malformed_json", f"the request body is not valid JSON: {reason}")
    details = [
        {"where": _where(e.get("loc")), "problem": str(e.get("msg", "")), "kind": e.get("type")}
        for e in errors
    ]
    summary = "; ".join(f"{d['where']}: {d['problem']}" for d in details[:5])
    return ApiError(422, "validation_error", f"the request is invalid: {summary}", details=details)


Renderer = Callable[[Request, ApiError], Awaitable[Response]]


def install_handlers(app: FastAPI, html: Renderer | None = None) -> None:
    """Exception handlers: JSON errors for the API, pages for the dashboard (``html``)."""

    async def respond(request: Request, error: ApiError) -> Response:
        if html is not None and request.url.path.startswith("/ui"):
            return await html(request, error)
        return error_response(error.status, error.type, error.message, error.details, error.headers)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return await respond(request, exc)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return await respond(request, _validation(exc))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = _STATUS_TYPES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else kind
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such path: {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        headers = dict(exc.headers) if exc.headers else None
        return await respond(request, ApiError(exc.status_code, kind, message, headers=headers))

    async def on_storno(request: Request, exc: Exception) -> Response:
        error = from_storno(exc)
        if error is None:
            return await on_unexpected(request, exc)
        if error.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, error.message)
        return await respond(request, error)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        error = ApiError(500, "internal_error", "the server failed; its log has the details")
        return await respond(request, error)

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    storno_errors: tuple[type[Exception], ...] = (
        ConfigurationError,
        SerializationError,
        PlanError,
        StoreError,
        RunNotFoundError,
        RunConflictError,
        RunStateError,
    )
    for kind in storno_errors:
        app.add_exception_handler(kind, on_storno)
    app.add_exception_handler(Exception, on_unexpected)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413, before it is all read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"the request body is over the limit of {self.limit:,} bytes; store large data "
            f"elsewhere and pass a reference"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = 0
                if size > self.limit:
                    response = error_response(413, "payload_too_large", message)
                    await response(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)

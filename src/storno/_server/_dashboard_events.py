"""The dashboard's event pages: the outbox (how it stands, its dead letters with retry and
discard for operators, its recent rows) and a correlation (the runs sharing a correlation id
and one timeline across them).

They use the dashboard's own sign-in, rendering and operator forms (:class:`Pages`, handed
over by :func:`storno._server._dashboard.install_dashboard`): the same session, the same
per-session form token, the same escaping.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from storno._correlation import load_correlation
from storno._outbox_ops import STATUSES, Action, act
from storno._server._api_common import actor, state_of
from storno._server._errors import ApiError
from storno._server._guards import run_id_of
from storno._server._models import check_identifier, check_text

__all__ = ["Pages", "install_event_pages"]

PAGE = 50


@dataclass(frozen=True, slots=True)
class Pages:
    """What the event pages take from the dashboard."""

    render: Callable[..., HTMLResponse]  # (request, template, code=200, auth=..., **context)
    reader: Callable[[Request], Any]  # who is signed in (401 for nobody)
    operator_form: Callable[[Request], Awaitable[tuple[Any, dict[str, str]]]]  # checked form


def _checked(value: str, what: str) -> str:
    try:
        return check_identifier(run_id_of(value), what)
    except ValueError as exc:
        raise ApiError(422, "invalid", str(exc)) from None


def install_event_pages(api: FastAPI, pages: Pages) -> None:
    """Add ``/ui/outbox`` (with its two actions) and ``/ui/correlations/{id}``."""

    @api.get("/ui/outbox", include_in_schema=False)
    async def outbox_page(request: Request) -> Response:
        auth = pages.reader(request)
        params = request.query_params
        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            raise ApiError(422, "invalid_status", f"unknown outbox status {status!r}")
        try:
            offset = max(0, min(int(params.get("offset", "0")), 1_000_000_000))
        except ValueError:
            offset = 0
        outbox = state_of(request).app.store.outbox
        stats = await outbox.stats()
        dead = await outbox.rows(status="dead", limit=200)
        rows = await outbox.rows(status=status, limit=PAGE + 1, offset=offset)
        base = {"status": status} if status else {}
        return pages.render(
            request,
            "outbox.html",
            auth=auth,
            stats=stats,
            lag=stats.lag(time.time()),
            dead=dead,
            rows=rows[:PAGE],
            status=status or "",
            outbox_statuses=STATUSES,
            prev_link=("?" + urlencode({**base, "offset": max(offset - PAGE, 0)}))
            if offset
            else None,
            next_link=("?" + urlencode({**base, "offset": offset + PAGE}))
            if len(rows) > PAGE
            else None,
        )

    @api.post("/ui/outbox/{event_id:path}/{action}", include_in_schema=False)
    async def outbox_action(request: Request, event_id: str, action: str) -> Response:
        auth, form = await pages.operator_form(request)
        if action not in ("retry", "discard"):
            raise ApiError(404, "not_found", f"no action {action!r}")
        event_id = _checked(event_id, "event id")
        try:
            check_text(form.get("note", ""))
        except ValueError as exc:
            raise ApiError(422, "invalid", str(exc)) from None
        server = state_of(request)
        who = actor(auth.principal, None)
        note = form.get("note", "").strip() or None
        kind: Action = "retry" if action == "retry" else "discard"
        done = await act(
            server.app.store.outbox, kind, [event_id], by=who, now=server.app.clock.now(), note=note
        )
        if event_id in done.refused:
            status = done.refused[event_id]
            if status is None:
                raise ApiError(404, "event_not_found", f"no outbox event with id {event_id!r}")
            raise ApiError(409, "event_state", f"event {event_id!r} is {status}, not a dead letter")
        server.stats.invalidate()
        notice = "Sent again at the next claim." if kind == "retry" else "Discarded."
        return RedirectResponse(f"/ui/outbox?{urlencode({'notice': notice})}", status_code=303)

    @api.get("/ui/correlations/{correlation_id:path}", include_in_schema=False)
    async def correlation_page(request: Request, correlation_id: str) -> Response:
        auth = pages.reader(request)
        server = state_of(request)
        correlation_id = _checked(correlation_id, "correlation id")
        found = await load_correlation(server.app, correlation_id)
        if not found.runs:
            raise ApiError(
                404, "correlation_not_found", f"no run with correlation id {correlation_id!r}"
            )
        snap = await server.stats.get()
        return pages.render(
            request, "correlation.html", auth=auth, correlation=found, stuck=snap.stuck_ids
        )

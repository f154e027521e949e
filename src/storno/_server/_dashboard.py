"""The web dashboard under ``/ui``: server-rendered pages, one CSS and one JS file.

Pages read runs with a read or operator token: the login form checks it and starts a session
on the server, whose random id (never the token) is held in an HttpOnly cookie; signing out
ends the session. Forms that change a run are shown only to operators, and every action is checked
again on the server: role and a per-session form token (CSRF). Everything shown is escaped
by the templates: step arguments, results and errors are untrusted data.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from storno import __version__
from storno._correlation import correlation_of
from storno._errors import StornoError
from storno._model import ENDED_STATUSES, UNDOING_STATUSES, MessageKind, RunStatus
from storno._server._api_common import actor, state_of
from storno._server._auth import Principal, Role
from storno._server._dashboard_events import Pages, install_event_pages
from storno._server._errors import ApiError, from_storno
from storno._server._guards import run_id_of
from storno._server._models import check_identifier, check_text
from storno._server._wording import event_text, superseded_text
from storno._stuck import find_stuck, stuck_reason, threshold_for
from storno._timeline import build_timeline

__all__ = ["COOKIE", "install_dashboard"]

COOKIE = "storno_session"
HERE = Path(__file__).parent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE = 50
ACTIONS = ("retry", "compensate", "resolve", "cancel", "approve", "reject", "signal")


def _ts(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(value: float | None) -> str:
    if value is None:
        return ""
    return datetime.fromtimestamp(value, UTC).isoformat()


def _duration(value: float | None) -> str:
    if value is None or math.isnan(value):
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    if value < 172800:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} d"


def _json(value: Any) -> str:
    """Pretty JSON as plain text: the template escapes it like any other string."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def _short(value: Any, width: int = 80) -> str:
    text = value if isinstance(value, str) else _json(value).replace("\n", " ")
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _error_text(error: Any) -> str:
    if not isinstance(error, dict):
        return "" if error is None else str(error)
    kind, message = error.get("type", ""), error.get("message", "")
    return f"{kind}: {message}" if kind and message else str(message or kind)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ts=_ts,
        iso=_iso,
        duration=_duration,
        json=_json,
        short=_short,
        error_text=_error_text,
        superseded=superseded_text,
    )
    env.globals["version"] = __version__
    env.globals["statuses"] = [s.value for s in RunStatus]
    env.globals["q"] = lambda value: quote(str(value), safe="")
    return env


class _Auth:
    """The dashboard's view of who is looking."""

    def __init__(self, request: Request) -> None:
        server = state_of(request)
        tokens = server.tokens
        self.session = request.cookies.get(COOKIE)
        principal = tokens.check(None) if tokens.open else server.sessions.check(self.session)
        if principal is not None and principal.role is Role.WEBHOOK:
            principal = None
        self.principal: Principal | None = principal
        self.open = tokens.open
        # The form token is tied to the session, so a page of an ended session cannot post.
        self.csrf = tokens.csrf(self.session if principal is not None else None)
        if principal is not None:
            request.state.principal_name = principal.name


def install_dashboard(api: FastAPI) -> Any:
    """Add the dashboard's routes; return the renderer of its error pages."""
    env = _environment()
    api.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    def render(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
        auth = context.pop("auth", None) or _Auth(request)
        html = env.get_template(template).render(
            request_path=request.url.path,
            principal=auth.principal,
            open_mode=auth.open,
            csrf=auth.csrf,
            notice=request.query_params.get("notice", ""),
            **context,
        )
        return HTMLResponse(
            html,
            status_code=code,
            headers={
                "Content-Security-Policy": CSP,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store",
            },
        )

    async def error_page(request: Request, error: ApiError) -> Response:
        if error.status == 401:
            target = request.url.path
            if request.url.query:
                target += "?" + request.url.query
            return RedirectResponse("/ui/login?" + urlencode({"next": target}), status_code=303)
        return render(
            request,
            "error.html",
            code=error.status,
            error=error,
            auth=_Auth(request),
        )

    def reader(request: Request) -> _Auth:
        auth = _Auth(request)
        if auth.principal is None:
            raise ApiError(401, "unauthorized", "sign in with a token")
        return auth

    async def operator_form(request: Request) -> tuple[_Auth, dict[str, str]]:
        """The signed-in operator and the form posted, once its form token checks out."""
        auth = reader(request)
        form = await _form(request)
        if not state_of(request).tokens.csrf_ok(auth.session, form.get("csrf")):
            raise ApiError(403, "forbidden", "the form is stale or forged: reload the page")
        if auth.principal is None or not auth.principal.can_operate:
            raise ApiError(
                403, "forbidden", "this needs an operator token; you are signed in read-only"
            )
        return auth, form

    # --- login ----------------------------------------------------------------------------

    @api.get("/ui/login", include_in_schema=False)
    async def login_form(request: Request) -> Response:
        return render(request, "login.html", next=_safe_next(request.query_params.get("next")))

    @api.post("/ui/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await _form(request)
        token = form.get("token", "").strip()
        target = _safe_next(form.get("next"))
        principal = state_of(request).tokens.check(token)
        if principal is None or principal.role is Role.WEBHOOK or state_of(request).tokens.open:
            message = "That token is not valid for the dashboard."
            if state_of(request).tokens.open:
                message = "The server runs open on loopback; no token is needed."
            return render(request, "login.html", code=401, next=target, failed=message)
        response = RedirectResponse(target, status_code=303)
        sessions = state_of(request).sessions
        response.set_cookie(
            COOKIE,
            sessions.start(principal),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/ui",
            max_age=int(sessions.max_age),
        )
        return response

    @api.post("/ui/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        state_of(request).sessions.end(request.cookies.get(COOKIE))
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    # --- pages ----------------------------------------------------------------------------

    @api.get("/ui/", include_in_schema=False)
    @api.get("/ui", include_in_schema=False)
    async def runs_page(request: Request) -> Response:
        auth = reader(request)
        server = state_of(request)
        params = request.query_params
        status_text = params.get("status") or None
        saga = params.get("saga") or None
        wanted = params.get("run", "").strip()
        if wanted:
            try:
                check_identifier(wanted, "run id")
            except ValueError as exc:
                raise ApiError(422, "invalid_run_id", str(exc)) from None
            return RedirectResponse(f"/ui/runs/{quote(wanted, safe='/')}", status_code=303)
        status = None
        if status_text is not None:
            try:
                status = RunStatus(status_text)
            except ValueError:
                raise ApiError(422, "invalid_status", f"unknown status {status_text!r}") from None
        if saga is not None:
            try:
                check_identifier(saga, "saga")
            except ValueError as exc:
                raise ApiError(422, "invalid_saga", str(exc)) from None
        try:
            offset = max(0, min(int(params.get("offset", "0")), 1_000_000_000))
        except ValueError:
            offset = 0
        runs = await server.app.list_runs(status=status, saga=saga, limit=PAGE + 1, offset=offset)
        snap = await server.stats.get()
        sagas = sorted({s for s, _ in snap.by_saga_status})
        base = {k: v for k, v in (("status", status_text), ("saga", saga)) if v}
        return render(
            request,
            "runs.html",
            auth=auth,
            runs=runs[:PAGE],
            stuck=snap.stuck_ids,
            counts=snap.by_status,
            total=snap.total,
            stuck_count=len(snap.stuck),
            sagas=sagas,
            status=status_text or "",
            saga=saga or "",
            offset=offset,
            prev_link=("?" + urlencode({**base, "offset": max(offset - PAGE, 0)}))
            if offset
            else None,
            next_link=("?" + urlencode({**base, "offset": offset + PAGE}))
            if len(runs) > PAGE
            else None,
        )

    @api.get("/ui/dead-letters", include_in_schema=False)
    async def dead_letters_page(request: Request) -> Response:
        auth = reader(request)
        runs = await state_of(request).app.dead_letters(limit=200)
        return render(request, "dead_letters.html", auth=auth, runs=runs)

    @api.get("/ui/stuck", include_in_schema=False)
    async def stuck_page(request: Request) -> Response:
        auth = reader(request)
        server = state_of(request)
        found = await find_stuck(server.app, default=server.stuck_after, limit=500)
        return render(request, "stuck.html", auth=auth, found=found)

    @api.post("/ui/runs/{run_id:path}/{action}", include_in_schema=False)
    async def run_action(request: Request, run_id: str, action: str) -> Response:
        auth, form = await operator_form(request)
        run_id = run_id_of(run_id)
        assert auth.principal is not None
        if action not in ACTIONS:
            raise ApiError(404, "not_found", f"no action {action!r}")
        try:
            check_identifier(run_id, "run id")
            for key in ("note", "reason", "data", "name", "id", "not_applied", "outcome", "digest"):
                check_text(form.get(key, ""))
        except ValueError as exc:
            raise ApiError(422, "invalid", str(exc)) from None
        app = state_of(request).app
        who = actor(auth.principal, None)
        note = form.get("note", "").strip() or None
        reason = form.get("reason", "").strip()
        try:
            if action == "retry":
                await app.retry(run_id, by=who, note=note)
            elif action == "resolve":
                if not note:
                    raise ApiError(422, "invalid", "say what was done by hand in the note")
                outcome = form.get("outcome", "").strip() or None
                await app.resolve(run_id, by=who, note=note, outcome=outcome)
            elif action == "compensate":
                raw = form.get("not_applied", "")
                steps = [part.strip() for part in raw.split(",") if part.strip()]
                await app.compensate(run_id, by=who, note=note, not_applied=steps)
            elif action == "cancel":
                if not reason:
                    raise ApiError(422, "invalid", "a cancel needs a reason")
                await app.cancel(run_id, by=who, reason=reason)
            elif action == "approve":
                digest = form.get("digest", "").strip() or None
                await app.approve(run_id, by=who, note=note, digest=digest)
            elif action == "reject":
                if not reason:
                    raise ApiError(422, "invalid", "a rejection needs a reason")
                await app.reject(run_id, by=who, reason=reason)
            else:
                name = form.get("name", "").strip()
                try:
                    check_identifier(name, "signal name")
                except ValueError as exc:
                    raise ApiError(422, "invalid", str(exc)) from None
                raw = form.get("data", "").strip()
                try:
                    data = json.loads(raw) if raw else None
                except ValueError as exc:
                    raise ApiError(422, "invalid", f"the signal data is not JSON: {exc}") from None
                await app.signal(run_id, name, data, id=form.get("id", "").strip() or None)
        except StornoError as exc:
            error = from_storno(exc)
            if error is None:
                raise
            raise error from None
        state_of(request).stats.invalidate()
        back = form.get("back", "")
        target = back if back in ("/ui/dead-letters",) else f"/ui/runs/{quote(run_id, safe='/')}"
        notice = {
            "retry": "Retried.",
            "compensate": "Compensation started.",
            "resolve": "Marked completed by hand."
            if form.get("outcome") == "completed"
            else "Marked compensated by hand.",
            "cancel": "Cancel requested.",
            "approve": "Approved.",
            "reject": "Rejected.",
            "signal": "Signal sent.",
        }[action]
        return RedirectResponse(f"{target}?{urlencode({'notice': notice})}", status_code=303)

    @api.get("/ui/runs/{run_id:path}", include_in_schema=False)
    async def run_page(request: Request, run_id: str) -> Response:
        auth = reader(request)
        run_id = run_id_of(run_id)
        server = state_of(request)
        try:
            check_identifier(run_id, "run id")
        except ValueError as exc:
            raise ApiError(422, "invalid_run_id", str(exc)) from None
        info = await server.app.describe(run_id)
        timeline = build_timeline(info)
        now = time.time()
        reason = stuck_reason(info, now, threshold_for(server.app, info.saga, server.stuck_after))
        inbox = await server.app.store.inbox(run_id)
        consumed = {
            e.data["inbox_seq"] for e in info.history if isinstance(e.data.get("inbox_seq"), int)
        }
        messages = [
            {
                "seq": m.seq,
                "kind": m.kind.value,
                "name": "" if m.kind is MessageKind.APPROVAL else m.name,
                "id": m.message_id,
                "sent_at": m.sent_at,
                "meta": m.meta,
                "consumed": m.seq in consumed,
            }
            for m in inbox
            if m.kind.value != "child"
        ]
        return render(
            request,
            "run.html",
            auth=auth,
            run=info,
            timeline=timeline,
            run_events=[
                (e.at, e.kind, text) for e in timeline.events if (text := event_text(e)) is not None
            ],
            stuck_reason=reason,
            correlation=correlation_of(info),
            messages=messages,
            ended=info.status in ENDED_STATUSES,
            undoing=info.status in UNDOING_STATUSES,
            unknown_steps=[
                s.name for s in info.steps if s.outcome_unknown and s.kind != "compensable"
            ],
        )

    install_event_pages(api, Pages(render, reader, operator_form))
    return error_page


def _safe_next(value: str | None) -> str:
    """Only a path on this dashboard: never another site."""
    if value and value.startswith("/ui") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/"


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", "the form is not UTF-8") from None
    return dict(parse_qsl(text, keep_blank_values=True))

"""storno served to any MCP client (``storno[mcp]``): ``storno mcp --app module:app``.

:func:`create_server` builds a FastMCP server on a :class:`storno.Storno` application. Its
tools start work and read it back; none holds a request open while a run goes on:

- ``list_sagas``: the sagas a client may start, and the steps a plan may use.
- ``start_saga`` / ``start_plan``: start a registered saga with its arguments, or a plan (a
  saga as data) once it has passed :func:`storno.validate_plan`; both return the run id at
  once. An unknown saga is refused naming the registered ones, a bad plan with its findings.
- ``get_run``: a run's status, steps, what it waits for, and its history (poll this).
- ``list_approvals``: the runs waiting in ``ctx.wait_for_approval()``, with what each asks to
  approve and its digest.
- ``approve`` / ``reject``: an operator's decision. The client presents a ``token`` that
  must be an operator token of the server's (``$STORNO_API_TOKENS`` or a tokens file, as
  for ``storno serve``); a read-only token, an unknown one or none is refused, and the
  history records the token's name as the actor.

The runs are executed by a worker: ``storno worker`` beside it, or this server's own
(``worker=True``, ``storno mcp --worker``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Sequence
from typing import Any

from mcp.server.fastmcp import FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import ToolAnnotations

from storno._app import Storno
from storno._errors import PlanError, StornoError
from storno._history import fold
from storno._model import Event, RunStatus
from storno._plan import PLAN_SAGA_NAME
from storno._server._auth import ENV_OPERATOR, Principal, TokenStore

__all__ = ["create_server"]

_INSTRUCTIONS = """\
This server runs durable sagas with storno. Start work with start_saga or start_plan: they \
return a run id at once. Then poll get_run until the run's status has ended (completed, \
compensated, cancelled) or needs a person. A run that waits for approval is decided by an \
operator with approve or reject, which need an operator token."""

_READ = ToolAnnotations(readOnlyHint=True, idempotentHint=True, openWorldHint=False)
_WRITE = ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=True)
_DECIDE = ToolAnnotations(readOnlyHint=False, destructiveHint=True, openWorldHint=True)


def _fail(exc: Exception) -> ToolError:
    return ToolError(str(exc))


def _open_wait(history: list[Event]) -> dict[str, Any] | None:
    """The approval a run's history asks for now (its subject and digest), or ``None``."""
    found = fold(history).waits.values()
    waits = [w for w in found if w.kind == "approval" and w.status == "waiting"]
    if not waits:
        return None
    return {"position": waits[0].position, "subject": waits[0].subject, "digest": waits[0].digest}


class _Tools:
    """The tools' bodies, on one application and one token store."""

    def __init__(self, app: Storno, tokens: TokenStore) -> None:
        self.app = app
        self.tokens = tokens

    # --- starting -------------------------------------------------------------------

    def list_sagas(self) -> dict[str, Any]:
        """The sagas start_saga accepts (with their parameters) and the steps start_plan may
        use (with their kinds)."""
        sagas = []
        for name in self.app.saga_names:
            if name == PLAN_SAGA_NAME:
                continue
            saga = self.app.find_saga(name)
            params = list(inspect.signature(saga.fn).parameters.values())[1:]
            sagas.append(
                {
                    "name": name,
                    "parameters": [p.name for p in params],
                    "description": inspect.getdoc(saga.fn) or "",
                }
            )
        steps = [
            {"name": s.name, "kind": s.kind.value, "description": inspect.getdoc(s.fn) or ""}
            for s in self.app.registry.steps
        ]
        return {"sagas": sagas, "plan_steps": steps}

    async def start_saga(
        self,
        name: str,
        args: list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> dict[str, Any]:
        """Start a run of a registered saga with these arguments and return its run id at
        once (poll get_run). Starting again with the same run_id returns that run."""
        args, kwargs = list(args or []), dict(kwargs or {})
        known = [n for n in self.app.saga_names if n != PLAN_SAGA_NAME]
        if name not in known:
            names = ", ".join(repr(n) for n in known) or "none"
            raise ToolError(
                f"saga {name!r} is not registered with this server; the registered sagas are "
                f"{names} (list_sagas describes them; start a plan with start_plan)"
            )
        saga = self.app.find_saga(name)
        try:
            inspect.signature(saga.fn).bind(None, *args, **kwargs)
        except TypeError as exc:
            raise ToolError(f"saga {name!r} does not accept these arguments: {exc}") from None
        if run_id is not None:
            saga = saga.options(run_id=run_id)
        try:
            handle = await self.app.start(saga, *args, **kwargs)
        except StornoError as exc:
            raise _fail(exc) from None
        return {"run_id": handle.run_id, "saga": name, "status": await self._status(handle.run_id)}

    async def start_plan(
        self, steps: list[dict[str, Any]], run_id: str | None = None
    ) -> dict[str, Any]:
        """Check a plan (a list of {"step": name, "args": [...], "kwargs": {...}} calls of
        registered steps, compensable ones before the pivot) and start it; returns the run
        id at once. A plan with a problem is refused with its findings and nothing runs."""
        try:
            handle = await self.app.start_plan({"steps": steps}, run_id=run_id)
        except PlanError as exc:
            findings = "\n".join(f"- {p}" for p in exc.problems)
            raise ToolError(f"the plan was refused, nothing ran:\n{findings}") from None
        except StornoError as exc:
            raise _fail(exc) from None
        status = await self._status(handle.run_id)
        return {"run_id": handle.run_id, "saga": PLAN_SAGA_NAME, "status": status}

    async def _status(self, run_id: str) -> str:
        record = await self.app.store.get_run(run_id)
        return record.status.value if record is not None else "unknown"

    # --- reading --------------------------------------------------------------------

    async def get_run(self, run_id: str, history: bool = True) -> dict[str, Any]:
        """A run's status, result or error, steps, the approval it waits for (if any) and,
        unless history is false, its full history."""
        try:
            info = await self.app.describe(run_id)
        except StornoError as exc:
            raise _fail(exc) from None
        out = info.to_json(with_history=history)
        wait = None
        if info.status is RunStatus.WAITING:
            wait = _open_wait(await self.app.store.history(run_id))
        out["waiting_for_approval"] = wait
        return out

    async def list_approvals(self, limit: int = 50) -> dict[str, Any]:
        """The runs waiting for an operator's approval, newest first, with what each asks to
        approve (subject) and its digest (pass it to approve to decide on exactly that)."""
        runs = []
        for info in await self.app.list_runs(status=RunStatus.WAITING, limit=max(1, limit)):
            wait = _open_wait(await self.app.store.history(info.run_id))
            if wait is not None:
                runs.append({"run_id": info.run_id, "saga": info.saga, **wait})
        return {"runs": runs}

    # --- deciding -------------------------------------------------------------------

    def _operator(self, token: str | None, what: str) -> Principal:
        if self.tokens.empty and not self.tokens.open:
            raise ToolError(
                f"this server has no operator tokens, so no one may {what} through it; start "
                f"it with ${ENV_OPERATOR} (or a tokens file) and present one of them as token"
            )
        principal = self.tokens.check(token)
        if principal is None:
            said = "no token was given" if not token else "the token is not known"
            raise ToolError(
                f"refused: to {what} a run takes an operator's token ({said}); an approval is "
                f"an operator's decision, recorded under their name"
            )
        if not principal.can_operate:
            raise ToolError(
                f"refused: token {principal.name!r} is {principal.role.value}-only; to {what} "
                f"a run takes an operator's token"
            )
        return principal

    @staticmethod
    def _actor(principal: Principal, by: str | None) -> str:
        if not by or by == principal.name:
            return principal.name
        return f"{by} (via {principal.name})"

    async def approve(
        self,
        run_id: str,
        token: str,
        note: str | None = None,
        digest: str | None = None,
        by: str | None = None,
    ) -> dict[str, Any]:
        """Approve a run waiting for approval (operators only: token is an operator token).
        Pass the digest list_approvals showed to approve exactly what you were shown."""
        who = self._actor(self._operator(token, "approve"), by)
        try:
            await self.app.approve(run_id, by=who, note=note, digest=digest)
        except StornoError as exc:
            raise _fail(exc) from None
        return {"run_id": run_id, "approved": True, "by": who}

    async def reject(
        self, run_id: str, token: str, reason: str, by: str | None = None
    ) -> dict[str, Any]:
        """Reject a run waiting for approval (operators only); it compensates what it did."""
        who = self._actor(self._operator(token, "reject"), by)
        try:
            await self.app.reject(run_id, by=who, reason=reason)
        except StornoError as exc:
            raise _fail(exc) from None
        return {"run_id": run_id, "approved": False, "by": who}


def create_server(
    app: Storno,
    *,
    tokens: TokenStore | None = None,
    worker: bool = False,
    worker_options: dict[str, Any] | None = None,
    name: str = "storno",
) -> FastMCP[Any]:
    """An MCP server serving ``app``'s runs. ``tokens`` holds the operator (and read-only)
    tokens that approve and reject check; by default those of ``$STORNO_API_TOKENS`` and
    ``$STORNO_API_READ_TOKENS``. With ``worker`` the server also executes runs while a
    client is connected."""
    tools = _Tools(app, TokenStore.from_sources() if tokens is None else tokens)

    @contextlib.asynccontextmanager
    async def lifespan(server: FastMCP[Any]) -> AsyncIterator[None]:
        await app.open()
        if not worker:
            yield
            return
        async with app.worker(**(worker_options or {})):
            yield

    # FastMCP configures logging where nothing did yet; WARNING keeps a line per request out.
    server: FastMCP[Any] = FastMCP(
        name, instructions=_INSTRUCTIONS, lifespan=lifespan, log_level="WARNING"
    )
    table: Sequence[tuple[Any, ToolAnnotations]] = (
        (tools.list_sagas, _READ),
        (tools.start_saga, _WRITE),
        (tools.start_plan, _WRITE),
        (tools.get_run, _READ),
        (tools.list_approvals, _READ),
        (tools.approve, _DECIDE),
        (tools.reject, _DECIDE),
    )
    for fn, hints in table:
        server.add_tool(fn, annotations=hints, structured_output=True)
    return server

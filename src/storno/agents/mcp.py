"""An MCP server's tools as storno tools (``storno[mcp]``).

:func:`register` lists the tools of an MCP server (through the SDK's ``ClientSession``) and
registers each into a :class:`storno.agents.ToolRegistry` as the user classified it: a
:func:`read`, or a :func:`write` of a step kind with its compensation (often another tool of
the same server, called with the forward call's arguments and result) and an optional verify
tool. What a tool does to the world is the user's word, never the server's: a tool left
unclassified is registered as a refusal, so a model that calls it is told why and nothing runs.

Every call carries storno's identity in the request's ``_meta``: ``storno/idempotency_key``
(the step's structural key, the same on every retry, restart and worker, so a server that
honours it applies a call once), ``storno/run_id``, and for a compensation or a read-back
``storno/forward_key`` (the key of the call it undoes or looks up).

Where the server publishes annotations (``readOnlyHint``, ``destructiveHint``,
``idempotentHint``), :func:`report` shows them next to the classification and
:func:`register` warns where the two disagree.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from mcp import ClientSession
from mcp import types as mcp_types

from storno._definitions import NOT_APPLIED, CompensationContext, StepContext, step
from storno._errors import ConfigurationError
from storno._model import RetryPolicy, StepKind
from storno.agents._tools import Approval, Tool, ToolContext, ToolRegistry

__all__ = [
    "McpToolError",
    "Read",
    "ToolReport",
    "Write",
    "load_classification",
    "read",
    "register",
    "report",
    "write",
]

IDEMPOTENCY_KEY = "storno/idempotency_key"
RUN_ID = "storno/run_id"
FORWARD_KEY = "storno/forward_key"

Session = ClientSession | Callable[[], ClientSession | Awaitable[ClientSession]]
"""A session, or a function that returns the session to use now (called at each call)."""

ArgumentsFn = Callable[[dict[str, Any], Any], dict[str, Any]]


class McpToolError(RuntimeError):
    """The server answered a call with ``isError``: retried under the same key by the step's
    retry policy (a server that honours the key does not apply it twice)."""


@dataclass(frozen=True, slots=True)
class Read:
    """A tool with no side effects: its result is recorded, never compensated."""


@dataclass(frozen=True, slots=True)
class Write:
    """A tool that changes the world: a storno step of ``kind``.

    ``compensate`` names the server's tool that undoes it; ``compensate_arguments`` builds that
    tool's arguments from the forward call's arguments and result: a function, or a mapping of
    argument name to ``"arguments.<name>"``, ``"result.<name>"`` or ``"result"`` (by default the
    forward call's own arguments). The result is ``None`` in it when the forward call's outcome
    is unknown; the forward key is in the compensation's ``_meta`` as ``storno/forward_key``.
    ``verify`` names a tool that reads back, under the same key, whether a call whose answer
    was lost landed: it answers ``null`` when it did not, else the call's result
    (``verify_arguments`` as for the compensation, without a result).
    """

    kind: StepKind
    compensate: str | None = None
    compensate_arguments: ArgumentsFn | Mapping[str, str] | None = None
    verify: str | None = None
    verify_arguments: ArgumentsFn | Mapping[str, str] | None = None
    approval: Approval = None
    retry: RetryPolicy | None = None
    timeout: float | timedelta | None = None
    attempt_timeout: float | timedelta | None = None


Classification = Read | Write


def read() -> Read:
    """Classify a tool as a read."""
    return Read()


def write(
    kind: StepKind | str,
    *,
    compensate: str | None = None,
    compensate_arguments: ArgumentsFn | Mapping[str, str] | None = None,
    verify: str | None = None,
    verify_arguments: ArgumentsFn | Mapping[str, str] | None = None,
    approval: Approval = None,
    retry: RetryPolicy | None = None,
    timeout: float | timedelta | None = None,
    attempt_timeout: float | timedelta | None = None,
) -> Write:
    """Classify a tool as a write of ``kind`` (see :class:`Write`)."""
    parsed = StepKind.parse(kind)
    if parsed is StepKind.COMPENSABLE and compensate is None:
        raise ConfigurationError("a compensable write needs compensate=<the tool that undoes it>")
    return Write(
        parsed,
        compensate,
        compensate_arguments,
        verify,
        verify_arguments,
        approval,
        retry,
        timeout,
        attempt_timeout,
    )


def load_classification(source: str | Path | Mapping[str, Any]) -> dict[str, Classification]:
    """A classification from a TOML or JSON file (or its parsed content), for example:

    .. code-block:: toml

        [tools.balance]
        kind = "read"

        [tools.charge]
        kind = "compensable"
        compensate = "refund"
        compensate_arguments = { charge_id = "result.charge_id" }
        verify = "find_charge"
        approval = "always"
        attempt_timeout = 5
    """
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    entries = data.get("tools", data)
    if not isinstance(entries, Mapping):
        raise ConfigurationError("a classification maps tool names to their entries")
    known = {
        "kind",
        "compensate",
        "compensate_arguments",
        "verify",
        "verify_arguments",
        "approval",
        "timeout",
        "attempt_timeout",
    }
    out: dict[str, Classification] = {}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping) or "kind" not in entry:
            raise ConfigurationError(f"tool {name!r}: an entry needs kind = read or a step kind")
        unknown = set(entry) - known
        if unknown:
            raise ConfigurationError(f"tool {name!r}: unknown keys {sorted(unknown)}")
        if entry["kind"] == "read":
            if set(entry) != {"kind"}:
                raise ConfigurationError(f"tool {name!r}: a read takes no other keys")
            out[name] = Read()
            continue
        approval = entry.get("approval")
        if approval not in (None, "always"):
            raise ConfigurationError(f"tool {name!r}: approval in a file can only be 'always'")
        out[name] = write(
            entry["kind"],
            compensate=entry.get("compensate"),
            compensate_arguments=entry.get("compensate_arguments"),
            verify=entry.get("verify"),
            verify_arguments=entry.get("verify_arguments"),
            approval=approval,
            timeout=entry.get("timeout"),
            attempt_timeout=entry.get("attempt_timeout"),
        )
    return out


# --- calls -----------------------------------------------------------------------------------


async def _session(session: Session) -> ClientSession:
    if isinstance(session, ClientSession):
        return session
    made = session()
    if isinstance(made, ClientSession):
        return made
    return await made


def _wraps(tool: mcp_types.Tool) -> bool:
    """Whether the tool's structured result is FastMCP's wrapping of a value that is not an
    object, ``{"result": value}`` (its output schema says so)."""
    schema = tool.outputSchema or {}
    properties = schema.get("properties")
    return (
        schema.get("title") == f"{tool.name}Output"
        and isinstance(properties, Mapping)
        and set(properties) == {"result"}
    )


def _value(name: str, result: mcp_types.CallToolResult, wrapped: bool) -> Any:
    """A call's result as JSON-able data (FastMCP's wrapping undone where the tool's output
    schema says it wraps); ``isError`` raises :class:`McpToolError`."""
    texts = [c.text for c in result.content if isinstance(c, mcp_types.TextContent)]
    if result.isError:
        raise McpToolError(f"{name}: {' '.join(texts) or 'the server reported an error'}")
    if result.structuredContent is not None:
        content = dict(result.structuredContent)
        return content.get("result") if wrapped else content
    if len(texts) == len(result.content):
        return "\n".join(texts)
    return [c.model_dump(mode="json") for c in result.content]


async def _call(
    session: Session, name: str, arguments: dict[str, Any], meta: dict[str, Any], wrapped: bool
) -> Any:
    client = await _session(session)
    return _value(name, await client.call_tool(name, arguments, meta=meta), wrapped)


def _pick(path: str, arguments: dict[str, Any], result: Any) -> Any:
    if path == "result":
        return result
    where, _, key = path.partition(".")
    if where == "arguments":
        return arguments.get(key)
    if where == "result":
        return result.get(key) if isinstance(result, Mapping) else None
    raise ConfigurationError(f"{path!r} is not 'result', 'result.<name>' or 'arguments.<name>'")


def _arguments(
    how: ArgumentsFn | Mapping[str, str] | None, arguments: dict[str, Any], result: Any
) -> dict[str, Any]:
    if how is None:
        return dict(arguments)
    if callable(how):
        return dict(how(dict(arguments), result))
    return {name: _pick(path, arguments, result) for name, path in how.items()}


class _SchemaCheck:
    """Checks a call's arguments against the tool's JSON schema (the ``validator`` of a Tool)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.arguments: dict[str, Any] = {}

    def model_validate(self, arguments: dict[str, Any]) -> _SchemaCheck:
        import importlib

        importlib.import_module("jsonschema").validate(arguments, self.schema)
        checked = _SchemaCheck(self.schema)
        checked.arguments = dict(arguments)
        return checked

    def model_dump(self, mode: str = "json") -> dict[str, Any]:
        return self.arguments


class _Unclassified(Tool):
    """A tool the user did not classify: every call is refused, and nothing runs."""

    __slots__ = ()

    def check(self, arguments: Any) -> dict[str, Any]:
        raise ValueError(
            f"refused, nothing ran: {self.name!r} is not classified, so storno cannot tell "
            f"whether it changes anything or how to undo it; classify it as a read or a write"
        )


# --- annotations ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolReport:
    """One server tool: the user's classification next to the server's annotations."""

    name: str
    classification: str  # "read", a step kind, or "unclassified, refused to the model"
    annotations: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        hints = ", ".join(f"{k}={v}" for k, v in self.annotations.items()) or "no annotations"
        lines = [f"{self.name}: {self.classification} (server: {hints})"]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _hints(tool: mcp_types.Tool) -> dict[str, Any]:
    if tool.annotations is None:
        return {}
    names = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")
    return {
        n: getattr(tool.annotations, n) for n in names if getattr(tool.annotations, n) is not None
    }


def _disagreements(name: str, what: Classification | None, hints: dict[str, Any]) -> list[str]:
    if not hints or what is None:
        return []
    found: list[str] = []
    read_only = hints.get("readOnlyHint")
    if isinstance(what, Read):
        if read_only is not True:
            found.append(
                f"{name!r} is classified as a read but the server does not mark it read-only: "
                f"if it changes anything, nothing will undo it"
            )
        if hints.get("destructiveHint") is True:
            found.append(f"{name!r} is classified as a read but the server marks it destructive")
        return found
    if read_only is True:
        found.append(
            f"{name!r} is classified as a {what.kind.value} write but the server marks it read-only"
        )
    if what.kind is StepKind.RETRYABLE and hints.get("idempotentHint") is False:
        found.append(
            f"{name!r} is classified as retryable but the server says repeating it is not "
            f"idempotent: it is retried under the same key, which the server must honour"
        )
    return found


def report(
    tools: Iterable[mcp_types.Tool], classification: Mapping[str, Classification]
) -> list[ToolReport]:
    """Each server tool's classification next to its annotations, with the disagreements."""
    roles: dict[str, list[str]] = {}
    for name, entry in classification.items():
        if isinstance(entry, Write):
            if entry.compensate is not None:
                roles.setdefault(entry.compensate, []).append(f"undoes {name}")
            if entry.verify is not None:
                roles.setdefault(entry.verify, []).append(f"reads back {name}")
    rows = []
    for tool in tools:
        what = classification.get(tool.name)
        if what is None:
            role = "; ".join(roles.get(tool.name, []))
            label = f"unclassified, refused to the model{f' ({role})' if role else ''}"
        else:
            label = "read" if isinstance(what, Read) else what.kind.value
        hints = _hints(tool)
        rows.append(ToolReport(tool.name, label, hints, _disagreements(tool.name, what, hints)))
    return rows


# --- registration -----------------------------------------------------------------------------


async def list_all_tools(session: ClientSession) -> list[mcp_types.Tool]:
    """Every tool the server lists, across pages."""
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    while True:
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.nextCursor
        if not cursor:
            return tools


async def register(
    registry: ToolRegistry,
    session: Session,
    classification: Mapping[str, Classification] | str | Path,
    *,
    prefix: str = "",
) -> list[ToolReport]:
    """Register the server's tools into ``registry`` as ``classification`` says (a mapping of
    tool name to :func:`read` / :func:`write`, or a TOML/JSON file for
    :func:`load_classification`); returns the :func:`report`, and warns for each
    disagreement with the server's annotations.

    ``session`` is a ``ClientSession``, or a function returning the one to use at each call
    (a resumed run in a new process reaches the server through a new session). Registered
    names are ``prefix + tool name``; a write's step is named the same, so the registry's
    ``steps()`` go to ``Storno(steps=...)`` as usual.
    """
    if not isinstance(classification, Mapping):
        classification = load_classification(classification)
    listed = await list_all_tools(await _session(session))
    by_name = {t.name: t for t in listed}
    for name, what in classification.items():
        if name not in by_name:
            raise ConfigurationError(f"{name!r} is classified but the server has no such tool")
        if isinstance(what, Write):
            for other in (what.compensate, what.verify):
                if other is not None and other not in by_name:
                    raise ConfigurationError(
                        f"{name!r} names {other!r}, which the server does not have"
                    )
    rows = report(listed, classification)
    for row in rows:
        for warning in row.warnings:
            warnings.warn(warning, UserWarning, stacklevel=2)
    wrapped = {t.name for t in listed if _wraps(t)}
    for tool in listed:
        registry._add(_tool(session, tool, classification.get(tool.name), prefix, wrapped))
    return rows


def _tool(
    session: Session,
    tool: mcp_types.Tool,
    what: Classification | None,
    prefix: str,
    wrapped: set[str],
) -> Tool:
    name = f"{prefix}{tool.name}"
    server_name = tool.name
    description = tool.description or tool.title or tool.name
    schema = dict(tool.inputSchema)
    check = _SchemaCheck(schema)
    if what is None:

        def refused(ctx: ToolContext, **arguments: Any) -> None:  # never called
            raise AssertionError("an unclassified tool never runs")

        return _Unclassified(name, description, schema, "unclassified", refused, None, None, check)
    if isinstance(what, Read):

        async def read_fn(ctx: ToolContext, **arguments: Any) -> Any:
            meta = {RUN_ID: ctx.run_id}
            return await _call(session, server_name, arguments, meta, server_name in wrapped)

        return Tool(name, description, schema, "read", read_fn, None, None, check)

    spec = what

    async def forward(ctx: StepContext, /, **arguments: Any) -> Any:
        meta = {IDEMPOTENCY_KEY: ctx.idempotency_key, RUN_ID: ctx.run_id}
        return await _call(session, server_name, arguments, meta, server_name in wrapped)

    compensate = None
    if spec.compensate is not None:
        undo = spec.compensate

        async def compensate_fn(ctx: CompensationContext[Any], **arguments: Any) -> None:
            result = None if not ctx.outcome_known else ctx.result
            meta = {
                IDEMPOTENCY_KEY: ctx.idempotency_key,
                FORWARD_KEY: ctx.forward_key,
                RUN_ID: ctx.run_id,
            }
            args = _arguments(spec.compensate_arguments, arguments, result)
            await _call(session, undo, args, meta, undo in wrapped)

        compensate = compensate_fn
    verify = None
    if spec.verify is not None:
        look = spec.verify

        async def verify_fn(ctx: StepContext, **arguments: Any) -> Any:
            meta = {
                IDEMPOTENCY_KEY: ctx.idempotency_key,
                FORWARD_KEY: ctx.idempotency_key,
                RUN_ID: ctx.run_id,
            }
            args = _arguments(spec.verify_arguments, arguments, None)
            found = await _call(session, look, args, meta, look in wrapped)
            return NOT_APPLIED if found is None else found

        verify = verify_fn
    made = step(
        kind=spec.kind,
        compensate=compensate,
        verify=verify,
        retry=spec.retry,
        timeout=spec.timeout,
        attempt_timeout=spec.attempt_timeout,
        name=name,
    )(forward)
    return Tool(name, description, schema, spec.kind.value, forward, made, spec.approval, check)

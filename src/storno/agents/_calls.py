"""A model's decisions and tool calls, run through the engine that holds the truth.

The model is the unreliable narrator: its answer is journaled as it is made (a resumed run
replays it instead of asking again), a write it asks for is a step at the run's next position
(keyed by run, position and tool, never by the model's call id or arguments), and what it is
told about a write is what the engine established. A call it should not have made (an unknown
tool, arguments its schema refuses, a write the order rule forbids) is answered with an error
it can act on, and nothing runs.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from storno._context import SagaContext
from storno._errors import PlanError
from storno._model import StepKind
from storno.agents._tools import ToolContext, ToolRegistry

__all__ = ["ToolCall", "ToolOutcome", "call_tool", "call_tools", "decide"]

_ORDER = (
    "writes must come in the order compensable* pivot? (retryable | noncompensable)*: every "
    "write that can be undone first, then at most one pivot, then only retryable or "
    "noncompensable writes"
)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call as a model asks for it; ``id`` is the model's own, kept for its answers."""

    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """What the model is told about one call: its value, or an error it can act on."""

    call_id: str
    name: str
    ok: bool
    value: Any = None
    error: str | None = None


async def decide(
    ctx: SagaContext, fn: Callable[[], Any | Awaitable[Any]], *, name: str = "model"
) -> Any:
    """Ask ``fn()`` (the model) once; its JSON answer is durable before it is returned, and a
    resumed run gets it back without asking again."""
    return await ctx.record(name, fn)


# The first write past the point of no return, per execution of a saga body: a replay makes
# the same calls in the same order, so this is the same at every execution.
_forward_only: weakref.WeakKeyDictionary[SagaContext, str] = weakref.WeakKeyDictionary()
_pivots: weakref.WeakKeyDictionary[SagaContext, str] = weakref.WeakKeyDictionary()


async def call_tool(ctx: SagaContext, tools: ToolRegistry, call: ToolCall) -> ToolOutcome:
    """Run one call of the model's: a read (recorded), or a write as a step (after an
    operator's approval where the tool asks for one). A write that fails for good raises
    :class:`storno.StepFailedError`, which ends the forward path: the writes done so far are
    compensated. A refusal is returned as an outcome, with the reason."""
    tool = tools.get(call.name)
    if tool is None:
        known = ", ".join(tools.names()) or "none"
        return _refused(call, f"there is no tool named {call.name!r}; the tools are: {known}")
    try:
        arguments = tool.check(call.arguments)
    except ValueError as exc:
        return _refused(call, str(exc))
    if tool.step is None:
        value = await ctx.record(
            f"read:{tool.name}", lambda: tool.fn(ToolContext(ctx.run_id, tool.name), **arguments)
        )
        return ToolOutcome(call.id, call.name, True, value)
    past = _forward_only.get(ctx)
    kind = tool.step.kind
    if past is not None and kind is StepKind.COMPENSABLE:
        return _refused(
            call,
            f"refused, nothing ran: {tool.name!r} can be undone but {past!r}, which cannot, "
            f"has run already; {_ORDER}",
        )
    if kind is StepKind.PIVOT and _pivots.get(ctx) is not None:
        return _refused(
            call,
            f"refused, nothing ran: {tool.name!r} is a pivot, and {_pivots[ctx]!r} was the "
            f"run's pivot already; {_ORDER}",
        )
    if tool.needs_approval(arguments):
        # Bound to what is approved: the tool and these arguments (a digest of them).
        await ctx.wait_for_approval(subject={"tool": tool.name, "arguments": arguments})
    try:
        value = await ctx.step(tool.step, **arguments)
    except PlanError as exc:
        return _refused(call, f"refused, nothing ran: {exc}; {_ORDER}")
    if kind is not StepKind.COMPENSABLE:
        _forward_only.setdefault(ctx, tool.name)
    if kind is StepKind.PIVOT:
        _pivots.setdefault(ctx, tool.name)
    return ToolOutcome(call.id, call.name, True, value)


async def call_tools(
    ctx: SagaContext, tools: ToolRegistry, calls: Sequence[ToolCall]
) -> list[ToolOutcome]:
    """Run the calls of one model turn, in its order where the order rule allows: reads and
    compensable writes together, then each write that cannot be undone, only once every
    compensable write of the turn has succeeded (a failure raises before any of them runs)."""
    first: list[int] = []
    later: list[int] = []
    for index, call in enumerate(calls):
        tool = tools.get(call.name)
        undoable = tool is None or tool.step is None or tool.step.kind is StepKind.COMPENSABLE
        (first if undoable else later).append(index)
    outcomes: dict[int, ToolOutcome] = {}
    done = await ctx.gather(*(call_tool(ctx, tools, calls[i]) for i in first))
    outcomes.update(zip(first, done, strict=True))
    for index in later:
        outcomes[index] = await call_tool(ctx, tools, calls[index])
    return [outcomes[i] for i in range(len(calls))]


def _refused(call: ToolCall, why: str) -> ToolOutcome:
    return ToolOutcome(call.id, call.name, False, None, why)

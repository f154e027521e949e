"""Pydantic AI agents on storno: the agent's loop, storno's journal and steps.

A Pydantic AI agent keeps its own loop; inside a saga body, :func:`run` routes the two things
in it that must not happen twice through storno:

- each **model request** goes through :func:`storno.agents.decide` (:class:`StornoModel`, a
  ``WrapperModel``): the response is journaled, with the request that asked for it, before the
  agent sees it, and a resumed run gets the recorded response back without asking the model;
- each **tool call** of a tool registered in a :class:`storno.agents.ToolRegistry` goes through
  :func:`storno.agents.call_tools` (:class:`StornoToolset`, built from the registry, so a tool is
  declared once): the calls of one model response run together as a turn, in the order the
  order rule allows (or each on its own, behind a wrapper that may hold calls back), a write
  as a step keyed by (run, position, tool), a read recorded. A refusal (unknown
  tool, bad arguments, the order rule) reaches the model as a failed tool result
  (``ToolFailed``) saying why; a write that fails for good raises out of the agent, and the saga
  compensates the writes done so far.

Approvals are storno's: a write whose policy asks for one parks the run in a durable wait bound
to the tool and a digest of its arguments. Pydantic AI's own approval flow (``ApprovalRequired``,
``DeferredToolResults``) is a boolean per call id; it is never taken for a storno approval, so a
registry tool that Pydantic AI was told is approved still waits for storno's, and an approval
that overrides the arguments is a new call needing a new approval.

Tools the agent has of its own (``@agent.tool`` and other toolsets) are not journaled: they run
again on a replay. Streaming requests are answered from the journaled response in one piece.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic_ai import ToolsetTool
from pydantic_ai.agent import AbstractAgent
from pydantic_ai.exceptions import ToolFailed
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelResponse,
    TextPart,
    ToolCallPart,
)
from pydantic_ai.models import (
    CompletedStreamedResponse,
    KnownModelName,
    Model,
    ModelRequestContext,
    ModelRequestParameters,
    StreamedResponse,
)
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.run import AgentRunResult
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext, ToolDefinition
from pydantic_ai.toolsets import AbstractToolset, ApprovalRequiredToolset
from pydantic_core import SchemaValidator, core_schema

from storno._context import SagaContext
from storno._errors import ConfigurationError
from storno.agents._calls import ToolCall, ToolOutcome, call_tool, call_tools, decide
from storno.agents._tools import ToolRegistry

__all__ = ["StornoModel", "StornoToolset", "bind", "run"]

_saga: ContextVar[SagaContext | None] = ContextVar("storno_pydantic_ai_saga", default=None)

# Arguments are checked by the registry (storno's own wording, one place for every adapter), so
# Pydantic AI hands them over as the model sent them.
_ANY = SchemaValidator(core_schema.any_schema())


def _context(explicit: SagaContext | None, what: str) -> SagaContext:
    ctx = explicit if explicit is not None else _saga.get()
    if ctx is None:
        raise ConfigurationError(
            f"{what} runs only inside a saga body: call storno.agents.pydantic_ai.run(ctx, "
            f"agent, ...) there, or enter bind(ctx) around agent.run(...)"
        )
    return ctx


@contextmanager
def bind(ctx: SagaContext) -> Iterator[SagaContext]:
    """Make ``ctx`` the saga the storno models and toolsets in this task (and the tasks it
    starts) journal to, for an ``agent.run(...)`` or ``agent.iter(...)`` made inside."""
    token = _saga.set(ctx)
    try:
        yield ctx
    finally:
        _saga.reset(token)


def _dump(messages: Sequence[ModelMessage]) -> list[Any]:
    dumped: list[Any] = ModelMessagesTypeAdapter.dump_python(list(messages), mode="json")
    return dumped


def _summary(response: ModelResponse) -> dict[str, Any]:
    """The answer in the shape of storno's own loop (``ModelTurn``): its text, its calls."""
    words = [part.content for part in response.parts if isinstance(part, TextPart)]
    calls = [
        {"id": part.tool_call_id, "name": part.tool_name, "arguments": part.args_as_dict()}
        for part in response.parts
        if isinstance(part, ToolCallPart)
    ]
    return {"text": "".join(words) if words else None, "tool_calls": calls}


def _load_response(data: Any) -> ModelResponse:
    (message,) = ModelMessagesTypeAdapter.validate_python([data])
    if not isinstance(message, ModelResponse):
        raise ConfigurationError("the journaled model answer is not a model response")
    return message


class StornoModel(WrapperModel):
    """A model whose every request is decided once: the response (and the request that asked
    for it: the last message, its prompt or its tool results) is journaled through
    :func:`storno.agents.decide` before the agent sees it; a replay returns the journaled
    response and never asks ``wrapped`` again."""

    def __init__(
        self,
        wrapped: Model | KnownModelName | str,
        *,
        ctx: SagaContext | None = None,
        name: str = "model",
    ) -> None:
        super().__init__(wrapped)
        self._ctx = ctx
        self._name = name

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        saga = _context(self._ctx, "a storno model")
        wrapped = self.wrapped

        async def ask() -> dict[str, Any]:
            response = await wrapped.request(messages, model_settings, model_request_parameters)
            return {
                "answered": _summary(response),  # what the timeline shows first
                "request": _dump(messages[-1:]),
                "response": _dump([response])[0],
            }

        answer = await decide(saga, ask, name=self._name)
        return _load_response(answer["response"])

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        # A journaled answer is whole: the stream replays it in one piece, the same on a replay.
        response = await self.request(messages, model_settings, model_request_parameters)
        yield CompletedStreamedResponse(
            response, model_request_parameters=model_request_parameters, replay_events=True
        )

    async def compact_messages(
        self,
        request_context: ModelRequestContext,
        *,
        instructions: str | None = None,
    ) -> ModelResponse:
        saga = _context(self._ctx, "a storno model")
        wrapped = self.wrapped

        async def ask() -> dict[str, Any]:
            response = await wrapped.compact_messages(request_context, instructions=instructions)
            return {"response": _dump([response])[0]}

        answer = await decide(saga, ask, name=f"{self._name}:compact")
        return _load_response(answer["response"])


@dataclass
class _Turn:
    """The registry's calls of one model response, run together once."""

    step: int  # Pydantic AI's run step: the model request the calls answer
    calls: tuple[ToolCall, ...]
    outcomes: asyncio.Task[list[ToolOutcome]]


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # every caller of the turn sees it; do not log it as lost


class StornoToolset(AbstractToolset[Any]):
    """The tools of a :class:`storno.agents.ToolRegistry`, as a Pydantic AI toolset.

    The model sees each tool's name, docstring and JSON schema from the registry (the step's
    context, and so its idempotency key, is not in it). A refused call is a failed tool result
    the model sees (``ToolFailed``).

    With ``turns=True`` (the default) the registry calls of a fresh model response go through
    :func:`storno.agents.call_tools` together, as one turn: reads and compensable writes side
    by side, then each write that cannot be undone once all of those succeeded. That needs
    every call of the turn to reach this toolset; a wrapper that may hold some back (Pydantic
    AI's ``approval_required``, a custom one raising ``CallDeferred``) needs ``turns=False``:
    each call then runs on its own through :func:`storno.agents.call_tool`, as Pydantic AI
    dispatches it. :meth:`approval_required` sets it. Calls answered in a later agent run (a
    deferred call resumed with ``DeferredToolResults``) always run on their own.
    """

    def __init__(
        self,
        registry: ToolRegistry,
        *,
        ctx: SagaContext | None = None,
        id: str = "storno",
        turns: bool = True,
    ) -> None:
        self.registry = registry
        self.turns = turns
        self._ctx = ctx
        self._id = id
        self._turn: _Turn | None = None

    @property
    def id(self) -> str | None:
        return self._id

    async def for_run(self, ctx: RunContext[Any]) -> AbstractToolset[Any]:
        # One agent may serve many runs at once: each run gets its own turn state.
        return StornoToolset(self.registry, ctx=self._ctx, id=self._id, turns=self.turns)

    def approval_required(
        self,
        approval_required_func: Callable[
            [RunContext[Any], ToolDefinition, dict[str, Any]], bool
        ] = (lambda ctx, tool_def, tool_args: True),
    ) -> ApprovalRequiredToolset[Any]:
        """Pydantic AI's approval in front of storno's: the agent's caller says yes first (the
        run ends with ``DeferredToolRequests``), then a write whose registry policy asks for
        it still waits for an operator's approval of the arguments it runs with."""
        alone = StornoToolset(self.registry, ctx=self._ctx, id=self._id, turns=False)
        return ApprovalRequiredToolset(alone, approval_required_func)

    async def get_tools(self, ctx: RunContext[Any]) -> dict[str, ToolsetTool[Any]]:
        tools: dict[str, ToolsetTool[Any]] = {}
        for tool in self.registry:
            definition = ToolDefinition(
                name=tool.name,
                parameters_json_schema=tool.parameters,
                description=tool.description,
                metadata={"storno_kind": tool.kind},
            )
            tools[tool.name] = ToolsetTool(
                toolset=self, tool_def=definition, max_retries=0, args_validator=_ANY
            )
        return tools

    async def call_tool(
        self, name: str, tool_args: dict[str, Any], ctx: RunContext[Any], tool: ToolsetTool[Any]
    ) -> Any:
        # ctx.tool_call_approved (Pydantic AI's approval) is deliberately not consulted: a write
        # needing approval waits for storno's, bound to the digest of these arguments.
        saga = _context(self._ctx, "a storno tool")
        call_id = ctx.tool_call_id or name
        calls = self._fresh_turn(ctx) if self.turns else ()
        mine = next((c for c in calls if c.id == call_id), None)
        if mine is None or mine.name != name or mine.arguments != tool_args:
            # On its own, at the run's next position: not part of a fresh turn, or not as the
            # model asked it (arguments overridden on approval).
            outcome = await call_tool(saga, self.registry, ToolCall(call_id, name, tool_args))
        else:
            turn = self._turn
            if turn is None or (turn.step, turn.calls) != (ctx.run_step, calls):
                task = asyncio.ensure_future(call_tools(saga, self.registry, list(calls)))
                task.add_done_callback(_retrieve)
                turn = self._turn = _Turn(ctx.run_step, calls, task)
            outcomes = await turn.outcomes
            outcome = outcomes[calls.index(mine)]
        if not outcome.ok:
            raise ToolFailed(outcome.error or f"tool {name!r} failed")
        return outcome.value

    def _fresh_turn(self, ctx: RunContext[Any]) -> tuple[ToolCall, ...]:
        """The registry's tool calls of the model response being acted on, in its order, if
        none of them has been answered yet (the response is the last message)."""
        if not ctx.messages or ctx.tool_call_approved:
            return ()
        response = ctx.messages[-1]
        if not isinstance(response, ModelResponse):
            return ()
        return tuple(
            ToolCall(part.tool_call_id, part.tool_name, part.args_as_dict())
            for part in response.parts
            if isinstance(part, ToolCallPart) and self.registry.get(part.tool_name) is not None
        )


async def run(
    ctx: SagaContext,
    agent: AbstractAgent[Any, Any],
    user_prompt: Any = None,
    *,
    tools: ToolRegistry | None = None,
    model: Model | KnownModelName | str | None = None,
    toolsets: Sequence[AbstractToolset[Any]] | None = None,
    model_name: str = "model",
    **kwargs: Any,
) -> AgentRunResult[Any]:
    """Run ``agent`` in a saga body, its model requests and registry tool calls through storno.

    The model (``model``, else the agent's own) is wrapped in a :class:`StornoModel` unless it
    is one; ``tools`` adds the registry as a :class:`StornoToolset` for this run (or give the
    agent ``toolsets=[StornoToolset(registry)]`` where it is declared). Other keyword
    arguments go to ``agent.run``. A write that fails for good raises out of here (the saga
    compensates); a run waiting for an approval waits here, durably.
    """
    chosen = model if model is not None else agent.model
    if chosen is None:
        raise ConfigurationError("the agent has no model: pass model= to run()")
    wrapped = chosen if isinstance(chosen, StornoModel) else StornoModel(chosen, name=model_name)
    extra = list(toolsets or [])
    if tools is not None:
        extra.append(StornoToolset(tools))
    with bind(ctx):
        result: AgentRunResult[Any] = await agent.run(
            user_prompt, model=wrapped, toolsets=extra or None, **kwargs
        )
    return result

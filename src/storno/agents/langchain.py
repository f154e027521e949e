"""LangChain v1 agents on storno: the agent's graph, storno's journal and steps.

A ``create_agent`` agent runs its own loop (a LangGraph graph); :class:`StornoMiddleware`, one
of its middleware, routes the two things in it that must not happen twice through storno when
the agent runs inside a saga body (``await agent.ainvoke(...)`` within :func:`bind`, or
:func:`run`):

- each **model call** (``awrap_model_call``) goes through :func:`storno.agents.decide`: the
  answer (its messages, the ``AIMessage`` with its tool calls) is journaled, with the last
  message it answers, before the agent sees it, and a resumed run gets the recorded answer
  back without asking the model;
- each **tool call** (``awrap_tool_call``) of a tool of the :class:`storno.agents.ToolRegistry`
  goes through :func:`storno.agents.call_tools`: the registry calls of one ``AIMessage`` run
  together as a turn, in the order the order rule allows, a write as a step keyed by (run,
  position, tool), a read recorded. A refusal (unknown tool, bad arguments, the order rule)
  is answered as a ``ToolMessage`` with ``status="error"`` saying why; a write that fails for
  good raises out of the agent, and the saga compensates the writes done so far.

The middleware hands the registry's tools to the agent itself (``middleware.tools``, built by
:func:`tools` from the registry, so a tool is declared once). Tools the agent has of its own
are not journaled: they run again on a replay.

Approvals are storno's: a write whose policy asks for one parks the run in a durable wait
bound to the tool and a digest of its arguments. LangGraph's ``interrupt()`` (and
``HumanInTheLoopMiddleware``) does not replace it: a call a human approved or edited there
still waits for storno's approval of the arguments it runs with, and :func:`run` refuses an
agent run that ended in an interrupt, which would otherwise leave the saga body finished with
the agent's work half done.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ToolMessage,
    messages_from_dict,
    messages_to_dict,
)
from langchain_core.tools import BaseTool, StructuredTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from storno._context import SagaContext
from storno._errors import ConfigurationError
from storno.agents._calls import ToolCall, ToolOutcome, call_tool, call_tools, decide
from storno.agents._tools import ToolRegistry

__all__ = ["StornoMiddleware", "bind", "run", "tools"]

_saga: ContextVar[SagaContext | None] = ContextVar("storno_langchain_saga", default=None)


def _context(explicit: SagaContext | None, what: str) -> SagaContext:
    ctx = explicit if explicit is not None else _saga.get()
    if ctx is None:
        raise ConfigurationError(
            f"{what} runs only inside a saga body: call storno.agents.langchain.run(ctx, "
            f"agent, ...) there, or enter bind(ctx) around agent.ainvoke(...)"
        )
    return ctx


@contextmanager
def bind(ctx: SagaContext) -> Iterator[SagaContext]:
    """Make ``ctx`` the saga the storno middleware in this task (and the tasks it starts)
    journals to, for an ``agent.ainvoke(...)`` or ``agent.astream(...)`` made inside."""
    token = _saga.set(ctx)
    try:
        yield ctx
    finally:
        _saga.reset(token)


def tools(registry: ToolRegistry) -> list[BaseTool]:
    """The registry's tools as LangChain tools: name, docstring and JSON schema from the
    registry (the step's context, and so its idempotency key, is not in it). They run only
    through :class:`StornoMiddleware`; invoked any other way they refuse."""

    def built(name: str, description: str, schema: dict[str, Any]) -> BaseTool:
        async def outside(**arguments: Any) -> Any:
            raise ConfigurationError(
                f"tool {name!r} of a storno ToolRegistry runs only through StornoMiddleware"
            )

        def outside_sync(**arguments: Any) -> Any:
            raise ConfigurationError(
                f"tool {name!r} of a storno ToolRegistry runs only through StornoMiddleware"
            )

        return StructuredTool(
            name=name,
            description=description or name,
            args_schema=schema,
            func=outside_sync,
            coroutine=outside,
            metadata={"storno_kind": registry_kind[name]},
        )

    registry_kind = {tool.name: tool.kind for tool in registry}
    return [built(t.name, t.description, t.parameters) for t in registry]


def _summary(message: AIMessage) -> dict[str, Any]:
    """The answer in the shape of storno's own loop (``ModelTurn``): its text, its calls."""
    words = message.text
    calls = [
        {"id": call.get("id"), "name": call["name"], "arguments": call["args"]}
        for call in message.tool_calls
    ]
    return {"text": words or None, "tool_calls": calls}


def _json(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{what} is not JSON, so it cannot be journaled: {exc}") from exc


def _content(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _last_ai(state: Any) -> AIMessage | None:
    messages = state.get("messages") if isinstance(state, Mapping) else None
    if not messages:
        return None
    last = messages[-1]
    return last if isinstance(last, AIMessage) else None


class StornoMiddleware(AgentMiddleware[Any, Any, Any]):
    """The middleware that journals a ``create_agent`` agent's model calls and runs its
    registry tool calls as storno steps; give it to ``create_agent(middleware=[...])``.

    ``registry`` (optional) is the agent's storno tools: the middleware registers them with the
    agent (do not pass them again in ``tools=``). ``ctx`` binds it to one saga; without it the
    saga is the one :func:`bind` (or :func:`run`) set for the running task. ``name`` is the
    name the model's answers are recorded under (``#N name: ...`` in ``storno show``).
    """

    def __init__(
        self,
        registry: ToolRegistry | None = None,
        *,
        ctx: SagaContext | None = None,
        name: str = "model",
    ) -> None:
        super().__init__()
        self.registry = registry if registry is not None else ToolRegistry()
        self.tools = tools(self.registry)
        self._ctx = ctx
        self._name = name
        # The turn being run, per saga execution: the AIMessage's registry calls, run once.
        self._turns: weakref.WeakKeyDictionary[
            SagaContext, tuple[tuple[ToolCall, ...], asyncio.Task[list[ToolOutcome]]]
        ] = weakref.WeakKeyDictionary()

    @property
    def name(self) -> str:
        return "StornoMiddleware"

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any]:
        saga = _context(self._ctx, "the storno middleware")

        async def ask() -> dict[str, Any]:
            response = await handler(request)
            answer = [m for m in response.result if isinstance(m, AIMessage)]
            return {
                # what the timeline shows first
                "answered": _summary(answer[-1]) if answer else {"text": None, "tool_calls": []},
                "request": _json(messages_to_dict(request.messages[-1:]), "the model request"),
                "result": _json(messages_to_dict(response.result), "the model answer"),
                "structured": _json(response.structured_response, "the structured response"),
            }

        answer = await decide(saga, ask, name=self._name)
        result: list[BaseMessage] = messages_from_dict(answer["result"])
        return ModelResponse(result=result, structured_response=answer.get("structured"))

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        call = request.tool_call
        name = call["name"]
        if self.registry.get(name) is None:
            return await handler(request)  # the agent's own tool: not storno's
        saga = _context(self._ctx, "a storno tool")
        call_id = call.get("id") or name
        mine = ToolCall(call_id, name, dict(call["args"]))
        calls = self._fresh_turn(request.state)
        if mine not in calls:
            # Not as the model asked it (changed by other middleware): on its own, at the
            # run's next position.
            outcome = await call_tool(saga, self.registry, mine)
        else:
            turn = self._turns.get(saga)
            if turn is None or turn[0] != calls:
                task = asyncio.ensure_future(call_tools(saga, self.registry, list(calls)))
                task.add_done_callback(_retrieve)
                turn = (calls, task)
                self._turns[saga] = turn
            outcome = (await turn[1])[calls.index(mine)]
        if not outcome.ok:
            return ToolMessage(
                content=outcome.error or f"tool {name!r} failed",
                tool_call_id=call_id,
                name=name,
                status="error",
            )
        return ToolMessage(content=_content(outcome.value), tool_call_id=call_id, name=name)

    def _fresh_turn(self, state: Any) -> tuple[ToolCall, ...]:
        """The registry's tool calls of the AIMessage being acted on, in its order."""
        message = _last_ai(state)
        if message is None:
            return ()
        return tuple(
            ToolCall(c.get("id") or c["name"], c["name"], dict(c["args"]))
            for c in message.tool_calls
            if self.registry.get(c["name"]) is not None
        )


async def _from_the_start(ctx: SagaContext, agent: Any, config: Any) -> Any:
    """With a checkpointer and a thread, the graph starts at the checkpoint the thread was at
    when this run first invoked it (journaled), so a replay does not continue from the state
    the interrupted execution left in the thread (its input once more on top of it)."""
    saver = getattr(agent, "checkpointer", None)
    configurable = dict((config or {}).get("configurable") or {})
    thread = configurable.get("thread_id")
    if not isinstance(saver, BaseCheckpointSaver) or thread is None:
        return config
    if "checkpoint_id" in configurable:
        return config  # the caller chose where to start

    async def latest() -> str | None:
        found = await saver.aget_tuple({"configurable": configurable})
        return None if found is None else str(found.config["configurable"]["checkpoint_id"])

    start = await ctx.record("langgraph:checkpoint", latest)
    if await latest() == start:
        return config  # the first execution, or a replay that had not reached the graph
    if start is None:
        # The thread was new to this run: what it holds is the interrupted execution's.
        await saver.adelete_thread(thread)
        return config
    return {**config, "configurable": {**configurable, "checkpoint_id": start}}


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # every caller of the turn sees it; do not log it as lost


async def run(
    ctx: SagaContext,
    agent: Any,
    input: Any,
    config: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``await agent.ainvoke(input, config, **kwargs)`` inside a saga body, the agent's
    :class:`StornoMiddleware` bound to ``ctx``. A write that fails for good raises out of here
    (the saga compensates); a run waiting for a storno approval waits here, durably. A run that
    LangGraph interrupted (``interrupt()``, human in the loop) is refused: inside a saga the
    approval is storno's."""
    config = await _from_the_start(ctx, agent, config)
    with bind(ctx):
        result: Any = await agent.ainvoke(input, config, **kwargs)
    if isinstance(result, Mapping) and result.get("__interrupt__"):
        raise ConfigurationError(
            "the agent stopped at a LangGraph interrupt; inside a saga body a human decision "
            "is storno's durable approval (a registry write with approval=...), not interrupt()"
        )
    return dict(result) if isinstance(result, Mapping) else {"output": result}

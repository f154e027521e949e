"""Run an OpenAI Agents SDK agent inside a storno saga body (``storno[openai-agents]``).

Two things make such an agent durable:

- **Model responses are journaled.** :class:`DurableModel` wraps the SDK's ``Model``: each
  ``get_response`` goes through :func:`storno.agents.decide`, which records the response (as
  JSON) before the SDK sees it. A resumed run gets the recorded response back and the model
  is not asked again. :class:`DurableModelProvider` does the same for the models a provider
  resolves by name.
- **Function tools are storno steps.** :func:`function_tools` builds the SDK's
  ``FunctionTool`` objects from a :class:`storno.agents.ToolRegistry`, so a tool is declared
  once. When the SDK invokes them, the calls of one model response go through
  :func:`storno.agents.call_tools` together, in the order the model gave them: a write is a
  step at the run's next position (its idempotency key is structural), the order rule and
  approvals hold, and a refusal reaches the model as the tool's output.

:func:`run` puts it together: ``await run(ctx, agent, input)`` inside a saga body wraps the
agent's model, runs ``Runner.run`` and hands back its ``RunResult``. A write that fails for
good raises its :class:`storno.StepFailedError` out of :func:`run` (not the SDK's wrapping of
it), so the saga compensates the writes done so far.

Approvals are storno's: a tool declared with ``approval=`` waits durably for an operator inside
``call_tools``, bound to a digest of its arguments. The SDK's own ``needs_approval`` flow is
switched off for these tools (it would interrupt the run outside the journal and ask twice),
and :func:`run` refuses agents whose other function tools use it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agents import (
    Agent,
    FunctionTool,
    ItemHelpers,
    Model,
    ModelProvider,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    RunConfig,
    Runner,
    RunResult,
    Tool,
)
from agents.handoffs import Handoff
from agents.tool_context import ToolContext
from agents.usage import deserialize_usage, serialize_usage
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputItem
from pydantic import TypeAdapter, ValidationError

from storno import ConfigurationError, SagaContext
from storno import agents as core

__all__ = [
    "DurableModel",
    "DurableModelProvider",
    "dump_response",
    "function_tools",
    "load_response",
    "run",
]

_OUTPUT_ITEM: TypeAdapter[Any] = TypeAdapter(ResponseOutputItem)


# --- model responses as JSON -------------------------------------------------------------------


def _jsonable(item: Any) -> Any:
    """An SDK item (a pydantic model of the OpenAI types, or a plain dict) as JSON-able data."""
    to_dict = getattr(item, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    model_dump = getattr(item, "model_dump", None)
    if callable(model_dump):
        return model_dump(mode="json", exclude_unset=True, by_alias=True)
    return json.loads(json.dumps(item, default=str))


def dump_response(response: ModelResponse) -> dict[str, Any]:
    """A ``ModelResponse`` as JSON-able data (what storno records); :func:`load_response`
    rebuilds it."""
    return {
        "output": [_jsonable(item) for item in response.output],
        "usage": serialize_usage(response.usage),
        "response_id": response.response_id,
        "request_id": response.request_id,
    }


def _output_item(data: Any) -> Any:
    try:
        return _OUTPUT_ITEM.validate_python(data)
    except ValidationError:
        return data  # an item type this version of the openai package does not model


def load_response(data: Mapping[str, Any]) -> ModelResponse:
    """The ``ModelResponse`` that :func:`dump_response` recorded."""
    return ModelResponse(
        output=[_output_item(item) for item in data["output"]],
        usage=deserialize_usage(data.get("usage") or {}),
        response_id=data.get("response_id"),
        request_id=data.get("request_id"),
    )


def _decision(response: ModelResponse) -> dict[str, Any]:
    """A response's text and tool calls, in the shape ``storno.agents.run_agent`` records."""
    texts = [ItemHelpers.extract_text(item) for item in response.output]
    calls = []
    for item in response.output:
        if isinstance(item, ResponseFunctionToolCall):
            try:
                arguments: Any = json.loads(item.arguments or "{}")
            except ValueError:
                arguments = item.arguments
            calls.append({"id": item.call_id, "name": item.name, "arguments": arguments})
    text = "".join(t for t in texts if t) or None
    return {"text": text, "tool_calls": calls}


# --- one agent run inside a saga body ----------------------------------------------------------


@dataclass
class _Turn:
    """The storno tool calls of one model response, run together on their first invocation."""

    calls: list[tuple[core.ToolRegistry, core.ToolCall]]
    refused: dict[str, str]  # call id -> an error for arguments that are not JSON
    task: asyncio.Task[dict[str, core.ToolOutcome]] | None = None

    def holds(self, call_id: str) -> bool:
        return call_id in self.refused or any(call.id == call_id for _, call in self.calls)


@dataclass
class _Session:
    """What one :func:`run` knows while the SDK drives the agent."""

    ctx: SagaContext
    turns: list[_Turn] = field(default_factory=list)
    failure: BaseException | None = None
    seen_input: int = 0

    def note(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = error

    async def settle(self) -> None:
        """Wait for every tool batch still running (the SDK may have cancelled its callers)."""
        tasks = [turn.task for turn in self.turns if turn.task is not None]
        if tasks:
            await asyncio.wait(tasks)


_session: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "storno_openai_agents_session", default=None
)


def _current(what: str) -> _Session:
    session = _session.get()
    if session is None:
        raise ConfigurationError(
            f"{what} runs only inside storno.agents.openai_agents.run(ctx, agent, ...), called "
            f"from a saga body; Runner.run on its own would not journal anything"
        )
    return session


# --- the model -----------------------------------------------------------------------------------


class DurableModel(Model):
    """A ``Model`` whose responses are journaled by the storno run that :func:`run` drives.

    ``name`` is the name of the recorded decision (shown in the run's history). Wrap the model
    of every agent a run may hand off to; :func:`run` wraps the starting agent's own.
    """

    def __init__(self, model: Model, *, name: str = "model") -> None:
        self.model = model
        self.name = name

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[Any],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: Any,
        handoffs: list[Handoff[Any, Any]],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> ModelResponse:
        session = _current("a DurableModel")
        if isinstance(input, str):
            request: dict[str, Any] = {"input": input}
        else:
            # Only the items new since the previous request: the tool outputs the model sees.
            start = session.seen_input if session.seen_input <= len(input) else 0
            request = {"items": len(input), "new": [_jsonable(item) for item in input[start:]]}
            session.seen_input = len(input)
        request["tools"] = [tool.name for tool in tools]

        async def ask() -> dict[str, Any]:
            response = await self.model.get_response(
                system_instructions,
                input,
                model_settings,
                tools,
                output_schema,
                handoffs,
                tracing,
                previous_response_id=previous_response_id,
                conversation_id=conversation_id,
                prompt=prompt,
            )
            # What the model decided (first in the JSON, so `storno show` prints it), then all
            # of the response and what the model was told since its previous answer.
            decision = _decision(response)
            return {"decision": decision, "request": request, "response": dump_response(response)}

        try:
            recorded = await core.decide(session.ctx, ask, name=self.name)
            response = load_response(recorded["response"])
        except BaseException as exc:
            session.note(exc)
            raise
        session.turns.append(_turn_of(response, tools))
        if not isinstance(input, str):
            session.seen_input += len(response.output)
        return response

    def stream_response(
        self,
        system_instructions: str | None,
        input: str | list[Any],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: Any,
        handoffs: list[Handoff[Any, Any]],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> AsyncIterator[Any]:
        raise ConfigurationError(
            "a durable agent run is not streamed: storno records whole responses; use "
            "storno.agents.openai_agents.run() (Runner.run), not Runner.run_streamed"
        )

    def get_retry_advice(self, request: Any) -> Any:
        return self.model.get_retry_advice(request)

    async def close(self) -> None:
        await self.model.close()

    async def _cleanup_on_run_end(self, owner: object) -> None:
        await self.model._cleanup_on_run_end(owner)

    def __repr__(self) -> str:
        return f"DurableModel({self.model!r})"


class DurableModelProvider(ModelProvider):
    """A ``ModelProvider`` whose models are :class:`DurableModel` s."""

    def __init__(self, provider: ModelProvider, *, name: str = "model") -> None:
        self.provider = provider
        self.name = name

    def get_model(self, model_name: str | None) -> Model:
        model = self.provider.get_model(model_name)
        return model if isinstance(model, DurableModel) else DurableModel(model, name=self.name)

    async def aclose(self) -> None:
        await self.provider.aclose()


# --- the tools -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Invoker:
    """``on_invoke_tool`` of a FunctionTool built from a storno registry."""

    registry: core.ToolRegistry
    name: str

    async def __call__(self, tool_context: ToolContext[Any], arguments: str) -> str:
        session = _current(f"storno tool {self.name!r}")
        call_id = tool_context.tool_call_id
        turn = next((t for t in reversed(session.turns) if t.holds(call_id)), None)
        if turn is None:
            error = ConfigurationError(
                f"tool call {call_id!r} ({self.name}) comes from a model response storno did "
                f"not record: wrap the model of every agent in DurableModel"
            )
            session.note(error)
            raise error
        if call_id in turn.refused:
            return turn.refused[call_id]
        if turn.task is None:
            turn.task = asyncio.create_task(_run_turn(session, turn))
        # Shielded: if the SDK cancels this invocation, the tool calls still run to their end
        # (storno records every call it started); run() waits for them before it returns.
        outcomes = await asyncio.shield(turn.task)
        return _for_model(outcomes[call_id])


def function_tools(
    registry: core.ToolRegistry,
    names: Iterable[str] | None = None,
    *,
    strict: bool = False,
) -> list[FunctionTool]:
    """The SDK's ``FunctionTool`` for each tool of ``registry`` (or those in ``names``).

    The name, description and JSON schema are the registry's (the idempotency key and other
    context never appear in it). ``strict`` asks the SDK for its strict schema mode, which
    needs every parameter required. Invoking the tools runs them through storno, so they work
    only inside :func:`run`.
    """
    chosen = list(registry.names() if names is None else names)
    built = []
    for name in chosen:
        tool = registry.get(name)
        if tool is None:
            known = ", ".join(registry.names()) or "none"
            raise ConfigurationError(f"no tool named {name!r} in the registry; it has: {known}")
        built.append(
            FunctionTool(
                name=tool.name,
                description=tool.description,
                params_json_schema=dict(tool.parameters),
                on_invoke_tool=_Invoker(registry, tool.name),
                strict_json_schema=strict,
                # storno asks for approval itself, durably and bound to the arguments; the SDK's
                # own interruption would happen outside the journal and ask a second time.
                needs_approval=False,
            )
        )
    return built


def _storno_tools(tools: Iterable[Any]) -> dict[str, core.ToolRegistry]:
    return {
        tool.name: tool.on_invoke_tool.registry
        for tool in tools
        if isinstance(tool, FunctionTool) and isinstance(tool.on_invoke_tool, _Invoker)
    }


def _turn_of(response: ModelResponse, tools: list[Tool]) -> _Turn:
    """The storno tool calls in a response, in the order the model gave them."""
    registries = _storno_tools(tools)
    calls: list[tuple[core.ToolRegistry, core.ToolCall]] = []
    refused: dict[str, str] = {}
    for item in response.output:
        if not isinstance(item, ResponseFunctionToolCall) or item.name not in registries:
            continue
        try:
            arguments = json.loads(item.arguments or "{}")
        except ValueError as exc:
            refused[item.call_id] = f"error: the arguments are not valid JSON ({exc}); nothing ran"
            continue
        if not isinstance(arguments, dict):
            refused[item.call_id] = "error: the arguments must be a JSON object; nothing ran"
            continue
        calls.append(
            (
                registries[item.name],
                core.ToolCall(id=item.call_id, name=item.name, arguments=arguments),
            )
        )
    return _Turn(calls, refused)


async def _run_turn(session: _Session, turn: _Turn) -> dict[str, core.ToolOutcome]:
    """Every storno call of one turn through ``call_tools``, one batch per registry."""
    outcomes: dict[str, core.ToolOutcome] = {}
    batches: dict[int, tuple[core.ToolRegistry, list[core.ToolCall]]] = {}
    for registry, call in turn.calls:
        batches.setdefault(id(registry), (registry, []))[1].append(call)
    try:
        for registry, calls in batches.values():
            for outcome in await core.call_tools(session.ctx, registry, calls):
                outcomes[outcome.call_id] = outcome
    except BaseException as exc:
        session.note(exc)
        raise
    return outcomes


def _for_model(outcome: core.ToolOutcome) -> str:
    """A tool outcome as the tool output the model reads."""
    if not outcome.ok:
        return f"error: {outcome.error}"
    if isinstance(outcome.value, str):
        return outcome.value
    return json.dumps(outcome.value, default=str)


# --- the runner ----------------------------------------------------------------------------------


def _agents_reachable(agent: Agent[Any]) -> list[Agent[Any]]:
    seen: dict[int, Agent[Any]] = {}
    todo = [agent]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen[id(current)] = current
        todo.extend(h for h in current.handoffs if isinstance(h, Agent))
    return list(seen.values())


def _check_agents(agent: Agent[Any], config: RunConfig) -> None:
    for each in _agents_reachable(agent):
        unwrapped = isinstance(each.model, Model) and not isinstance(each.model, DurableModel)
        if unwrapped and config.model is None:
            raise ConfigurationError(
                f"agent {each.name!r} has a model storno would not journal: wrap it, "
                f"Agent(..., model=DurableModel(model))"
            )
        for tool in each.tools:
            if (
                isinstance(tool, FunctionTool)
                and not isinstance(tool.on_invoke_tool, _Invoker)
                and tool.needs_approval is not False
            ):
                raise ConfigurationError(
                    f"tool {tool.name!r} of agent {each.name!r} uses the SDK's needs_approval, "
                    f"which would interrupt the run outside storno's journal; declare the tool "
                    f"in a storno ToolRegistry with approval=... and use function_tools()"
                )


async def run(
    ctx: SagaContext,
    agent: Agent[Any],
    input: str | list[Any],
    *,
    run_config: RunConfig | None = None,
    context: Any = None,
    max_turns: int | None = None,
    **runner_kwargs: Any,
) -> RunResult:
    """Run ``agent`` with ``Runner.run`` inside a saga body, durably.

    Model responses are journaled (the starting agent's model, ``run_config.model`` and the
    models ``run_config.model_provider`` resolves are wrapped in :class:`DurableModel`), and
    the storno tools of :func:`function_tools` run as steps. Without a ``run_config``, tracing
    is off. Errors storno raises inside the run (a failed write, a rejected approval) come out
    of here as themselves, so the saga compensates. Other ``Runner.run`` keywords pass through.
    """
    if _session.get() is not None:
        raise ConfigurationError("storno's agent runs do not nest (an agent used as a tool)")
    config = RunConfig(tracing_disabled=True) if run_config is None else run_config
    changes: dict[str, Any] = {}
    if isinstance(config.model, Model) and not isinstance(config.model, DurableModel):
        changes["model"] = DurableModel(config.model)
    if not isinstance(config.model_provider, DurableModelProvider):
        changes["model_provider"] = DurableModelProvider(config.model_provider)
    if changes:
        config = dataclasses.replace(config, **changes)
    if isinstance(agent.model, Model) and not isinstance(agent.model, DurableModel):
        agent = agent.clone(model=DurableModel(agent.model))
    _check_agents(agent, config)
    if max_turns is not None:
        runner_kwargs["max_turns"] = max_turns

    session = _Session(ctx)
    token = _session.set(session)
    result: RunResult | None = None
    try:
        try:
            result = await Runner.run(
                agent, input, context=context, run_config=config, **runner_kwargs
            )
        finally:
            await session.settle()
    except BaseException:
        if session.failure is None:
            raise
    finally:
        _session.reset(token)
    if session.failure is not None:
        # storno's own error (a failed write, a rejected approval, a wait), not the SDK's
        # wrapping of it, and even where the SDK turned it into a tool output.
        raise session.failure
    assert result is not None
    if result.interruptions:
        raise ConfigurationError(
            f"the agent run stopped for {len(result.interruptions)} SDK approval(s); storno "
            f"does approvals itself: declare them on storno tools (approval=...)"
        )
    return result

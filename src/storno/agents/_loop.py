"""An agent loop of storno's own, for any model behind a small callable (and for tests).

``run_agent`` asks the model, journals each answer, runs the tool calls it asks for through
:func:`~storno.agents.call_tools`, and tells it the outcomes, until it answers with text. The
frameworks' adapters (Pydantic AI, the OpenAI Agents SDK) keep their own loops and route their
model requests and tool calls through the same two operations.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from storno._context import SagaContext
from storno._errors import TerminalError
from storno.agents._calls import ToolCall, ToolOutcome, call_tools, decide
from storno.agents._tools import ToolRegistry

__all__ = ["Model", "ModelTurn", "ScriptedModel", "run_agent"]

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ModelTurn:
    """One answer of a model: text, tool calls, or both."""

    text: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.tool_calls]
        return {"text": self.text, "tool_calls": calls}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelTurn:
        calls = [ToolCall(c["id"], c["name"], dict(c["arguments"])) for c in data["tool_calls"]]
        return cls(data.get("text"), calls)


Model = Callable[[list[Message], list[dict[str, Any]]], "ModelTurn | Awaitable[ModelTurn]"]
"""A model: given the conversation and the tools' schemas, its next turn."""


class ScriptedModel:
    """A model that answers from a script, for tests and examples: each turn is a
    :class:`ModelTurn`, or a function of the conversation that returns one. Like a real model
    it answers the conversation it is given: its n-th answer follows n-1 earlier ones, however
    many times it was asked. ``calls`` counts how often it was asked (a replay must not)."""

    def __init__(self, turns: Sequence[ModelTurn | Callable[[list[Message]], ModelTurn]]):
        self.turns = list(turns)
        self.calls = 0

    def __call__(self, messages: list[Message], tools: list[dict[str, Any]]) -> ModelTurn:
        self.calls += 1
        number = sum(1 for m in messages if m.get("role") == "assistant")
        if number >= len(self.turns):
            raise TerminalError(f"the scripted model has no turn {number + 1}")
        turn = self.turns[number]
        return turn(messages) if callable(turn) else turn


def _answer(outcome: ToolOutcome) -> Message:
    content = outcome.value if outcome.ok else {"error": outcome.error}
    return {
        "role": "tool",
        "tool_call_id": outcome.call_id,
        "name": outcome.name,
        "content": content,
    }


async def run_agent(
    ctx: SagaContext,
    model: Model,
    tools: ToolRegistry,
    prompt: str,
    *,
    instructions: str | None = None,
    max_turns: int = 20,
) -> str:
    """Run an agent in a saga body until the model answers with text; that text is returned.

    Every model answer is journaled before any tool it asks for runs; a resumed run replays it.
    A write that fails for good raises out of here, and the saga compensates the writes done.
    """
    messages: list[Message] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    messages.append({"role": "user", "content": prompt})
    schemas = tools.schemas()
    for _ in range(max_turns):

        async def ask() -> dict[str, Any]:
            answer = model(list(messages), schemas)
            if inspect.isawaitable(answer):
                answer = await answer
            return answer.to_json()

        turn = ModelTurn.from_json(await decide(ctx, ask))
        messages.append({"role": "assistant", **turn.to_json()})
        if not turn.tool_calls:
            return turn.text or ""
        for outcome in await call_tools(ctx, tools, turn.tool_calls):
            messages.append(_answer(outcome))
    raise TerminalError(f"the agent did not finish within {max_turns} model turns")

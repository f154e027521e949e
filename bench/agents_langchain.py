"""What storno adds per write tool call of a LangChain agent (``create_agent``), on SQLite.

The same scripted chat model (each model turn asks for one write tool call, then a final text
answer) drives two agents built alike, run by run in this process: one with the write tool
given to ``create_agent`` as a plain LangChain tool (LangChain alone, nothing journaled, no
checkpointer), one with ``StornoMiddleware(registry)`` run through
``storno.agents.langchain.run(ctx, agent, input)`` in a saga (each model answer journaled,
each write a step under a lease). The difference per write call is storno's overhead; printed
as the median and p99 over runs of several rounds. Nothing here is asserted.

    python -m bench.agents_langchain [--rounds 5] [--runs 200] [--writes 5]
        [--synchronous full|normal]
"""

from __future__ import annotations

import argparse
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import StructuredTool

import storno
from bench import write_overhead
from storno import agents
from storno.agents import langchain as storno_lc

tools = agents.ToolRegistry()


@tools.write(kind="compensable", compensate=lambda ctx, n: None)
def reserve(ctx: storno.StepContext, n: int) -> str:
    """Reserve item n."""
    return f"r{n}"


def reserve_plain(n: int) -> str:
    """Reserve item n."""
    return f"r{n}"


class Scripted(GenericFakeChatModel):
    """The model: one write call a turn, ``writes`` turns, then a text answer."""

    writes: int = 5

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        turn = sum(isinstance(m, AIMessage) for m in messages)
        if turn < self.writes:
            call = {"id": f"c{turn}", "name": "reserve", "args": {"n": turn}, "type": "tool_call"}
            answer = AIMessage(content="", tool_calls=[call])
        else:
            answer = AIMessage(content="done")
        return ChatResult(generations=[ChatGeneration(message=answer)])


async def one_round(folder: Path, args: argparse.Namespace) -> list[float]:
    """Seconds of overhead per write call, one figure per run."""
    plain_agent = create_agent(
        Scripted(messages=iter(()), writes=args.writes),
        tools=[StructuredTool.from_function(reserve_plain, name="reserve")],
    )
    storno_agent = create_agent(
        Scripted(messages=iter(()), writes=args.writes),
        middleware=[storno_lc.StornoMiddleware(tools)],
    )
    start_input = {"messages": [("user", "go")]}

    @storno.saga(name="bench_langchain_agent")
    async def agent(ctx: storno.SagaContext) -> str:
        result = await storno_lc.run(ctx, storno_agent, start_input)
        return str(result["messages"][-1].content)

    url = f"sqlite:///{folder / 'agents.db'}?synchronous={args.synchronous}"
    overheads = []
    async with storno.Storno(url, sagas=[agent], steps=tools.steps()) as app, app.worker():
        for _ in range(10):  # warm up
            await plain_agent.ainvoke(start_input)
            await app.run(agent)
        for _ in range(args.runs):
            start = time.perf_counter()
            await plain_agent.ainvoke(start_input)
            plain = time.perf_counter() - start
            start = time.perf_counter()
            await app.run(agent)
            with_storno = time.perf_counter() - start
            overheads.append((with_storno - plain) / args.writes)
    return overheads


def main() -> None:
    versions = f"langchain {version('langchain')}, langgraph {version('langgraph')}"
    write_overhead.main(__doc__ or "", one_round, f"of a LangChain agent ({versions})")


if __name__ == "__main__":
    main()

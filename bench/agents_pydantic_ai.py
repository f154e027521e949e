"""What storno adds per write tool call of a Pydantic AI agent, on SQLite.

The same scripted ``FunctionModel`` (each model turn asks for one write tool call, then a final
text answer) drives two agents built alike, run by run in this process: one with the write tool
registered on the ``Agent`` as a plain function tool (Pydantic AI alone, nothing journaled), one
run through ``storno.agents.pydantic_ai.run(ctx, agent, prompt, tools=registry)`` in a saga
(each model response journaled, each write a step under a lease). The difference per write call
is storno's overhead; printed as the median and p99 over runs of several rounds. Nothing here is
asserted.

    python -m bench.agents_pydantic_ai [--rounds 5] [--runs 200] [--writes 5]
        [--synchronous full|normal]
"""

from __future__ import annotations

import argparse
import time
from importlib.metadata import version
from pathlib import Path

from pydantic_ai import Agent, Tool
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

import storno
from bench import write_overhead
from storno import agents
from storno.agents import pydantic_ai as storno_pai

INSTRUCTIONS = "Reserve the items, then say so."

tools = agents.ToolRegistry()


@tools.write(kind="compensable", compensate=lambda ctx, n: None)
def reserve(ctx: storno.StepContext, n: int) -> str:
    """Reserve item n."""
    return f"r{n}"


def reserve_plain(n: int) -> str:
    """Reserve item n."""
    return f"r{n}"


def scripted(writes: int) -> FunctionModel:
    """The model: one write call a turn, ``writes`` turns, then a text answer."""

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        turn = sum(isinstance(m, ModelResponse) for m in messages)
        if turn < writes:
            return ModelResponse(parts=[ToolCallPart("reserve", {"n": turn}, f"c{turn}")])
        return ModelResponse(parts=[TextPart("done")])

    return FunctionModel(answer)


async def one_round(folder: Path, args: argparse.Namespace) -> list[float]:
    """Seconds of overhead per write call, one figure per run."""
    plain_agent = Agent(
        scripted(args.writes),
        instructions=INSTRUCTIONS,
        tools=[Tool(reserve_plain, name="reserve", takes_ctx=False)],
    )
    storno_agent = Agent(scripted(args.writes), instructions=INSTRUCTIONS)

    @storno.saga(name="bench_pydantic_agent")
    async def agent(ctx: storno.SagaContext) -> str:
        result = await storno_pai.run(ctx, storno_agent, "go", tools=tools)
        return str(result.output)

    url = f"sqlite:///{folder / 'agents.db'}?synchronous={args.synchronous}"
    overheads = []
    async with storno.Storno(url, sagas=[agent], steps=tools.steps()) as app, app.worker():
        for _ in range(10):  # warm up
            await plain_agent.run("go")
            await app.run(agent)
        for _ in range(args.runs):
            start = time.perf_counter()
            await plain_agent.run("go")
            plain = time.perf_counter() - start
            start = time.perf_counter()
            await app.run(agent)
            with_storno = time.perf_counter() - start
            overheads.append((with_storno - plain) / args.writes)
    return overheads


def main() -> None:
    write_overhead.main(
        __doc__ or "",
        one_round,
        f"of a Pydantic AI agent (pydantic-ai-slim {version('pydantic-ai-slim')})",
    )


if __name__ == "__main__":
    main()

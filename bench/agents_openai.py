"""What storno adds per write tool call of an OpenAI Agents SDK agent, on SQLite.

The same agent with the same scripted model (the SDK's ``agents.testing.ScriptedModel``: each
turn asks for one write tool call, then a final answer; tracing off) runs twice in this
process, run by run: with the SDK alone (``Runner.run``, plain ``function_tool`` s, nothing
kept) and through ``storno.agents.openai_agents.run`` inside a saga (each model response
journaled, each write a step under a lease, tools from ``function_tools(registry)``). The
difference per write call is storno's overhead; printed as the median and p99 over runs of
several rounds. Nothing here is asserted.

No module in ``bench/`` may be called ``agents``: run as a script, this one would import it in
place of the SDK's ``agents`` package.

    python -m bench.agents_openai [--rounds 5] [--runs 200] [--writes 5]
        [--synchronous full|normal]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.testing import ScriptedModel, assistant_message, function_call

import storno
from bench import write_overhead
from storno import agents
from storno.agents import openai_agents

tools = agents.ToolRegistry()


@tools.write(kind="compensable", compensate=lambda ctx, n: None)
def reserve(ctx: storno.StepContext, n: int) -> str:
    """Reserve item n."""
    return f"r{n}"


@function_tool(name_override="reserve")
def plain_reserve(n: int) -> str:
    """Reserve item n."""
    return f"r{n}"


def script(writes: int) -> list[Any]:
    turns: list[Any] = [
        [function_call("reserve", {"n": i}, call_id=f"c{i}")] for i in range(writes)
    ]
    return [*turns, [assistant_message("done")]]


def agent_with(writes: int, agent_tools: list[Any]) -> Agent[Any]:
    return Agent(
        name="bench",
        instructions="Reserve.",
        tools=agent_tools,
        model=ScriptedModel(script(writes)),
    )


async def one_round(folder: Path, args: argparse.Namespace) -> list[float]:
    """Seconds of overhead per write call, one figure per run."""
    durable_tools: list[Any] = openai_agents.function_tools(tools)

    @storno.saga(name="bench_openai_agent")
    async def agent(ctx: storno.SagaContext) -> str:
        result = await openai_agents.run(ctx, agent_with(args.writes, durable_tools), "go")
        return str(result.final_output)

    url = f"sqlite:///{folder / 'agents.db'}?synchronous={args.synchronous}"
    overheads = []
    async with storno.Storno(url, sagas=[agent], steps=tools.steps()) as app, app.worker():
        for _ in range(10):  # warm up
            await Runner.run(agent_with(args.writes, [plain_reserve]), "go")
            await app.run(agent)
        for _ in range(args.runs):
            plain_agent = agent_with(args.writes, [plain_reserve])
            start = time.perf_counter()
            await Runner.run(plain_agent, "go")
            plain = time.perf_counter() - start
            start = time.perf_counter()
            await app.run(agent)
            with_storno = time.perf_counter() - start
            overheads.append((with_storno - plain) / args.writes)
    return overheads


def main() -> None:
    set_tracing_disabled(True)
    write_overhead.main(__doc__ or "", one_round, "of an OpenAI Agents SDK agent")


if __name__ == "__main__":
    main()

"""What storno adds per write tool call of an agent, on SQLite.

The same scripted model and the same tool functions run twice in this process: in storno's
agent loop (each model answer journaled, each write a step under a lease, one run a saga) and in
a plain loop that calls the model and the tools directly and keeps nothing. The difference per
write call is storno's overhead; printed as the median and p99 over runs of several rounds.
Nothing here is asserted.

    python -m bench.agent_loop [--rounds 5] [--runs 200] [--writes 5] [--synchronous full|normal]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import storno
from bench import write_overhead
from storno import agents

tools = agents.ToolRegistry()


@tools.write(kind="compensable", compensate=lambda ctx, n: None)
def reserve(ctx: storno.StepContext, n: int) -> str:
    """Reserve item n."""
    return f"r{n}"


def script(writes: int) -> list[agents.ModelTurn]:
    turns = [
        agents.ModelTurn(tool_calls=[agents.ToolCall(str(i), "reserve", {"n": i})])
        for i in range(writes)
    ]
    return [*turns, agents.ModelTurn(text="done")]


async def plain_loop(model: agents.ScriptedModel) -> str:
    """The agent loop without storno: ask, call the tool, tell the model, keep nothing."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    schemas = tools.schemas()
    while True:
        turn = model(messages, schemas)
        messages.append({"role": "assistant", **turn.to_json()})
        if not turn.tool_calls:
            return turn.text or ""
        for call in turn.tool_calls:
            tool = tools.get(call.name)
            assert tool is not None
            value = tool.fn(None, **tool.check(call.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": value})


async def one_round(folder: Path, args: argparse.Namespace) -> list[float]:
    """Seconds of overhead per write call, one figure per run."""
    turns = script(args.writes)

    @storno.saga(name="bench_agent")
    async def agent(ctx: storno.SagaContext) -> str:
        return await agents.run_agent(ctx, agents.ScriptedModel(turns), tools, "go")

    url = f"sqlite:///{folder / 'agents.db'}?synchronous={args.synchronous}"
    overheads = []
    async with storno.Storno(url, sagas=[agent], steps=tools.steps()) as app, app.worker():
        for _ in range(10):  # warm up
            await app.run(agent)
        for _ in range(args.runs):
            start = time.perf_counter()
            await plain_loop(agents.ScriptedModel(turns))
            plain = time.perf_counter() - start
            start = time.perf_counter()
            await app.run(agent)
            with_storno = time.perf_counter() - start
            overheads.append((with_storno - plain) / args.writes)
    return overheads


def main() -> None:
    write_overhead.main(__doc__ or "", one_round, "")


if __name__ == "__main__":
    main()

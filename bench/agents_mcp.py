"""What storno adds per write call of an MCP server's tool, on SQLite.

The same scripted model calls the same FastMCP server's write tool over the MCP SDK's
in-memory transport twice in this process: in a plain loop that calls ``session.call_tool``
and keeps nothing, and in storno's agent loop over the tools ``storno.agents.mcp.register``
made of the server's (each model answer journaled, each write a step whose key goes in the
request's ``_meta``, one run a saga). The difference per write call is storno's overhead,
printed as the median and p99 over runs of several rounds. Nothing here is asserted.

    python -m bench.agents_mcp [--rounds 5] [--runs 100] [--writes 5] [--synchronous full|normal]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mcp import ClientSession
from mcp.server.fastmcp import Context, FastMCP
from mcp.shared.memory import create_connected_server_and_client_session

import storno
from storno import agents
from storno.agents import mcp

server = FastMCP("bench", log_level="WARNING")
seen: dict[str, str] = {}


@server.tool()
def reserve(n: int, ctx: Context[Any, Any, Any]) -> str:
    """Reserve item n (once per idempotency key)."""
    meta = ctx.request_context.meta
    key = str((meta.model_extra or {}).get("storno/idempotency_key") if meta else n)
    return seen.setdefault(key, f"r{n}")


@server.tool()
def release(n: int) -> None:
    """Release item n."""


def script(writes: int) -> list[agents.ModelTurn]:
    turns = [
        agents.ModelTurn(tool_calls=[agents.ToolCall(str(i), "reserve", {"n": i})])
        for i in range(writes)
    ]
    return [*turns, agents.ModelTurn(text="done")]


async def plain_loop(session: ClientSession, model: agents.ScriptedModel) -> str:
    """The agent loop without storno: ask, call the server's tool, tell the model."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "go"}]
    while True:
        turn = model(messages, [])
        messages.append({"role": "assistant", **turn.to_json()})
        if not turn.tool_calls:
            return turn.text or ""
        for call in turn.tool_calls:
            result = await session.call_tool(call.name, call.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result.content})


async def one_round(folder: Path, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Seconds of overhead per write call, one figure per run; and the plain loop's own."""
    turns = script(args.writes)
    overheads, plains = [], []
    async with create_connected_server_and_client_session(server) as session:
        tools = agents.ToolRegistry()
        classification = {"reserve": mcp.write("compensable", compensate="release")}
        await mcp.register(tools, session, classification)

        @storno.saga(name="bench_mcp_agent")
        async def agent(ctx: storno.SagaContext) -> str:
            return await agents.run_agent(ctx, agents.ScriptedModel(turns), tools, "go")

        url = f"sqlite:///{folder / 'agents.db'}?synchronous={args.synchronous}"
        async with storno.Storno(url, sagas=[agent], steps=tools.steps()) as app, app.worker():
            for _ in range(10):  # warm up
                await plain_loop(session, agents.ScriptedModel(turns))
                await app.run(agent)
            for _ in range(args.runs):
                start = time.perf_counter()
                await plain_loop(session, agents.ScriptedModel(turns))
                plain = time.perf_counter() - start
                start = time.perf_counter()
                await app.run(agent)
                with_storno = time.perf_counter() - start
                overheads.append((with_storno - plain) / args.writes)
                plains.append(plain / args.writes)
    return overheads, plains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--writes", type=int, default=5)
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    args = parser.parse_args()
    medians, p99s, plain = [], [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            overheads, plains = asyncio.run(one_round(Path(tmp), args))
        per_call = sorted(overheads)
        plain.append(statistics.median(plains) * 1000)
        medians.append(statistics.median(per_call) * 1000)
        p99s.append(per_call[max(int(len(per_call) * 0.99) - 1, 0)] * 1000)
    print(
        f"storno's overhead per MCP write call (in-memory transport, SQLite, "
        f"synchronous={args.synchronous}, {args.writes} writes a run, {args.runs} runs x "
        f"{args.rounds} rounds): median {statistics.median(medians):.2f} ms (rounds "
        f"{min(medians):.2f}-{max(medians):.2f}), p99 {statistics.median(p99s):.2f} ms; "
        f"the plain MCP call itself: median {statistics.median(plain):.2f} ms"
    )


if __name__ == "__main__":
    main()

"""A LangChain agent as a saga, and the worker process the SIGKILL test kills.

The agent's chat model has a memory that outlives the process: every request it gets is
appended to a log file. Asked for its first turn a second time, it would charge 999 instead of
120, so a replay that asked the model again would show. The ``charge_card`` tool appends its
call (amount and idempotency key) to the same log.

Run as a worker process::

    python tests/langchain_app.py --db PATH [--start] [--kill]

``--start`` starts the run (id ``agent-1``) first; ``--kill`` makes the process SIGKILL itself
when the engine reaches ``step.started`` for ``charge_card``: the model's answer is journaled,
the tool call it asked for has not been made. The process works until the run has ended.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

import storno
from storno import _faults, agents
from storno.agents import langchain as storno_lc

RUN_ID = "agent-1"
LOG = Path(os.environ.get("LANGCHAIN_APP_LOG", "agent.log"))


def note(line: str) -> None:
    with LOG.open("a") as log:
        log.write(line + "\n")
        log.flush()
        os.fsync(log.fileno())


def lines() -> list[str]:
    return LOG.read_text().splitlines() if LOG.exists() else []


tools = agents.ToolRegistry()


@tools.write(kind="compensable")
def charge_card(ctx: storno.StepContext, customer: str, amount: int) -> str:
    """Charge the customer's card."""
    note(f"charge {amount} {ctx.idempotency_key}")
    return f"charge-{customer}-{amount}"


@charge_card.compensation
def refund(ctx: storno.CompensationContext[str], customer: str, amount: int) -> None:
    note(f"refund {ctx.result}")


class Remembering(GenericFakeChatModel):
    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        turn = sum(isinstance(m, AIMessage) for m in messages)
        again = f"asked {turn}" in lines()
        note(f"asked {turn}")
        if turn == 0:
            args_ = {"customer": "ada", "amount": 999 if again else 120}
            call = {"id": "c1", "name": "charge_card", "args": args_, "type": "tool_call"}
            answer = AIMessage(content="", tool_calls=[call])
        else:
            answer = AIMessage(content="charged")
        return ChatResult(generations=[ChatGeneration(message=answer)])


agent = create_agent(Remembering(messages=iter(())), middleware=[storno_lc.StornoMiddleware(tools)])


@storno.saga
async def charge_agent(ctx: storno.SagaContext, prompt: str) -> str:
    result = await storno_lc.run(ctx, agent, {"messages": [("user", prompt)]})
    return str(result["messages"][-1].content)


def _kill_at_charge(name: str, details: dict[str, Any]) -> None:
    if name == "step.started" and details.get("step") == "charge_card":
        note("killed")
        os.kill(os.getpid(), signal.SIGKILL)


async def work(db: str, start: bool) -> None:
    async with storno.Storno(f"sqlite:///{db}", sagas=[charge_agent], steps=tools.steps()) as app:
        if start:
            await app.start(charge_agent.options(run_id=RUN_ID), "charge ada 120")
        async with app.worker(worker_id="w1"):
            await app.get_handle(RUN_ID).result(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--start", action="store_true")
    parser.add_argument("--kill", action="store_true")
    args = parser.parse_args()
    if args.kill:
        _faults.set_hook(_kill_at_charge)
    asyncio.run(work(args.db, args.start))
    return 0


if __name__ == "__main__":
    # Import ourselves by name so that step references recorded in the history read
    # ``langchain_app:charge_card`` (as in the test process), not ``__main__:charge_card``.
    import langchain_app

    sys.exit(langchain_app.main())
